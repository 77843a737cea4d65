"""The jitted DPO update (rlhf_jax.steps.dpo) on a tiny Transformer and on a categorical bandit.

The bandit is a parameter table of logits behind the same
`apply_fn(params, tokens, mask) -> (logits, cache)` interface as the
Transformer, so the step runs unchanged on a problem with a closed-form
optimum: DPO on Bradley–Terry preferences of a reward r converges to
π* = π_ref·exp(r/β)/Z (ALGORITHMS §8.4, §12).

Compiling the Transformer step dominates the cost of this file, so every
Transformer test shares the same three jitted functions on [3, 18] batches.
"""

import itertools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from rlhf_jax import models
from rlhf_jax.state import create_train_state
from rlhf_jax.steps.dpo import make_dpo_step, make_sequence_logps_fn
from rlhf_jax.tokenizer import ByteTokenizer, encode_pairs

CFG = models.ModelConfig(dim=32, n_layers=1, n_heads=2, n_kv_heads=1, mlp_dim=64, max_seq_len=64)
APPLY = models.make_apply_fn(CFG)
TOK = ByteTokenizer()
TX = optax.sgd(1.0)
BETA = 0.5
TRACES = {"inline": 0}


def _counted_inline(state, batch, ref_params):
  TRACES["inline"] += 1  # runs once per trace, never per call
  return make_dpo_step(APPLY, TX, beta=BETA, reference="inline")(state, batch, ref_params)


INLINE = jax.jit(_counted_inline)
PRECOMPUTED = jax.jit(make_dpo_step(APPLY, TX, beta=BETA))
LOGPS = jax.jit(make_sequence_logps_fn(APPLY))


def pair_batch(prompts, chosen, rejected, weights=None):
  c = encode_pairs(TOK, prompts, chosen, 8, 10)
  r = encode_pairs(TOK, prompts, rejected, 8, 10)
  batch = {f"chosen_{k}": jnp.asarray(v) for k, v in c.items()}
  batch.update({f"rejected_{k}": jnp.asarray(v) for k, v in r.items()})
  batch["weights"] = jnp.ones(len(prompts), jnp.float32) if weights is None else jnp.asarray(weights, jnp.float32)
  return batch


def with_reference(batch, ref_params):
  return {**batch,
          "ref_chosen_logps": LOGPS(ref_params, batch["chosen_tokens"], batch["chosen_mask"],
                                    batch["chosen_loss_mask"]),
          "ref_rejected_logps": LOGPS(ref_params, batch["rejected_tokens"], batch["rejected_mask"],
                                      batch["rejected_loss_mask"])}


@pytest.fixture(scope="module")
def params():
  return jax.jit(lambda key: models.init_params(CFG, key))(jax.random.PRNGKey(0))


@pytest.fixture(scope="module")
def policy(params):
  """A policy away from the reference, so h ≠ 0 and the gradients are not symmetric."""
  return jax.tree.map(lambda x: x * 1.1, params)


BATCH = pair_batch(["Hi", "Say yes", "Count"], ["hello", "yes", "1 2 3"], ["bye", "no", "3 2"])


def test_sequence_logps_sum_response_tokens_only(params):
  """Σ over loss_mask of log-softmax(logits)[next token], against a direct gather; prompt and padding out."""
  tokens, mask, loss_mask = BATCH["chosen_tokens"], BATCH["chosen_mask"], BATCH["chosen_loss_mask"]
  got = LOGPS(params, tokens, mask, loss_mask)
  logits, _ = jax.jit(APPLY)(params, tokens[:, :-1], mask[:, :-1])
  logp = np.asarray(jax.nn.log_softmax(logits.astype(jnp.float32), -1))
  lp = np.take_along_axis(logp, np.asarray(tokens[:, 1:, None]), -1)[..., 0]
  np.testing.assert_allclose(got, (lp * np.asarray(loss_mask[:, 1:])).sum(-1), rtol=1e-5)
  assert int(loss_mask[0].sum()) == 6  # "hello" + EOS


