"""R² analysis stage (PF-PPO Table 1): how well the RM's reward predicts the sandbox's truth per strategy.

For a policy (`config.eval.params_dir`, else the workdir's latest policy) it
samples `ppo.samples_per_prompt` completions for each of `eval.num_problems`
MiniCode prompts of `eval.split`, scores them with the workdir's reward model,
runs them in the sandbox, and reports binned (the paper's) and unbinned R²
over the samples each strategy keeps. Writes `<workdir>/r2/table.json` and
`<workdir>/r2/r2.png`.

  python -m experiments.run --config=pfppo.py --workdir=runs/pfppo --config.stages="('r2',)"
"""

from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax import models
from rlhf_jax.pipelines import analysis, common, eval as eval_stage, rm as rm_stage, rollout
from rlhf_jax.sampling import Sampler, SamplingParams
from rlhf_jax.steps import make_score_fn
from rlhf_jax.tokenizer import encode_pairs
from rlhf_jax.utils import plot_bars


def run_r2(config, workdir: str) -> dict[str, Any]:
  out_dir = common.stage_dir(workdir, "r2")
  mesh = common.make_mesh(config)
  tok = common.tokenizer(config)
  cfg = common.model_config(config)
  source = eval_stage.policy_dir(config, workdir)
  params, _ = common.load_params(source, models.abstract_params(cfg), common.param_shardings(cfg, mesh))
  rm_params, _ = rm_stage.load_reward_model(config, workdir, mesh)
  n = max(2, config.ppo.samples_per_prompt)
  eval_cfg = config.copy_and_resolve_references()
  with eval_cfg.unlocked():
    eval_cfg.eval.task = "minicode"
    eval_cfg.eval.num_problems = config.eval.num_problems or 128
  problems = eval_stage.load_problems(eval_cfg, workdir)
  sampler = Sampler(cfg, SamplingParams(max_new_tokens=config.task.max_response_len,
                                        temperature=config.sampling.temperature, top_k=config.sampling.top_k,
                                        top_p=config.sampling.top_p, num_samples=n),
                    eos_id=tok.eos_id, pad_id=tok.pad_id, mesh=mesh)
  texts, _ = rollout.sample_texts(sampler, params, tok, [p["prompt"] for p in problems],
                                  batch_size=config.ppo.rollout_batch, max_prompt_len=config.task.max_prompt_len,
                                  rng=jax.random.PRNGKey(config.seed + 7), mesh=mesh)
  truth = rollout.grade_minicode(problems, texts, n=n).reshape(len(problems), n)
  score = jax.jit(make_score_fn(models.make_apply_fn(cfg, head="scalar")))
  prompts = [p["prompt"] for p in problems for _ in range(n)]
  rewards = []
  bs = config.ppo.rollout_batch * n
  for i in range(0, len(texts), bs):
    enc = encode_pairs(tok, prompts[i:i + bs], texts[i:i + bs], config.task.max_prompt_len,
                       config.task.max_response_len)
    rewards.append(np.asarray(score(rm_params, jnp.asarray(enc["tokens"]), jnp.asarray(enc["mask"]))))
  rewards = np.concatenate(rewards).reshape(len(problems), n)
  table = analysis.r2_table(rewards, truth, bins=config.ppo.r2_bins, key=jax.random.PRNGKey(config.seed))
  report = {"policy": source, "split": config.eval.split, "prompts": len(problems), "samples_per_prompt": n,
            "pass_rate": float(truth.mean()), "table": table}
  common.write_json(os.path.join(out_dir, "table.json"), report)
  plot_bars({k: v["r2_binned"] for k, v in table.items()}, os.path.join(out_dir, "r2.png"),
            title=f"binned R² (RM reward vs. pass) per strategy — {os.path.basename(source.rstrip('/'))}",
            ylabel="R²")
  print("[r2] " + ", ".join(f"{k}: R²={v['r2']:.3f} binned={v['r2_binned']:.3f}" for k, v in table.items()))
  return report
