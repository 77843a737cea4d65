"""Step factories: `make_<algo>_step(apply_fn, optimizer, *, hyperparameters)`.

Each returns a pure `step(state, batch) -> (state, metrics)` that callers jit
once with shardings and donation (see `rlhf_jax.pipelines`).
"""

from rlhf_jax.steps.am import AMState, init_am_state, make_am_step
from rlhf_jax.steps.bond import BATCH_KEYS as BOND_BATCH_KEYS
from rlhf_jax.steps.bond import BONDState, create_bond_state, make_bond_step, weighted_loo_baseline
from rlhf_jax.steps.common import completion_logprobs, completion_values, last_valid_index, map_rows, \
    microbatch_rows, rowwise_value_and_grad, sequence_scores
from rlhf_jax.steps.dpo import REFERENCES, make_dpo_step, make_sequence_logps_fn, pair_logps, sequence_logps
from rlhf_jax.steps.ppo import ADVANTAGES, PPOState, critic_from_reward_model, kept_per_prompt, make_ppo_step, \
    make_prepare_fn, make_score_fn as make_ppo_score_fn, select_rows
from rlhf_jax.steps.rehearsal import add_rehearsal_loss, prompt_embeddings, rehearsal_nll, select_rehearsal
from rlhf_jax.steps.rm import make_rm_eval_step, make_rm_step, make_score_fn
from rlhf_jax.steps.sft import make_sft_eval_step, make_sft_step

__all__ = [
    "AMState", "init_am_state", "make_am_step",
    "BOND_BATCH_KEYS", "BONDState", "create_bond_state", "make_bond_step", "weighted_loo_baseline",
    "completion_logprobs", "completion_values", "last_valid_index", "map_rows", "microbatch_rows",
    "rowwise_value_and_grad", "sequence_scores",
    "REFERENCES", "make_dpo_step", "make_sequence_logps_fn", "pair_logps", "sequence_logps",
    "ADVANTAGES", "PPOState", "critic_from_reward_model", "kept_per_prompt", "make_prepare_fn", "make_ppo_step",
    "make_ppo_score_fn", "select_rows",
    "add_rehearsal_loss", "prompt_embeddings", "rehearsal_nll", "select_rehearsal",
    "make_rm_eval_step", "make_rm_step", "make_score_fn", "make_sft_eval_step", "make_sft_step",
]
