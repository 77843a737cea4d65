"""The `grpo` stage: the RL loop of `pipelines/ppo.py` with a critic-free group advantage.

`algo.advantage` picks the estimator (grpo: (r − mean)/std over the N samples of a
prompt; rloo: leave-one-out mean; reinforce: group mean); the KL to the reference is
a loss term (`algo.kl_estimator`, k3 by default in experiments/configs/grpo.py).
Writes `<workdir>/grpo/` like the ppo stage.
"""

from __future__ import annotations

from typing import Any

from rlhf_jax.pipelines.ppo import run_rl


def run_grpo(config, workdir: str) -> dict[str, Any]:
  return run_rl(config, workdir, stage="grpo")
