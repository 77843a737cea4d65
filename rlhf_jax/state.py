"""Training state and optimizer factory shared by every training stage.

`TrainState` is a plain pytree of arrays (step, params, opt_state, rng), so it
can be jitted, donated, sharded and checkpointed by Orbax as one object. The
optimizer itself is not stored in the state: callers keep the
`optax.GradientTransformation` from `make_optimizer` and pass it to their step
factory, which keeps the state serialisable and the step a pure function.

Randomness inside a step is drawn from `jax.random.fold_in(state.rng, state.step)`,
so a run restored from a checkpoint draws exactly the numbers it would have
drawn without the interruption.
"""
from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax

__all__ = [
    "TrainState",
    "create_train_state",
    "apply_gradients",
    "apply_gradients_with_status",
    "make_schedule",
    "make_optimizer",
    "current_learning_rate",
    "weight_decay_mask",
]

SCHEDULES = ("cosine", "linear", "constant")
OPTIMIZERS = ("adamw", "sgd")


@flax.struct.dataclass
class TrainState:
  """Pytree holding everything a training step changes.

  Attributes:
    step: int32 scalar, the number of updates applied so far.
    params: the model parameters (any pytree of arrays).
    opt_state: the optax state of the optimizer that created it.
    rng: a raw `uint32[2]` PRNG key (the `jax.random.PRNGKey` format), kept raw
      so that Orbax saves it like any other array. Derive per-step keys with
      `jax.random.fold_in(state.rng, state.step)`.

  RL stages that need more (reference params, KL controller) subclass it with
  `@flax.struct.dataclass class PPOState(TrainState): ref_params: Any`.
  """

  step: jax.Array
  params: Any
  opt_state: Any
  rng: jax.Array


def _raw_key(rng: jax.Array) -> jax.Array:
  rng = jnp.asarray(rng) if not isinstance(rng, jax.Array) else rng
  if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):
    rng = jax.random.key_data(rng)
  if rng.dtype != jnp.uint32 or rng.ndim != 1:
    raise ValueError(
        "rng must be a raw uint32 key from jax.random.PRNGKey (or a typed key "
        f"from jax.random.key); got dtype {rng.dtype} shape {rng.shape}")
  return rng


def create_train_state(params: Any, optimizer: optax.GradientTransformation,
                       rng: jax.Array) -> TrainState:
  """Builds the step-0 `TrainState`.

  Call it inside `jax.jit(..., out_shardings=...)` to create the optimizer
  state directly in the parameters' layout.

  Args:
    params: parameter pytree.
    optimizer: the transformation from `make_optimizer` (or any optax one).
    rng: `jax.random.PRNGKey(seed)` (raw uint32[2]) or a typed `jax.random.key`;
      typed keys are converted to raw key data.

  Returns:
    `TrainState(step=0 (int32), params, opt_state=optimizer.init(params), rng)`.
  """
  return TrainState(
      step=jnp.zeros((), jnp.int32),
      params=params,
      opt_state=optimizer.init(params),
      rng=_raw_key(rng),
  )


def _all_finite(tree: Any) -> jax.Array:
  """True when every floating leaf of `tree` is free of NaN and Inf (a bool scalar, no host sync)."""
  flags = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
           if jnp.issubdtype(jnp.result_type(x), jnp.inexact)]
  return jnp.all(jnp.stack(flags)) if flags else jnp.array(True)


