"""SFT stage: next-token loss on response tokens, with eval, checkpoints, metrics and plots.

Writes under `<workdir>/sft/`: `ckpt/` (resumable training state + data
position), `final/` (the parameters later stages load), `metrics.jsonl`,
`tb/`, `loss.png`, and `summary.json`. A finished SFT stage is reused: running
it again with the same workdir only loads it (after checking the saved
parameters against their checksums; corrupt ones are rebuilt from `ckpt/`).

Reliability:
  - SIGTERM (preemption) during training: the state is checkpointed at the
    next step boundary and the process exits with status 75
    (`utils.preemption.PREEMPTED_EXIT_CODE`); running the same command again
    resumes, and the result is bitwise that of an uninterrupted run.
  - A step whose loss or gradient is NaN/Inf changes nothing (`train/skipped`
    = 1); more than `sft.max_consecutive_skips` (default 10) in a row stop the
    run with `TrainingDiverged`. No checkpoint ever holds NaN/Inf.
  - On resume, rows of metrics.jsonl after the restored step are dropped, so
    the file never holds a step twice.
"""

from __future__ import annotations

import os
import time
from typing import Any

import jax
import numpy as np

from rlhf_jax import rollout, sharding as shd
from rlhf_jax.checkpointing import Checkpointer, abstract_like
from rlhf_jax.config import config_to_json
from rlhf_jax.data import make_grain_loader
from rlhf_jax.pipelines import common, task_data
from rlhf_jax.steps import make_sft_eval_step, make_sft_step
from rlhf_jax.tokenizer import encode_pairs
from rlhf_jax.utils import MetricsWriter, Progress, plot_metrics
from rlhf_jax.utils.divergence import NonFiniteGuard
from rlhf_jax.utils.metrics import truncate_metrics
from rlhf_jax.utils.preemption import PreemptionGuard

DEFAULT_MAX_CONSECUTIVE_SKIPS = 10


def _encode(tok, batch: dict, config) -> dict[str, np.ndarray]:
  return encode_pairs(tok, batch["prompt"], batch["response"], config.task.max_prompt_len,
                      config.task.max_response_len)


def _to_mesh(enc: dict[str, np.ndarray], mesh) -> Any:
  """The global batch (the same on every host) on the mesh: each host feeds only its rows (`rollout.host_rows`),
  so a multi-host run trains on exactly the batches of a one-process run."""
  rows = rollout.host_rows(len(enc["tokens"]), mesh)
  return shd.shard_batch({k: v[rows] for k, v in enc.items()}, mesh)


def _close_quietly(ckpt: Checkpointer) -> None:
  try:
    ckpt.close()
  except Exception:  # pylint: disable=broad-except
    pass  # the exception being raised says more


def final_params_dir(workdir: str) -> str:
  return os.path.join(workdir, "sft", "final")


