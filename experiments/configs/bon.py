"""Best-of-N inference on the RL testbed: SFT -> reward model -> best-of-N of the SFT policy, N = 1..16.

Run (2 CPU cores; numbers in experiments/RESULTS.md):

  python -m experiments.run --config=bon.py --workdir=runs/bon

The testbed is grpo.py's (synthetic `reverse:` task, SFT stopped early). The bon stage
samples 17 completions for each of 64 held-out prompts once, scores them with the RM
(`--config.bon.reward_source=task` ranks by the task's grade instead), and reports for
N in (1, 2, 4, 8, 16) the mean reward, true score (task grade) and success rate of the
best of the first N, the win rate against the 17th sample, and the KL(π_BoN‖π_ref)
estimate beside the bound log N − (N − 1)/N. Outputs: <workdir>/bon/{bon.png,summary.json}.
A workdir holding a finished SFT (and RM) of grpo.py / pfppo_rm.py serves (symlink sft/, rm/, data/).
"""
from experiments.configs import grpo, pfppo_rm
from experiments.configs.base import get_base_config


def get_config():
  config = grpo.testbed(get_base_config())
  rm = pfppo_rm.get_config().rm  # the RM settings of pfppo_rm.py: one RM serves both
  config.rm = rm
  config.stages = ("sft", "rm", "bon")
  config.algo.name = "bon"
  config.bon.ns = (1, 2, 4, 8, 16)
  config.bon.num_prompts = 64
  config.bon.reward_source = "rm"
  config.bon.rollout_batch = 32
  return config