def apply_gradients_with_status(state: TrainState, grads: Any, optimizer: optax.GradientTransformation, *,
                                loss: jax.Array | None = None) -> tuple[TrainState, jax.Array]:
  """One guarded optimizer update, and whether it was skipped.

    ok      = isfinite(loss) ∧ isfinite(grads) ∧ isfinite(updates)     (every element)
    params  ← ok ? params + optimizer.update(grads) : params
    opt_state ← ok ? new opt_state : opt_state
    step    ← step + 1                                                 (always)

  A non-finite loss or gradient (NaN or Inf anywhere, so also a non-finite
  global norm) or an update made non-finite by the optimizer (e.g. an
  infinite learning rate) leaves `params` and `opt_state` bit-identical: the
  step counter still advances, so the data position and per-step keys stay in
  step with an unskipped run. The choice is made with `jnp.where` inside the
  traced function: no Python branch on values, no host sync.

  Args:
    state: current state.
    grads: gradients with the structure of `state.params`.
    optimizer: the transformation that built `state.opt_state`.
    loss: optional loss (any shape) checked with the gradients.

  Returns:
    `(new_state, skipped)`: `skipped` is a float32 scalar, 1.0 when the update
    was skipped and 0.0 when it was applied (a metric that averages to the
    fraction of skipped steps).
  """
  updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
  ok = _all_finite(grads) & _all_finite(updates)
  if loss is not None:
    ok = ok & jnp.all(jnp.isfinite(jnp.asarray(loss)))
  keep = lambda new, old: jnp.where(ok, new, old)
  new_state = state.replace(
      step=state.step + 1,
      params=jax.tree.map(keep, optax.apply_updates(state.params, updates), state.params),
      opt_state=jax.tree.map(keep, opt_state, state.opt_state),
  )
  return new_state, 1.0 - ok.astype(jnp.float32)


def apply_gradients(state: TrainState, grads: Any, optimizer: optax.GradientTransformation, *,
                    loss: jax.Array | None = None) -> TrainState:
  """One optimizer update: `params ← params + optimizer.update(grads)`, step + 1.

  Guarded: a non-finite loss, gradient or update skips the update (params and
  opt_state unchanged, step + 1); see `apply_gradients_with_status`, which
  also returns the skipped flag for the metrics.

  Args:
    state: current state.
    grads: gradients with the structure of `state.params`.
    optimizer: the transformation that built `state.opt_state`.
    loss: optional loss checked with the gradients.

  Returns:
    The new state; `rng` is unchanged (keys are derived with `fold_in(rng, step)`).
  """
  return apply_gradients_with_status(state, grads, optimizer, loss=loss)[0]


def make_schedule(*, learning_rate: float, schedule: str = "cosine",
                  warmup_steps: int = 0, total_steps: int,
                  end_lr_ratio: float = 0.1) -> optax.Schedule:
  """The learning-rate schedule: linear warmup, then decay.

    lr(t) = learning_rate * t / warmup_steps                  for t < warmup_steps
    cosine:   lr_end + (lr - lr_end) * (1 + cos(pi * u)) / 2  u = (t - warmup) / (total - warmup)
    linear:   lr + (lr_end - lr) * u
    constant: lr
  with lr_end = end_lr_ratio * learning_rate, and u clipped to [0, 1] (the rate
  stays at lr_end after total_steps).

  Args:
    learning_rate: peak rate, > 0.
    schedule: "cosine", "linear" or "constant".
    warmup_steps: steps of linear warmup from 0 (0 = none); <= total_steps.
    total_steps: step at which the decay reaches its end value.
    end_lr_ratio: final rate as a fraction of the peak.

  Returns:
    An optax schedule `count -> lr`.
  """
  if schedule not in SCHEDULES:
    raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
  if not learning_rate > 0:
    raise ValueError(f"learning_rate must be > 0, got {learning_rate}")
  if warmup_steps < 0 or total_steps < 1 or warmup_steps > total_steps:
    raise ValueError(
        "need 0 <= warmup_steps <= total_steps and total_steps >= 1, got "
        f"warmup_steps={warmup_steps}, total_steps={total_steps}")
  if not 0.0 <= end_lr_ratio <= 1.0:
    raise ValueError(f"end_lr_ratio must be in [0, 1], got {end_lr_ratio}")
  end_lr = learning_rate * end_lr_ratio
  decay_steps = max(total_steps - warmup_steps, 1)
  if schedule == "cosine":
    decay = optax.cosine_decay_schedule(
        learning_rate, decay_steps, alpha=end_lr_ratio)
  elif schedule == "linear":
    decay = optax.linear_schedule(learning_rate, end_lr, decay_steps)
  else:
    decay = optax.constant_schedule(learning_rate)
  if warmup_steps == 0:
    return decay
  warmup = optax.linear_schedule(0.0, learning_rate, warmup_steps)
  return optax.join_schedules([warmup, decay], [warmup_steps])


