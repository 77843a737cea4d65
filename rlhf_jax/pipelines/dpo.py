"""Offline DPO stage: preference pairs from a TFDS dataset, a fixed reference, `make_dpo_step` (ALGORITHMS §8.1).

  pairs      a preference-pair dataset (`data.build_preference_pairs` layout: prompt, chosen,
             rejected, metadata): `dpo.pairs_dir` names its version directory, else the pairs the
             `autoif` stage wrote in this workdir (its summary.json names them); its "train" split
             is trained on, a "validation" split (if any) is evaluated
  reference  the SFT policy (`dpo.reference_dir`, default `<workdir>/sft/final`); its sequence
             log-probs log π_ref(y|x) are computed ONCE per dataset (`make_sequence_logps_fn`,
             fixed-size padded batches) and fed to every step
  policy     initialised from `dpo.init_dir` (default: the reference)
  loop       `dpo.steps` steps of `dpo.batch_size` pairs; pair k of the stream is pair
             perm_e[k mod n] with e = k div n and perm_e a seeded permutation per epoch, so the
             data position is the step and a resumed run is bitwise the uninterrupted one

Pairs whose prompt or response does not fit `task.max_prompt_len` / `task.max_response_len`
are skipped and counted, never truncated.

Writes `<workdir>/dpo/`: `ckpt/` (state + data position), `final/` (policy params), `metrics.jsonl`,
`tb/`, `dpo.png` (loss, reward accuracy, margins, implicit rewards), `summary.json`.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax import data, losses, models, rollout
from rlhf_jax import sharding as shd
from rlhf_jax.checkpointing import Checkpointer, abstract_like
from rlhf_jax.pipelines import common, sft
from rlhf_jax.steps.dpo import make_dpo_step, make_sequence_logps_fn
from rlhf_jax.tokenizer import encode_pairs
from rlhf_jax.utils import MetricsWriter, Progress, plot_metrics
from rlhf_jax.utils.metrics import truncate_metrics

PLOT_GROUPS = {"DPO loss": ["train/loss", "eval/loss"], "reward accuracy": ["rewards/accuracy", "eval/accuracy"],
               "implicit reward margin β·h": ["rewards/margin", "eval/margin"],
               "implicit rewards β·log(π/π_ref)": ["rewards/chosen", "rewards/rejected"]}


def final_params_dir(workdir: str, stage: str = "dpo") -> str:
  return os.path.join(workdir, stage, "final")


# --- policies -----------------------------------------------------------------------------
def load_policy(config, directory: str, mesh) -> Any:
  """LM parameters saved by `common.save_params` in `directory`, sharded on `mesh`."""
  cfg = common.model_config(config)
  params, _ = common.load_params(directory, models.abstract_params(cfg), common.param_shardings(cfg, mesh))
  return params


def policy_dir(path: str, workdir: str) -> str:
  """`path`, or the workdir's SFT policy when it is ""."""
  return path or sft.final_params_dir(workdir)


# --- pairs --------------------------------------------------------------------------------
def autoif_pairs_dir(workdir: str) -> str:
  """The pair dataset the autoif stage of this workdir wrote (named in its summary.json)."""
  path = os.path.join(workdir, "autoif", "summary.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"config.dpo.pairs_dir is empty and there is no autoif stage output in {workdir} "
                            f"({path}): run the autoif stage first or set config.dpo.pairs_dir")
  with open(path) as f:
    return json.load(f)["pairs_dataset"]


def load_pairs(directory: str, split: str) -> list[dict]:
  """Every pair of one split of a preference-pair dataset version directory (dataset_info.json inside)."""
  src = data.load_split(directory, split)
  return [src[i] for i in range(len(src))]


def has_split(directory: str, split: str) -> bool:
  with open(os.path.join(directory, "dataset_info.json")) as f:
    return any(s.get("name") == split for s in json.load(f).get("splits", []))


