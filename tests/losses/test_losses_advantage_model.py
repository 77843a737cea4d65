"""Tests for the advantage-model loss (reconstruction, ALGORITHMS §10.2)."""
import functools

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax import losses


def _batch(seed=0, B=6):
  rng = np.random.default_rng(seed)
  ac, ar = rng.normal(0, 3, (2, B)).astype(np.float32)
  ltc, ltr, lbc, lbr = rng.normal(-8, 1.5, (4, B)).astype(np.float32)
  tasks = np.array([0, 0, 1, 2, 2, 2])[:B]
  return ac, ar, ltc, ltr, lbc, lbr, tasks


def _np_am(ac, ar, ltc, ltr, lbc, lbr, tasks, *, K, mc, bc, B, rc, tv, wclip):
  rank = np.mean(np.log1p(np.exp(-(ac - ar))))
  wc = np.minimum(np.exp(ltc - lbc), wclip)
  wr = np.minimum(np.exp(ltr - lbr), wclip)
  mean = np.mean(((wc * ac + wr * ar) / (wc + wr)) ** 2)
  s = np.concatenate([ac, ar])
  bound = np.mean(np.maximum(np.abs(s) - B, 0) ** 2)
  ids = np.concatenate([tasks, tasks])
  terms = [np.mean(s[ids == k]) ** 2 + (np.var(s[ids == k]) - tv) ** 2
           for k in range(K) if np.any(ids == k)]
  reg = np.mean(terms)
  return rank + mc * mean + bc * bound + rc * reg, (rank, mean, bound, reg)


def test_advantage_model_loss_matches_numpy():
  args = _batch()
  kw = dict(num_tasks=4, mean_coef=0.7, bound_coef=0.3, bound=2.0,
            regulate_coef=0.2, target_var=1.5, weight_clip=5.0)
  loss, m = jax.jit(functools.partial(losses.advantage_model_loss, **kw))(*args)
  want, (rank, mean, bound, reg) = _np_am(
      *args, K=4, mc=0.7, bc=0.3, B=2.0, rc=0.2, tv=1.5, wclip=5.0)
  np.testing.assert_allclose(loss, want, rtol=1e-4)
  for key, v in (("am/rank_loss", rank), ("am/mean_loss", mean),
                 ("am/bound_loss", bound), ("am/regulate_loss", reg)):
    np.testing.assert_allclose(m[key], v, rtol=1e-4)
  np.testing.assert_allclose(m["am/accuracy"], np.mean(args[0] > args[1]))


def test_advantage_model_reduces_to_bt_and_weights_are_constants():
  args = _batch(1)
  off = dict(num_tasks=3, mean_coef=0.0, bound_coef=0.0, regulate_coef=0.0)
  loss, _ = jax.jit(functools.partial(losses.advantage_model_loss, **off))(
      *args)
  bt, _ = jax.jit(losses.bradley_terry_loss)(args[0], args[1])
  np.testing.assert_allclose(loss, bt, rtol=1e-6)
  g = jax.jit(jax.grad(
      lambda *lps: losses.advantage_model_loss(*args[:2], *lps, args[6],
                                               num_tasks=3)[0],
      argnums=(0, 1, 2, 3)))(*args[2:6])
  assert all(np.all(np.asarray(x) == 0) for x in g)


def test_mean_term_zero_when_weighted_pair_mean_zero_and_bound_inactive():
  # Equal weights and a_r = −a_c: pair mean 0; |a| < B: no bound penalty.
  ac = jnp.array([1.0, 0.5])
  lp = jnp.zeros(2)
  am = jax.jit(losses.advantage_model_loss,
               static_argnames=("num_tasks", "bound"))
  _, m = am(ac, -ac, lp, lp, lp, lp, jnp.array([0, 1]), num_tasks=2, bound=2.0)
  assert float(m["am/mean_loss"]) == 0.0 and float(m["am/bound_loss"]) == 0.0
  # Importance weights w_c = 4, w_r = 1 (clip 5): mean (4·1 + 1·(−1))/5 = .6.
  _, m = am(
      jnp.array([1.0]), jnp.array([-1.0]), jnp.log(jnp.array([0.4])),
      jnp.log(jnp.array([0.1])), jnp.log(jnp.array([0.1])),
      jnp.log(jnp.array([0.1])), jnp.array([0]), num_tasks=1, bound=5.0)
  np.testing.assert_allclose(m["am/mean_loss"], 0.36, rtol=1e-5)


def test_task_statistics_and_running_update():
  scores = jnp.array([1.0, 3.0, 5.0, -1.0])
  ids = jnp.array([0, 0, 2, 2])
  mean, var, count = jax.jit(functools.partial(losses.task_statistics,
                                               num_tasks=3))(scores, ids)
  np.testing.assert_allclose(mean, [2.0, 0.0, 2.0])
  np.testing.assert_allclose(var, [1.0, 0.0, 9.0])
  np.testing.assert_allclose(count, [2, 0, 2])
  st = losses.init_task_stats(3)
  upd = jax.jit(functools.partial(losses.update_task_stats, momentum=0.9))
  st = upd(st, scores, ids)
  np.testing.assert_allclose(st.mean, [2.0, 0.0, 2.0])   # first sight: batch
  st2 = upd(st, jnp.array([0.0, 0.0, 0.0, 0.0]), jnp.array([0, 0, 1, 1]))
  np.testing.assert_allclose(st2.mean, [1.8, 0.0, 2.0], rtol=1e-6)
  np.testing.assert_allclose(st2.var, [0.9, 0.0, 9.0], rtol=1e-6)
  # Blending with running stats changes only the regulation term.
  args = _batch(2)
  am = jax.jit(functools.partial(losses.advantage_model_loss, num_tasks=3,
                                 stats_momentum=0.5))
  _, ma = am(*args)
  _, mb = am(*args, task_stats=st)
  np.testing.assert_allclose(ma["am/rank_loss"], mb["am/rank_loss"])
  assert float(ma["am/regulate_loss"]) != float(mb["am/regulate_loss"])


def test_regulation_equalises_task_distributions():
  """Gradient descent on free scores drives per-task means to 0, vars to target."""
  rng = np.random.default_rng(3)
  B = 12
  tasks = jnp.asarray(np.repeat([0, 1, 2], 4))
  offsets = jnp.asarray(np.repeat([3.0, -2.0, 0.5], 4), jnp.float32)
  ac = jnp.asarray(rng.normal(0, 0.3, B), jnp.float32) + offsets + 1.0
  ar = ac - 1.0 - jnp.asarray(rng.random(B), jnp.float32)
  lp = jnp.zeros(B)
  kw = dict(num_tasks=3, mean_coef=1.0, bound_coef=1.0, bound=4.0,
            regulate_coef=1.0, target_var=1.0)
  f = lambda s: losses.advantage_model_loss(s[0], s[1], lp, lp, lp, lp, tasks,
                                            **kw)[0]
  s = jax.jit(lambda s: jax.lax.fori_loop(
      0, 3000, lambda _, s: s - 0.05 * jax.grad(f)(s), s))(jnp.stack([ac, ar]))
  mean, var, _ = jax.jit(functools.partial(losses.task_statistics,
                                           num_tasks=3))(
      jnp.concatenate([s[0], s[1]]), jnp.concatenate([tasks, tasks]))
  assert np.all(np.abs(np.asarray(mean)) < 0.05)
  assert np.all(np.abs(np.asarray(var) - 1.0) < 0.3)
  assert np.all(np.asarray(s[0] > s[1]))          # ranking preserved
