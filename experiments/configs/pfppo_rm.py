"""PF-PPO with a learned reward model (the paper's setting): SFT -> RM -> PF-PPO (best_random, N = 5).

  python -m experiments.run --config=pfppo_rm.py --workdir=runs/pfppo_rm

pfppo.py with the reward of a reward model trained on pairs of the SFT policy's own
samples ranked by the task's grade (never the grader itself). The RM data are
sampled at T = 1.5 with the reference response added as a candidate: broader
coverage than T = 1 samples, which the policy otherwise exploits within ten
iterations (RESULTS.md, "PF-PPO with a learned RM"). PPO trains on the RM's
normalised reward, the critic initialised from the RM, with a KL coefficient of 0.2
(the reward's scale is the RM's standard deviation, not the grade's [0, 1]).
Measured on this testbed the policy still exploits the RM: held-out success does not
rise (RESULTS.md). Outputs: <workdir>/{sft,rm,ppo}/.
"""
from experiments.configs import grpo, pfppo
from experiments.configs.base import get_base_config


def get_config():
  config = pfppo.pfppo(grpo.testbed(get_base_config()))
  config.stages = ("sft", "rm", "ppo")
  config.ppo.reward_source = "rm"
  config.ppo.critic_init = "rm"
  config.algo.kl_coef = 0.2

  config.rm.num_prompts = 2048
  config.rm.samples_per_prompt = 8
  config.rm.temperature = 1.5
  config.rm.include_reference = True
  config.rm.max_pairs_per_prompt = 8
  config.rm.steps = 1500
  config.rm.batch_size = 32
  config.rm.optimizer.learning_rate = 3e-4
  config.rm.optimizer.warmup_steps = 10
  return config