def weight_decay_mask(params: Any) -> Any:
  """True for the leaves that get weight decay.

  Norm scales, biases and any array with ndim <= 1 are excluded: decaying them
  pulls norms towards 0 and biases have no scale to regularise.
  """

  def keep(path, leaf) -> bool:
    names = "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)
    names = names.lower()
    return not ("norm" in names or "bias" in names or jnp.ndim(leaf) <= 1)

  return jax.tree_util.tree_map_with_path(keep, params)


def make_optimizer(*, learning_rate: float, schedule: str = "cosine",
                   warmup_steps: int = 0, total_steps: int,
                   end_lr_ratio: float = 0.1, b1: float = 0.9,
                   b2: float = 0.95, eps: float = 1e-8,
                   weight_decay: float = 0.0, grad_clip: float | None = 1.0,
                   name: str = "adamw") -> optax.GradientTransformation:
  """AdamW (or SGD with momentum) with global-norm clipping and a schedule.

  The chain is: clip_by_global_norm(grad_clip) → scale_by_adam(b1, b2, eps)
  → add_decayed_weights(weight_decay, mask=weight_decay_mask) → −lr(t).
  Weight decay is decoupled (AdamW: `θ ← θ − lr (adam(g) + wd θ)`) and skips
  norms, biases and 1-D arrays. For "sgd", `b1` is the momentum (0 = plain SGD).

  The learning rate is injected as a hyperparameter, so
  `current_learning_rate(opt_state)` returns the rate of the last update.

  Args:
    learning_rate, schedule, warmup_steps, total_steps, end_lr_ratio: see
      `make_schedule`.
    b1, b2, eps: Adam moments and epsilon.
    weight_decay: decoupled weight decay coefficient (>= 0).
    grad_clip: max global gradient norm; None or 0 disables clipping.
    name: "adamw" or "sgd".

  Returns:
    An `optax.GradientTransformation`.
  """
  if name not in OPTIMIZERS:
    raise ValueError(f"name must be one of {OPTIMIZERS}, got {name!r}")
  if weight_decay < 0:
    raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
  if grad_clip is not None and grad_clip < 0:
    raise ValueError(f"grad_clip must be >= 0 or None, got {grad_clip}")
  lr_schedule = make_schedule(learning_rate=learning_rate, schedule=schedule,
                              warmup_steps=warmup_steps, total_steps=total_steps,
                              end_lr_ratio=end_lr_ratio)

  def factory(learning_rate):
    parts = []
    if grad_clip:
      parts.append(optax.clip_by_global_norm(grad_clip))
    if name == "adamw":
      parts.append(optax.scale_by_adam(b1=b1, b2=b2, eps=eps))
    elif b1:
      parts.append(optax.trace(decay=b1))
    if weight_decay:
      parts.append(optax.add_decayed_weights(weight_decay, mask=weight_decay_mask))
    parts.append(optax.scale_by_learning_rate(learning_rate))
    return optax.chain(*parts)

  # Only the rate is injected (a keyword to inject_hyperparams), so the mask
  # callable above is never mistaken for a schedule.
  return optax.inject_hyperparams(factory)(learning_rate=lr_schedule)


def current_learning_rate(opt_state: Any) -> jax.Array:
  """The learning rate used by the most recent update (step 0 rate before any).

  Args:
    opt_state: the state of an optimizer from `make_optimizer` (or any state
      containing an optax inject-hyperparams state with a `learning_rate`).

  Returns:
    A float32 scalar.
  """
  found = []

  def is_injected(x) -> bool:
    # optax has several InjectHyperparams*State NamedTuples; all carry
    # `hyperparams`, a dict of the current values.
    return isinstance(getattr(x, "hyperparams", None), dict)

  def visit(x):
    if is_injected(x) and "learning_rate" in x.hyperparams:
      found.append(x.hyperparams["learning_rate"])
    return x

  jax.tree_util.tree_map(visit, opt_state, is_leaf=is_injected)
  if not found:
    raise ValueError("opt_state has no injected learning_rate; build the "
                     "optimizer with make_optimizer")
  return found[0]

