"""Offline DPO on the AutoIF pairs: autoif -> SFT -> DPO (reference = SFT), the AutoIF testbed of autoif.py.

Run (2 CPU cores):

  python -m experiments.run --config=dpo.py --workdir=runs/dpo --config.task.data_dir=runs/dpo/data

Other pairs: --config.dpo.pairs_dir=<a preference-pair dataset version directory> (e.g. the
one the rm stage built); other losses: --config.dpo.loss_type=ipo|hinge, cDPO with
--config.dpo.label_smoothing=0.1. dpo/summary.json reports the first and final training
loss (log 2 at the start), reward accuracy and the held-out pair metrics; dpo/dpo.png the curves.
"""
from experiments.configs.autoif import testbed
from experiments.configs.base import get_base_config


def get_config():
  config = testbed(get_base_config())
  config.task.data_dir = "runs/dpo/data"
  config.stages = ("autoif", "sft", "dpo")
  return config