def test_loss_at_init_is_log2(params):
  state = create_train_state(params, TX, jax.random.PRNGKey(1))
  _, m = INLINE(state, BATCH, params)
  # Policy and reference go through the same forward: h = 0 bit for bit.
  assert float(m["dpo/loss"]) == pytest.approx(np.log(2.0), rel=1e-7)
  assert float(m["rewards/margin"]) == 0.0
  assert float(m["rewards/accuracy"]) == 0.0  # strict >: a tie is not a correct ranking
  assert float(m["dpo/pairs"]) == 3.0
  _, m = PRECOMPUTED(state, with_reference(BATCH, params))
  np.testing.assert_allclose(m["dpo/loss"], np.log(2.0), rtol=1e-5)


def test_inline_reference_equals_precomputed(params, policy):
  state = create_train_state(policy, TX, jax.random.PRNGKey(1))
  s1, m1 = INLINE(state, BATCH, params)
  s2, m2 = PRECOMPUTED(state, with_reference(BATCH, params))
  assert abs(float(m1["rewards/margin"])) > 1e-4  # not the trivial h = 0 case
  for k in m1:
    np.testing.assert_allclose(m1[k], m2[k], rtol=1e-5, atol=1e-6, err_msg=k)
  chex.assert_trees_all_close(s1.params, s2.params, rtol=1e-5, atol=1e-6)


def test_zero_weight_rows_are_masks_on_the_transformer(params, policy):
  """Other content in a weight-0 row (same shapes): bit-for-bit the same loss, metrics and update."""
  state = create_train_state(policy, TX, jax.random.PRNGKey(1))
  a = with_reference(pair_batch(["Hi", "Zzz", "Say yes"], ["hello", "garbage!!", "yes"], ["bye", "junk", "no"],
                                weights=[1.0, 0.0, 1.0]), params)
  b = with_reference(pair_batch(["Hi", "Other", "Say yes"], ["hello", "", "yes"], ["bye", "abcdefghij", "no"],
                                weights=[1.0, 0.0, 1.0]), params)
  sa, ma = PRECOMPUTED(state, a)
  sb, mb = PRECOMPUTED(state, b)
  chex.assert_trees_all_equal(ma, mb)
  chex.assert_trees_all_equal(sa.params, sb.params)
  assert float(ma["train/grad_norm"]) > 0 and float(ma["dpo/pairs"]) == 2.0


def test_step_traces_once_for_many_batches(params, policy):
  state = create_train_state(policy, TX, jax.random.PRNGKey(1))
  rng = np.random.default_rng(0)
  words = ["alpha", "beta", "gamma", "delta", "eps", "zeta"]
  pick = lambda: [str(rng.choice(words)) for _ in range(3)]
  for i in range(3):
    state, m = INLINE(state, pair_batch(pick(), pick(), pick(), weights=rng.uniform(size=3) * (i > 0)), params)
    assert np.isfinite(float(m["train/loss"]))
  assert TRACES["inline"] == 1
  assert int(state.step) == 3


# ------------------------------------------------------------------------------------------- bandit

K = 6  # responses = tokens of a one-token completion; slot 0 is the prompt


def bandit_apply(params, tokens, mask=None, **_):
  del mask
  return jnp.broadcast_to(params["logits"], (*tokens.shape, K)), None


