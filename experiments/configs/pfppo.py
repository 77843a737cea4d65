"""PF-PPO end to end on the RL testbed: SFT -> PPO with policy filtration (best_random, N = 5).

Run (2 CPU cores; measured time and numbers in experiments/RESULTS.md):

  python -m experiments.run --config=pfppo.py --workdir=runs/pfppo

The testbed is the synthetic `reverse:` task of grpo.py (the same SFT policy: a
workdir holding a finished SFT of either config serves both). Each iteration samples
N = 5 responses per prompt, scores them with the task's exact grade (character
credit), and the PF-PPO filter keeps the best and one random sample of each prompt
for the PPO update (GAE, a critic from the SFT backbone). The summary line reports
the held-out T=1 success rate and greedy success before and after.

With a *learned* reward model instead of the grade (the paper's setting), use
pfppo_rm.py: on this testbed the RM the tiny model can learn is exploited by the
policy and the true success falls (RESULTS.md, "PF-PPO with a learned RM"), which is
why the main command trains on the exact grade. Another strategy is a new run directory:

  python -m experiments.run --config=pfppo.py --workdir=runs/pfppo_bw --config.algo.strategy=best_worst

(copy or symlink runs/pfppo/sft into it to reuse the SFT; rerunning a finished stage in the
same workdir with other settings is refused, never silently mixed).
Outputs: <workdir>/{sft,ppo}/ with metrics.jsonl, tb/, PNG plots and summary.json.
"""
from experiments.configs import grpo
from experiments.configs.base import get_base_config


def pfppo(config):
  """The PPO + policy-filtration settings shared with pfppo_rm.py."""
  config.algo.name = "ppo"
  config.algo.advantage = "gae"
  config.algo.strategy = "best_random"
  config.algo.kl_estimator = "k1"
  config.ppo.samples_per_prompt = 5   # the paper's N
  config.ppo.critic_optimizer.learning_rate = 1e-4
  return config


def get_config():
  config = pfppo(grpo.testbed(get_base_config()))
  config.stages = ("sft", "ppo")
  config.ppo.reward_source = "task"
  config.ppo.critic_init = "sft"
  return config
