"""RL with an Advantage Model and Selective Rehearsal on the three-task mixture of am.py.

Run (2 CPU cores; numbers in experiments/RESULTS.md, section "Advantage Model and Selective Rehearsal"):

  python -m experiments.run --config=am_sr.py --workdir=runs/am_sr

As am.py, plus Selective Rehearsal (ALGORITHMS.md §10.2, a reconstruction): every PPO iteration the 16 prompts are
clustered (k-means, 4 clusters, on mean-pooled hidden states of the current policy) and the 2 expert (SFT)
examples of each cluster with the highest AM score get an NLL term of weight 0.2 in every minibatch. The
per-iteration PPO/rehearsal split is `rehearsal/*` in ppo/metrics.jsonl. To reuse the SFT and am stages of an
am.py run, symlink its sft/, am/ and data/ directories into the new workdir.
"""
from experiments.configs.am import mixture_testbed
from experiments.configs.base import get_base_config


def get_config():
  config = mixture_testbed(get_base_config())
  config.stages = ("sft", "am", "ppo")
  config.algo.name = "ppo"
  config.ppo.reward_source = "am"
  config.sr.coef = 0.2
  config.sr.clusters = 4
  config.sr.per_cluster = 2
  return config
