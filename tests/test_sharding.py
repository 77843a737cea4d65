"""Sharded equals unsharded: an SFT step, a PPO score pass and the sampler on a (2,2,2) CPU mesh."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax import models, sharding as shd
from rlhf_jax.pipelines import common
from rlhf_jax.sampling import Sampler, SamplingParams
from rlhf_jax.state import make_optimizer
from rlhf_jax.steps import make_sft_step
from rlhf_jax.tokenizer import ByteTokenizer, encode_pairs, encode_prompts

TOK = ByteTokenizer()


def test_mesh_shape_resolution():
  assert shd.resolve_mesh_shape((-1, 2, 2), 8) == (2, 2, 2)
  assert shd.resolve_mesh_shape((-1, 1, 1), 8) == (8, 1, 1)
  with pytest.raises(ValueError, match="at most one -1"):
    shd.resolve_mesh_shape((-1, -1, 2), 8)
  with pytest.raises(ValueError, match="needs 4 devices"):
    shd.resolve_mesh_shape((2, 2, 1), 8)


@pytest.fixture(scope="module")
def setup():
  assert jax.device_count() == 8, "tests/conftest.py sets 8 simulated CPU devices"
  cfg = models.get_model_config("tiny")
  meshes = {"one": shd.make_mesh((1, 1, 1), devices=jax.devices()[:1]), "eight": shd.make_mesh((2, 2, 2))}
  return cfg, meshes


def _sft_run(cfg, mesh, batch, steps=3):
  tx = make_optimizer(learning_rate=1e-3, schedule="constant", total_steps=10)
  state, sh = common.create_state(lambda r: models.init_params(cfg, r), models.logical_axes(cfg), tx, mesh,
                                  jax.random.PRNGKey(0))
  bsh = shd.batch_sharding(mesh, 2)
  step = jax.jit(make_sft_step(models.make_apply_fn(cfg), tx), in_shardings=(sh, {k: bsh for k in batch}),
                 out_shardings=(sh, shd.replicated(mesh)), donate_argnums=0)
  losses = []
  for _ in range(steps):
    state, m = step(state, shd.shard_batch(batch, mesh))
    losses.append(float(m["train/loss"]))
  return state, losses


def test_sft_step_sharded_equals_single_device(setup):
  cfg, meshes = setup
  batch = encode_pairs(TOK, [f"prompt {i}" for i in range(8)], [f"answer {i * 7}" for i in range(8)], 16, 16)
  s1, l1 = _sft_run(cfg, meshes["one"], batch)
  s8, l8 = _sft_run(cfg, meshes["eight"], batch)
  np.testing.assert_allclose(l1, l8, rtol=1e-5, atol=1e-5)
  wq = s8.params["layers"]["block"]["attn"]["wq"]
  assert wq.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None)
  # Adam amplifies 1e-8 gradient differences into ~1e-4 parameter differences (ENVIRONMENT.md).
  for a, b in zip(jax.tree.leaves(s1.params), jax.tree.leaves(s8.params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-4)


def test_bf16_sft_step_sharded_matches_single_device(setup):
  # bfloat16 compute on the CPU takes the float32-accumulating matmul (custom VJP, optimization barriers,
  # a flattened transpose): it must partition on the mesh and give the single-device losses up to
  # bfloat16 rounding (summation order differs between the two layouts).
  _, meshes = setup
  cfg = models.get_model_config("tiny", dtype="bfloat16")
  batch = encode_pairs(TOK, [f"prompt {i}" for i in range(8)], [f"answer {i * 7}" for i in range(8)], 16, 16)
  _, l1 = _sft_run(cfg, meshes["one"], batch)
  _, l8 = _sft_run(cfg, meshes["eight"], batch)
  assert l1[-1] < l1[0]
  np.testing.assert_allclose(l1, l8, rtol=1e-2)


def test_sampler_sharded_equals_single_device(setup):
  cfg, meshes = setup
  pt, pm = encode_prompts(TOK, [f"q{i}" * (i + 1) for i in range(8)], 17)  # the longest takes 17 (BOS + 16)
  outs = {}
  for name, mesh in meshes.items():
    params, _ = shd.init_sharded(lambda r: models.init_params(cfg, r), models.logical_axes(cfg), mesh,
                                 jax.random.PRNGKey(0))
    sampler = Sampler(cfg, SamplingParams(max_new_tokens=8, temperature=1.0, num_samples=2), eos_id=TOK.eos_id,
                      pad_id=TOK.pad_id, mesh=mesh)
    outs[name] = sampler(params, *shd.shard_batch((pt, pm), mesh), jax.random.PRNGKey(1))
  np.testing.assert_array_equal(outs["one"].completion_tokens, outs["eight"].completion_tokens)
  np.testing.assert_allclose(outs["one"].completion_logprobs, outs["eight"].completion_logprobs, atol=1e-5)
