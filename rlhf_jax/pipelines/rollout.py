"""Host-side rollout helpers: sample completions for text prompts, grade them in the sandbox."""

from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

import jax
import numpy as np

from rlhf_jax import sharding as shd
from rlhf_jax.execution import execute_many
from rlhf_jax.sampling import SampleOutput, Sampler
from rlhf_jax.tasks import minicode
from rlhf_jax.tokenizer import Tokenizer, encode_prompts

SANDBOX_TIMEOUT_S = 3.0
SANDBOX_MEMORY_MB = 512


def sample_texts(sampler: Sampler, params: Any, tok: Tokenizer, prompts: Sequence[str], *, batch_size: int,
                 max_prompt_len: int, rng: jax.Array, mesh=None) -> tuple[list[str], list[SampleOutput]]:
  """Completions (N per prompt, prompt-major) for any number of prompts.

  Prompts go through the compiled sampler in fixed-size batches (the last one
  padded by repetition), so nothing recompiles.
  """
  n = sampler.sampling.num_samples
  texts: list[str] = []
  outs = []
  for i in range(0, len(prompts), batch_size):
    chunk = list(prompts[i:i + batch_size])
    real = len(chunk)
    chunk += [chunk[-1]] * (batch_size - real)
    pt, pm = encode_prompts(tok, chunk, max_prompt_len)
    if mesh is not None:
      pt, pm = shd.shard_batch((pt, pm), mesh)
    out = sampler(params, pt, pm, jax.random.fold_in(rng, i))
    toks, mask = jax.device_get((out.completion_tokens, out.completion_mask))
    for r in range(real * n):
      texts.append(tok.decode(np.asarray(toks[r])[np.asarray(mask[r]) > 0]))
    outs.append(out)
  return texts, outs


def grade_minicode(problems: Sequence[Mapping[str, Any]], completions: Sequence[str], *,
                   n: int = 1) -> np.ndarray:
  """1.0 where the completion passes all hidden tests (sandboxed), shape [len(problems) * n]."""
  programs = [minicode.program_for(problems[i // n], c) for i, c in enumerate(completions)]
  results = execute_many(programs, timeout_s=SANDBOX_TIMEOUT_S, memory_mb=SANDBOX_MEMORY_MB)
  return np.asarray([float(r.passed) for r in results], np.float32)


def greedy_pass_at_1(sampler: Sampler, params: Any, tok: Tokenizer, problems: Sequence[Mapping[str, Any]], *,
                     batch_size: int, max_prompt_len: int, mesh=None, rng: Optional[jax.Array] = None) -> float:
  """Greedy pass@1 of a policy on MiniCode problems (sampler must be greedy, N = 1)."""
  if sampler.sampling.temperature != 0.0 or sampler.sampling.num_samples != 1:
    raise ValueError("greedy_pass_at_1 needs a greedy sampler with num_samples=1")
  texts, _ = sample_texts(sampler, params, tok, [p["prompt"] for p in problems], batch_size=batch_size,
                          max_prompt_len=max_prompt_len, rng=jax.random.PRNGKey(0) if rng is None else rng,
                          mesh=mesh)
  return float(np.mean(grade_minicode(problems, texts)))