def run_sft(config, workdir: str) -> dict[str, Any]:
  out_dir = common.stage_dir(workdir, "sft")
  # A finished or partly trained SFT is continued only with the settings that made it (the step count may grow).
  common.check_provenance(out_dir, config, "sft", ignore=("sft.steps", "sft.eval_every", "sft.eval_batches",
                                                          "sft.max_consecutive_skips"))
  cfg = common.model_config(config)
  final_dir = final_params_dir(workdir)
  if common.has_params(final_dir):
    print(f"[sft] reusing the finished SFT stage in {final_dir}")
    return {"reused": True}
  if os.path.isdir(final_dir):
    print(f"[sft] rebuilding {final_dir} from the training checkpoints in {os.path.join(out_dir, 'ckpt')}")

  # --- mesh, data -----------------------------------------------------------------
  mesh = common.make_mesh(config)
  tok = common.tokenizer(config)
  sc = config.sft
  train_src = task_data.sft_split(config, workdir, "train")
  eval_src = task_data.sft_split(config, workdir, "eval")
  if len(train_src) < sc.batch_size:
    raise ValueError(f"config.sft.batch_size={sc.batch_size} exceeds the {len(train_src)} training examples")

  # --- state ----------------------------------------------------------------------
  tx = common.policy_optimizer(config, common.optimizer(sc))  # LoRA (model.lora_rank): adapters only
  rng = jax.random.PRNGKey(config.seed)
  # The checkpoint's weights (model.hf_path) or a random init; with LoRA {"base", "lora"}, whole tree checkpointed.
  state, state_sh = common.policy_state(config, cfg, tx, mesh, rng, common.init_policy_params(config, rng, mesh))
  ckpt = Checkpointer(os.path.join(out_dir, "ckpt"), max_to_keep=config.checkpoint.max_to_keep,
                      save_interval_steps=config.checkpoint.every_steps, async_save=config.checkpoint.async_save)
  start_batch = 0
  if ckpt.latest_step() is not None:
    state, meta = ckpt.restore(abstract_like(state, sharding=state_sh))  # the newest intact checkpoint
    start_batch = int(meta["data_position"])
    print(f"[sft] resumed at step {int(state.step)} (data position {start_batch})")
  # Rows the interrupted run logged after this point are about to be logged again.
  truncate_metrics(os.path.join(out_dir, "metrics.jsonl"), int(state.step))

  # --- step -----------------------------------------------------------------------
  apply_fn = common.policy_apply_fn(config, cfg)
  batch_sh = shd.batch_sharding(mesh, 2)
  batch_shardings = {"tokens": batch_sh, "mask": batch_sh, "loss_mask": batch_sh}
  rep = shd.replicated(mesh)
  train_step = jax.jit(make_sft_step(apply_fn, tx, microbatch=common.microbatch(config)),
                       in_shardings=(state_sh, batch_shardings), out_shardings=(state_sh, rep), donate_argnums=0)
  eval_step = jax.jit(make_sft_eval_step(apply_fn), in_shardings=(state_sh.params, batch_shardings),
                      out_shardings=rep)

  def evaluate(params) -> dict[str, float]:
    loader = make_grain_loader(eval_src, batch_size=sc.batch_size, shuffle=False, num_epochs=1,
                               drop_remainder=True)
    results = []
    for i, batch in enumerate(loader):
      if i >= sc.eval_batches:
        break
      results.append(common.to_host(eval_step(params, _to_mesh(_encode(tok, batch, config), mesh))))
    return {f"eval/{k.split('/')[-1]}": v for k, v in common.mean_metrics(results).items()}

  # --- loop -----------------------------------------------------------------------
  # Every host loads the same global batch; `_to_mesh` keeps its rows.
  loader = make_grain_loader(train_src, batch_size=sc.batch_size, seed=config.seed, shuffle=True, num_epochs=None,
                             start_index=start_batch)
  writer = MetricsWriter(out_dir, tensorboard=config.logging.tensorboard)
  progress = Progress(sc.steps, desc="sft", initial=int(state.step), quiet=not config.logging.progress)
  nonfinite = NonFiniteGuard(int(sc.get("max_consecutive_skips", DEFAULT_MAX_CONSECUTIVE_SKIPS)), stage="sft",
                             kept=f"the parameters are those of the last finite update and the checkpoints in "
                                  f"{ckpt.directory} hold no NaN/Inf")
  step = int(state.step)
  t_log, pending = time.time(), []

  def log_pending(*, advance: bool = True) -> None:
    nonlocal pending, t_log
    hosts = [common.to_host(m) for m in pending]  # one sync per log interval
    host = common.mean_metrics(hosts)
    if advance:
      progress.update(step, loss=host["train/loss"], tokens=tokens)
    host["train/tokens_per_s"] = progress.tokens_per_second
    host["train/steps_per_s"] = len(pending) / max(time.time() - t_log, 1e-9)
    pending, t_log = [], time.time()
    writer.write(step, host)
    nonfinite.update([m["train/skipped"] for m in hosts], step=step)

  def meta() -> dict[str, Any]:
    return {"data_position": loader.position, "config": config_to_json(config)}

  with PreemptionGuard() as guard:
    try:
      for batch in loader:
        if step >= sc.steps:
          break
        enc = _encode(tok, batch, config)
        state, metrics = train_step(state, _to_mesh(enc, mesh))
        step += 1
        pending.append(metrics)
        tokens = int(enc["mask"].sum())  # real (non-padding) tokens processed
        if step % config.logging.every_steps == 0 or step == sc.steps:
          log_pending()
        else:
          progress.update(step, tokens=tokens)
        if step % sc.eval_every == 0 and step < sc.steps:  # the last step's eval is the final one, below
          writer.write(step, evaluate(state.params))
        # The last step is always saved: the final parameters can be rebuilt from it.
        ckpt.save(step, state, meta=meta(), force=step == sc.steps)
        if guard.should_stop(step):
          if pending:
            log_pending(advance=False)
          ckpt.save(step, state, meta=meta(), force=True)  # no-op when this step was just saved
          ckpt.wait()  # committed before the process says so
          guard.exit(stage="sft", step=step, checkpoint=os.path.join(ckpt.directory, str(step)))
      ckpt.wait()
    except BaseException:  # an error, TrainingDiverged or Preempted: release files, keep the original exception
      progress.close()
      writer.close()
      _close_quietly(ckpt)
      raise
    progress.close()
    ckpt.close()

    final_eval = evaluate(state.params)
    writer.write(step, final_eval)
    writer.close()
    final_params = common.plain_params(config, state.params)  # LoRA merged: later stages load a plain model
    common.save_params(final_dir, final_params, {"step": step, "stage": "sft", "model": config.model.to_dict()})
    common.export_hf(config, final_params, out_dir)  # <out_dir>/hf/ with model.hf_path
    plot_metrics(os.path.join(out_dir, "metrics.jsonl"), {"loss": ["train/loss", "eval/nll"],
                                                          "token accuracy": ["sft/accuracy", "eval/accuracy"]},
                 os.path.join(out_dir, "loss.png"), title="SFT")
    summary = {"steps": step, "skipped_steps": nonfinite.total, **final_eval}
    common.write_json(os.path.join(out_dir, "summary.json"), summary)
    print(f"[sft] done: {summary}")
    if guard.requested:  # the signal came after the last step: the stage is complete, stop before the next one
      guard.exit(stage="sft", step=step, checkpoint=final_dir)
  return summary
