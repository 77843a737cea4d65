"""Online / iterative DPO from SFT on the AutoIF testbed: autoif -> SFT -> online DPO (ALGORITHMS §8.3, §9.2).

Run (2 CPU cores):

  python -m experiments.run --config=online_dpo.py --workdir=runs/online_dpo \
      --config.task.data_dir=runs/online_dpo/data

Each round samples 8 responses per prompt at T = 0.8 from the current policy, grades them
with the instruction's cross-validated verification functions (sandbox), pairs accuracy
>= 0.5 against accuracy 0 (up to 2 x 2 a prompt; --config.online_dpo.pos_strict=True for
the paper's > 0.5) and runs DPO with the SFT reference. online_dpo/summary.json reports the
held-out score and success before and after; online_dpo/online_dpo.png the rounds.
"""
from experiments.configs.autoif import testbed
from experiments.configs.base import get_base_config


def get_config():
  config = testbed(get_base_config())
  config.task.data_dir = "runs/online_dpo/data"
  config.stages = ("autoif", "sft", "online_dpo")
  return config