def fit_pairs(tok, pairs: Sequence[dict], *, max_prompt_len: int, max_response_len: int) -> tuple[list[dict], int]:
  """The pairs whose BOS + prompt and both responses + EOS fit; (kept, skipped)."""
  plen = lambda p: rollout.prompt_length(tok, {"prompt": p})  # BOS + prompt, in the chat template if used
  rlen = lambda r: len(tok.encode(r)) + 1
  kept = [p for p in pairs if plen(p["prompt"]) <= max_prompt_len and rlen(p["chosen"]) <= max_response_len
          and rlen(p["rejected"]) <= max_response_len]
  return kept, len(pairs) - len(kept)


def encode_pair_batch(tok, pairs: Sequence[dict], *, max_prompt_len: int, max_response_len: int,
                      weights: Optional[np.ndarray] = None) -> dict[str, np.ndarray]:
  """The DPO batch layout of `steps.dpo` (without reference log-probs) for a list of pairs."""
  prompts = [p["prompt"] for p in pairs]
  c = encode_pairs(tok, prompts, [p["chosen"] for p in pairs], max_prompt_len, max_response_len)
  r = encode_pairs(tok, prompts, [p["rejected"] for p in pairs], max_prompt_len, max_response_len)
  batch = {f"chosen_{k}": v for k, v in c.items()}
  batch.update({f"rejected_{k}": v for k, v in r.items()})
  batch["weights"] = np.ones(len(pairs), np.float32) if weights is None else np.asarray(weights, np.float32)
  return batch


def padded_batches(n: int, batch_size: int):
  """(indices [batch_size], weights [batch_size]) covering 0..n-1 once; the last batch repeats index n-1 at weight 0."""
  for i in range(0, n, batch_size):
    idx = np.arange(i, i + batch_size)
    yield np.minimum(idx, n - 1), (idx < n).astype(np.float32)


def sequence_logps(logps_fn, params, tok, pairs: Sequence[dict], *, batch_size: int, max_prompt_len: int,
                   max_response_len: int, mesh) -> tuple[np.ndarray, np.ndarray]:
  """(log π(y_w|x), log π(y_l|x)) of every pair, [n] each, in fixed-size batches (one compilation)."""
  chosen, rejected = [], []
  for idx, w in padded_batches(len(pairs), batch_size):
    b = encode_pair_batch(tok, [pairs[i] for i in idx], max_prompt_len=max_prompt_len,
                          max_response_len=max_response_len)
    b = shd.shard_batch(b, mesh)
    keep = int(w.sum())
    chosen.append(rollout.local_rows(logps_fn(params, b["chosen_tokens"], b["chosen_mask"],
                                              b["chosen_loss_mask"]))[:keep])
    rejected.append(rollout.local_rows(logps_fn(params, b["rejected_tokens"], b["rejected_mask"],
                                                b["rejected_loss_mask"]))[:keep])
  return np.concatenate(chosen).astype(np.float32), np.concatenate(rejected).astype(np.float32)


