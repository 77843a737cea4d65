"""Step factories: `make_<algo>_step(apply_fn, optimizer, *, hyperparameters)`.

Each returns a pure `step(state, batch) -> (state, metrics)` that callers jit
once with shardings and donation (see `rlhf_jax.pipelines`).
"""

from rlhf_jax.steps.sft import make_sft_eval_step, make_sft_step

__all__ = ["make_sft_step", "make_sft_eval_step"]
