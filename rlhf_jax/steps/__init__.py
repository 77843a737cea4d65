"""Step factories: `make_<algo>_step(apply_fn, optimizer, *, hyperparameters)`.

Each returns a pure `step(state, batch) -> (state, metrics)` that callers jit
once with shardings and donation (see `rlhf_jax.pipelines`).
"""

from rlhf_jax.steps.common import completion_logprobs, completion_values, last_valid_index, sequence_scores
from rlhf_jax.steps.ppo import PPOState, kept_per_prompt, make_ppo_step, make_score_fn as make_ppo_score_fn, \
    select_rows
from rlhf_jax.steps.rm import make_rm_eval_step, make_rm_step, make_score_fn
from rlhf_jax.steps.sft import make_sft_eval_step, make_sft_step

__all__ = [
    "completion_logprobs", "completion_values", "last_valid_index", "sequence_scores", "PPOState",
    "kept_per_prompt", "make_ppo_step", "make_ppo_score_fn", "select_rows", "make_rm_eval_step", "make_rm_step",
    "make_score_fn", "make_sft_eval_step", "make_sft_step",
]
