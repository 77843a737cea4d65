"""AutoIF stage: instruction-following SFT data and DPO pairs from execution feedback (ALGORITHMS §9.1).

  supervisor  `autoif.supervisor`: "scripted" (`autoif.ScriptedSupervisor`, model-free, with a share of
              deliberate mistakes: CPU runs), "policy" (every generation step samples our policy:
              `PolicySupervisor`), or "policy_responses" (scripted Stage 1, the policy answers the
              Stage-2 prompts: self-alignment of the responses)
  pipeline    `autoif.run_autoif`: augmentation → verifiers → cross-validation (`autoif.cross_validation`:
              "paper", "code" or "none", the ablation) → back-translation (rule-based judge) → query
              prompts → K responses → accuracy in the sandbox → response filters → SFT set and
              instruction/query-level pairs
  outputs     under the data dir (`task.data_dir`, default `<workdir>/data`), named by the autoif
              settings: an SFT dataset (`RlhfAutoifSft`: prompt, response, task, metadata JSON with the
              instruction, query, accuracy and verification functions) and a preference-pair dataset
              (`data.build_preference_pairs`), each split by prompt into train / validation
              (`autoif.eval_fraction`)

Train SFT on the written records with `--config.task.name=rlhf_jax.pipelines.autoif:make_sft_task`
(`make_sft_task`; needs `task.data_dir` set, since a task factory sees the config, not the workdir);
the `dpo` stage reads the pairs by default. `run_ifeval` (stage `rlhf_jax.pipelines.autoif:run_ifeval`)
measures the workdir's SFT / DPO / online-DPO policies with IFEval's four accuracies on held-out
prompts whose constraint types were not among the training types.

Writes `<workdir>/autoif/`: `summary.json` (every filter's in/out counts: the shape of the paper's
Table 5; dataset paths), `filters.png` (in/out per filter), `sft.jsonl`, `pairs.jsonl`.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from typing import Any, Optional, Sequence

import jax
import numpy as np

from rlhf_jax import autoif, data, models, rollout
from rlhf_jax.autoif.supervisor import augmentation_prompt, back_translation_prompt, quality_prompt, \
    verifier_prompt
from rlhf_jax.data.builders import GeneratedConfig, GeneratedDatasetBuilder, build_dataset
from rlhf_jax.pipelines import common, sft
from rlhf_jax.tasks import instructions as catalogue
from rlhf_jax.tasks.base import check_scores

STAGE = "autoif"
SUPERVISORS = ("scripted", "policy", "policy_responses")
CROSS_VALIDATION = ("paper", "code", "none")
POLICY_STAGES = ("sft", "dpo", "online_dpo")


class RlhfAutoifSft(GeneratedDatasetBuilder):
  """AutoIF SFT records: prompt (query + instruction), response, task, metadata JSON (instruction, functions)."""
  FEATURES = {"prompt": "text", "response": "text", "task": "text", "metadata": "text"}


# --- settings ---------------------------------------------------------------------------------
def _known_types(config, key: str) -> list[str]:
  types = list(config.autoif[key])
  known = {t.id for t in catalogue.CONSTRAINT_TYPES}
  bad = [t for t in types if t not in known]
  if bad:
    raise ValueError(f"config.autoif.{key}: unknown constraint types {bad}; known: {sorted(known)}")
  return types


def train_types(config) -> list[str]:
  return _known_types(config, "train_types") or autoif.standalone_types()


def eval_types(config) -> list[str]:
  """Held-out IFEval constraint types: `autoif.eval_types`, else every catalogue type not trained on."""
  if config.autoif.eval_types:
    return _known_types(config, "eval_types")
  seen = set(train_types(config))
  rest = [t.id for t in catalogue.CONSTRAINT_TYPES if t.id not in seen]
  return rest or [t.id for t in catalogue.CONSTRAINT_TYPES]


def autoif_config(config) -> autoif.AutoIFConfig:
  """The `autoif` section as the data pipeline's `AutoIFConfig`."""
  ac = config.autoif
  cv = {"paper": autoif.CrossValidationConfig.paper(), "code": autoif.CrossValidationConfig.code(),
        "none": None}[ac.cross_validation]
  return autoif.AutoIFConfig(
      seed=int(config.seed), seed_type_ids=tuple(train_types(config)), augment_completions=ac.augment_completions,
      verifiers_per_instruction=ac.verifiers_per_instruction, cross_validation=cv,
      queries_per_instruction=ac.queries_per_instruction, query_chars=tuple(ac.query_chars),
      responses_per_prompt=ac.responses_per_prompt, response_threshold=ac.response_threshold,
      min_quality_score=ac.min_quality_score if ac.quality_filter else None, pair_strict=ac.pair_strict,
      timeout_s=ac.timeout_s, max_workers=ac.max_workers)


