"""Reward-model stage: sandbox-labelled preference pairs from the SFT policy, then Bradley–Terry.

1. sample `rm.samples_per_prompt` completions from the SFT policy for
   `rm.num_prompts` MiniCode train prompts and run each against its hidden
   tests in the sandbox;
2. pair passing with failing completions of the same prompt (at most
   `rm.max_pairs_per_prompt` per prompt) into a TFDS preference-pair dataset,
   holding out `rm.eval_fraction` of the prompts;
3. train a scalar-head model initialised from the SFT backbone with the BT
   loss; report held-out pairwise accuracy and calibration (ECE);
4. store the RM's score mean/std over held-out samples with its parameters,
   the statistics PPO normalises rewards with.

The RM is a learned, imperfect model of the test outcome: it only ever sees
the text, never the sandbox result at scoring time.

Writes `<workdir>/rm/`: `final/` (params + normalisation statistics),
`samples.jsonl`, `metrics.jsonl`, `tb/`, `rm.png`, `summary.json`.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax import data, losses, models
from rlhf_jax import sharding as shd
from rlhf_jax.pipelines import common, rollout, sft, task_data
from rlhf_jax.sampling import Sampler, SamplingParams
from rlhf_jax.steps import make_rm_eval_step, make_rm_step, make_score_fn
from rlhf_jax.tokenizer import encode_pairs
from rlhf_jax.utils import MetricsWriter, Progress, plot_metrics


def final_params_dir(workdir: str) -> str:
  return os.path.join(workdir, "rm", "final")


def load_sft_policy(config, workdir: str, mesh):
  cfg = common.model_config(config)
  params, _ = common.load_params(sft.final_params_dir(workdir), models.abstract_params(cfg),
                                 common.param_shardings(cfg, mesh))
  return cfg, params


def load_reward_model(config, workdir: str, mesh) -> tuple[Any, dict]:
  """RM params and their meta (incl. `reward_mean`, `reward_std`)."""
  cfg = common.model_config(config)
  return common.load_params(final_params_dir(workdir), models.abstract_params(cfg, head="scalar"),
                            common.param_shardings(cfg, mesh, head="scalar"))


def make_pairs(groups: list[dict], *, max_pairs: int, seed: int) -> list[dict]:
  """(passing, failing) completion pairs of the same prompt; duplicates collapsed."""
  rnd = random.Random(seed)
  pairs = []
  for g in groups:
    good = sorted({c for c, ok in zip(g["completions"], g["passed"]) if ok})
    bad = sorted({c for c, ok in zip(g["completions"], g["passed"]) if not ok})
    combos = [(c, r) for c in good for r in bad]
    rnd.shuffle(combos)
    for c, r in combos[:max_pairs]:
      pairs.append({"prompt": g["prompt"], "chosen": c, "rejected": r,
                    "metadata": json.dumps({"task_id": g["task_id"]})})
  return pairs


_INT = re.compile(r"(?<![\w.])\d+(?![\w.])")
_OPS = (("<", ">"), (">", "<"), ("+", "-"), ("-", "+"), ("==", "!="), ("%", "//"))


def mutants(code: str, *, k: int, rng: random.Random) -> list[str]:
  """Up to k distinct near-miss edits of `code`: one integer literal or one operator changed.

  They look like the policy's typical failures (a wrong constant, a flipped
  comparison); whether each one still passes is decided by the sandbox.
  """
  out: set[str] = set()
  for _ in range(8 * k):
    if len(out) >= k:
      break
    ints = list(_INT.finditer(code))
    if ints and rng.random() < 0.6:
      m = rng.choice(ints)
      new = str(max(0, int(m.group()) + rng.choice((-2, -1, 1, 2))))
      cand = code[:m.start()] + new + code[m.end():]
    else:
      old, new = rng.choice(_OPS)
      spots = [i for i in range(len(code)) if code.startswith(old, i)]
      if not spots:
        continue
      i = rng.choice(spots)
      cand = code[:i] + new + code[i + len(old):]
    if cand != code:
      out.add(cand)
  return sorted(out)


def _encode_pairs(tok, batch, config) -> dict[str, np.ndarray]:
  c = encode_pairs(tok, batch["prompt"], batch["chosen"], config.task.max_prompt_len, config.task.max_response_len)
  r = encode_pairs(tok, batch["prompt"], batch["rejected"], config.task.max_prompt_len,
                   config.task.max_response_len)
  return {"chosen_tokens": c["tokens"], "chosen_mask": c["mask"], "rejected_tokens": r["tokens"],
          "rejected_mask": r["mask"]}


def run_rm(config, workdir: str) -> dict[str, Any]:
  out_dir = common.stage_dir(workdir, "rm")
  if common.has_params(final_params_dir(workdir)):
    print(f"[rm] reusing the finished RM stage in {final_params_dir(workdir)}")
    return {"reused": True}
  if config.task.name != "minicode":
    raise ValueError(f"the rm stage labels MiniCode samples in the sandbox; config.task.name={config.task.name!r}")
  rc = config.rm
  mesh = common.make_mesh(config)
  tok = common.tokenizer(config)
  cfg, sft_params = load_sft_policy(config, workdir, mesh)
  rng = jax.random.PRNGKey(config.seed + 1)

  # --- 1. sample and grade ----------------------------------------------------------
  train = task_data.minicode_split(config, workdir, "train")
  order = np.random.default_rng(config.seed).permutation(len(train))[: rc.num_prompts]
  problems = [train[int(i)] for i in order]
  n = rc.samples_per_prompt
  temperature = config.sampling.temperature if rc.temperature is None else rc.temperature
  sampler = Sampler(cfg, SamplingParams(max_new_tokens=config.task.max_response_len, temperature=temperature, top_k=config.sampling.top_k,
                                        top_p=config.sampling.top_p, num_samples=n),
                    eos_id=tok.eos_id, pad_id=tok.pad_id, mesh=mesh)
  print(f"[rm] sampling {n} completions for {len(problems)} prompts and grading them in the sandbox")
  texts, _ = rollout.sample_texts(sampler, sft_params, tok, [p["prompt"] for p in problems],
                                  batch_size=config.ppo.rollout_batch, max_prompt_len=config.task.max_prompt_len,
                                  rng=rng, mesh=mesh)
  per_prompt = [texts[i * n:(i + 1) * n] for i in range(len(problems))]
  if rc.include_canonical:  # graded like any other candidate; helps when the SFT policy rarely passes
    per_prompt = [c + [p["canonical_solution"]] for c, p in zip(per_prompt, problems)]
  if rc.mutations_per_prompt:  # near-miss negatives, labelled by the sandbox like everything else
    rnd = random.Random(config.seed)
    per_prompt = [c + [p["canonical_solution"]] * (not rc.include_canonical)
                  + mutants(p["canonical_solution"], k=rc.mutations_per_prompt, rng=rnd)
                  for c, p in zip(per_prompt, problems)]
  flat = [c for cs in per_prompt for c in cs]
  owners = [problems[i] for i, cs in enumerate(per_prompt) for _ in cs]
  results = rollout.grade_minicode(owners, flat, n=1)
  offsets = np.cumsum([0] + [len(cs) for cs in per_prompt])
  groups = [{"task_id": p["task_id"], "prompt": p["prompt"], "completions": per_prompt[i],
             "passed": results[offsets[i]:offsets[i + 1]].tolist()} for i, p in enumerate(problems)]
  sft_pass = float(np.mean([g["passed"][:n] for g in groups]))  # the policy's own samples only
  with open(os.path.join(out_dir, "samples.jsonl"), "w") as f:
    for g in groups:
      f.write(json.dumps(g) + "\n")
  n_eval = max(1, int(round(rc.eval_fraction * len(groups))))
  # Held-out pairs use the policy's own samples only: that is what the RM will have to judge in PPO.
  eval_groups = [{**g, "completions": g["completions"][:n], "passed": g["passed"][:n]} for g in groups[:n_eval]]
  train_groups = groups[n_eval:]
  pairs = {"train": make_pairs(train_groups, max_pairs=rc.max_pairs_per_prompt, seed=config.seed),
           "validation": make_pairs(eval_groups, max_pairs=rc.max_pairs_per_prompt, seed=config.seed)}
  heldout_source = "policy samples"
  if not pairs["validation"] and (rc.include_canonical or rc.mutations_per_prompt):
    # No held-out prompt has both a passing and a failing policy sample: fall back to the
    # canonical/mutant candidates, and say so in the summary.
    pairs["validation"] = make_pairs(groups[:n_eval], max_pairs=rc.max_pairs_per_prompt, seed=config.seed)
    heldout_source = "canonical and mutant candidates (no held-out policy pair)"
  print(f"[rm] SFT sample pass rate {sft_pass:.3f}; pairs: {len(pairs['train'])} train, "
        f"{len(pairs['validation'])} held out ({heldout_source})")
  if len(pairs["train"]) < 2 or not pairs["validation"]:
    raise RuntimeError(f"too few preference pairs ({len(pairs['train'])} train, {len(pairs['validation'])} held "
                       f"out): the SFT policy passes {sft_pass:.1%} of its samples. Train SFT longer or raise "
                       "config.rm.num_prompts / samples_per_prompt.")
  # The dataset is named by its content: a finished dataset of the same name is reused as is.
  digest = hashlib.sha256(json.dumps(pairs, sort_keys=True).encode()).hexdigest()[:12]
  builder = data.build_preference_pairs(common.data_dir(config, workdir), pairs, name=f"minicode_pairs_{digest}")
  train_src, eval_src = data.load_split(builder, "train"), data.load_split(builder, "validation")

  # --- 2. init from the SFT backbone, step --------------------------------------------
  tx = common.optimizer(rc)
  state, state_sh = common.create_state(lambda r, p: models.lm_to_scalar_params(p, cfg, r),
                                        models.logical_axes(cfg, head="scalar"), tx, mesh, rng, sft_params)
  apply_fn = models.make_apply_fn(cfg, head="scalar")
  bsh = shd.batch_sharding(mesh, 2)
  batch_sh = {k: bsh for k in ("chosen_tokens", "chosen_mask", "rejected_tokens", "rejected_mask")}
  rep = shd.replicated(mesh)
  train_step = jax.jit(make_rm_step(apply_fn, tx, margin=rc.margin), in_shardings=(state_sh, batch_sh),
                       out_shardings=(state_sh, rep), donate_argnums=0)
  eval_step = jax.jit(make_rm_eval_step(apply_fn), in_shardings=(state_sh.params, batch_sh))

  def evaluate(params) -> dict[str, float]:
    """Every held-out pair: the last batch is padded by repetition (static shapes) and trimmed."""
    records = [eval_src[i] for i in range(len(eval_src))]
    bs = rc.batch_size
    padded = records + [records[-1]] * (-len(records) % bs)
    chosen, rejected = [], []
    for i in range(0, len(padded), bs):
      batch = data.collate(padded[i:i + bs])
      c, r = eval_step(params, shd.shard_batch(_encode_pairs(tok, batch, config), mesh))
      chosen.append(np.asarray(c))
      rejected.append(np.asarray(r))
    chosen, rejected = np.concatenate(chosen)[:len(records)], np.concatenate(rejected)[:len(records)]
    c, r = jnp.asarray(chosen), jnp.asarray(rejected)
    _, m = losses.bradley_terry_loss(c, r)
    out = {f"eval/{k.split('/')[-1]}": float(v) for k, v in m.items()}
    return out

  # --- 3. loop ------------------------------------------------------------------------
  bs = min(rc.batch_size, len(train_src))
  loader = data.make_grain_loader(train_src, batch_size=bs, seed=config.seed, shuffle=True, num_epochs=None)
  writer = MetricsWriter(out_dir, tensorboard=config.logging.tensorboard)
  progress = Progress(rc.steps, desc="rm", quiet=not config.logging.progress)
  pending = []
  for step, batch in zip(range(1, rc.steps + 1), loader):
    state, metrics = train_step(state, shd.shard_batch(_encode_pairs(tok, batch, config), mesh))
    pending.append(metrics)
    if step % config.logging.every_steps == 0 or step == rc.steps:
      host = common.mean_metrics([common.to_host(m) for m in pending])
      pending = []
      progress.update(step, loss=host["train/loss"], acc=host.get("rm/accuracy", 0.0))
      writer.write(step, host)
    if step % max(1, rc.steps // 4) == 0 or step == rc.steps:
      writer.write(step, evaluate(state.params))
  progress.close()
  final_eval = evaluate(state.params)

  # --- 4. reward normalisation statistics (held-out SFT samples) -------------------
  score = jax.jit(make_score_fn(apply_fn))
  # Statistics over the policy's own held-out samples (not the canonical candidates): what PPO will score.
  eval_texts = [c for g in eval_groups for c in g["completions"]]
  eval_prompts = [g["prompt"] for g in eval_groups for _ in range(n)]
  scores = []
  for i in range(0, len(eval_texts), bs):
    enc = encode_pairs(tok, eval_prompts[i:i + bs], eval_texts[i:i + bs], config.task.max_prompt_len,
                       config.task.max_response_len)
    scores.append(np.asarray(score(state.params, jnp.asarray(enc["tokens"]), jnp.asarray(enc["mask"]))))
  scores = np.concatenate(scores)
  labels = np.asarray([ok for g in eval_groups for ok in g["passed"]], np.float32)
  from rlhf_jax.selection import r_squared  # pylint: disable=import-outside-toplevel
  stats = {"reward_mean": float(scores.mean()), "reward_std": float(max(scores.std(), 1e-6)),
           "heldout_score_label_r2": float(r_squared(jnp.asarray(scores), jnp.asarray(labels)))}
  writer.write(rc.steps, {**final_eval, **{f"eval/{k}": v for k, v in stats.items()}})
  writer.close()
  common.save_params(final_params_dir(workdir), state.params, {"step": rc.steps, "stage": "rm", **stats})
  plot_metrics(os.path.join(out_dir, "metrics.jsonl"),
               {"BT loss": ["train/loss", "eval/loss"], "pairwise accuracy": ["rm/accuracy", "eval/accuracy"]},
               os.path.join(out_dir, "rm.png"), title="Reward model")
  summary = {"sft_pass_rate": sft_pass, "train_pairs": len(pairs["train"]), "heldout_source": heldout_source,
             "heldout_pairs": len(pairs["validation"]), **final_eval, **stats}
  common.write_json(os.path.join(out_dir, "summary.json"), summary)
  print(f"[rm] done: {summary}")
  return summary
