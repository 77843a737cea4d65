"""The Advantage-Model step (rlhf_jax.steps.am), the §10.2 reconstruction, on toys with known answers.

Most toys score a (prompt, response) pair with a parameter table behind the Transformer's `apply_fn` interface:
tokens are [prompt id, response id] and the value at the last token is table[prompt, response], so a(x, y) is a
free parameter per pair. The bitwise RM check runs a small neural scorer
over padded token sequences.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from rlhf_jax import losses
from rlhf_jax.state import create_train_state
from rlhf_jax.steps.am import AMState, init_am_state, make_am_step
from rlhf_jax.steps.rm import make_rm_step

OFF = dict(mean_coef=0.0, bound_coef=0.0, regulation_coef=0.0)


def table_apply(params, tokens, mask=None, **_):
  del mask
  a = params["table"][tokens[:, 0], tokens[:, 1]]
  return jnp.stack([jnp.zeros_like(a), a], 1), None


def pair_batch(prompts, chosen, rejected, **extra):
  prompts = np.asarray(prompts, np.int32)
  tok = lambda y: jnp.asarray(np.stack([prompts, np.asarray(y, np.int32)], 1))
  ones = jnp.ones((len(prompts), 2), jnp.int32)
  return {"chosen_tokens": tok(chosen), "chosen_mask": ones, "rejected_tokens": tok(rejected),
          "rejected_mask": ones, **{k: jnp.asarray(v) for k, v in extra.items()}}


def am_state(params, tx, num_tasks=1, target_var=1.0):
  return init_am_state(create_train_state(params, tx, jax.random.PRNGKey(0)), num_tasks=num_tasks,
                       target_var=target_var)


def bt_pairs(rng, r_PxK, n, probs_PxK=None, keep_ties=False):
  """n pairs (prompt, y1, y2), y1, y2 ~ probs i.i.d. (uniform if None), labelled by the true reward.

  Pairs of one response with itself are dropped unless `keep_ties`: dropping them changes the law of each
  response (an unbiased E_π check keeps them; their BT gradient is 0 anyway)."""
  P, K = r_PxK.shape
  x = rng.integers(0, P, 4 * n)
  if probs_PxK is None:
    y1, y2 = rng.integers(0, K, (2, 4 * n))
  else:
    cdf = np.cumsum(probs_PxK, 1)[x]
    y1 = (rng.random((4 * n, 1)) > cdf).sum(1)
    y2 = (rng.random((4 * n, 1)) > cdf).sum(1)
  keep = np.arange(n) if keep_ties else np.flatnonzero(y1 != y2)[:n]
  x, y1, y2 = x[keep], np.minimum(y1[keep], K - 1), np.minimum(y2[keep], K - 1)
  better = r_PxK[x, y1] > r_PxK[x, y2]
  return x, np.where(better, y1, y2), np.where(better, y2, y1)


# ----------------------------------------------------------------------------------------------------------------
# All extras off = the RM, bit for bit
# ----------------------------------------------------------------------------------------------------------------


def prefix_apply(params, tokens, mask, **_):
  """A small neural scorer: value at t = MLP(mean of the embeddings of the real tokens up to t)."""
  m = mask.astype(jnp.float32)[..., None]
  h = jnp.cumsum(params["embed"][tokens] * m, 1) / jnp.maximum(jnp.cumsum(m, 1), 1.0)
  return jnp.tanh(h @ params["w1"]) @ params["w2"], None


@pytest.fixture(scope="module")
def small_rm():
  k = jax.random.split(jax.random.PRNGKey(0), 3)
  params = {"embed": jax.random.normal(k[0], (32, 16)), "w1": jax.random.normal(k[1], (16, 16)) / 4,
            "w2": jax.random.normal(k[2], (16,)) / 4}
  return prefix_apply, params


def token_batches(n, b=6, s=8, num_tasks=3):
  rng = np.random.default_rng(7)
  out = []
  for _ in range(n):
    pad = rng.integers(0, 3, (2, b, 1))
    mask = (np.arange(s) >= pad).astype(np.int32)  # ragged left padding
    tok = rng.integers(0, 32, (2, b, s)).astype(np.int32)
    out.append({"chosen_tokens": tok[0], "chosen_mask": mask[0], "rejected_tokens": tok[1], "rejected_mask": mask[1],
                "task_ids": rng.integers(0, num_tasks, b).astype(np.int32)})
  return out


def test_all_terms_off_is_the_rm_step_bitwise(small_rm):
  apply_fn, params = small_rm
  tx = optax.adamw(1e-2, weight_decay=0.01)
  rm_step = jax.jit(make_rm_step(apply_fn, tx))
  am_step = jax.jit(make_am_step(apply_fn, tx, num_tasks=3, **OFF))
  rm = create_train_state(params, tx, jax.random.PRNGKey(0))
  am = init_am_state(rm, num_tasks=3)
  for batch in token_batches(3):
    rm, rm_m = rm_step(rm, {k: v for k, v in batch.items() if k != "task_ids"})
    am, am_m = am_step(am, batch)
    assert np.asarray(rm_m["train/loss"]).tobytes() == np.asarray(am_m["train/loss"]).tobytes()
    assert np.asarray(rm_m["rm/accuracy"]) == np.asarray(am_m["am/accuracy"])
  for x, y in zip(jax.tree.leaves((rm.params, rm.opt_state)), jax.tree.leaves((am.model.params, am.model.opt_state))):
    assert np.asarray(x).tobytes() == np.asarray(y).tobytes()
  assert float(jnp.sum(am.task_stats.count)) == 3 * 2 * 6  # the statistics still ran



# ----------------------------------------------------------------------------------------------------------------
# §10.3 properties
# ----------------------------------------------------------------------------------------------------------------


def test_ranking_accuracy_equals_the_rm_on_the_same_pairs():
  """BT is invariant to a per-prompt shift, so AM and RM learn the same ranking (held-out accuracy)."""
  P, K, D = 12, 10, 5
  rng = np.random.default_rng(0)
  phi = jnp.asarray(rng.normal(size=(K, D)), jnp.float32)
  theta_true = rng.normal(size=D)
  r_true = np.asarray(phi) @ theta_true + rng.normal(0, 3, (P, 1))  # large task-like per-prompt offsets
  # Noisy BT labels: the pair's order is flipped with probability σ(−Δr).
  x, yc, yr = bt_pairs(rng, r_true, 384)
  flip = rng.random(len(x)) < 1 / (1 + np.exp(np.abs(r_true[x, yc] - r_true[x, yr])))
  yc, yr = np.where(flip, yr, yc), np.where(flip, yc, yr)
  train = pair_batch(x, yc, yr, task_ids=x % 3)

  def linear_apply(params, tokens, mask=None, **_):
    a = phi[tokens[:, 1]] @ params["theta"] + params["offset"][tokens[:, 0]]
    return jnp.stack([jnp.zeros_like(a), a], 1), None

  init = {"theta": jnp.zeros(D), "offset": jnp.zeros(P)}
  tx = optax.adam(0.05)
  results = {}
  for name, kw in (("rm", OFF), ("am", dict(mean_coef=1.0, bound_coef=1.0, bound=3.0, regulation_coef=0.1))):
    step = jax.jit(make_am_step(linear_apply, tx, num_tasks=3, **kw))
    state = am_state(init, tx, num_tasks=3)
    for _ in range(300):
      state, m = step(state, train)
    scores = np.asarray(linear_apply(state.model.params, jnp.stack(
        [jnp.repeat(jnp.arange(P), K), jnp.tile(jnp.arange(K), P)], 1))[0][:, 1]).reshape(P, K)
    iu = np.triu_indices(K, 1)
    agree = np.sign(scores[:, iu[0]] - scores[:, iu[1]]) == np.sign(r_true[:, iu[0]] - r_true[:, iu[1]])
    results[name] = (agree.mean(), float(m["am/accuracy"]), scores)
  (acc_rm, train_rm, s_rm), (acc_am, train_am, s_am) = results["rm"], results["am"]
  assert acc_rm > 0.9 and acc_am > 0.9
  assert abs(acc_am - acc_rm) <= 0.01 and abs(train_am - train_rm) <= 0.01
  # The AM differs where it should: its per-prompt means sit near 0, the RM's do not move from the start.
  # The AM differs where it should: its per-prompt mean scores sit near 0 (the RM's shifts are arbitrary).
  assert np.abs(s_am.mean(1)).max() < 0.1, s_am.mean(1)


def test_mean_advantage_under_the_target_policy_goes_to_zero():
  """E_{y~π}[a(x, y)] → 0 per prompt with the mean term on, and not with it off.

  On-policy: pairs drawn from π (w = 1), one group per pair (the §10.2 formula), where the optimum is exact.
  Off-policy: pairs drawn uniformly (π' = uniform), importance weights from the log-probs, one group per prompt.
  Both feed the same two compiled steps (same batch keys).
  """
  P, K, B = 4, 6, 256
  rng = np.random.default_rng(1)
  pi = np.exp(rng.normal(0, 1.0, (P, K)))
  pi /= pi.sum(1, keepdims=True)
  r_true = rng.normal(size=(P, K))
  offsets = np.array([3.0, -2.0, 1.5, -4.0])
  init = {"table": jnp.asarray(np.repeat(offsets[:, None], K, 1), jnp.float32)}  # arbitrary per-prompt shifts
  tx = optax.adam(0.03)
  iu = np.triu_indices(K, 1)

  def batch(seed, off_policy):
    x, yc, yr = bt_pairs(np.random.default_rng(seed), r_true, B, pi if not off_policy else None, keep_ties=True)
    logp = lambda y: np.log(pi[x, y]).astype(np.float32)
    behaviour = (lambda y: np.full(B, -np.log(K), np.float32)) if off_policy else logp
    groups = x if off_policy else np.arange(B)
    return pair_batch(x, yc, yr, prompt_ids=groups.astype(np.int32), chosen_logp_target=logp(yc),
                      chosen_logp_behaviour=behaviour(yc), rejected_logp_target=logp(yr),
                      rejected_logp_behaviour=behaviour(yr))

  steps = {coef: jax.jit(make_am_step(table_apply, tx, num_tasks=1, mean_coef=coef, bound_coef=0.0,
                                      regulation_coef=0.0, importance_clip=50.0)) for coef in (0.0, 1.0)}
  spread = np.abs(offsets).min()
  for off_policy in (False, True):
    e_pi = {}
    for coef, step in steps.items():
      state = am_state(init, tx)
      for i in range(300):
        state, m = step(state, batch(i, off_policy))
      table = np.asarray(state.model.params["table"])
      e_pi[coef] = (pi * table).sum(1)
      # The ranking is learnt either way.
      assert np.mean(np.sign(table[:, iu[0]] - table[:, iu[1]]) == np.sign(r_true[:, iu[0]] - r_true[:, iu[1]])) > 0.9
    assert np.abs(e_pi[1.0]).max() < 0.05 * spread, (off_policy, e_pi[1.0])
    assert np.abs(e_pi[0.0]).min() > 0.5 * spread, (off_policy, e_pi[0.0])


def test_bound_term_keeps_scores_within_the_bound():
  """Deterministic, separable preferences push BT scores apart without limit; the bound term holds |a| ≤ B."""
  P, K, bound = 3, 5, 1.0
  x, yc, yr = (a.ravel() for a in np.meshgrid(np.arange(P), np.arange(K), np.arange(K), indexing="ij"))
  keep = yc < yr  # lower response id always wins
  batch = pair_batch(x[keep], yc[keep], yr[keep])
  init = {"table": jnp.zeros((P, K))}
  tx = optax.adam(0.1)
  out = {}
  for coef in (0.0, 10.0):
    step = jax.jit(make_am_step(table_apply, tx, num_tasks=1, mean_coef=0.0, bound_coef=coef, bound=bound,
                                regulation_coef=0.0))
    state = am_state(init, tx)
    for _ in range(500):
      state, m = step(state, batch)
    out[coef] = (np.abs(np.asarray(state.model.params["table"])).max(), float(m["am/accuracy"]))
  assert out[10.0][1] == 1.0 and out[0.0][1] == 1.0
  assert out[10.0][0] <= bound + 0.05, out
  assert out[0.0][0] > 2 * bound, out


def test_task_statistics_update_is_exact_by_hand():
  # Three pairs with known scores: (a_c, a_r) = (1, 0), (2, −1), (3, 5); tasks 0, 0, 1. lr 0 keeps them fixed.
  table = jnp.array([[0.0, 1.0], [-1.0, 2.0], [5.0, 3.0]])
  tx = optax.sgd(0.0)
  m_ = 0.9
  step = jax.jit(make_am_step(table_apply, tx, num_tasks=3, mean_coef=1.0, bound_coef=1.0, bound=2.0,
                              regulation_coef=1.0, stats_momentum=m_, target_var=1.0))
  state = am_state({"table": table}, tx, num_tasks=3)
  batch = pair_batch([0, 1, 2], [1, 1, 1], [0, 0, 0], task_ids=np.array([0, 0, 1], np.int32))
  state, m = step(state, batch)
  # Task 0 scores {1, 0, 2, −1}: mean 0.5, var 1.25; task 1 {3, 5}: mean 4, var 1. First sight: taken directly.
  np.testing.assert_allclose(state.task_stats.mean, [0.5, 4.0, 0.0], rtol=1e-6)
  np.testing.assert_allclose(state.task_stats.var, [1.25, 1.0, 1.0], rtol=1e-6)
  np.testing.assert_array_equal(state.task_stats.count, [4, 2, 0])
  np.testing.assert_allclose([m["am/task0/mean"], m["am/task0/std"], m["am/task1/mean"], m["am/task1/std"]],
                             [0.5, np.sqrt(1.25), 4.0, 1.0], rtol=1e-6)
  # Regulation with no running statistics yet: mean over present tasks of μ² + (σ² − 1)².
  np.testing.assert_allclose(m["am/regulate_loss"], ((0.25 + 0.0625) + (16.0 + 0.0)) / 2, rtol=1e-6)
  # Bound B = 2: only |5| and |3| exceed it: (3² + 1²) / 6.
  np.testing.assert_allclose(m["am/bound_loss"], 10.0 / 6, rtol=1e-6)
  # Mean term, one group per pair, w = 1: mean of ((a_c + a_r)/2)² = (0.25 + 0.25 + 16) / 3.
  np.testing.assert_allclose(m["am/mean_loss"], 16.5 / 3, rtol=1e-6)

  # Second batch: pair 1 is weighted out, so task 0 sees {1, 0} (mean 0.5, var 0.25) and task 1 is absent.
  batch2 = pair_batch([0, 1], [1, 1], [0, 0], task_ids=np.array([0, 0], np.int32),
                      weights=np.array([1.0, 0.0], np.float32))
  state, m = step(state, batch2)
  np.testing.assert_allclose(state.task_stats.mean, [m_ * 0.5 + (1 - m_) * 0.5, 4.0, 0.0], rtol=1e-6)
  np.testing.assert_allclose(state.task_stats.var, [m_ * 1.25 + (1 - m_) * 0.25, 1.0, 1.0], rtol=1e-6)
  np.testing.assert_array_equal(state.task_stats.count, [6, 2, 0])
  np.testing.assert_allclose(m["am/task0/running_mean"], 0.5, rtol=1e-6)
  # Regulation now blends the running statistics (before this update) with the batch's: task 0 only.
  mu, var = m_ * 0.5 + (1 - m_) * 0.5, m_ * 1.25 + (1 - m_) * 0.25
  np.testing.assert_allclose(m["am/regulate_loss"], mu ** 2 + (var - 1.0) ** 2, rtol=1e-6)
  # And it is the same function the loss module exposes.
  ref = losses.update_task_stats(losses.TaskStats(jnp.array([0.5, 4.0, 0.0]), jnp.array([1.25, 1.0, 1.0]),
                                                  jnp.array([4.0, 2.0, 0.0])),
                                 jnp.array([1.0, 0.0]), jnp.array([0, 0]), momentum=m_)
  np.testing.assert_allclose(state.task_stats.var, ref.var, rtol=1e-6)


def test_regulation_balances_per_task_score_distributions():
  """Tasks whose true rewards sit at very different levels and spreads end with per-task means ≈ 0 and similar
  variances under the regulation term (the paper's claim, §10.1), while BT accuracy stays perfect."""
  P, K = 4, 6
  task_of_prompt = np.array([0, 0, 1, 1])
  scale = np.array([1.0, 1.0, 6.0, 6.0])[:, None]  # task 1's preferences are "louder"
  r_true = scale * np.random.default_rng(3).normal(size=(P, K))
  x, yc, yr = (a.ravel() for a in np.meshgrid(np.arange(P), np.arange(K), np.arange(K), indexing="ij"))
  keep = r_true[x, yc] > r_true[x, yr]
  batch = pair_batch(x[keep], yc[keep], yr[keep], task_ids=task_of_prompt[x[keep]].astype(np.int32))
  init = {"table": jnp.asarray(r_true + np.array([2.0, 2.0, -5.0, -5.0])[:, None], jnp.float32)}  # an RM's scores
  # Clipped SGD: the shrink and shift the regulation asks for keep the order (Adam's per-entry steps would not).
  tx = optax.chain(optax.clip_by_global_norm(1.0), optax.sgd(0.3))
  step = jax.jit(make_am_step(table_apply, tx, num_tasks=2, mean_coef=0.0, bound_coef=0.0, regulation_coef=1.0,
                              stats_momentum=0.5, target_var=1.0))
  state = am_state(init, tx, num_tasks=2)
  _, m0 = step(state, batch)
  assert float(m0["am/task1/std"]) > 2 * float(m0["am/task0/std"])  # unbalanced at the start
  for _ in range(400):
    state, m = step(state, batch)
  assert float(m["am/accuracy"]) == 1.0
  stds = [float(m[f"am/task{i}/std"]) for i in range(2)]
  assert max(abs(float(m[f"am/task{i}/mean"])) for i in range(2)) < 0.05
  assert abs(stds[0] - stds[1]) < 0.01 and abs(stds[0] - 1.0) < 0.1, stds


# ----------------------------------------------------------------------------------------------------------------
# Masks, traces, bad input
# ----------------------------------------------------------------------------------------------------------------


def test_weighted_out_pairs_equal_sliced_pairs():
  rng = np.random.default_rng(4)
  table = jnp.asarray(rng.normal(size=(3, 4)), jnp.float32)
  kw = dict(num_tasks=2, mean_coef=0.7, bound_coef=0.5, bound=0.5, regulation_coef=0.3)
  x, yc, yr, t, pid = [0, 1, 2, 0, 2, 1], [1, 2, 3, 0, 1, 0], [0, 0, 1, 3, 2, 3], [0, 1, 1, 0, 1, 0], [0, 1, 2, 0, 2, 1]
  lp = rng.normal(-2, 0.5, (4, 6)).astype(np.float32)
  extra = dict(chosen_logp_target=lp[0], chosen_logp_behaviour=lp[1], rejected_logp_target=lp[2],
               rejected_logp_behaviour=lp[3], prompt_ids=np.array(pid, np.int32), task_ids=np.array(t, np.int32))
  keep = np.array([1, 0, 1, 1, 0, 1], bool)
  full = pair_batch(x, yc, yr, weights=keep.astype(np.float32), **extra)
  sliced = pair_batch(*(np.asarray(v)[keep] for v in (x, yc, yr)), weights=np.ones(keep.sum(), np.float32),
                      **{k: v[keep] for k, v in extra.items()})
  tx = optax.sgd(0.1)
  step = jax.jit(make_am_step(table_apply, tx, **kw))
  s1, m1 = step(am_state({"table": table}, tx, 2), full)
  s2, m2 = step(am_state({"table": table}, tx, 2), sliced)
  np.testing.assert_allclose(s1.model.params["table"], s2.model.params["table"], rtol=1e-6, atol=1e-7)
  for k in ("am/loss", "am/mean_loss", "am/bound_loss", "am/regulate_loss", "am/task0/mean", "am/task1/std"):
    np.testing.assert_allclose(m1[k], m2[k], rtol=1e-6, atol=1e-7)
  for a, b in zip(jax.tree.leaves(s1.task_stats), jax.tree.leaves(s2.task_stats)):
    np.testing.assert_allclose(a, b, rtol=1e-6)


def test_one_trace_for_many_batches():
  tx = optax.adam(0.01)
  step = jax.jit(chex.assert_max_traces(make_am_step(table_apply, tx, num_tasks=2), n=1))
  state = am_state({"table": jnp.zeros((3, 4))}, tx, 2)
  rng = np.random.default_rng(5)
  for _ in range(4):
    x, yc, yr, t = rng.integers(0, 3, 5), rng.integers(0, 4, 5), rng.integers(0, 4, 5), rng.integers(0, 2, 5)
    state, m = step(state, pair_batch(x, yc, yr, task_ids=t.astype(np.int32), weights=rng.random(5) > 0.3))
  assert isinstance(state, AMState) and int(state.model.step) == 4
  assert set(m) >= {"am/loss", "am/rank_loss", "am/mean_loss", "am/bound_loss", "am/regulate_loss", "am/accuracy",
                    "am/task1/mean", "am/task1/std", "train/grad_norm"}
  assert all(np.isfinite(np.asarray(v)).all() for v in m.values())


def test_bad_input_names_the_argument():
  tx = optax.sgd(0.1)
  with pytest.raises(ValueError, match="num_tasks"):
    make_am_step(table_apply, tx, num_tasks=0)
  with pytest.raises(ValueError, match="mean_coef"):
    make_am_step(table_apply, tx, num_tasks=1, mean_coef=-1.0)
  with pytest.raises(ValueError, match="bound"):
    make_am_step(table_apply, tx, num_tasks=1, bound=0.0)
  with pytest.raises(ValueError, match="stats_momentum"):
    make_am_step(table_apply, tx, num_tasks=1, stats_momentum=1.0)
  state = am_state({"table": jnp.zeros((2, 2))}, tx, 2)
  step = make_am_step(table_apply, tx, num_tasks=2)
  with pytest.raises(ValueError, match="task_ids"):
    step(state, pair_batch([0], [1], [0]))
  with pytest.raises(ValueError, match="chosen_logp_behaviour"):
    step(state, pair_batch([0], [1], [0], task_ids=np.array([0], np.int32), chosen_logp_target=np.zeros(1)))
  with pytest.raises(ValueError, match="weights"):
    step(state, pair_batch([0], [1], [0], task_ids=np.array([0], np.int32), weights=np.ones(2)))