def dataset_digest(config) -> str:
  """Names the datasets by the settings that made them (the autoif section, the seed; the model for a policy)."""
  spec = {"seed": int(config.seed), "autoif": config.autoif.to_dict()}
  if config.autoif.supervisor != "scripted":
    spec["model"] = config.model.to_dict()
  return hashlib.sha256(json.dumps(spec, sort_keys=True, default=list).encode()).hexdigest()[:12]


def sft_dataset_dir(data_dir: str, digest: str) -> str:
  return os.path.join(data_dir, RlhfAutoifSft.name, f"autoif_sft_{digest}", "1.0.0")


def heldout_split(prompt: str, fraction: float) -> str:
  """"validation" for a stable hash-chosen share of prompts, else "train" (pairs follow their prompt)."""
  u = int.from_bytes(hashlib.sha256(prompt.encode()).digest()[:8], "big") / 2.0**64
  return "validation" if u < fraction else "train"


# --- the policy as supervisor -------------------------------------------------------------------
class PolicySupervisor:
  """`autoif.Supervisor` that samples a policy through the rollout path.

  Every method formats the pipeline's prompt template (`autoif.supervisor`),
  samples `n` completions per prompt at `temperature`, and returns the raw
  text; prompts longer than `max_prompt_len` tokens are not sampled (their
  completions are "", counted in `self.skipped`), never truncated. Methods
  listed in `delegate` are answered by `fallback` instead (e.g. a scripted
  Stage 1 with policy responses).
  """

  def __init__(self, params: Any, cfg, tok, *, max_prompt_len: int, max_new_tokens: int, temperature: float,
               batch_size: int, rng: jax.Array, mesh=None, fallback: Optional[autoif.Supervisor] = None,
               delegate: Sequence[str] = ()):
    if delegate and fallback is None:
      raise ValueError("delegate: methods can only be delegated to a fallback supervisor")
    self.params, self.cfg, self.tok, self.mesh = params, cfg, tok, mesh
    self.max_prompt_len, self.max_new_tokens = max_prompt_len, max_new_tokens
    self.temperature, self.batch_size, self.rng = temperature, batch_size, rng
    self.fallback, self.delegate = fallback, set(delegate)
    self.calls, self.skipped, self.sampled = 0, 0, 0

  def _sample(self, prompts: Sequence[str], n: int) -> list[list[str]]:
    self.calls += 1
    fits = [rollout.prompt_length(self.tok, {"prompt": p}) <= self.max_prompt_len for p in prompts]
    records = [{"prompt": p} for p, ok in zip(prompts, fits) if ok]
    self.skipped += len(prompts) - len(records)
    texts: list[str] = []
    if records:
      sampler = rollout.make_sampler(self.cfg, self.tok, max_new_tokens=self.max_new_tokens,
                                     temperature=self.temperature, num_samples=n, mesh=self.mesh)
      texts = rollout.generate_texts(sampler, self.params, self.tok, records, batch_size=self.batch_size,
                                     max_prompt_len=self.max_prompt_len,
                                     rng=jax.random.fold_in(self.rng, self.calls), mesh=self.mesh)
      self.sampled += len(texts)
    it = iter(texts[i * n:(i + 1) * n] for i in range(len(records)))
    return [next(it) if ok else [""] * n for ok in fits]

  def augment_instructions(self, seed_instructions: Sequence[str], num_completions: int) -> list[str]:
    if "augment_instructions" in self.delegate:
      return self.fallback.augment_instructions(seed_instructions, num_completions)
    return self._sample([augmentation_prompt(seed_instructions)], num_completions)[0]

  def write_verifiers(self, instructions: Sequence[str], k: int) -> list[list[str]]:
    if "write_verifiers" in self.delegate:
      return self.fallback.write_verifiers(instructions, k)
    return self._sample([verifier_prompt(i) for i in instructions], k)

  def back_translate(self, functions: Sequence[str]) -> list[str]:
    if "back_translate" in self.delegate:
      return self.fallback.back_translate(functions)
    return [c[0] for c in self._sample([back_translation_prompt(f) for f in functions], 1)]

  def respond(self, prompts: Sequence[autoif.QueryPrompt], k: int) -> list[list[str]]:
    if "respond" in self.delegate:
      return self.fallback.respond(prompts, k)
    return self._sample([qp.prompt for qp in prompts], k)

  def rate_quality(self, instructions: Sequence[str], queries: Sequence[str], responses: Sequence[str]) -> list[str]:
    if "rate_quality" in self.delegate:
      return self.fallback.rate_quality(instructions, queries, responses)
    return [c[0] for c in self._sample([quality_prompt(i, q, r) for i, q, r in zip(instructions, queries, responses)],
                                       1)]


