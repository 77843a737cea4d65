"""Test-wide setup: 8 simulated CPU devices, so mesh tests run anywhere, a cheaper LLVM
optimisation level, and one compilation cache for the whole run.

XLA reads the flags once, when jax initialises, so they are set here before any
test module imports jax.

Compiling is most of this suite's time (tests/test_sampling.py: 196 s cold, 38 s
with every program already compiled), and many tests compile programs another
test already compiled (a new `Sampler` or jitted step per test, the command-line
tests' subprocesses). JAX's persistent compilation cache, in a directory of this
run's own (inherited by the subprocesses, deleted at exit), compiles each of them
once. It is fresh for every run on purpose: JAX's cache key does not name the CPU's
instruction set, so a directory kept across machines could hand AVX-512 code to
an AVX2 CPU. Set JAX_COMPILATION_CACHE_DIR yourself to keep one between runs on
one machine.

The suite runs on every core (`-n auto --dist loadfile` in setup.cfg, pytest-xdist): a
test file runs whole in one worker, so a module fixture that trains a stage runs
once. `pytest_xdist_auto_num_workers` below picks one worker per core, at most one per
3 GiB of available memory (each worker holds JAX, 8 simulated devices and, in the
Hugging Face tests, torch); `-n 0` runs in one process, `-n K` with K workers.
"""
import atexit
import os
import shutil
import tempfile

from xla_flags import xla_flags

os.environ.setdefault("XLA_FLAGS", xla_flags(8))  # see tests/xla_flags.py
os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _cache_dir = tempfile.mkdtemp(prefix="rlhf_jax_tests_xla_cache_")
  atexit.register(shutil.rmtree, _cache_dir, ignore_errors=True)
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache_dir
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")


def pytest_xdist_auto_num_workers(config):
  del config
  from rlhf_jax.sampling import _usable_cores  # pylint: disable=import-outside-toplevel
  cores = _usable_cores()
  try:
    with open("/proc/meminfo") as f:
      avail_kib = next(int(line.split()[1]) for line in f if line.startswith("MemAvailable:"))
    by_memory = max(1, avail_kib // (3 * 1024 * 1024))
  except (OSError, StopIteration, ValueError):
    by_memory = cores
  return max(1, min(cores, by_memory))
