"""Evaluation metrics computed on the host (numpy)."""
from __future__ import annotations

import numpy as np


def pass_at_k(n, c, k):
  """Unbiased pass@k estimator (Chen et al. 2021, "Codex").

    pass@k = 1 − C(n − c, k) / C(n, k) = 1 − Π_{i = n−c+1}^{n} (1 − k / i)

  evaluated as the product (in log space, vectorised) so it stays accurate for
  large n where the binomials overflow. It is 1 when n − c < k (every k-subset
  contains a correct sample).

  Args:
    n: number of samples per problem (int or array of ints).
    c: number of correct samples (int or array broadcastable with n).
    k: the k of pass@k (int, 1 ≤ k ≤ n).

  Returns:
    float64 array of the broadcast shape of n and c (a Python float for scalar
    inputs).
  """
  n_arr = np.asarray(n)
  c_arr = np.asarray(c)
  if not (np.issubdtype(n_arr.dtype, np.integer) and
          np.issubdtype(c_arr.dtype, np.integer)):
    raise ValueError("`n` and `c` must be integers.")
  if int(k) != k or k < 1:
    raise ValueError(f"`k` must be a positive integer, got {k}.")
  n_arr, c_arr = np.broadcast_arrays(n_arr.astype(np.int64),
                                     c_arr.astype(np.int64))
  if np.any(c_arr < 0) or np.any(c_arr > n_arr):
    raise ValueError("`c` must satisfy 0 <= c <= n.")
  if np.any(n_arr < k):
    raise ValueError(f"`n` must be >= k = {k}.")
  flat_n = n_arr.reshape(-1)
  flat_c = c_arr.reshape(-1)
  max_n = int(flat_n.max()) if flat_n.size else 0
  i = np.arange(1, max_n + 1, dtype=np.float64)[None, :]        # [1, max_n]
  # Factor i enters for n − c < i ≤ n; all such i exceed k when n − c ≥ k.
  in_range = (i > (flat_n - flat_c)[:, None]) & (i <= flat_n[:, None])
  all_fail = (flat_n - flat_c) < k
  safe = np.where(in_range & ~all_fail[:, None], 1.0 - k / i, 1.0)
  log_prod = np.sum(np.log(safe), axis=1)
  out = np.where(all_fail, 1.0, 0.0 - np.expm1(log_prod)).reshape(n_arr.shape)
  return float(out) if out.ndim == 0 else out
