"""Evaluate a policy checkpoint on a task; writes <workdir>/eval/report.json.

  python -m experiments.run --config=eval.py --workdir=runs/pfppo                      # latest policy, the run's task
  python -m experiments.run --config=eval.py --workdir=runs/pfppo \
      --config.eval.num_samples=8 --config.eval.ks="(1,4,8)" --config.sampling.temperature=1.0
  python -m experiments.run --config=eval.py --workdir=runs/code --config.eval.task=humaneval   # another task

The model shape and lengths must match the run that produced the checkpoint
(this config uses pfppo.py's); `--config.eval.params_dir=DIR` picks a
checkpoint explicitly (a stage's `final/` directory). Prompts longer than
`task.max_prompt_len` are skipped and counted in the report, never truncated.
"""
from experiments.configs import pfppo


def get_config():
  config = pfppo.get_config()
  config.stages = ("eval",)
  config.sampling.temperature = 0.0
  config.eval.task = ""    # the run's task
  config.eval.split = ""   # its held-out split
  return config
