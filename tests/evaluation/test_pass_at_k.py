"""Tests for rlhf_jax.evaluation.metrics.pass_at_k."""
import itertools
import math
from fractions import Fraction

import numpy as np
import pytest

from rlhf_jax.evaluation.metrics import pass_at_k


def _brute(n, c, k):
  """Fraction of k-subsets of n samples (c correct) with a correct sample."""
  samples = [1] * c + [0] * (n - c)
  subsets = list(itertools.combinations(range(n), k))
  return sum(any(samples[i] for i in s) for s in subsets) / len(subsets)


def test_pass_at_k_matches_subset_enumeration():
  for n in range(1, 8):
    for c in range(n + 1):
      for k in range(1, n + 1):
        assert abs(pass_at_k(n, c, k) - _brute(n, c, k)) < 1e-12


def test_pass_at_k_vectorised_and_edge_cases():
  n = np.array([5, 10, 10, 3])
  c = np.array([0, 10, 2, 1])
  got = pass_at_k(n, c, 2)
  want = [_brute(5, 0, 2), 1.0, _brute(10, 2, 2), _brute(3, 1, 2)]
  np.testing.assert_allclose(got, want, rtol=1e-12)
  assert pass_at_k(10, 9, 2) == 1.0           # n − c < k
  assert pass_at_k(10, 0, 10) == 0.0
  assert pass_at_k(10, 3, 1) == pytest.approx(0.3)
  with pytest.raises(ValueError):
    pass_at_k(3, 4, 1)
  with pytest.raises(ValueError):
    pass_at_k(3, 1, 4)


def test_pass_at_k_large_n_is_exact():
  for c in (0, 1, 7, 100, 190, 199, 200):
    for k in (1, 10, 100):
      want = (Fraction(1) - Fraction(math.comb(200 - c, k), math.comb(200, k))
              if 200 - c >= k else Fraction(1))
      assert pass_at_k(200, c, k) == pytest.approx(float(want), rel=1e-12,
                                                   abs=1e-15)
