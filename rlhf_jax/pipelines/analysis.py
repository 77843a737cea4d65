"""R² of reward-model scores against the sandbox's truth, per filtration strategy (PF-PPO Table 1)."""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax import selection

TABLE1_STRATEGIES = ("none", "best_of_n", "best_random", "best_worst")


def r2_diagnostics(rewards_PxN: np.ndarray, truth_PxN: np.ndarray, weights_PxN: np.ndarray, *,
                   bins: int) -> dict[str, float]:
  """Unbinned and binned R² on the kept samples, and the RM–truth correlation on all samples."""
  r, s = jnp.asarray(rewards_PxN).reshape(-1), jnp.asarray(truth_PxN, jnp.float32).reshape(-1)
  kept = (jnp.asarray(weights_PxN).reshape(-1) > 0).astype(jnp.float32)
  corr2 = float(selection.r_squared(r, s))
  sign = np.sign(np.corrcoef(np.asarray(r), np.asarray(s))[0, 1]) if np.std(s) > 0 and np.std(r) > 0 else 0.0
  return {"filter/r2": float(selection.r_squared(r, s, kept)),
          "filter/r2_binned": float(selection.binned_r_squared(r, s, kept, bins=bins)),
          "true/rm_corr": float(sign * np.sqrt(max(corr2, 0.0)))}


def r2_table(rewards_PxN: np.ndarray, truth_PxN: np.ndarray, *, bins: int, key: Optional[jax.Array] = None,
             strategies=TABLE1_STRATEGIES) -> dict[str, dict[str, float]]:
  """{strategy: {"r2", "r2_binned", "kept"}} over the same rollouts (the paper's Table 1)."""
  n = rewards_PxN.shape[1]
  key = jax.random.PRNGKey(0) if key is None else key
  out = {}
  for strategy in strategies:
    if n < 2 and strategy != "none":
      continue
    w = selection.filtration_weights(jnp.asarray(rewards_PxN), strategy=strategy, key=key)
    mask = (w.reshape(-1) > 0).astype(jnp.float32)
    r, s = jnp.asarray(rewards_PxN).reshape(-1), jnp.asarray(truth_PxN, jnp.float32).reshape(-1)
    out[strategy] = {"r2": float(selection.r_squared(r, s, mask)),
                     "r2_binned": float(selection.binned_r_squared(r, s, mask, bins=bins)),
                     "kept": int(mask.sum())}
  return out
