"""Shared helpers of the model benchmarks: thread pinning, timing, peers.

Both sides of every comparison run in the same process, on the same number of
threads, with warm-up (and compilation) excluded and the median of several
timed repeats reported. The torch side is optional: without torch installed
(use the bench venv, see README.md) its rows are printed as "n/a".
"""
from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from typing import Callable, Iterator


def set_threads(n: int) -> None:
  """Pin every runtime to `n` threads; must run before jax/numpy/torch import."""
  for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ.setdefault(var, str(n))
  # torch's OpenMP workers spin-wait by default; on a shared, oversubscribed
  # machine that makes torch 5-10x slower than it is (measured: HF generate
  # 16.7 s -> 1.65 s at load ~6). Passive waiting is the fair setting for it.
  os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
  # XLA:CPU sizes its thread pool from the visible cores; the benchmark machine
  # has exactly `n` (checked by the callers against os.cpu_count()).
  os.environ.setdefault("JAX_PLATFORMS", "cpu")


def load_average() -> str:
  """The 1/5/15-minute load averages (the machine is shared; report them)."""
  try:
    return " / ".join(f"{x:.2f}" for x in os.getloadavg())
  except OSError:
    return "n/a"


def time_calls(fn: Callable[[], object], *, warmup: int, repeats: int) -> tuple[float, list[float]]:
  """Median wall-clock seconds of `fn()` over `repeats` timed calls after `warmup` untimed ones.

  `fn` must block until its result is ready (call `block_until_ready`).
  """
  for _ in range(warmup):
    fn()
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return statistics.median(times), times


def time_interleaved(fns: dict[str, Callable[[], object]], *, warmup: int, repeats: int) -> dict[str, float]:
  """Median seconds of each blocking `fn()`, timing them in turns (a, b, a, b, ...).

  Alternating the sides spreads the drift of a shared machine's load evenly
  over them, instead of handing one side a quiet minute and the other a busy one.
  """
  for fn in fns.values():
    for _ in range(warmup):
      fn()
  times = {name: [] for name in fns}
  for _ in range(repeats):
    for name, fn in fns.items():
      t0 = time.perf_counter()
      fn()
      times[name].append(time.perf_counter() - t0)
  return {name: statistics.median(ts) for name, ts in times.items()}


def try_import_torch(threads: int):
  """torch and transformers' Llama, or (None, reason) when the bench venv is not used."""
  try:
    import torch
    import transformers  # noqa: F401
  except ImportError as e:  # the default venv has no torch
    return None, f"torch/transformers not importable ({e.name}); use .venv-bench"
  torch.set_num_threads(threads)
  return torch, None


def hf_llama(cfg, torch, *, seed: int = 0):
  """An HF LlamaForCausalLM with our ModelConfig's shapes and random weights (no download)."""
  from transformers import LlamaConfig, LlamaForCausalLM
  hf_cfg = LlamaConfig(
      vocab_size=cfg.vocab_size, hidden_size=cfg.dim, intermediate_size=cfg.mlp_dim,
      num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads,
      head_dim=cfg.head_dim, max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps,
      rope_theta=cfg.rope_theta, tie_word_embeddings=cfg.tie_embeddings, hidden_act="silu",
      attention_bias=False, mlp_bias=False, bos_token_id=None, eos_token_id=None, pad_token_id=None)
  hf_cfg._attn_implementation = "sdpa"
  torch.manual_seed(seed)
  model = LlamaForCausalLM(hf_cfg)
  return model.float()


def markdown_table(header: list[str], rows: list[list[object]]) -> str:
  def fmt(x):
    if isinstance(x, float):
      return f"{x:,.1f}" if abs(x) >= 10 else f"{x:.3g}"
    return str(x)
  lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
  lines += ["| " + " | ".join(fmt(x) for x in r) + " |" for r in rows]
  return "\n".join(lines)


REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run_config(config: str, workdir: str, args: list[str], log) -> float:
  """`python -m experiments.run --config=CONFIG --workdir=WORKDIR ARGS` with its output into `log`; seconds taken.

  Exits (naming the command and the log) if the run fails: the harnesses resume from finished runs.
  """
  cmd = [sys.executable, "-m", "experiments.run", f"--config={config}", f"--workdir={workdir}"] + list(args)
  log.write("$ " + " ".join(cmd) + "\n")
  log.flush()
  start = time.time()
  proc = subprocess.run(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, check=False)
  if proc.returncode:
    raise SystemExit(f"run failed ({proc.returncode}): {' '.join(cmd)}; see {log.name}")
  print(f"  done in {time.time() - start:.0f} s: {workdir}", flush=True)
  return time.time() - start


def link(src: str, dst: str) -> None:
  """Symlink a finished stage directory `src` into a run directory (a shared base), once."""
  if os.path.isdir(src) and not os.path.lexists(dst):
    os.symlink(os.path.abspath(src), dst)


def sampler_prefill(sampler, params, tokens, mask, keys: Iterator) -> Callable[[], None]:
  """A callable that runs `sampler`'s prefill as its `__call__` does: one call per host-thread group of prompts
  (`Sampler.groups`), the groups concurrently, so it times (and reuses) the sampler's compiled prefill."""
  import concurrent.futures
  import jax
  groups = sampler.groups(tokens.shape[0])
  pool = concurrent.futures.ThreadPoolExecutor(len(groups))

  def group(g, key):
    rows, offset, total = g
    out = sampler._prefill(  # pylint: disable=protected-access
        params, tokens[rows], mask[rows], key, offset, total_rows=total)
    jax.block_until_ready(out.tokens)

  def run():
    key = next(keys)
    list(pool.map(lambda g: group(g, key), groups))

  return run