def bandit_batch(chosen, rejected, weights, ref_logits):
  """Pairs of single-token responses after a one-token prompt, reference log-probs precomputed."""
  chosen, rejected = np.asarray(chosen, np.int32), np.asarray(rejected, np.int32)
  n = len(chosen)
  tok = lambda a: jnp.asarray(np.stack([np.zeros(n, np.int32), a], 1))
  ones = jnp.ones((n, 2), jnp.int32)
  loss_mask = jnp.asarray(np.tile([0, 1], (n, 1)), jnp.int32)
  batch = {"chosen_tokens": tok(chosen), "chosen_mask": ones, "chosen_loss_mask": loss_mask,
           "rejected_tokens": tok(rejected), "rejected_mask": ones, "rejected_loss_mask": loss_mask,
           "weights": jnp.asarray(weights, jnp.float32)}
  logps = make_sequence_logps_fn(bandit_apply)
  ref = {"logits": jnp.asarray(ref_logits, jnp.float32)}
  batch["ref_chosen_logps"] = logps(ref, batch["chosen_tokens"], batch["chosen_mask"], loss_mask)
  batch["ref_rejected_logps"] = logps(ref, batch["rejected_tokens"], batch["rejected_mask"], loss_mask)
  return batch


def test_bandit_reaches_the_kl_regularised_optimum():
  """All ordered pairs (i, j) weighted by P(i ≻ j) = σ(r_i − r_j): the optimum is π_ref·exp(r/β)/Z."""
  rng = np.random.default_rng(0)
  ref_logits = jnp.asarray(rng.normal(size=K), jnp.float32)
  r = jnp.asarray(rng.normal(size=K), jnp.float32)
  beta = 0.5
  pairs = np.array(list(itertools.permutations(range(K), 2)))
  batch = bandit_batch(pairs[:, 0], pairs[:, 1], jax.nn.sigmoid(r[pairs[:, 0]] - r[pairs[:, 1]]), ref_logits)
  tx = optax.adam(0.05)
  state = create_train_state({"logits": ref_logits}, tx, jax.random.PRNGKey(0))
  step = jax.jit(make_dpo_step(bandit_apply, tx, beta=beta))
  for _ in range(800):
    state, m = step(state, batch)
  pi = jax.nn.softmax(state.params["logits"])
  target = jax.nn.softmax(ref_logits + r / beta)  # π_ref·exp(r/β)/Z
  tv = 0.5 * float(jnp.abs(pi - target).sum())
  assert tv < 0.02, (pi, target)
  # The implicit reward β log(π/π_ref) recovers r up to a constant.
  implicit = beta * (jnp.log(pi) - jax.nn.log_softmax(ref_logits))
  np.testing.assert_allclose(implicit - implicit.mean(), r - r.mean(), atol=0.05)


@pytest.mark.parametrize("loss_type,eps", [("sigmoid", 0.0), ("sigmoid", 0.1), ("ipo", 0.0), ("hinge", 0.0)])
def test_zero_weight_pairs_equal_the_batch_without_them(loss_type, eps):
  rng = np.random.default_rng(1)
  ref_logits = rng.normal(size=K)
  tx = optax.sgd(1.0)
  state = create_train_state({"logits": jnp.asarray(rng.normal(size=K), jnp.float32)}, tx, jax.random.PRNGKey(0))
  step = jax.jit(make_dpo_step(bandit_apply, tx, beta=0.5, loss_type=loss_type, label_smoothing=eps))
  small = bandit_batch([0, 3], [1, 2], [1.0, 1.0], ref_logits)
  big = bandit_batch([0, 5, 3, 4], [1, 0, 2, 1], [1.0, 0.0, 1.0, 0.0], ref_logits)
  s1, m1 = step(state, small)
  s2, m2 = step(state, big)
  for k in m1:
    np.testing.assert_allclose(m1[k], m2[k], rtol=1e-6, atol=1e-7, err_msg=k)
  np.testing.assert_allclose(s1.params["logits"], s2.params["logits"], rtol=1e-6, atol=1e-7)
  assert float(m1["train/grad_norm"]) > 0


