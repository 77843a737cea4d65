r"""Held-out success of every SFT checkpoint of a workdir: how the SFT stopping point sets RL's base rate.

  python -m experiments.benchmarks.sft_base_rate --workdir=runs/sft250 [--config=grpo.py]

Reads `<workdir>/sft/ckpt/<step>` (all kept steps) and reports, on the task's first 64
held-out prompts, the T=1 success rate and pass@4 (4 samples per prompt) and greedy
success, with the same evaluation the RL stages use (`rollout.evaluate_policy`).
"""

from __future__ import annotations

import argparse
import importlib

import jax

from rlhf_jax import models, rollout
from rlhf_jax.checkpointing import Checkpointer, abstract_like
from rlhf_jax.pipelines import common


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--config", default="grpo", help="a config in experiments/configs (its task and lengths)")
  parser.add_argument("--prompts", type=int, default=64)
  args = parser.parse_args()
  config = importlib.import_module(f"experiments.configs.{args.config.removesuffix('.py')}").get_config()
  cfg, mesh, tok = common.model_config(config), common.make_mesh(config), common.tokenizer(config)
  task = common.make_task(config, args.workdir)
  plen, rlen = config.task.max_prompt_len, config.task.max_response_len
  held = rollout.load_fitted(task, tok, task.eval_split, max_prompt_len=plen)[:args.prompts]
  sampler = rollout.make_sampler(cfg, tok, max_new_tokens=rlen, temperature=config.sampling.temperature,
                                 num_samples=4, mesh=mesh)
  greedy = rollout.make_sampler(cfg, tok, max_new_tokens=rlen, temperature=0.0, mesh=mesh)
  with Checkpointer(f"{args.workdir}/sft/ckpt", max_to_keep=None, async_save=False) as ckpt:
    print("| SFT step | T=1 success | pass@4 | greedy success |\n|---|---|---|---|")
    for step in ckpt.all_steps():
      tx = common.optimizer(config.sft)
      state, state_sh = common.create_state(lambda r: models.init_params(cfg, r), models.logical_axes(cfg), tx,
                                            mesh, jax.random.PRNGKey(0))
      state, _ = ckpt.restore(abstract_like(state, sharding=state_sh), step=step)
      m = rollout.evaluate_policy(task, sampler, greedy, state.params, tok, held, batch_size=32, max_prompt_len=plen,
                                  rng=jax.random.PRNGKey(11), mesh=mesh, ks=(1, 4))
      print(f"| {step} | {m['eval/success_rate']:.3f} | {m['eval/pass@4']:.3f} | {m['eval/greedy_success']:.3f} |",
            flush=True)
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
