"""XLA flags of the test processes: conftest's for the suite, and the command-line tests' subprocesses.

LLVM's optimisation level 1 without its expensive passes: XLA's own HLO passes, fusion decisions and
matmul library calls are unchanged, only the machine code of the fused loops gets less LLVM optimisation.
Compiling is most of this suite's time, and with these flags a subset of the suite ran in 95 s (106 s with
level 1 alone) against 127–134 s with XLA's defaults (experiments/RESULTS.md, 3 Dec 2026). Level 0 compiled
faster still but ran the code 2x slower and moved a sampler log-prob by 1e-4, so it is not used.
`XLA_FLAGS=--xla_force_host_platform_device_count=8` set by hand tests with XLA's default optimisation
(conftest keeps an XLA_FLAGS that is already set; the subprocesses then get their device count without
the compile flags).
"""
from __future__ import annotations

import os
from typing import Optional

COMPILE = "--xla_backend_optimization_level=1 --xla_llvm_disable_expensive_passes=true"


def xla_flags(devices: Optional[int] = None) -> str:
  """XLA_FLAGS for a test process: the compile flags, and `devices` simulated CPU devices when given.

  The compile flags are left out when this process's XLA_FLAGS were set by hand without them, so a
  suite run with XLA's default optimisation runs its subprocesses with it too.
  """
  compile_flags = COMPILE if COMPILE in os.environ.get("XLA_FLAGS", COMPILE) else ""
  device_flag = "" if devices is None else f"--xla_force_host_platform_device_count={devices}"
  return " ".join(f for f in (device_flag, compile_flags) if f)
