"""Row micro-batching (rlhf_jax.steps.common): chunked forwards and gradient accumulation change nothing but speed.

`map_rows` and `rowwise_value_and_grad` run a model `k` rows at a time; the results must be those of one call on
the whole batch (to float32 summation order), for the PPO step (policy + critic, rehearsal), the SFT, DPO and RM steps
and the scoring forwards, and for row counts the requested size does not divide. `ModelConfig.scan_unroll` likewise
changes only how the layer scan is compiled (unrolled completely, it also lets the last layer skip the positions
nobody reads: the same values in another float summation order).
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from rlhf_jax import losses, models
from rlhf_jax.models import ModelConfig
from rlhf_jax.state import create_train_state
from rlhf_jax.steps import PPOState, make_dpo_step, make_ppo_score_fn, make_ppo_step, make_rm_step, \
    make_sft_step
from rlhf_jax.steps.common import _chunks, completion_logprobs, map_rows, microbatch_rows, \
    rowwise_value_and_grad, sequence_scores

CFG = ModelConfig(vocab_size=64, dim=32, n_layers=2, n_heads=2, n_kv_heads=1, mlp_dim=64, max_seq_len=32)
B, S, P = 12, 16, 6  # rows, buffer length, prompt length
G = S - P


@pytest.fixture(scope="module")
def setup():
  keys = jax.random.split(jax.random.PRNGKey(0), 8)
  params = jax.jit(functools.partial(models.init_params, CFG))(keys[0])
  critic = models.lm_to_scalar_params(params, CFG, keys[1])
  critic = dict(critic, score_head=0.1 * jax.random.normal(keys[2], critic["score_head"].shape))
  tokens = jax.random.randint(keys[3], (B, S), 0, CFG.vocab_size)
  mask = jnp.ones((B, S), jnp.int32).at[:4, :2].set(0)                   # left-padded prompts
  cmask = jnp.ones((B, G), jnp.float32).at[6:, 7:].set(0.0)              # shorter completions
  old = -4.2 + 0.2 * jax.random.normal(keys[4], (B, G))
  batch = {"tokens": tokens, "mask": mask, "completion_mask": cmask, "old_logprobs": old,
           "ref_logprobs": old - 0.05 * jax.random.uniform(keys[5], (B, G)),
           "old_values": 0.3 * jax.random.normal(keys[6], (B, G)), "scores": jax.random.normal(keys[7], (B,)),
           "weights": jnp.ones(B).at[2].set(0.0).at[5].set(0.5)}
  return params, critic, batch


def assert_trees_close(a, b, rtol=2e-5, atol=2e-6):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


def assert_same_update(chunked, whole, names):
  """Two `(state, metrics)` of one step: parameters and the named metrics equal; the step moved something."""
  (b, mb), (a, ma) = chunked, whole
  assert_trees_close(b.params, a.params, rtol=1e-4, atol=1e-6)
  for name in names:
    np.testing.assert_allclose(float(mb[name]), float(ma[name]), rtol=1e-5, atol=1e-6)
  assert float(ma["train/grad_norm"]) > 0


def test_microbatch_rows_is_the_largest_divisor_up_to_the_request():
  assert microbatch_rows(12, 16, None) == 12
  assert microbatch_rows(12, 16, 0) == 12
  assert microbatch_rows(12, 16, 4) == 4
  assert microbatch_rows(12, 16, 5) == 4       # not a divisor: the largest one below
  assert microbatch_rows(13, 16, 5) == 1       # a prime row count: one row at a time
  assert microbatch_rows(12, 16, 100) == 12
  if jax.default_backend() == "cpu":            # auto: ~1k tokens a chunk on CPU
    assert microbatch_rows(64, 128, "auto") == 8
    assert microbatch_rows(64, 4096, "auto") == 1
  with pytest.raises(ValueError, match="microbatch"):
    microbatch_rows(12, 16, -1)
  with pytest.raises(ValueError, match="microbatch"):
    microbatch_rows(12, 16, "fast")


def test_auto_chunks_are_sized_by_the_token_buffer_not_the_first_leaf():
  """A PPO minibatch's first leaf (sorted keys) is `advantages` [B, G]; auto must size by `tokens` [B, P + G]."""
  mb = {"advantages": jnp.zeros((16, 64)), "tokens": jnp.zeros((16, 128), jnp.int32), "weights": jnp.zeros(16)}
  rows, n = _chunks(mb, "auto")
  assert rows == 16
  if jax.default_backend() == "cpu":
    assert n == 2  # 1024 // 128 = 8 rows a chunk


