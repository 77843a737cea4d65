"""Evaluate a policy checkpoint on MiniCode, HumanEval or the instruction task; writes <workdir>/eval/report.json.

  python -m experiments.run --config=eval.py --workdir=runs/pfppo                      # latest policy, MiniCode test
  python -m experiments.run --config=eval.py --workdir=runs/pfppo --config.eval.task=humaneval
  python -m experiments.run --config=eval.py --workdir=runs/pfppo \
      --config.eval.num_samples=10 --config.eval.ks="(1,5,10)" --config.sampling.temperature=0.8

The model shape and lengths must match the run that produced the checkpoint
(this config uses pfppo.py's); `--config.eval.params_dir=DIR` picks a
checkpoint explicitly (a stage's `final/` directory).
"""
from experiments.configs import pfppo


def get_config():
  config = pfppo.get_config()
  config.stages = ("eval",)
  config.sampling.temperature = 0.0
  config.eval.task = "minicode"
  config.eval.split = "test"
  return config
