"""Pure loss functions of arrays: each returns (loss, metrics) or arrays.

Nothing here imports Flax, configs or the host layer (DESIGN.md).
"""
from rlhf_jax.losses.advantage_model import TaskStats
from rlhf_jax.losses.advantage_model import advantage_model_loss
from rlhf_jax.losses.advantage_model import init_task_stats
from rlhf_jax.losses.advantage_model import task_statistics
from rlhf_jax.losses.advantage_model import update_task_stats
from rlhf_jax.losses.advantages import GROUP_ADVANTAGES
from rlhf_jax.losses.advantages import gae
from rlhf_jax.losses.advantages import group_advantages
from rlhf_jax.losses.advantages import grpo_advantages
from rlhf_jax.losses.advantages import rloo_advantages
from rlhf_jax.losses.bon import bon_distribution
from rlhf_jax.losses.bond import bond_backward_return
from rlhf_jax.losses.bond import ema_update
from rlhf_jax.losses.bond import jbond_crude_reward
from rlhf_jax.losses.bond import jbond_loss
from rlhf_jax.losses.bond import leave_one_out_baseline
from rlhf_jax.losses.bond import mc_quantile_reward
from rlhf_jax.losses.common import aggregate_loss
from rlhf_jax.losses.common import entropy_from_logits
from rlhf_jax.losses.common import masked_mean
from rlhf_jax.losses.common import masked_sum
from rlhf_jax.losses.common import masked_var
from rlhf_jax.losses.common import masked_whiten
from rlhf_jax.losses.common import sequence_logprobs
from rlhf_jax.losses.common import token_logprobs
from rlhf_jax.losses.dpo import dpo_loss
from rlhf_jax.losses.kl import KLControllerState
from rlhf_jax.losses.kl import adaptive_kl_update
from rlhf_jax.losses.kl import init_kl_controller
from rlhf_jax.losses.kl import kl_penalty
from rlhf_jax.losses.kl import kl_shaped_rewards
from rlhf_jax.losses.kl import last_token_mask
from rlhf_jax.losses.kl import normalize_rewards
from rlhf_jax.losses.ppo import ppo_policy_loss
from rlhf_jax.losses.ppo import value_loss
from rlhf_jax.losses.reward import bradley_terry_loss
from rlhf_jax.losses.reward import pairwise_calibration
from rlhf_jax.losses.sft import sft_loss
from rlhf_jax.losses.sft import sft_loss_from_logprobs
from rlhf_jax.losses.sft import token_correct
