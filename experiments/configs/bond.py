"""J-BOND on the RL testbed: SFT -> reward model -> J-BOND (β 0.5, η 0.02, γ 0) with the learned RM.

Run (2 CPU cores; numbers in experiments/RESULTS.md):

  python -m experiments.run --config=bond.py --workdir=runs/bond

The testbed is grpo.py's (a finished SFT/RM of pfppo_rm.py serves: symlink sft/, rm/, data/).
Each iteration draws 1 policy sample and 2 anchor samples (EMA anchor inside the state)
for 16 train prompts, plus 4 samples of the SFT reference for the quantile metrics, and
takes one J-BOND step. `bond/summary.json` reports the held-out T=1 and greedy success
before and after, the final KL to the reference and the policy's effective N.
Variants: --config.bond.reward_source=task (the task's grade as reward),
--config.bond.beta=1.0 (backward KL only), --config.bond.hard_anchor_every=50 (iterative
BOND with hard anchor copies), --config.bond.variant=bond --config.bond.anchor_samples=8
--config.bond.n=4 (plain BOND, Monte Carlo quantile over 8 anchor samples, Bo-4 target).
The reward–KL frontier against REINFORCE (RLOO) and best-of-N:
experiments/benchmarks/bond_frontier.py.
"""
from experiments.configs import grpo, pfppo_rm
from experiments.configs.base import get_base_config


def get_config():
  config = grpo.testbed(get_base_config())
  config.rm = pfppo_rm.get_config().rm  # the RM settings of pfppo_rm.py: one RM serves both
  config.stages = ("sft", "rm", "bond")
  config.algo.name = "jbond"
  config.bond.iterations = 100
  config.bond.prompts_per_iteration = 16
  config.bond.variant = "jbond"
  config.bond.beta = 0.5
  config.bond.eta = 0.02
  config.bond.gamma = 0.0
  config.bond.reward_source = "rm"
  config.bond.reference_samples = 4
  config.bond.eval_every = 10
  config.bond.eval_prompts = 64
  config.bond.eval_samples = 4
  config.bond.checkpoint_every = 10
  config.bond.rollout_batch = 32
  config.bond.optimizer.learning_rate = 1e-4
  return config