def test_map_rows_equals_one_call(setup):
  params, _, batch = setup
  apply_fn = models.make_apply_fn(CFG)
  fn = lambda t, m: completion_logprobs(apply_fn, params, t, m, P, with_entropy=True)  # noqa: E731
  whole = fn(batch["tokens"], batch["mask"])
  for k in (1, 4, 5):
    assert_trees_close(map_rows(fn, k, batch["tokens"], batch["mask"]), whole)


@pytest.mark.parametrize("loss_agg", ["seq_mean_token_mean", "token_mean"])
def test_rowwise_gradient_equals_the_whole_batch_gradient(setup, loss_agg):
  """The chunks' gradients sum to the whole-batch gradient of a PPO loss (+ entropy, + an extra term)."""
  params, _, batch = setup
  apply_fn = models.make_apply_fn(CFG)
  adv = batch["scores"][:, None] * batch["completion_mask"]

  def rows_fn(p, rows):
    return completion_logprobs(apply_fn, p, rows["tokens"], rows["mask"], P, with_entropy=True)

  def loss_fn(out):
    lp, ent = out
    loss, metrics = losses.ppo_policy_loss(lp, batch["old_logprobs"], adv, batch["completion_mask"], clip_eps=0.2,
                                           loss_agg=loss_agg, weights=batch["weights"])
    return loss - 0.01 * losses.masked_mean(ent, batch["completion_mask"]), metrics

  def extra_fn(p):  # e.g. the rehearsal NLL: other data, differentiated once
    return 0.1 * jnp.sum(p["embedding"][:3] ** 2), {"extra/seen": jnp.float32(1.0)}

  rows = {"tokens": batch["tokens"], "mask": batch["mask"]}
  fill = (batch["old_logprobs"], jnp.zeros_like(batch["old_logprobs"]))
  run = jax.jit(lambda p, k: rowwise_value_and_grad(rows_fn, loss_fn, p, rows, fill=fill, microbatch=k,
                                                    extra_fn=extra_fn), static_argnums=1)
  (loss0, aux0), g0 = run(params, None)
  scale = max(float(jnp.max(jnp.abs(x))) for x in jax.tree.leaves(g0))
  assert scale > 0
  for k in (5,):  # → 3 chunks of 4 rows
    (loss, aux), g = run(params, k)
    np.testing.assert_allclose(float(loss), float(loss0), rtol=1e-6)
    assert set(aux) == set(aux0) and float(aux["extra/seen"]) == 1.0
    assert_trees_close(aux, aux0, rtol=1e-5, atol=1e-6)
    for x, y in zip(jax.tree.leaves(g), jax.tree.leaves(g0)):
      np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=2e-5 * scale)


# The layer scan as one scan (accelerators) and as straight-line layers (the CPU default), where the chunk loop runs
# on the per-layer view of the stacked params (`make_apply_fn(cfg).layer_views`) and restacks the gradient once.
UNROLLS = pytest.mark.parametrize("unroll", [1, CFG.n_layers], ids=["scan", "straight_line"])


def test_layer_views_round_trip_and_the_model_takes_either_layout(setup):
  params, critic, batch = setup
  cfg = dataclasses.replace(CFG, scan_unroll=CFG.n_layers)
  assert models.make_apply_fn(CFG).layer_views is None  # a partly unrolled scan keeps the stacked layout
  for head, p in (("lm", params), ("scalar", critic)):
    apply_fn = models.make_apply_fn(cfg, head=head)
    to_view, from_view = apply_fn.layer_views
    view = to_view(p)
    assert "layers" not in view and sorted(k for k in view if k.startswith("layer_")) == ["layer_0", "layer_1"]
    back = from_view(view)
    assert jax.tree.structure(back) == jax.tree.structure(p)
    for x, y in zip(jax.tree.leaves(back), jax.tree.leaves(p)):
      np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    out_stacked = apply_fn(p, batch["tokens"], batch["mask"], out_from=P)[0]
    out_view = apply_fn(view, batch["tokens"], batch["mask"], out_from=P)[0]
    np.testing.assert_allclose(np.asarray(out_view), np.asarray(out_stacked), rtol=1e-6, atol=1e-6)


