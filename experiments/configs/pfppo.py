"""PF-PPO end to end on the RL testbed: SFT -> reward model -> PF-PPO (best_random) with the learned RM.

Run (2 CPU cores; measured time and numbers in experiments/RESULTS.md):

  python -m experiments.run --config=pfppo.py --workdir=runs/pfppo

The testbed is the synthetic `reverse:` task of grpo.py (the same SFT policy: a
workdir holding a finished SFT of either config serves both). The RM is trained on
pairs of the SFT policy's own samples ranked by the task's grade (never the grader
itself); PPO trains on its normalised reward with a critic initialised from it, the
PF-PPO filter keeping the best and one random sample of the N = 5 per prompt. The
summary line reports the held-out T=1 success rate and greedy success before and
after. Another strategy is a new run directory:

  python -m experiments.run --config=pfppo.py --workdir=runs/pfppo_bw --config.algo.strategy=best_worst

(copy or symlink runs/pfppo/sft and runs/pfppo/rm into it to reuse them; rerunning a
finished stage in the same workdir with other settings is refused, never silently mixed).
Outputs: <workdir>/{sft,rm,ppo}/ with metrics.jsonl, tb/, PNG plots and summary.json.
"""
from experiments.configs import grpo
from experiments.configs.base import get_base_config


def get_config():
  config = grpo.testbed(get_base_config())
  config.stages = ("sft", "rm", "ppo")
  config.algo.name = "ppo"
  config.algo.advantage = "gae"
  config.algo.strategy = "best_random"
  config.algo.kl_estimator = "k1"
  config.ppo.reward_source = "rm"
  config.ppo.samples_per_prompt = 5   # the paper's N
  config.ppo.critic_optimizer.learning_rate = 1e-4

  config.rm.num_prompts = 256
  config.rm.samples_per_prompt = 8
  config.rm.max_pairs_per_prompt = 4
  config.rm.steps = 150
  config.rm.batch_size = 16
  config.rm.optimizer.learning_rate = 3e-4
  config.rm.optimizer.warmup_steps = 10
  return config
