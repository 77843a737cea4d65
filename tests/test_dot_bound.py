"""The benchmark helper that reads the dots out of a compiled program (experiments/benchmarks/dot_bound.py)."""

import jax
import jax.numpy as jnp
import pytest

from experiments.benchmarks.dot_bound import compiled_dots, program_callables, time_dots


def test_dots_are_counted_per_run_with_loop_trip_counts():
  def f(w, xs):
    def outer(c, x_row):
      def inner(c2, x):
        return c2 + jnp.dot(x, w).sum(), None
      return jax.lax.scan(inner, c, x_row)[0], None
    batched = jnp.einsum("bij,bkj->bik", xs[0], xs[0])  # a batched dot outside the loops
    return jax.lax.scan(outer, 0.0, xs)[0] + batched.sum()

  text = jax.jit(f).lower(jnp.ones((16, 8)), jnp.ones((5, 3, 4, 16))).compile().as_text()
  dots = {(d.lhs, d.rhs): d for d in compiled_dots(text)}
  loop = dots[((4, 16), (16, 8))]
  assert loop.count == 15  # 5 outer x 3 inner iterations
  assert loop.dimension_numbers == (((1,), (0,)), ((), ()))
  assert loop.flops == 2 * 4 * 16 * 8
  batched = dots[((3, 4, 16), (3, 4, 16))]
  assert batched.count == 1 and batched.dimension_numbers == (((2,), (2,)), ((0,), (0,)))
  assert batched.flops == 2 * 3 * 4 * 4 * 16


def test_timing_reports_every_execution_and_no_dot_is_an_error():
  text = jax.jit(lambda a, b: a @ b).lower(jnp.ones((8, 4)), jnp.ones((4, 2))).compile().as_text()
  out = time_dots(compiled_dots(text), repeats=1, inner=1)
  assert out["count"] == 1 and out["gflop"] == pytest.approx(2 * 8 * 4 * 2 / 1e9)
  assert out["xla_s"] > 0 and out["torch_s"] is None
  assert list(program_callables(compiled_dots(text))) == ["dots alone, XLA"]  # no torch side without torch
  program_callables(compiled_dots(text))["dots alone, XLA"]()
  with pytest.raises(ValueError, match="no dot"):
    compiled_dots(jax.jit(lambda a: a + 1).lower(jnp.ones(3)).compile().as_text())