def make_supervisor(config, workdir: str):
  ac = config.autoif
  scripted = autoif.ScriptedSupervisor(seed=int(config.seed), error_rates={
      "wrong_function_kinds": tuple(ac.scripted_wrong_kinds)}, timeout_s=ac.timeout_s)
  if ac.supervisor == "scripted":
    return scripted
  mesh = common.make_mesh(config)
  cfg = common.model_config(config)
  source = ac.policy_dir or sft.final_params_dir(workdir)
  params, _ = common.load_params(source, models.abstract_params(cfg), common.param_shardings(cfg, mesh))
  delegate = () if ac.supervisor == "policy" else ("augment_instructions", "write_verifiers", "back_translate",
                                                   "rate_quality")
  print(f"[{STAGE}] supervisor: the policy {source} ({'every step' if not delegate else 'responses only'})")
  return PolicySupervisor(params, cfg, common.tokenizer(config), max_prompt_len=config.task.max_prompt_len,
                          max_new_tokens=config.task.max_response_len, temperature=ac.temperature,
                          batch_size=ac.batch_size, rng=jax.random.PRNGKey(config.seed + 13), mesh=mesh,
                          fallback=scripted, delegate=delegate)


# --- the stage ----------------------------------------------------------------------------------
def plot_filters(reports: Sequence[dict], out_png: str) -> str:
  """Grouped bars: items in and out of every filter (log scale), labelled with the unit."""
  from rlhf_jax.utils.plotting import _figure, _fit_texts, _save  # pylint: disable=import-outside-toplevel
  fig = _figure(figsize=(max(6.0, 1.1 * len(reports) + 2), 4.0))
  ax = fig.subplots()
  x = np.arange(len(reports))
  ins = [max(r["in"], 0) for r in reports]
  outs = [max(r["out"], 0) for r in reports]
  b1 = ax.bar(x - 0.2, ins, 0.4, label="in")
  b2 = ax.bar(x + 0.2, outs, 0.4, label="out")
  ax.bar_label(b1, fontsize=7)
  ax.bar_label(b2, fontsize=7)
  ax.set_xticks(x, [f"{r['name']}\n({r['unit']})" for r in reports], rotation=30, ha="right", fontsize=8)
  ax.set_yscale("symlog")
  ax.set_ylabel("items (symlog scale)")
  ax.set_title("AutoIF: items into and out of each step")
  ax.legend()
  ax.grid(axis="y", alpha=0.3)
  _fit_texts(fig)
  return _save(fig, out_png)


