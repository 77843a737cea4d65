"""RL with an Advantage Model on a three-task mixture: SFT -> am (AM + RM on the same pairs) -> PPO on the AM.

Run (2 CPU cores; measured time and numbers in experiments/RESULTS.md, section "Advantage Model and Selective
Rehearsal"):

  python -m experiments.run --config=am.py --workdir=runs/am

The mixture: synthetic reverse / sort / double (`task.mixture_tasks`, equal weights), each its own dataset and
grader (character match), records tagged with their task. SFT is stopped early so the tasks are learned to
different degrees; the `am` stage trains the AM (ALGORITHMS.md §10.2, a reconstruction) and an RM on the same
pairs and writes per-task accuracy / ECE / score statistics (am/summary.json, am/scores.png). PPO (GAE + critic,
the critic initialised from the AM) then trains on the normalised AM score; per-task reward and true score, and the
held-out expert set's NLL and greedy score per task (forgetting) are in ppo/metrics.jsonl and ppo/ppo_tasks.png.
The RM baseline: --config.stages="('sft','rm','ppo')" --config.ppo.reward_source=rm (the rm stage trains exactly
the RM of the am stage: same samples, pairs, batches and steps). With Selective Rehearsal: am_sr.py.
"""
from experiments.configs.base import get_base_config


def mixture_testbed(config):
  """The shared settings of am.py and am_sr.py."""
  config.model.preset = "tiny"
  config.task.name = "mixture"
  config.task.mixture_tasks = ("synthetic:reverse", "synthetic:sort", "synthetic:double")
  config.task.mixture_weights = (1.0, 1.0, 1.0)
  config.task.synthetic_max_len = 8
  config.task.num_train = 2000      # per member
  config.task.num_eval = 200        # per member
  config.task.max_prompt_len = 24   # BOS + "reverse: " + 8 letters + newline = 19
  config.task.max_response_len = 20  # "double" of 8 letters = 16 + EOS
  config.sampling.temperature = 1.0

  config.sft.steps = 300
  config.sft.optimizer.total_steps = 400  # stopped early: the tasks are learned to different degrees
  config.sft.batch_size = 32
  config.sft.eval_every = 100
  config.sft.optimizer.learning_rate = 1e-3
  config.sft.optimizer.warmup_steps = 20
  config.checkpoint.every_steps = 100
  config.logging.every_steps = 10

  config.rm.num_prompts = 1536      # 384 prompts x 150 steps left both AM and RM near chance (RESULTS.md)
  config.rm.samples_per_prompt = 4
  config.rm.max_pairs_per_prompt = 4
  config.rm.eval_fraction = 0.25
  config.rm.steps = 600
  config.rm.batch_size = 32
  config.rm.optimizer.learning_rate = 3e-4

  config.sr.expert_eval = True

  config.ppo.iterations = 60
  config.ppo.prompts_per_iteration = 16
  config.ppo.samples_per_prompt = 4
  config.ppo.eval_every = 10
  config.ppo.eval_prompts = 96
  config.ppo.eval_samples = 2
  config.ppo.checkpoint_every = 10
  config.ppo.rollout_batch = 32
  config.ppo.actor_optimizer.learning_rate = 5e-5
  config.ppo.critic_optimizer.learning_rate = 1e-4
  config.algo.advantage = "gae"
  config.algo.strategy = "none"
  config.algo.epochs = 1
  config.algo.minibatches = 2
  config.algo.kl_coef = 0.02
  return config


def get_config():
  config = mixture_testbed(get_base_config())
  config.stages = ("sft", "am", "ppo")
  config.algo.name = "ppo"
  config.ppo.reward_source = "am"
  return config