def test_fractional_weights_are_a_weighted_mean():
  """Σ w ℓ / Σ w: weight 2 on a pair equals listing it twice."""
  ref_logits = np.linspace(-1, 1, K)
  tx = optax.sgd(1.0)
  state = create_train_state({"logits": jnp.zeros(K)}, tx, jax.random.PRNGKey(0))
  step = jax.jit(make_dpo_step(bandit_apply, tx, beta=0.5))
  sa, ma = step(state, bandit_batch([0, 3], [1, 2], [2.0, 1.0], ref_logits))
  sb, mb = step(state, bandit_batch([0, 0, 3], [1, 1, 2], [1.0, 1.0, 1.0], ref_logits))
  for k in ("dpo/loss", "rewards/margin", "logps/chosen"):
    np.testing.assert_allclose(ma[k], mb[k], rtol=1e-6, err_msg=k)
  np.testing.assert_allclose(sa.params["logits"], sb.params["logits"], rtol=1e-6, atol=1e-7)


def test_sharded_equals_unsharded():
  """The bandit step on an 8-device (2, 2, 2) mesh, batch over ("data", "fsdp"), 2 padding rows of weight 0."""
  from rlhf_jax import sharding
  rng = np.random.default_rng(2)
  ref_logits = rng.normal(size=K)
  pairs = np.array(list(itertools.permutations(range(K), 2)) + [(0, 1), (2, 3)])  # 32 rows
  weights = np.r_[rng.uniform(size=30), 0.0, 0.0]
  batch = bandit_batch(pairs[:, 0], pairs[:, 1], weights, ref_logits)
  tx = optax.adam(0.1)
  state = create_train_state({"logits": jnp.asarray(rng.normal(size=K), jnp.float32)}, tx, jax.random.PRNGKey(0))
  step = make_dpo_step(bandit_apply, tx, beta=0.5)
  s1, m1 = jax.jit(step)(state, batch)
  mesh = sharding.make_mesh((2, 2, 2))
  s2, m2 = jax.jit(step, in_shardings=(sharding.replicated(mesh), None), out_shardings=sharding.replicated(mesh))(
      jax.device_put(state, sharding.replicated(mesh)), sharding.shard_batch(jax.device_get(batch), mesh))
  for k in m1:
    np.testing.assert_allclose(m1[k], m2[k], rtol=1e-6, atol=1e-7, err_msg=k)
  np.testing.assert_allclose(s1.params["logits"], s2.params["logits"], rtol=1e-5, atol=1e-6)


def test_inline_reference_gets_no_gradient():
  tx = optax.sgd(0.0)
  state = create_train_state({"logits": jnp.ones(K)}, tx, jax.random.PRNGKey(0))
  batch = bandit_batch([0, 3], [1, 2], [1.0, 1.0], np.zeros(K))
  step = make_dpo_step(bandit_apply, tx, beta=0.5, reference="inline")
  g = jax.jit(jax.grad(lambda ref: step(state, batch, ref)[1]["train/loss"]))({"logits": jnp.zeros(K)})
  assert float(jnp.abs(g["logits"]).max()) == 0.0


def test_bad_arguments_raise():
  with pytest.raises(ValueError, match="reference"):
    make_dpo_step(APPLY, TX, beta=0.1, reference="online")
  with pytest.raises(ValueError, match="loss_type"):
    make_dpo_step(APPLY, TX, beta=0.1, loss_type="kto")
  with pytest.raises(ValueError, match="beta"):
    make_dpo_step(APPLY, TX, beta=0.0)
  with pytest.raises(ValueError, match="label_smoothing"):
    make_dpo_step(APPLY, TX, beta=0.1, loss_type="ipo", label_smoothing=0.1)
  with pytest.raises(ValueError, match="ref_apply_fn"):
    make_dpo_step(APPLY, TX, beta=0.1, ref_apply_fn=APPLY)
  state = create_train_state({"logits": jnp.zeros(K)}, TX, jax.random.PRNGKey(0))
  with pytest.raises(ValueError, match="ref_chosen_logps"):
    make_dpo_step(bandit_apply, TX, beta=0.1)(state, BATCH)
  bad = {**bandit_batch([0], [1], [1.0], np.zeros(K)), "weights": jnp.ones(2)}
  with pytest.raises(ValueError, match="weights"):
    make_dpo_step(bandit_apply, TX, beta=0.1)(state, bad)