def _jsonl(path: str, rows: Sequence[dict]) -> None:
  tmp = f"{path}.tmp"
  with open(tmp, "w") as f:
    for r in rows:
      f.write(json.dumps(r, sort_keys=True) + "\n")
  os.replace(tmp, path)


def run_autoif(config, workdir: str) -> dict[str, Any]:
  out_dir = common.stage_dir(workdir, STAGE)
  common.check_provenance(out_dir, config, STAGE)
  ac = config.autoif
  summary_path = os.path.join(out_dir, "summary.json")
  if os.path.exists(summary_path):
    with open(summary_path) as f:
      done = json.load(f)
    if all(os.path.exists(os.path.join(done.get(k) or "", "dataset_info.json"))
           for k in ("sft_dataset", "pairs_dataset")):
      print(f"[{STAGE}] reusing the finished stage in {out_dir}")
      return {"reused": True, **done}
  t0 = time.time()
  af = autoif_config(config)
  supervisor = make_supervisor(config, workdir)
  print(f"[{STAGE}] {ac.supervisor} supervisor, {len(af.seed_type_ids)} seed types, cross-validation "
        f"{ac.cross_validation}, back-translation {'on' if ac.back_translation else 'off'}")
  result = autoif.run_autoif(supervisor, af, judge=autoif.RuleBasedJudge() if ac.back_translation else None)
  print(autoif.format_reports(result.reports))
  _jsonl(os.path.join(out_dir, "sft.jsonl"), result.sft)
  _jsonl(os.path.join(out_dir, "pairs.jsonl"), result.pairs)
  plot_filters(result.reports, os.path.join(out_dir, "filters.png"))
  summary: dict[str, Any] = {
      "stage": STAGE, "supervisor": ac.supervisor, "cross_validation": ac.cross_validation,
      "back_translation": bool(ac.back_translation), "train_types": list(af.seed_type_ids),
      "eval_types": eval_types(config), "reports": result.reports, "table": autoif.format_reports(result.reports),
      "instructions": len(result.instructions), "verified_instructions": len(result.verified),
      "prompts": len(result.prompts), "responses": int(np.size(result.accuracy)),
      "sft_records": len(result.sft), "pairs": len(result.pairs),
      "pairs_by_level": {lvl: sum(p["metadata"]["level"] == lvl for p in result.pairs)
                         for lvl in ("instruction", "query")},
      "response_pass_rate": float(np.mean(np.nan_to_num(result.accuracy) > ac.response_threshold))
      if np.size(result.accuracy) else 0.0,
      "sft_dataset": None, "pairs_dataset": None}
  if isinstance(supervisor, PolicySupervisor):
    summary["policy_prompts_skipped_too_long"] = supervisor.skipped
  if not result.sft or not result.pairs:
    common.write_json(os.path.join(out_dir, "summary.json"), {**summary, "wall_s": time.time() - t0})
    raise RuntimeError(f"[{STAGE}] nothing to train on: {len(result.sft)} SFT records and {len(result.pairs)} pairs "
                       f"survived the filters (see {out_dir}/summary.json and filters.png)")

  # --- datasets, split by prompt --------------------------------------------------------------
  digest, data_dir = dataset_digest(config), common.data_dir(config, workdir)
  split = lambda rows: {s: [r for r in rows if heldout_split(r["prompt"], ac.eval_fraction) == s]
                        for s in ("train", "validation")}
  sft_rows = {s: [{**r, "metadata": json.dumps(r["metadata"], sort_keys=True)} for r in rows]
              for s, rows in split(result.sft).items() if rows}
  pair_rows = {s: rows for s, rows in split(result.pairs).items() if rows}
  if "train" not in sft_rows or "train" not in pair_rows:
    raise RuntimeError(f"[{STAGE}] autoif.eval_fraction={ac.eval_fraction} left no training records")
  sft_builder = build_dataset(RlhfAutoifSft, data_dir, GeneratedConfig(
      name=f"autoif_sft_{digest}", spec=json.dumps({"digest": digest}),
      split_generators={s: (lambda rows=rows: rows) for s, rows in sft_rows.items()}))
  pairs_builder = data.build_preference_pairs(data_dir, pair_rows, name=f"autoif_pairs_{digest}")
  summary.update({"sft_dataset": str(sft_builder.data_dir), "pairs_dataset": str(pairs_builder.data_dir),
                  "sft_split_sizes": {s: len(r) for s, r in sft_rows.items()},
                  "pair_split_sizes": {s: len(r) for s, r in pair_rows.items()}, "wall_s": time.time() - t0})
  common.write_json(summary_path, summary)
  print(f"[{STAGE}] done in {summary['wall_s']:.0f} s: {len(result.sft)} SFT records, {len(result.pairs)} pairs "
        f"-> {data_dir}")
  return summary