def stream_indices(step: int, batch_size: int, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """Pair indices and weights of training batch `step` (1-based) of a seeded per-epoch shuffle.

  With n ≥ batch_size every batch holds batch_size pairs (crossing epochs);
  with n < batch_size each batch holds every pair once and weight-0 padding.
  """
  if n < batch_size:
    idx = np.arange(batch_size)
    return np.random.default_rng([seed, step]).permutation(n)[np.minimum(idx, n - 1)], (idx < n).astype(np.float32)
  ks = np.arange((step - 1) * batch_size, step * batch_size)
  epochs, pos = ks // n, ks % n
  perms = {e: np.random.default_rng([seed, int(e)]).permutation(n) for e in np.unique(epochs)}
  return np.asarray([perms[e][p] for e, p in zip(epochs, pos)]), np.ones(batch_size, np.float32)


def dpo_eval_metrics(chosen, rejected, ref_chosen, ref_rejected, *, beta: float, loss_type: str,
                     label_smoothing: float) -> dict[str, float]:
  """`losses.dpo_loss` metrics over whole arrays of pairs, as eval/<name>."""
  _, m = losses.dpo_loss(jnp.asarray(chosen), jnp.asarray(rejected), jnp.asarray(ref_chosen),
                         jnp.asarray(ref_rejected), beta=beta, loss_type=loss_type, label_smoothing=label_smoothing)
  return {f"eval/{k.split('/')[-1]}": float(v) for k, v in m.items()}


# --- the stage ------------------------------------------------------------------------------
def run_dpo(config, workdir: str) -> dict[str, Any]:
  out_dir = common.stage_dir(workdir, "dpo")
  common.check_provenance(out_dir, config, "dpo")
  dc = config.dpo
  if common.has_params(final_params_dir(workdir)) and os.path.exists(os.path.join(out_dir, "summary.json")):
    print(f"[dpo] reusing the finished stage in {final_params_dir(workdir)}")
    with open(os.path.join(out_dir, "summary.json")) as f:
      return {"reused": True, **json.load(f)}
  plen, rlen = config.task.max_prompt_len, config.task.max_response_len
  lengths = dict(max_prompt_len=plen, max_response_len=rlen)

  # --- mesh, data ------------------------------------------------------------------------
  mesh = common.make_mesh(config)
  tok = common.tokenizer(config)
  pairs_dir = dc.pairs_dir or autoif_pairs_dir(workdir)
  train, skipped = fit_pairs(tok, load_pairs(pairs_dir, "train"), **lengths)
  held_out, skipped_eval = (fit_pairs(tok, load_pairs(pairs_dir, "validation"), **lengths)
                            if has_split(pairs_dir, "validation") else ([], 0))
  if skipped or skipped_eval:
    print(f"[dpo] skipped {skipped} train and {skipped_eval} held-out pairs that do not fit "
          f"max_prompt_len={plen}, max_response_len={rlen}")
  if not train:
    raise ValueError(f"config.dpo.pairs_dir: no training pair of {pairs_dir} fits the task lengths")
  bs = dc.batch_size

  # --- reference log-probs, once per dataset ------------------------------------------------
  cfg = common.model_config(config)
  ref_dir, init_dir = policy_dir(dc.reference_dir, workdir), policy_dir(dc.init_dir or dc.reference_dir, workdir)
  ref_params = load_policy(config, ref_dir, mesh)
  logps = jax.jit(make_sequence_logps_fn(models.make_apply_fn(cfg)))
  t0 = time.time()
  ref_c, ref_r = sequence_logps(logps, ref_params, tok, train, batch_size=bs, mesh=mesh, **lengths)
  ref_eval = (sequence_logps(logps, ref_params, tok, held_out, batch_size=bs, mesh=mesh, **lengths)
              if held_out else None)
  print(f"[dpo] {len(train)} train / {len(held_out)} held-out pairs from {pairs_dir}; reference {ref_dir} "
        f"log-probs in {time.time() - t0:.1f} s")

  # --- state, step --------------------------------------------------------------------------
  tx = common.optimizer(dc)
  rng = jax.random.PRNGKey(config.seed + 5)
  init_params = ref_params if init_dir == ref_dir else load_policy(config, init_dir, mesh)
  copy = lambda r, p: jax.tree.map(jnp.copy, p)  # the state owns its buffers (donated)
  state, state_sh = common.create_state(copy, models.logical_axes(cfg), tx, mesh, rng, init_params)
  ckpt = Checkpointer(os.path.join(out_dir, "ckpt"), max_to_keep=config.checkpoint.max_to_keep,
                      save_interval_steps=config.checkpoint.every_steps, async_save=config.checkpoint.async_save)
  if ckpt.latest_step() is not None:
    state, meta = ckpt.restore(abstract_like(state, sharding=state_sh))
    print(f"[dpo] resumed at step {int(state.step)} (data position {meta['data_position']})")
  start = int(state.step)
  truncate_metrics(os.path.join(out_dir, "metrics.jsonl"), start)
  rep = shd.replicated(mesh)
  step_fn = jax.jit(make_dpo_step(models.make_apply_fn(cfg), tx, beta=dc.beta, loss_type=dc.loss_type,
                                  label_smoothing=dc.label_smoothing, microbatch=common.microbatch(config)),
                    in_shardings=(state_sh, None), out_shardings=(state_sh, rep), donate_argnums=0)
  hyper = dict(beta=dc.beta, loss_type=dc.loss_type, label_smoothing=dc.label_smoothing)

  def evaluate(params) -> dict[str, float]:
    if not held_out:
      return {}
    c, r = sequence_logps(logps, params, tok, held_out, batch_size=bs, mesh=mesh, **lengths)
    return dpo_eval_metrics(c, r, *ref_eval, **hyper)

  # --- loop -----------------------------------------------------------------------------------
  writer = MetricsWriter(out_dir, tensorboard=config.logging.tensorboard)
  progress = Progress(dc.steps, desc=f"dpo[{dc.loss_type}]", initial=start, quiet=not config.logging.progress)
  initial = evaluate(state.params) if start == 0 else {}
  if initial:
    writer.write(0, initial)
  pending, last_eval, host = [], {}, {}
  for step in range(start + 1, dc.steps + 1):
    idx, w = stream_indices(step, bs, len(train), config.seed)
    batch = encode_pair_batch(tok, [train[i] for i in idx], weights=w, **lengths)
    batch["ref_chosen_logps"], batch["ref_rejected_logps"] = ref_c[idx], ref_r[idx]
    state, metrics = step_fn(state, shd.shard_batch(batch, mesh))
    pending.append(metrics)
    if step % config.logging.every_steps == 0 or step == dc.steps:
      host = common.mean_metrics([common.to_host(m) for m in pending])
      pending = []
      if step % dc.eval_every == 0 or step == dc.steps:
        last_eval = evaluate(state.params)
        host.update(last_eval)
      writer.write(step, host)
      progress.update(step, loss=host["train/loss"], acc=host["rewards/accuracy"],
                      margin=host["rewards/margin"])
    else:
      progress.update(step)
    ckpt.save(step, state, meta={"data_position": step * bs}, force=step == dc.steps)
  progress.close()
  ckpt.wait()
  ckpt.close()
  writer.close()

  common.save_params(final_params_dir(workdir), state.params,
                     {"step": dc.steps, "stage": "dpo", "loss_type": dc.loss_type, "beta": dc.beta})
  common.export_hf(config, state.params, out_dir)  # dpo/hf/ with model.hf_path
  plot_metrics(os.path.join(out_dir, "metrics.jsonl"), PLOT_GROUPS, os.path.join(out_dir, "dpo.png"),
               title=f"offline DPO ({dc.loss_type}, β={dc.beta})")
  rows = [r for r in _read(os.path.join(out_dir, "metrics.jsonl")) if "train/loss" in r]
  summary = {"stage": "dpo", "pairs_dataset": pairs_dir, "reference": ref_dir, "init": init_dir,
             "train_pairs": len(train), "heldout_pairs": len(held_out), "skipped_pairs": skipped + skipped_eval,
             "steps": dc.steps, "loss_type": dc.loss_type, "beta": dc.beta,
             "first_train_loss": rows[0]["train/loss"] if rows else None,
             "final_train_loss": host.get("train/loss"), "final_train_accuracy": host.get("rewards/accuracy"),
             "final_train_margin": host.get("rewards/margin"),
             "initial_eval": initial, "final_eval": last_eval}
  common.write_json(os.path.join(out_dir, "summary.json"), summary)
  print(f"[dpo] done: train loss {summary['first_train_loss']} -> {summary['final_train_loss']}, reward accuracy "
        f"{summary['final_train_accuracy']}; held-out {last_eval}")
  return summary


def _read(path: str) -> list[dict]:
  from rlhf_jax.utils import read_metrics  # pylint: disable=import-outside-toplevel
  return read_metrics(path) if os.path.exists(path) else []
