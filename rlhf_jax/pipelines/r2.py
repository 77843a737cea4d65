"""R² analysis stage (PF-PPO Table 1): how well the RM's reward predicts the task's grade, per strategy.

For a policy (`config.eval.params_dir`, else the workdir's latest policy) it
samples `ppo.samples_per_prompt` completions for each of `eval.num_problems`
(default 128) prompts of the task's eval split, scores them with the workdir's
reward model, grades them with the task, and reports binned (the paper's) and
unbinned R² over the samples each strategy keeps. Writes
`<workdir>/r2/table.json` and `<workdir>/r2/r2.png`.

  python -m experiments.run --config=pfppo_rm.py --workdir=runs/pfppo_rm --config.stages="('r2',)"
"""

from __future__ import annotations

import os
from typing import Any

import jax

from rlhf_jax import models, rollout
from rlhf_jax.pipelines import analysis, common, eval as eval_stage, rm as rm_stage
from rlhf_jax.steps import make_score_fn
from rlhf_jax.utils import plot_bars


def run_r2(config, workdir: str) -> dict[str, Any]:
  out_dir = common.stage_dir(workdir, "r2")
  mesh = common.make_mesh(config)
  tok = common.tokenizer(config)
  cfg = common.model_config(config)
  source = eval_stage.policy_dir(config, workdir)
  params, _ = common.load_params(source, models.abstract_params(cfg), common.param_shardings(cfg, mesh))
  rm_params, _ = rm_stage.load_reward_model(config, workdir, mesh)
  task = common.make_task(config, workdir)
  plen, rlen = config.task.max_prompt_len, config.task.max_response_len
  records = rollout.load_fitted(task, tok, config.eval.split or task.eval_split, max_prompt_len=plen,
                                stage="r2")[:config.eval.num_problems or 128]
  n = max(2, config.ppo.samples_per_prompt)
  sampler = rollout.make_sampler(cfg, tok, max_new_tokens=rlen, temperature=config.sampling.temperature,
                                 top_k=config.sampling.top_k, top_p=config.sampling.top_p, num_samples=n, mesh=mesh)
  texts = rollout.generate_texts(sampler, params, tok, records, batch_size=config.ppo.rollout_batch,
                                 max_prompt_len=plen, rng=jax.random.PRNGKey(config.seed + 7), mesh=mesh)
  truth = rollout.grade(task, records, texts, n=n).reshape(len(records), n)
  score = jax.jit(make_score_fn(models.make_apply_fn(cfg, head="scalar")))
  rewards = rollout.score_texts(score, rm_params, tok, [r["prompt"] for r in records for _ in range(n)], texts,
                                batch_size=config.ppo.rollout_batch * n, max_prompt_len=plen, max_response_len=rlen,
                                mesh=mesh).reshape(len(records), n)
  table = analysis.r2_table(rewards, truth, bins=config.ppo.r2_bins, key=jax.random.PRNGKey(config.seed))
  report = {"policy": source, "task": task.name, "prompts": len(records), "samples_per_prompt": n,
            "mean_grade": float(truth.mean()), "table": table}
  common.write_json(os.path.join(out_dir, "table.json"), report)
  plot_bars({k: v["r2_binned"] for k, v in table.items()}, os.path.join(out_dir, "r2.png"),
            title=f"binned R² (RM reward vs grade) per strategy\n{os.path.basename(os.path.dirname(source))}",
            ylabel="R²")
  print("[r2] " + ", ".join(f"{k}: R²={v['r2']:.3f} binned={v['r2_binned']:.3f}" for k, v in table.items()))
  return report