@UNROLLS
def test_ppo_step_with_microbatches_equals_the_whole_minibatch(setup, unroll):
  """GAE + critic, 2 minibatches of 6 rows, SGD: the same parameters and metrics in chunks of 4→3 rows.

  (Small steps: with large ones the value clip's boundary can fall differently under float32 reassociation.)
  """
  params, critic, batch = setup
  cfg = dataclasses.replace(CFG, scan_unroll=unroll)
  lm, scalar = models.make_apply_fn(cfg), models.make_apply_fn(cfg, head="scalar")
  tx = optax.sgd(0.05)  # params move by exactly the gradients
  results = {}
  for k in (None, 4):
    state = PPOState(actor=create_train_state(params, tx, jax.random.PRNGKey(0)),
                     critic=create_train_state(critic, tx, jax.random.PRNGKey(1)),
                     kl=losses.init_kl_controller(0.1))
    step = jax.jit(make_ppo_step(lm, tx, critic_apply=scalar, critic_tx=tx, prompt_len=P, epochs=1, minibatches=2,
                                 kl_estimator="k3", entropy_coef=0.01, microbatch=k))
    results[k] = step(state, batch)
  base_state, base_metrics = results[None]
  for k in (4,):
    state, metrics = results[k]
    assert_trees_close((state.actor.params, state.critic.params), (base_state.actor.params, base_state.critic.params),
                       rtol=1e-4, atol=1e-6)
    for name in ("policy/loss", "policy/entropy", "value/loss", "policy/grad_norm", "value/grad_norm", "kl/ref"):
      np.testing.assert_allclose(float(metrics[name]), float(base_metrics[name]), rtol=1e-4, atol=1e-6)
  assert float(jnp.abs(base_state.actor.params["embedding"] - params["embedding"]).max()) > 1e-5  # it moved


@UNROLLS
def test_grpo_step_with_rehearsal_and_microbatches_equals_the_whole_minibatch(setup, unroll):
  params, _, batch = setup
  lm = models.make_apply_fn(dataclasses.replace(CFG, scan_unroll=unroll))
  tx = optax.sgd(0.5)
  rehearsal = {"tokens": batch["tokens"][:3], "mask": batch["mask"][:3],
               "loss_mask": jnp.ones((3, S), jnp.int32).at[:, :P].set(0), "weights": jnp.ones(3)}
  grpo_batch = {k: v for k, v in batch.items() if k != "old_values"}
  grpo_batch.update(advantages=batch["scores"], rehearsal=rehearsal)
  results = []
  for k in (None, 3):
    state = PPOState(actor=create_train_state(params, tx, jax.random.PRNGKey(0)), critic=None,
                     kl=losses.init_kl_controller(0.1))
    step = jax.jit(make_ppo_step(lm, tx, prompt_len=P, advantage="grpo", kl_estimator="k3", rehearsal_coef=0.5,
                                 microbatch=k))
    results.append(step(state, grpo_batch))
  (a, ma), (b, mb) = results
  assert_trees_close(b.actor.params, a.actor.params, rtol=1e-4, atol=1e-6)
  for name in ("policy/loss", "policy/kl_loss", "rehearsal/nll"):
    np.testing.assert_allclose(float(mb[name]), float(ma[name]), rtol=1e-5, atol=1e-6)


def test_sft_step_with_microbatches_equals_the_whole_batch(setup):
  params, _, batch = setup
  apply_fn = models.make_apply_fn(CFG)
  tx = optax.sgd(0.5)
  sft_batch = {"tokens": batch["tokens"], "mask": batch["mask"],
               "loss_mask": batch["mask"].at[:, :P].set(0).at[8:, 12:].set(0)}
  results = [jax.jit(make_sft_step(apply_fn, tx, microbatch=k))(create_train_state(params, tx,
                                                                                   jax.random.PRNGKey(0)), sft_batch)
             for k in (None, 5)]
  assert_same_update(results[1], results[0], ("train/loss", "sft/accuracy", "sft/tokens", "train/grad_norm"))


@pytest.mark.parametrize("reference", ["precomputed", "inline"])
def test_dpo_step_with_microbatches_equals_the_whole_batch(setup, reference):
  """6 pairs in chunks of 4→3 (the inline reference's forward chunked too): the same update and metrics."""
  params, _, batch = setup
  apply_fn = models.make_apply_fn(CFG)
  tx = optax.sgd(0.5)
  t, m = batch["tokens"], batch["mask"]
  loss_mask = m.at[:, :P].set(0)
  pairs = {"chosen_tokens": t[:6], "chosen_mask": m[:6], "chosen_loss_mask": loss_mask[:6],
           "rejected_tokens": t[6:], "rejected_mask": m[6:], "rejected_loss_mask": loss_mask[6:].at[:, 12:].set(0),
           "weights": jnp.asarray([1.0, 1.0, 0.0, 1.0, 0.5, 1.0])}
  ref = jax.tree.map(lambda x: x * 0.9, params)
  if reference == "precomputed":
    pairs["ref_chosen_logps"] = -60.0 + jnp.arange(6.0)
    pairs["ref_rejected_logps"] = -61.0 + 0.5 * jnp.arange(6.0)
  results = []
  for k in (None, 4):
    step = jax.jit(make_dpo_step(apply_fn, tx, beta=0.1, reference=reference, microbatch=k))
    args = (ref,) if reference == "inline" else ()
    results.append(step(create_train_state(params, tx, jax.random.PRNGKey(0)), pairs, *args))
  assert_same_update(results[1], results[0], ("dpo/loss", "rewards/margin", "logps/chosen", "train/grad_norm"))


