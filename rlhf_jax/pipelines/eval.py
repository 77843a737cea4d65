"""Evaluation stage: a policy's mean grade, success rate and pass@k on any task (IFEval scores for instructions).

The policy is `config.eval.params_dir`, or else the latest policy of the
workdir (`grpo/final`, `ppo/final`, then `sft/final`). The task is
`config.eval.task` (default: the run's `task.name`). Completions are sampled
through the rollout path (greedy when `eval.num_samples == 1`, else at
`sampling.temperature`) and graded by the task. Prompts that do not fit
`task.max_prompt_len` are skipped and counted in the report, never truncated.
Writes `<workdir>/eval/report.json` (never the workdir's config.json).
"""

from __future__ import annotations

import os
from typing import Any

import jax

from rlhf_jax import models, rollout
from rlhf_jax.evaluation import evaluate_instruction_completions
from rlhf_jax.pipelines import common, sft
from rlhf_jax.tasks.base import success

POLICY_STAGES = ("grpo", "ppo")


def policy_dir(config, workdir: str) -> str:
  if config.eval.params_dir:
    return config.eval.params_dir
  candidates = [os.path.join(workdir, s, "final") for s in POLICY_STAGES] + [sft.final_params_dir(workdir)]
  for candidate in candidates:
    if common.has_params(candidate):
      return candidate
  raise FileNotFoundError(f"no policy to evaluate in {workdir} (none of {', '.join(candidates)}); "
                          "set config.eval.params_dir")


def eval_task(config, workdir: str):
  if not config.eval.task or config.eval.task == config.task.name:
    return common.make_task(config, workdir)
  other = config.copy_and_resolve_references()
  with other.unlocked():
    other.task.name = config.eval.task
  return common.make_task(other, workdir)


def run_eval(config, workdir: str) -> dict[str, Any]:
  ec = config.eval
  out_dir = common.stage_dir(workdir, "eval")
  mesh = common.make_mesh(config)
  tok = common.tokenizer(config)
  cfg = common.model_config(config)
  source = policy_dir(config, workdir)
  params, _ = common.load_params(source, models.abstract_params(cfg), common.param_shardings(cfg, mesh))
  task = eval_task(config, workdir)
  split = ec.split if ec.split else task.eval_split
  all_records = task.load(split)
  records, skipped = rollout.fit_records(tok, all_records, config.task.max_prompt_len)
  if skipped:
    print(f"[eval] {task.name}/{split}: skipped {skipped} of {len(all_records)} prompts longer than "
          f"task.max_prompt_len={config.task.max_prompt_len} (never truncated)")
  if ec.num_problems:
    records = records[:ec.num_problems]
  if not records:
    raise ValueError(f"[eval] no {task.name}/{split} prompt fits task.max_prompt_len={config.task.max_prompt_len}")
  n = ec.num_samples
  temperature = config.sampling.temperature if n > 1 else 0.0  # one sample per prompt: greedy
  sampler = rollout.make_sampler(cfg, tok, max_new_tokens=config.task.max_response_len, temperature=temperature,
                                 top_k=config.sampling.top_k, top_p=config.sampling.top_p, num_samples=n, mesh=mesh)
  print(f"[eval] {task.name}/{split}: {len(records)} prompts × {n} samples at T={temperature} from {source}")
  texts = rollout.generate_texts(sampler, params, tok, records, batch_size=ec.batch_size,
                                 max_prompt_len=config.task.max_prompt_len, rng=jax.random.PRNGKey(config.seed),
                                 mesh=mesh)
  per_record = [texts[i * n:(i + 1) * n] for i in range(len(records))]
  if task.name == "instructions":
    report = evaluate_instruction_completions(records, per_record, ks=tuple(ec.ks), include_per_prompt=False)
  else:
    scores = rollout.grade(task, records, texts, n=n).reshape(len(records), n)
    ok = success(scores)
    report = {"mean_score": float(scores.mean()), "success_rate": float(ok.mean()),
              **rollout.pass_at_k(ok, tuple(ec.ks))}
  report.update({"policy": source, "task": task.name, "split": split, "num_prompts": len(records),
                 "skipped_too_long": skipped, "num_samples": n, "temperature": temperature,
                 "examples": [{"prompt": records[i]["prompt"], "completion": per_record[i][0]}
                              for i in range(min(3, len(records)))]})
  common.write_json(os.path.join(out_dir, "report.json"), report)
  headline = {k: v for k, v in report.items() if k.startswith("pass@") or "acc" in k or k in ("mean_score",
                                                                                            "success_rate")}
  print(f"[eval] done: {headline} -> {os.path.join(out_dir, 'report.json')}")
  return report