# --- the written SFT records as a task ---------------------------------------------------------------
def autoif_constraints(record: dict) -> list[dict]:
  """An AutoIF record's verification functions as `tasks.instructions` constraints (custom sources)."""
  meta = record["metadata"] if isinstance(record["metadata"], dict) else json.loads(record["metadata"])
  return [{"type": "autoif", "params": {}, "instruction": meta["instruction"], "source": f}
          for f in meta["functions"]]


class AutoIFSftTask:
  """The autoif stage's SFT records as a task; graded by verification functions in the sandbox.

  Splits: "train" / "validation" (AutoIF records: prompt, response, graded by
  the pass rate of the instruction's cross-validated functions — the accuracy
  online DPO pairs on), "ifeval" (IFEval-style prompts of the held-out
  constraint types, graded by the catalogue's verifiers: fraction of
  constraints followed) and "ifeval_seen" (the same of the training types).
  `eval_split` is "validation" (it has responses, so SFT can evaluate on it).
  """

  name = "autoif"
  eval_split = "validation"

  def __init__(self, sft_dir: str, *, heldout_types: Sequence[str], seen_types: Sequence[str], num_eval: int,
               max_constraints: int, seed: int = 0):
    self.sft_dir = sft_dir
    self._eval = {"ifeval": list(heldout_types), "ifeval_seen": list(seen_types)}
    self._num_eval, self._max_constraints, self._seed = int(num_eval), int(max_constraints), seed
    self._cache: dict[str, list[dict]] = {}

  def load(self, split: str) -> list[dict]:
    if split not in ("train", "validation", *self._eval):
      raise ValueError(f"task {self.name!r} has no split {split!r}; it has train, validation, ifeval, ifeval_seen")
    if split not in self._cache:
      if split in self._eval:
        self._cache[split] = catalogue.generate_prompts("test", self._num_eval, seed=self._seed,
                                                        max_constraints=self._max_constraints,
                                                        type_ids=self._eval[split])
      else:
        src = data.load_split(self.sft_dir, split)
        rows = [src[i] for i in range(len(src))]
        self._cache[split] = [{**r, "constraints": autoif_constraints(r)} for r in rows]
    return self._cache[split]

  def grade(self, records: Sequence[dict], completions: Sequence[str]) -> np.ndarray:
    from rlhf_jax.tasks.registry import SANDBOX_MEMORY_MB, SANDBOX_TIMEOUT_S  # pylint: disable=import-outside-toplevel
    checked = catalogue.check_responses(list(records), list(completions), timeout_s=SANDBOX_TIMEOUT_S,
                                        memory_mb=SANDBOX_MEMORY_MB)
    return check_scores(self.name, [float(np.mean(c["strict"])) if c["strict"] else 0.0 for c in checked],
                        len(completions))


