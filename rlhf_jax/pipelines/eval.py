"""Evaluation stage: a policy's pass@k on MiniCode or HumanEval, or IFEval scores on the instruction task.

The policy is `config.eval.params_dir`, or else the latest policy of the
workdir (`ppo/final`, then `sft/final`). Completions are sampled with the
jitted sampler (greedy when `eval.num_samples == 1` and `sampling.temperature
== 0`) and graded in the sandbox. Writes `<workdir>/eval/report.json`.
"""

from __future__ import annotations

import os
from typing import Any

import jax

from rlhf_jax import models
from rlhf_jax.evaluation import evaluate_code_completions, evaluate_instruction_completions
from rlhf_jax.pipelines import common, ppo, rollout, sft, task_data
from rlhf_jax.sampling import Sampler, SamplingParams
from rlhf_jax.tasks import humaneval, instructions

TASKS = ("minicode", "humaneval", "instructions")


def policy_dir(config, workdir: str) -> str:
  if config.eval.params_dir:
    return config.eval.params_dir
  for candidate in (ppo.final_params_dir(workdir), sft.final_params_dir(workdir)):
    if common.has_params(candidate):
      return candidate
  raise FileNotFoundError(f"no policy to evaluate in {workdir} (no ppo/final or sft/final); "
                          "set config.eval.params_dir")


def load_problems(config, workdir: str) -> list[dict[str, Any]]:
  ec = config.eval
  if ec.task == "minicode":
    src = task_data.minicode_split(config, workdir, ec.split)
    problems = [src[i] for i in range(len(src))]
  elif ec.task == "humaneval":
    problems = humaneval.load_problems()
  elif ec.task == "instructions":
    problems = instructions.generate_prompts(ec.split, ec.num_problems or 200, seed=config.task.seed)
  else:
    raise ValueError(f"config.eval.task={ec.task!r} is not one of {TASKS}")
  return problems[: ec.num_problems] if ec.num_problems else problems


def run_eval(config, workdir: str) -> dict[str, Any]:
  ec = config.eval
  out_dir = common.stage_dir(workdir, "eval")
  mesh = common.make_mesh(config)
  tok = common.tokenizer(config)
  cfg = common.model_config(config)
  source = policy_dir(config, workdir)
  params, _ = common.load_params(source, models.abstract_params(cfg), common.param_shardings(cfg, mesh))
  problems = load_problems(config, workdir)
  temperature = config.sampling.temperature if ec.num_samples > 1 else 0.0
  sampler = Sampler(cfg, SamplingParams(max_new_tokens=config.task.max_response_len, temperature=temperature,
                                        top_k=config.sampling.top_k, top_p=config.sampling.top_p,
                                        num_samples=ec.num_samples),
                    eos_id=tok.eos_id, pad_id=tok.pad_id, mesh=mesh)
  print(f"[eval] {ec.task}/{ec.split}: {len(problems)} problems × {ec.num_samples} samples from {source}")
  texts, _ = rollout.sample_texts(sampler, params, tok, [p["prompt"] for p in problems], batch_size=ec.batch_size,
                                  max_prompt_len=config.task.max_prompt_len, rng=jax.random.PRNGKey(config.seed),
                                  mesh=mesh)
  n = ec.num_samples
  per_problem = [texts[i * n:(i + 1) * n] for i in range(len(problems))]
  ks = tuple(k for k in ec.ks if k <= n)
  if ec.task == "instructions":
    report = evaluate_instruction_completions(problems, per_problem, ks=ks, include_per_prompt=False)
  else:
    program_fn = humaneval.program_for if ec.task == "humaneval" else None
    report = evaluate_code_completions(problems, per_problem, ks=ks, program_fn=program_fn,
                                       timeout_s=rollout.SANDBOX_TIMEOUT_S, memory_mb=rollout.SANDBOX_MEMORY_MB,
                                       include_per_problem=False)
  report.update({"policy": source, "task": ec.task, "split": ec.split, "num_samples": n,
                 "temperature": temperature, "examples": [{"prompt": problems[i]["prompt"],
                                                           "completion": per_problem[i][0]}
                                                          for i in range(min(3, len(problems)))]})
  common.write_json(os.path.join(out_dir, "report.json"), report)
  headline = {k: v for k, v in report.items() if k.startswith("pass@") or "accuracy" in k}
  print(f"[eval] done: {headline or report.get('overall', {})} -> {os.path.join(out_dir, 'report.json')}")
  return report
