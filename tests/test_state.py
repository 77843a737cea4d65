"""TrainState and the optimizer factory: schedules, clipping, weight-decay mask."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from rlhf_jax import state as state_lib

LR, WARMUP, TOTAL, END = 1e-3, 10, 110, 0.1


def _params():
  return {
      "dense": {"kernel": jnp.ones((3, 4)), "bias": jnp.ones((4,))},
      "attn_norm": {"scale": jnp.ones((4,))},
      "layers": {"mlp": {"kernel": jnp.ones((2, 4, 4))}},
      "final_layernorm": {"weight": jnp.ones((4, 4))},  # named norm, 2-D
      "embed": jnp.ones((5, 4)),
      "vec": jnp.ones((4,)),  # 1-D, no telling name
  }


@pytest.mark.parametrize("schedule", ["cosine", "linear", "constant"])
def test_schedule_values(schedule):
  fn = state_lib.make_schedule(learning_rate=LR, schedule=schedule,
                               warmup_steps=WARMUP, total_steps=TOTAL,
                               end_lr_ratio=END)
  np.testing.assert_allclose(fn(0), 0.0, atol=1e-12)
  np.testing.assert_allclose(fn(WARMUP // 2), LR / 2, rtol=1e-6)
  np.testing.assert_allclose(fn(WARMUP), LR, rtol=1e-6)
  end = LR if schedule == "constant" else LR * END
  np.testing.assert_allclose(fn(TOTAL), end, rtol=1e-6)
  np.testing.assert_allclose(fn(TOTAL + 50), end, rtol=1e-6)  # stays there
  mid = WARMUP + (TOTAL - WARMUP) // 2
  expected_mid = {"cosine": LR * END + (LR - LR * END) * 0.5,  # cos(pi/2) = 0
                  "linear": (LR + LR * END) / 2, "constant": LR}[schedule]
  np.testing.assert_allclose(fn(mid), expected_mid, rtol=1e-6)
  if schedule == "cosine":
    t = WARMUP + 25
    u = 25 / (TOTAL - WARMUP)
    ref = LR * END + (LR - LR * END) * 0.5 * (1 + math.cos(math.pi * u))
    np.testing.assert_allclose(fn(t), ref, rtol=1e-6)


def test_no_warmup_starts_at_peak():
  fn = state_lib.make_schedule(learning_rate=LR, schedule="cosine",
                               warmup_steps=0, total_steps=10)
  np.testing.assert_allclose(fn(0), LR, rtol=1e-6)


@pytest.mark.parametrize("kwargs, match", [
    (dict(schedule="exp"), "schedule"),
    (dict(learning_rate=0.0), "learning_rate"),
    (dict(warmup_steps=200), "warmup_steps"),
    (dict(end_lr_ratio=2.0), "end_lr_ratio"),
])
def test_schedule_rejects_bad_arguments(kwargs, match):
  args = dict(learning_rate=LR, warmup_steps=WARMUP, total_steps=TOTAL)
  args.update(kwargs)
  with pytest.raises(ValueError, match=match):
    state_lib.make_schedule(**args)


def test_optimizer_rejects_bad_arguments():
  with pytest.raises(ValueError, match="name"):
    state_lib.make_optimizer(learning_rate=LR, total_steps=5, name="lamb")
  with pytest.raises(ValueError, match="weight_decay"):
    state_lib.make_optimizer(learning_rate=LR, total_steps=5, weight_decay=-1.0)


def test_current_learning_rate_follows_schedule():
  tx = state_lib.make_optimizer(learning_rate=LR, warmup_steps=WARMUP,
                                total_steps=TOTAL, end_lr_ratio=END)
  fn = state_lib.make_schedule(learning_rate=LR, warmup_steps=WARMUP,
                               total_steps=TOTAL, end_lr_ratio=END)
  state = state_lib.create_train_state(_params(), tx, jax.random.PRNGKey(0))
  step = jax.jit(lambda s, g: state_lib.apply_gradients(s, g, tx))
  grads = jax.tree.map(jnp.ones_like, state.params)
  for t in range(WARMUP + 3):
    state = step(state, grads)
    # The logged rate is the one the update at count t used.
    np.testing.assert_allclose(state_lib.current_learning_rate(state.opt_state),
                               fn(t), rtol=1e-6)
  assert int(state.step) == WARMUP + 3
  with pytest.raises(ValueError, match="learning_rate"):
    state_lib.current_learning_rate(optax.adam(1e-3).init(_params()))


def test_weight_decay_mask_excludes_norms_biases_and_vectors():
  mask = state_lib.weight_decay_mask(_params())
  assert mask == {
      "dense": {"kernel": True, "bias": False},
      "attn_norm": {"scale": False},
      "layers": {"mlp": {"kernel": True}},
      "final_layernorm": {"weight": False},
      "embed": True,
      "vec": False,
  }


def test_weight_decay_only_touches_masked_leaves():
  # With zero gradients Adam's update is 0, so the only change is decay.
  wd = 0.5
  tx = state_lib.make_optimizer(learning_rate=0.1, schedule="constant",
                                total_steps=10, weight_decay=wd, grad_clip=None)
  params = _params()
  state = state_lib.create_train_state(params, tx, jax.random.PRNGKey(0))
  zero = jax.tree.map(jnp.zeros_like, params)
  new = state_lib.apply_gradients(state, zero, tx).params
  mask = state_lib.weight_decay_mask(params)
  for p, n, m in zip(jax.tree.leaves(params), jax.tree.leaves(new),
                     jax.tree.leaves(mask)):
    expected = p * (1 - 0.1 * wd) if m else p
    np.testing.assert_allclose(n, expected, rtol=1e-6)


def test_grad_clipping_is_active():
  # SGD without momentum makes the update -lr * clipped(g), easy to check.
  clip = 1.0
  tx = state_lib.make_optimizer(learning_rate=1.0, schedule="constant",
                                total_steps=10, grad_clip=clip, name="sgd", b1=0.0)
  params = {"w": jnp.zeros((4,)), "v": jnp.zeros((2, 2))}
  grads = {"w": jnp.full((4,), 3.0), "v": jnp.full((2, 2), 4.0)}
  norm = float(optax.global_norm(grads))
  assert norm > clip
  state = state_lib.create_train_state(params, tx, jax.random.PRNGKey(0))
  new = state_lib.apply_gradients(state, grads, tx)
  np.testing.assert_allclose(optax.global_norm(new.params), clip, rtol=1e-6)
  np.testing.assert_allclose(new.params["w"], -3.0 * clip / norm, rtol=1e-6)
  # A gradient under the threshold is untouched.
  small = jax.tree.map(lambda g: g * 0.01, grads)
  new = state_lib.apply_gradients(state, small, tx)
  np.testing.assert_allclose(new.params["w"], -0.03, rtol=1e-6)


def test_adamw_matches_optax_reference():
  kw = dict(b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1)
  tx = state_lib.make_optimizer(learning_rate=1e-2, schedule="constant",
                                total_steps=10, grad_clip=None, **kw)
  ref = optax.adamw(1e-2, mask=state_lib.weight_decay_mask, **kw)
  params = _params()
  grads = jax.tree.map(lambda p: jnp.arange(p.size, dtype=p.dtype).reshape(p.shape)
                       / p.size - 0.3, params)
  s, r = tx.init(params), ref.init(params)
  p1, p2 = params, params
  for _ in range(3):
    u1, s = tx.update(grads, s, p1)
    u2, r = ref.update(grads, r, p2)
    p1, p2 = optax.apply_updates(p1, u1), optax.apply_updates(p2, u2)
  for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p2)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_create_train_state_fields_and_typed_key():
  tx = state_lib.make_optimizer(learning_rate=LR, total_steps=10)
  s = state_lib.create_train_state(_params(), tx, jax.random.key(3))
  assert s.step.dtype == jnp.int32 and s.step.shape == ()
  assert s.rng.dtype == jnp.uint32 and s.rng.shape == (2,)
  np.testing.assert_array_equal(s.rng, jax.random.PRNGKey(3))
  with pytest.raises(ValueError, match="rng"):
    state_lib.create_train_state(_params(), tx, jnp.zeros((2,), jnp.float32))
  # It is a pytree that jit and tree utilities handle.
  out = jax.jit(lambda st: st.replace(step=st.step + 1))(s)
  assert int(out.step) == 1


# --- the non-finite guard -------------------------------------------------------------
def _assert_tree_bitwise(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_nonfinite_loss_gradient_or_update_skips_the_update_in_one_trace():
  tx = state_lib.make_optimizer(learning_rate=1e-2, total_steps=10, weight_decay=0.1)
  params = _params()
  state = state_lib.create_train_state(params, tx, jax.random.PRNGKey(0))
  grads = jax.tree.map(lambda p: jnp.arange(p.size, dtype=p.dtype).reshape(p.shape) / p.size - 0.3, params)
  traces = []

  @jax.jit
  def step(state, grads, loss):
    traces.append(1)
    return state_lib.apply_gradients_with_status(state, grads, tx, loss=loss)

  # A finite step is the unguarded optax update (to float rounding: XLA fuses the two programs differently).
  new, skipped = step(state, grads, jnp.float32(1.5))
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  assert float(skipped) == 0.0 and int(new.step) == 1
  for got, want in ((new.params, optax.apply_updates(state.params, updates)), (new.opt_state, opt_state)):
    for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
      np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6, atol=1e-9)
  assert not np.array_equal(new.params["embed"], params["embed"])  # it did move

  nan_grads = dict(grads, vec=grads["vec"].at[2].set(jnp.nan))
  inf_grads = dict(grads, embed=grads["embed"].at[0, 0].set(-jnp.inf))
  for bad_grads, loss in ((nan_grads, 1.5), (inf_grads, 1.5), (grads, jnp.inf), (grads, jnp.nan)):
    out, skipped = step(new, bad_grads, jnp.float32(loss))
    assert float(skipped) == 1.0
    assert int(out.step) == int(new.step) + 1  # the step still advances
    _assert_tree_bitwise(out.params, new.params)  # params and optimizer state untouched
    _assert_tree_bitwise(out.opt_state, new.opt_state)
  assert len(traces) == 1  # values, not Python branches, decide


def test_infinite_learning_rate_update_is_skipped():
  # Finite gradients, but the optimizer turns them into an infinite update.
  tx = state_lib.make_optimizer(learning_rate=math.inf, schedule="constant", total_steps=10)
  params = _params()
  state = state_lib.create_train_state(params, tx, jax.random.PRNGKey(0))
  grads = jax.tree.map(lambda p: jnp.full_like(p, 0.5), params)
  new, skipped = jax.jit(lambda s, g: state_lib.apply_gradients_with_status(s, g, tx))(state, grads)
  assert float(skipped) == 1.0
  _assert_tree_bitwise(new.params, params)


@pytest.mark.parametrize("name", ["lion", "adafactor", "inject_hyperparams_adamw", "multisteps"])
def test_guard_with_other_optax_transformations(name):
  # The guard works for any optax transformation: an applied step is the unguarded update, with each state leaf
  # in the promotion of its old and new dtypes (inject_hyperparams returns a bfloat16 parameter's Adam moments in
  # float32); a skipped step leaves everything bit-identical, in those dtypes.
  tx = {"lion": optax.lion(1e-3), "adafactor": optax.adafactor(1e-2),
        "inject_hyperparams_adamw": optax.inject_hyperparams(optax.adamw)(learning_rate=1e-2),
        "multisteps": optax.MultiSteps(optax.adam(1e-2), every_k_schedule=2)}[name]
  params = dict(_params(), half=jnp.ones((3, 2), jnp.bfloat16))
  state = state_lib.create_train_state(params, tx, jax.random.PRNGKey(0))
  grads = jax.tree.map(lambda p: (jnp.arange(p.size, dtype=jnp.float32).reshape(p.shape) / p.size - 0.3)
                       .astype(p.dtype), params)
  step = jax.jit(lambda s, g: state_lib.apply_gradients_with_status(s, g, tx))
  new, skipped = step(state, grads)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  assert float(skipped) == 0.0
  for got, want in ((new.params, optax.apply_updates(state.params, updates)), (new.opt_state, opt_state)):
    for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
      assert x.dtype == y.dtype
      rtol = 1e-6 if x.dtype != jnp.bfloat16 else 2 ** -7  # XLA fuses the two programs differently: 1 bf16 ulp
      np.testing.assert_allclose(np.asarray(x, np.float64), np.asarray(y, np.float64), rtol=rtol, atol=1e-9)
  out, skipped = step(new, jax.tree.map(lambda g: g * jnp.nan, grads))
  assert float(skipped) == 1.0
  _assert_tree_bitwise(out.params, new.params)
  _assert_tree_bitwise(out.opt_state, new.opt_state)


def test_apply_gradients_keeps_its_signature_and_is_guarded():
  tx = state_lib.make_optimizer(learning_rate=1e-2, total_steps=10)
  state = state_lib.create_train_state(_params(), tx, jax.random.PRNGKey(0))
  nan_grads = jax.tree.map(lambda p: jnp.full_like(p, jnp.nan), state.params)
  new = jax.jit(lambda s, g: state_lib.apply_gradients(s, g, tx))(state, nan_grads)
  assert isinstance(new, state_lib.TrainState) and int(new.step) == 1
  _assert_tree_bitwise(new.params, state.params)
  new = state_lib.apply_gradients(state, nan_grads, tx, loss=jnp.float32(0.0))
  _assert_tree_bitwise(new.params, state.params)
