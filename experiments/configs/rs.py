"""Rejection-sampling fine-tuning (Llama 2 RS-FT / RAFT) on the RL testbed: SFT -> rounds of best-of-8 -> SFT.

Run (2 CPU cores; numbers in experiments/RESULTS.md):

  python -m experiments.run --config=rs.py --workdir=runs/rs

The testbed is grpo.py's. Each of 3 rounds samples 8 completions for 128 fresh train
prompts from the current policy, keeps each prompt's best by the task's grade, and runs
50 SFT steps on the kept pairs; held-out T=1 and greedy success are measured before round
1 and after each round (`rs/summary.json`: initial/final). Threshold RS instead:
--config.rs.selection=threshold --config.rs.threshold=0.99 (keeps every full-credit sample).
With a learned RM: --config.rs.reward_source=rm and stages ("sft", "rm", "rs").
"""
from experiments.configs import grpo
from experiments.configs.base import get_base_config


def get_config():
  config = grpo.testbed(get_base_config())
  config.stages = ("sft", "rs")
  config.algo.name = "rs"
  config.rs.rounds = 3
  config.rs.prompts_per_round = 128
  config.rs.samples_per_prompt = 8
  config.rs.selection = "best_of_n"
  config.rs.reward_source = "task"
  config.rs.sft_steps = 50
  config.rs.sft_batch_size = 32
  config.rs.eval_prompts = 64
  config.rs.eval_samples = 4
  config.rs.rollout_batch = 32
  config.rs.optimizer.learning_rate = 1e-4
  return config