def make_sft_task(config) -> AutoIFSftTask:
  """`--config.task.name=rlhf_jax.pipelines.autoif:make_sft_task`: the SFT set the autoif stage wrote.

  Reads `<task.data_dir>/rlhf_autoif_sft/autoif_sft_<digest of the autoif settings>`; `task.data_dir`
  must be set (the directory the autoif stage wrote into, e.g. `<workdir>/data`).
  """
  if not config.task.data_dir:
    raise ValueError("config.task.data_dir: the autoif SFT task needs the directory the autoif stage wrote its "
                     "datasets to (e.g. --config.task.data_dir=<workdir>/data)")
  path = sft_dataset_dir(config.task.data_dir, dataset_digest(config))
  if not os.path.exists(os.path.join(path, "dataset_info.json")):
    raise ValueError(f"config.task.data_dir: no AutoIF SFT dataset for these autoif settings at {path}: run the "
                     "autoif stage first (same seed and autoif section)")
  return AutoIFSftTask(path, heldout_types=eval_types(config), seen_types=train_types(config),
                       num_eval=config.autoif.num_eval, max_constraints=config.autoif.eval_max_constraints,
                       seed=config.task.seed)


# --- measurement: IFEval accuracies of the workdir's policies ------------------------------------------
def run_ifeval(config, workdir: str) -> dict[str, Any]:
  """IFEval prompt/instruction-level strict/loose accuracy (greedy) of every finished policy in the workdir.

  Stage `rlhf_jax.pipelines.autoif:run_ifeval`. Policies: sft, dpo, online_dpo (those present).
  Splits: "ifeval" (held-out constraint types) and "ifeval_seen". Writes `<workdir>/ifeval/report.json`
  and `ifeval.png`.
  """
  from rlhf_jax.evaluation import evaluate_instruction_completions  # pylint: disable=import-outside-toplevel
  out_dir = common.stage_dir(workdir, "ifeval")
  mesh, tok, cfg = common.make_mesh(config), common.tokenizer(config), common.model_config(config)
  task = make_sft_task(config)
  plen, rlen = config.task.max_prompt_len, config.task.max_response_len
  greedy = rollout.make_sampler(cfg, tok, max_new_tokens=rlen, temperature=0.0, mesh=mesh)
  report: dict[str, Any] = {"eval_types": eval_types(config), "train_types": train_types(config), "policies": {}}
  for stage in POLICY_STAGES:
    directory = os.path.join(workdir, stage, "final")
    if not common.has_params(directory):
      continue
    params, _ = common.load_params(directory, models.abstract_params(cfg), common.param_shardings(cfg, mesh))
    report["policies"][stage] = {}
    for split in ("ifeval", "ifeval_seen"):
      records = rollout.load_fitted(task, tok, split, max_prompt_len=plen, stage="ifeval")
      texts = rollout.generate_texts(greedy, params, tok, records, batch_size=config.eval.batch_size,
                                     max_prompt_len=plen, rng=jax.random.PRNGKey(config.seed), mesh=mesh)
      r = evaluate_instruction_completions(records, [[t] for t in texts], include_per_prompt=False)
      report["policies"][stage][split] = {
          k: r[k] for k in ("prompt_level_strict_acc", "prompt_level_loose_acc", "inst_level_strict_acc",
                            "inst_level_loose_acc", "num_prompts", "num_instructions")}
      report["policies"][stage][split]["examples"] = [{"prompt": records[i]["prompt"], "completion": texts[i]}
                                                      for i in range(min(2, len(records)))]
      print(f"[ifeval] {stage} on {split}: " + ", ".join(
          f"{k} {r[k]:.3f}" for k in ("prompt_level_strict_acc", "prompt_level_loose_acc", "inst_level_strict_acc",
                                      "inst_level_loose_acc")))
  if not report["policies"]:
    raise FileNotFoundError(f"[ifeval] no finished policy in {workdir} (looked for {', '.join(POLICY_STAGES)})")
  common.write_json(os.path.join(out_dir, "report.json"), report)
  from rlhf_jax.utils import plot_bars  # pylint: disable=import-outside-toplevel
  plot_bars({f"{s} {m}": report["policies"][s]["ifeval"][f"{m}_acc"] for s in report["policies"]
             for m in ("prompt_level_strict", "inst_level_loose")}, os.path.join(out_dir, "ifeval.png"),
            ylabel="accuracy (greedy)", title="IFEval on held-out constraint types")
  return report