def test_rm_step_with_microbatches_equals_the_whole_batch(setup):
  _, critic, batch = setup
  apply_fn = models.make_apply_fn(CFG, head="scalar")
  tx = optax.sgd(0.5)
  t, m = batch["tokens"], batch["mask"]
  pairs = {"chosen_tokens": t[:6], "chosen_mask": m[:6], "rejected_tokens": t[6:], "rejected_mask": m[6:]}
  results = [jax.jit(make_rm_step(apply_fn, tx, margin=0.5, microbatch=k))(
      create_train_state(critic, tx, jax.random.PRNGKey(0)), pairs) for k in (None, 4)]
  assert_same_update(results[1], results[0], ("rm/loss", "rm/accuracy", "rm/margin", "train/grad_norm"))


def test_score_fn_with_microbatches_equals_one_call(setup):
  params, critic, batch = setup
  lm, scalar = models.make_apply_fn(CFG), models.make_apply_fn(CFG, head="scalar")
  outs = [jax.jit(make_ppo_score_fn(lm, prompt_len=P, temperature=0.7, critic_apply=scalar, reward_apply=scalar,
                                    microbatch=k))(params, critic, critic, batch["tokens"], batch["mask"])
          for k in (None, 4)]
  assert_trees_close(outs[1], outs[0])


@pytest.mark.parametrize("unroll", [1, 2])
def test_sequence_scores_read_from_the_completion_equals_reading_every_slot(setup, unroll):
  """`sequence_scores(read_from=P - 1)` (the RM on a rollout) = the score at each row's last valid token read
  from a forward over every slot; also for an apply_fn that ignores `out_from` (it gets sliced)."""
  _, critic, batch = setup
  lengths = jnp.arange(B) % (G + 1)  # completions of 0..G tokens, right-padded
  mask = batch["mask"].at[:, P:].set((jnp.arange(G)[None, :] < lengths[:, None]).astype(jnp.int32))
  scalar = models.make_apply_fn(dataclasses.replace(CFG, scan_unroll=unroll), head="scalar")
  ignores_out_from = lambda p, t, m, out_from=0: scalar(p, t, m)  # noqa: E731
  full = sequence_scores(scalar, critic, batch["tokens"], mask)
  np.testing.assert_allclose(full, scalar(critic, batch["tokens"], mask)[0][jnp.arange(B), P + lengths - 1])
  for fn in (scalar, ignores_out_from):
    np.testing.assert_allclose(sequence_scores(fn, critic, batch["tokens"], mask, read_from=P - 1), full,
                               rtol=1e-5, atol=1e-6)


def test_scan_unroll_changes_neither_outputs_nor_gradients(setup):
  params, _, batch = setup
  results = []
  for unroll in (1, 2):
    apply_fn = models.make_apply_fn(dataclasses.replace(CFG, scan_unroll=unroll))
    loss = lambda p: jnp.sum(completion_logprobs(apply_fn, p, batch["tokens"], batch["mask"], P))  # noqa: E731
    results.append(jax.jit(jax.value_and_grad(loss))(params))
  # Unrolled completely, the last layer runs on the scored positions only (`Transformer(out_from=)`): the same
  # values in another float summation order, so gradients agree to rounding relative to each leaf's scale.
  assert_trees_close(results[1][0], results[0][0])
  for x, y in zip(jax.tree.leaves(results[1][1]), jax.tree.leaves(results[0][1])):
    np.testing.assert_allclose(x, y, rtol=2e-5, atol=2e-6 * float(np.max(np.abs(y))))
  with pytest.raises(ValueError, match="scan_unroll"):
    dataclasses.replace(CFG, scan_unroll=0)


def test_run_configs_resolve_the_auto_settings():
  from experiments.configs import base  # pylint: disable=import-outside-toplevel
  from rlhf_jax.pipelines import common  # pylint: disable=import-outside-toplevel
  config = base.get_base_config()
  cfg = common.model_config(config)
  assert cfg.scan_unroll == (cfg.n_layers if jax.default_backend() == "cpu" else 1)
  assert common.microbatch(config) == "auto"
  config.model.scan_unroll, config.model.microbatch = 2, 0
  assert common.model_config(config).scan_unroll == 2 and common.microbatch(config) is None
  config.model.scan_unroll, config.model.microbatch = 64, 8
  assert common.model_config(config).scan_unroll == cfg.n_layers and common.microbatch(config) == 8
  config.model.microbatch, config.model.lora_rank = -1, 4  # LoRA: auto is off, an explicit size still chunks
  assert common.microbatch(config) is None
  config.model.microbatch = 4
  assert common.microbatch(config) == 4
