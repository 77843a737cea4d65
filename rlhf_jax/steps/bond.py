"""BOND and J-BOND as one jitted update with the anchor inside the state (ALGORITHMS §6).

Per prompt the batch holds one policy sample y ~ π_θ and k anchor samples
y'_1..y'_k ~ π_anchor with their rewards. One step:
  1. log π_θ of y and of the forward target y'_best (one forward on [2B, S]),
     log π_anchor(y) from `state.anchor_params` (no gradient);
  2. the loss  L = (1 − β)·L_FW + β·L_BW + γ·L_KL  (weighted batch means):
       L_FW = −log π_θ(y'_best)                        forward KL(Bo-n(π_anchor)‖π_θ), SFT on the best of n
       R    = stopgrad((n − 1)·ρ(y) − (log π_θ(y) − log π_anchor(y)))
       L_BW = −(R − b)·log π_θ(y)                       backward KL(π_θ‖Bo-n(π_anchor)), REINFORCE
       L_KL = stopgrad(log π_θ(y) − log π_anchor(y))·log π_θ(y)     score-function ∇KL(π_θ‖π_anchor)
     with ρ and n by variant:
       "jbond": n = 2, k = 2, ρ = r_J(y) = −log 16 if r(y) < min(r(y'_1), r(y'_2)) else 0 (strict, §6.4)
       "bond":  n ≥ 1, k ≥ n, ρ = log max(p̂_≤(y), 1/(k + 1)), p̂_≤ = (1/k) Σ_i 1[r(y'_i) ≤ r(y)] (§6.2)
     and b the leave-one-out mean of R over the batch's other (weight > 0) rows, or 0;
     y'_best = the best of y'_1..y'_n (the first n anchor samples; ties: first wins);
  3. the optimizer step, then the anchor update on the new parameters, in the jit:
       EMA (default)            θ_a ← (1 − η)·θ_a + η·θ        (η = 0 freezes the anchor)
       hard_anchor_every = K    θ_a ← θ whenever the step count is a multiple of K (iterative BOND;
                                replaces the EMA), chosen with jnp.where, not a Python branch.

Sequence log-probs are sums over response tokens (§1). `weights` [B] weight the rows
(0 = not trained on and not in the baseline); a row's weight may be a probability, so
an enumerated batch weighted by its outcome probabilities gives the exact expected
gradient.

Where the fixed point lies (a frozen anchor, exact expectations): the forward term alone
(β = 0) is minimised at Bo-n(π_anchor). The backward term's return drops BoN's factor (B)
and replaces log p_≤ by ρ, so its minimiser is π_anchor·exp((n − 1)·E[ρ])/Z — for J-BOND
π_anchor·16^(−(1 − p_≤)²)/Z, which equals Bo-2 only approximately (E[r_J] = log p_≤ only at
the anchor median). For 0 < β < 1 the fixed point minimises
(1 − β)·KL(Bo-n‖π) + β·KL(π‖that target) (+ γ·KL(π‖π_anchor)).
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import flax
import jax
import jax.numpy as jnp
import optax

from rlhf_jax import losses
from rlhf_jax.bon import best_of_n_indices, take_best
from rlhf_jax.losses import common
from rlhf_jax.losses.bond import BASELINES
from rlhf_jax.losses.kl import KL_KINDS
from rlhf_jax.state import TrainState, apply_gradients
from rlhf_jax.steps.common import completion_logprobs

VARIANTS = ("jbond", "bond")
BATCH_KEYS = ("tokens", "mask", "completion_mask", "rewards", "anchor_tokens", "anchor_mask",
              "anchor_completion_mask", "anchor_rewards", "weights")


@flax.struct.dataclass
class BONDState:
  """Policy train state, the anchor parameters and the count of anchor moves.

  Attributes:
    policy: the policy's `TrainState` (step, params, opt_state, rng).
    anchor_params: π_anchor's parameters (same pytree as `policy.params`).
    anchor_updates: int32 scalar, the number of anchor moves so far (EMA updates, or
      hard copies with `hard_anchor_every`): M in "the target is ≈ Bo-n^M of the start".
  """

  policy: TrainState
  anchor_params: Any
  anchor_updates: jax.Array


def create_bond_state(policy: TrainState, anchor_params: Any = None) -> BONDState:
  """The step-0 `BONDState`; the anchor defaults to a copy of the policy's parameters.

  The anchor is a copy (never the same buffers), so the state can be donated.
  """
  src = policy.params if anchor_params is None else anchor_params
  if jax.tree.structure(src) != jax.tree.structure(policy.params):
    raise ValueError("`anchor_params` must have the pytree structure of `policy.params`.")
  return BONDState(policy=policy, anchor_params=jax.tree.map(jnp.copy, src),
                   anchor_updates=jnp.zeros((), jnp.int32))


def weighted_loo_baseline(x_B: jax.Array, w_B: jax.Array) -> jax.Array:
  """b_i = Σ_{j≠i} w_j x_j / Σ_{j≠i} w_j (0 when no other row has weight).

  With all weights 1 this is `losses.leave_one_out_baseline`.
  """
  return common.safe_divide(jnp.sum(w_B * x_B) - w_B * x_B, jnp.sum(w_B) - w_B)


def _check_batch(batch: dict, *, variant: str, n: int, prompt_len: int) -> tuple[int, int]:
  missing = [k for k in BATCH_KEYS if k not in batch]
  if missing:
    raise ValueError(f"BOND batch is missing keys {missing}; it needs {list(BATCH_KEYS)}.")
  tokens = batch["tokens"]
  common.check_ndim(tokens, 2, "batch['tokens']")
  b, s = tokens.shape
  if not 1 <= prompt_len < s:
    raise ValueError(f"`prompt_len` must be in [1, {s}) for tokens of length {s}, got {prompt_len}.")
  g = s - prompt_len
  common.check_ndim(batch["anchor_tokens"], 3, "batch['anchor_tokens']")
  k = batch["anchor_tokens"].shape[1]
  expected = {"mask": (b, s), "completion_mask": (b, g), "rewards": (b,), "anchor_tokens": (b, k, s),
              "anchor_mask": (b, k, s), "anchor_completion_mask": (b, k, g), "anchor_rewards": (b, k),
              "weights": (b,)}
  for key, shape in expected.items():
    if tuple(jnp.shape(batch[key])) != shape:
      raise ValueError(f"`batch['{key}']` must have shape {list(shape)} (B={b}, k={k}, S={s},"
                       f" G=S−prompt_len={g}), got {list(jnp.shape(batch[key]))}.")
  if variant == "jbond" and k != 2:
    raise ValueError(f"J-BOND takes exactly 2 anchor samples per prompt; `batch['anchor_tokens']` has k={k}.")
  if variant == "bond" and k < n:
    raise ValueError(f"BOND's forward term needs k >= n anchor samples per prompt (n={n}); got k={k}.")
  return b, k


def make_bond_step(apply_fn: Callable, optimizer: optax.GradientTransformation, *, prompt_len: int,
                   variant: str = "jbond", beta: float = 0.5, gamma: float = 0.0, eta: float = 0.02,
                   hard_anchor_every: Optional[int] = None, n: int = 2, baseline: str = "loo",
                   kl_estimator: str = "k3") -> Callable:
  """`step(state: BONDState, batch) -> (state, metrics)`: one BOND / J-BOND update (module docstring).

  batch (B prompts, k anchor samples each, S = prompt_len + G slots, completions from slot prompt_len):
    tokens, mask [B, S]                  the policy sample y
    completion_mask [B, G]               y's response tokens (incl. EOS)
    rewards [B]                          r(x, y)
    anchor_tokens, anchor_mask [B, k, S] the anchor samples y'_1..y'_k (k = 2 for J-BOND)
    anchor_completion_mask [B, k, G]
    anchor_rewards [B, k]                r(x, y'_i)
    weights [B]                          row weights / mask (0 = ignored)

  Args:
    apply_fn: `apply_fn(params, tokens, mask) -> (logits, aux)` of the policy (and anchor).
    optimizer: the optax transformation that built `state.policy.opt_state`.
    prompt_len: number of prompt slots (left-padded prompts), static.
    variant: "jbond" (crude 2-sample reward, n = 2) or "bond" (Monte Carlo quantile over k samples).
    beta: Jeffreys mix β ∈ [0, 1] (weight of the backward term).
    gamma: extra KL(π_θ‖π_anchor) coefficient γ ≥ 0.
    eta: anchor EMA rate η ∈ [0, 1] (0 = frozen anchor); unused with `hard_anchor_every`.
    hard_anchor_every: K ≥ 1 for a hard copy θ_a ← θ every K steps instead of the EMA.
    n: the best-of-n target of plain BOND (must be 2 for J-BOND).
    baseline: "loo" (leave-one-out mean return of the other prompts) or "none".
    kl_estimator: "k1", "k2" or "k3", the per-token estimator of the `kl/anchor` metric.

  Metrics: bond/loss, bond/fw_nll, bond/bw_loss, bond/kl_loss, bond/return (mean R), bond/reward
    (mean ρ: r_J or the clipped log p̂), bond/quantile (mean p̂_≤ of y among the k anchor rewards),
    bond/beats_all (fraction of y with r(y) > every anchor reward), bond/below_all (fraction with
    r(y) < every anchor reward), reward/policy, reward/anchor (mean over the k anchor samples),
    reward/anchor_best (reward of the forward target, the best of the first n), kl/anchor
    (Σ_t of the per-token estimator), kl/anchor_log_ratio (mean log π_θ(y) − log π_anchor(y)),
    policy/entropy (per-token mean, tokens weighted by their row's weight), policy/grad_norm,
    anchor/updates. Means are weighted by `weights` (rows with weight 0 do not count).
  """
  if variant not in VARIANTS:
    raise ValueError(f"`variant` must be one of {VARIANTS}, got {variant!r}.")
  if not 0.0 <= beta <= 1.0:
    raise ValueError(f"`beta` must be in [0, 1], got {beta}.")
  if gamma < 0:
    raise ValueError(f"`gamma` must be >= 0, got {gamma}.")
  if not 0.0 <= eta <= 1.0:
    raise ValueError(f"`eta` must be in [0, 1], got {eta}.")
  if hard_anchor_every is not None and (not isinstance(hard_anchor_every, int) or hard_anchor_every < 1):
    raise ValueError(f"`hard_anchor_every` must be None or an int >= 1, got {hard_anchor_every!r}.")
  if not isinstance(n, int) or n < 1:
    raise ValueError(f"`n` must be an int >= 1, got {n!r}.")
  if variant == "jbond" and n != 2:
    raise ValueError(f"J-BOND distils Best-of-2: `n` must be 2 for variant='jbond', got {n}.")
  if baseline not in BASELINES:
    raise ValueError(f"`baseline` must be one of {BASELINES}, got {baseline!r}.")
  if kl_estimator not in KL_KINDS:
    raise ValueError(f"`kl_estimator` must be one of {KL_KINDS}, got {kl_estimator!r}.")
  if not isinstance(prompt_len, int) or prompt_len < 1:
    raise ValueError(f"`prompt_len` must be an int >= 1, got {prompt_len!r}.")

  def loss_fn(params, data):
    tokens_2BxS = jnp.concatenate([data["tokens"], data["best_tokens"]], axis=0)
    mask_2BxS = jnp.concatenate([data["mask"], data["best_mask"]], axis=0)
    lp_2BxG, ent_2BxG = completion_logprobs(apply_fn, params, tokens_2BxS, mask_2BxS, prompt_len,
                                            with_entropy=True)
    b = data["tokens"].shape[0]
    lp_BxG, best_lp_BxG = lp_2BxG[:b], lp_2BxG[b:]
    logp_B = losses.sequence_logprobs(lp_BxG, data["completion_mask"])
    best_logp_B = losses.sequence_logprobs(best_lp_BxG, data["best_completion_mask"])
    w_B = data["weights"]
    anchor_logp_B = losses.sequence_logprobs(data["anchor_lp"], data["completion_mask"])
    log_ratio_B = jax.lax.stop_gradient(logp_B - anchor_logp_B)
    ret_B = losses.bond_backward_return(data["rho"], logp_B, anchor_logp_B, n=n)
    b_B = weighted_loo_baseline(ret_B, w_B) if baseline == "loo" else jnp.zeros_like(ret_B)
    adv_B = jax.lax.stop_gradient(ret_B - b_B)

    def wmean(x_B):
      return losses.masked_mean(x_B, w_B)

    fw = -wmean(best_logp_B)
    bw = -wmean(adv_B * logp_B)
    kl_term = wmean(log_ratio_B * logp_B)
    loss = (1.0 - beta) * fw + beta * bw + gamma * kl_term
    ent_mask_BxG = data["completion_mask"] * w_B[:, None]
    kl_B = losses.masked_sum(losses.kl_penalty(jax.lax.stop_gradient(lp_BxG), data["anchor_lp"], kind=kl_estimator),
                             data["completion_mask"], axis=1)
    metrics = {
        "bond/loss": loss, "bond/fw_nll": fw, "bond/bw_loss": bw, "bond/kl_loss": kl_term,
        "bond/return": wmean(ret_B), "kl/anchor": wmean(kl_B), "kl/anchor_log_ratio": wmean(log_ratio_B),
        "policy/entropy": losses.masked_mean(ent_2BxG[:b], ent_mask_BxG),
    }
    return loss, jax.tree.map(jax.lax.stop_gradient, metrics)

  def step(state: BONDState, batch: dict):
    _check_batch(batch, variant=variant, n=n, prompt_len=prompt_len)
    w_B = batch["weights"].astype(jnp.float32)
    cmask_BxG = batch["completion_mask"].astype(jnp.float32)
    rewards_B = batch["rewards"].astype(jnp.float32)
    anchor_rewards_BxK = batch["anchor_rewards"].astype(jnp.float32)

    # Forward target: the best of the first n anchor samples (first wins on ties).
    best_B = best_of_n_indices(anchor_rewards_BxK[:, :n])
    best = take_best({"tokens": batch["anchor_tokens"], "mask": batch["anchor_mask"],
                      "completion_mask": batch["anchor_completion_mask"], "reward": anchor_rewards_BxK}, best_B)
    if variant == "jbond":
      rho_B = losses.jbond_crude_reward(rewards_B, anchor_rewards_BxK)
    else:
      rho_B = losses.mc_quantile_reward(rewards_B, anchor_rewards_BxK)

    anchor_lp_BxG = jax.lax.stop_gradient(
        completion_logprobs(apply_fn, state.anchor_params, batch["tokens"], batch["mask"], prompt_len))
    data = {
        "tokens": batch["tokens"], "mask": batch["mask"], "completion_mask": cmask_BxG,
        "best_tokens": best["tokens"], "best_mask": best["mask"],
        "best_completion_mask": best["completion_mask"].astype(jnp.float32),
        "anchor_lp": anchor_lp_BxG,
        "rho": rho_B, "weights": w_B,
    }
    (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.policy.params, data)
    policy = apply_gradients(state.policy, grads, optimizer)

    if hard_anchor_every is None:
      anchor = losses.ema_update(state.anchor_params, policy.params, eta=eta)
      moved = jnp.ones((), jnp.int32)
    else:
      copy = (policy.step % hard_anchor_every) == 0
      anchor = jax.tree.map(lambda a, p: jnp.where(copy, p.astype(a.dtype), a), state.anchor_params,
                            policy.params)
      moved = copy.astype(jnp.int32)
    new_state = BONDState(policy=policy, anchor_params=anchor, anchor_updates=state.anchor_updates + moved)

    wmean = lambda x_B: losses.masked_mean(x_B, w_B)
    best_all_B = jnp.max(anchor_rewards_BxK, axis=-1)
    metrics.update({
        "bond/reward": wmean(rho_B),
        "bond/quantile": wmean(jnp.mean((anchor_rewards_BxK <= rewards_B[:, None]).astype(jnp.float32), -1)),
        "bond/beats_all": wmean((rewards_B > best_all_B).astype(jnp.float32)),
        "bond/below_all": wmean((rewards_B < jnp.min(anchor_rewards_BxK, -1)).astype(jnp.float32)),
        "reward/policy": wmean(rewards_B),
        "reward/anchor": wmean(jnp.mean(anchor_rewards_BxK, -1)),
        "reward/anchor_best": wmean(best["reward"]),
        "policy/grad_norm": optax.global_norm(grads),
        "anchor/updates": new_state.anchor_updates,
    })
    return new_state, metrics

  return step
