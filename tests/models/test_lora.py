"""LoRA adapters: identity at init, merge equals on-the-fly, only adapters train, sharded creation."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from rlhf_jax import models
from rlhf_jax import sharding as shd
from rlhf_jax.models import lora as lora_lib

CFG = models.ModelConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, mlp_dim=48, max_seq_len=32)
ALPHA, RANK = 16.0, 4


@pytest.fixture(scope="module")
def setup():
  base = jax.jit(lambda r: models.init_params(CFG, r))(jax.random.PRNGKey(0))
  lora = jax.jit(lambda r: lora_lib.init_lora(CFG, r, rank=RANK))(jax.random.PRNGKey(1))
  tokens = jax.random.randint(jax.random.PRNGKey(2), (3, 10), 0, CFG.vocab_size)
  apply_fn = models.make_apply_fn(CFG)
  return base, lora, tokens, apply_fn, lora_lib.make_lora_apply_fn(apply_fn, alpha=ALPHA)


def _randomise_b(lora, seed=3):
  """Nonzero B, so the adapters change the model."""
  rng = np.random.RandomState(seed)
  return jax.tree_util.tree_map_with_path(
      lambda p, x: rng.normal(0, 0.05, x.shape).astype(np.float32) if p[-1].key == "b" else x, lora)


def test_shapes_and_zero_init(setup):
  base, lora, tokens, apply_fn, lora_apply = setup
  wq = lora["layers"]["block"]["attn"]["wq"]
  assert wq["a"].shape == (2, 32, RANK) and wq["b"].shape == (2, RANK, 4, 8)
  wo = lora["layers"]["block"]["attn"]["wo"]
  assert wo["a"].shape == (2, 4, 8, RANK) and wo["b"].shape == (2, RANK, 32)
  assert set(lora["layers"]["block"]["mlp"]) == {"w_gate", "w_up", "w_down"}
  assert not any(np.any(np.asarray(x["b"])) for _, x in lora_lib._lora_entries(lora))
  a, _ = jax.jit(apply_fn)(base, tokens)
  b, _ = jax.jit(lora_apply)({"base": base, "lora": lora}, tokens)
  np.testing.assert_array_equal(a, b)  # B = 0: exactly the base model
  ref, _ = jax.jit(lora_apply)({"base": base}, tokens)  # the reference: base without adapters, same buffers
  np.testing.assert_array_equal(ref, a)


def test_merged_equals_on_the_fly(setup):
  base, lora, tokens, apply_fn, lora_apply = setup
  lora = _randomise_b(lora)
  on_the_fly, _ = jax.jit(lora_apply)({"base": base, "lora": lora}, tokens)
  merged = lora_lib.merge_lora(base, lora, alpha=ALPHA)
  assert jax.tree.structure(merged) == jax.tree.structure(base)
  out, _ = jax.jit(apply_fn)(merged, tokens)
  np.testing.assert_allclose(out, on_the_fly, rtol=1e-5, atol=1e-5)
  plain, _ = jax.jit(apply_fn)(base, tokens)
  assert float(jnp.abs(out - plain).max()) > 1e-3  # the adapters do something
  # The merge by hand for one weight: W + alpha/r * A @ B.
  ab = lora["layers"]["block"]["mlp"]["w_up"]
  want = base["layers"]["block"]["mlp"]["w_up"] + ALPHA / RANK * jnp.einsum("lir,lro->lio", ab["a"], ab["b"])
  np.testing.assert_allclose(merged["layers"]["block"]["mlp"]["w_up"], want, rtol=1e-6, atol=1e-6)
  # Untouched leaves are passed through.
  assert merged["embedding"].dtype == base["embedding"].dtype
  np.testing.assert_array_equal(merged["embedding"], base["embedding"])


def _loss(apply_fn, params, tokens):
  logits, _ = apply_fn(params, tokens)
  logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32))
  return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], -1))


def test_gradients_reach_only_the_adapters(setup):
  base, lora, tokens, _, lora_apply = setup
  grads = jax.jit(jax.grad(lambda p: _loss(lora_apply, p, tokens)))({"base": base, "lora": lora})
  assert all(not np.any(np.asarray(g)) for g in jax.tree.leaves(grads["base"]))
  # At B = 0 the gradient flows into B (dL/dB = A^T dL/dW'), not yet into A.
  for _, ab in lora_lib._lora_entries(grads["lora"]):
    assert np.any(np.asarray(ab["b"])) and not np.any(np.asarray(ab["a"]))


def test_a_few_optax_steps_reduce_the_loss_and_keep_the_base(setup):
  base, lora, tokens, _, lora_apply = setup
  tx = lora_lib.lora_optimizer(optax.adam(1e-2))
  params = {"base": base, "lora": lora}
  opt_state = tx.init(params)
  # The frozen base carries no optimizer state.
  assert sum(x.size for x in jax.tree.leaves(opt_state)) < 3 * sum(x.size for x in jax.tree.leaves(lora)) + 10

  @jax.jit
  def step(params, opt_state):
    loss, grads = jax.value_and_grad(lambda p: _loss(lora_apply, p, tokens))(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  losses = []
  for _ in range(15):
    params, opt_state, loss = step(params, opt_state)
    losses.append(float(loss))
  assert losses[-1] < losses[0] - 0.3
  jax.tree.map(np.testing.assert_array_equal, params["base"], base)


def test_logical_axes_and_sharded_creation(setup):
  _, lora, _, _, _ = setup
  axes = lora_lib.lora_logical_axes(CFG)
  wq = {"a": P("layers", "embed", None), "b": P("layers", None, "heads", "kv")}
  assert axes["layers"]["block"]["attn"]["wq"] == wq
  assert axes["layers"]["block"]["mlp"]["w_down"] == {"a": P("layers", "mlp", None), "b": P("layers", None, "embed")}
  assert jax.tree.structure(axes, is_leaf=lambda x: isinstance(x, P)) == jax.tree.structure(lora)
  mesh = shd.make_mesh((2, 2, 2))
  sharded, shardings = shd.init_sharded(lambda r: lora_lib.init_lora(CFG, r, rank=RANK), axes, mesh,
                                        jax.random.PRNGKey(1))
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(sharded), jax.device_get(lora))
  a = sharded["layers"]["block"]["attn"]["wq"]["a"]
  assert a.addressable_shards[0].data.shape == (2, 16, RANK)  # embed over fsdp=2


def test_unscanned_layers_and_target_subset():
  cfg = models.ModelConfig(**{**CFG.__dict__, "scan_layers": False})
  base = jax.jit(lambda r: models.init_params(cfg, r))(jax.random.PRNGKey(0))
  lora = lora_lib.init_lora(cfg, jax.random.PRNGKey(1), rank=2, targets=("attn/wq", "attn/wv"))
  assert set(lora) == {"layer_0", "layer_1"} and set(lora["layer_0"]["attn"]) == {"wq", "wv"}
  assert lora["layer_1"]["attn"]["wq"]["a"].shape == (32, 2)
  merged = lora_lib.merge_lora(base, _randomise_b(lora), alpha=4.0)
  np.testing.assert_array_equal(merged["layer_0"]["attn"]["wk"], base["layer_0"]["attn"]["wk"])
  assert np.any(np.asarray(merged["layer_0"]["attn"]["wq"] != base["layer_0"]["attn"]["wq"]))


def test_bad_input_is_named(setup):
  base, lora, tokens, _, lora_apply = setup
  with pytest.raises(ValueError, match="targets"):
    lora_lib.init_lora(CFG, jax.random.PRNGKey(0), rank=2, targets=("attn/wx",))
  with pytest.raises(ValueError, match="rank"):
    lora_lib.init_lora(CFG, jax.random.PRNGKey(0), rank=0)
  other = lora_lib.init_lora(models.ModelConfig(**{**CFG.__dict__, "dim": 64}), jax.random.PRNGKey(0), rank=2)
  with pytest.raises(ValueError, match="do not fit the weight"):
    lora_lib.apply_lora(base, other, alpha=1.0)
  with pytest.raises(ValueError, match="base"):
    lora_apply(base, tokens)
