"""SFT stage: next-token loss on response tokens, with eval, checkpoints, metrics and plots.

Writes under `<workdir>/sft/`: `ckpt/` (resumable training state + data
position), `final/` (the parameters later stages load), `metrics.jsonl`,
`tb/`, `loss.png`, and `summary.json`. A finished SFT stage is reused: running
it again with the same workdir only loads it.
"""

from __future__ import annotations

import os
import time
from typing import Any

import jax
import numpy as np

from rlhf_jax import models
from rlhf_jax import sharding as shd
from rlhf_jax.checkpointing import Checkpointer, abstract_like
from rlhf_jax.config import config_to_json
from rlhf_jax.data import make_grain_loader
from rlhf_jax.pipelines import common, task_data
from rlhf_jax.steps import make_sft_eval_step, make_sft_step
from rlhf_jax.tokenizer import encode_pairs
from rlhf_jax.utils import MetricsWriter, Progress, plot_metrics


def _encode(tok, batch: dict, config) -> dict[str, np.ndarray]:
  return encode_pairs(tok, batch["prompt"], batch["response"], config.task.max_prompt_len,
                      config.task.max_response_len)


def final_params_dir(workdir: str) -> str:
  return os.path.join(workdir, "sft", "final")


def run_sft(config, workdir: str) -> dict[str, Any]:
  out_dir = common.stage_dir(workdir, "sft")
  cfg = common.model_config(config)
  if common.has_params(final_params_dir(workdir)):
    print(f"[sft] reusing the finished SFT stage in {final_params_dir(workdir)}")
    return {"reused": True}

  # --- mesh, data -----------------------------------------------------------------
  mesh = common.make_mesh(config)
  tok = common.tokenizer(config)
  sc = config.sft
  train_src = task_data.sft_split(config, workdir, "train")
  eval_src = task_data.sft_split(config, workdir, "eval")
  if len(train_src) < sc.batch_size:
    raise ValueError(f"config.sft.batch_size={sc.batch_size} exceeds the {len(train_src)} training examples")

  # --- state ----------------------------------------------------------------------
  tx = common.optimizer(sc)
  rng = jax.random.PRNGKey(config.seed)
  state, state_sh = common.create_state(lambda r: models.init_params(cfg, r), models.logical_axes(cfg), tx, mesh, rng)
  ckpt = Checkpointer(os.path.join(out_dir, "ckpt"), max_to_keep=config.checkpoint.max_to_keep,
                      save_interval_steps=config.checkpoint.every_steps, async_save=config.checkpoint.async_save)
  start_batch = 0
  if ckpt.latest_step() is not None:
    state, meta = ckpt.restore(abstract_like(state, sharding=state_sh))
    start_batch = int(meta["data_position"])
    print(f"[sft] resumed at step {int(state.step)} (data position {start_batch})")

  # --- step -----------------------------------------------------------------------
  apply_fn = models.make_apply_fn(cfg)
  batch_sh = shd.batch_sharding(mesh, 2)
  batch_shardings = {"tokens": batch_sh, "mask": batch_sh, "loss_mask": batch_sh}
  rep = shd.replicated(mesh)
  train_step = jax.jit(make_sft_step(apply_fn, tx), in_shardings=(state_sh, batch_shardings),
                       out_shardings=(state_sh, rep), donate_argnums=0)
  eval_step = jax.jit(make_sft_eval_step(apply_fn), in_shardings=(state_sh.params, batch_shardings),
                      out_shardings=rep)

  def evaluate(params) -> dict[str, float]:
    loader = make_grain_loader(eval_src, batch_size=sc.batch_size, shuffle=False, num_epochs=1,
                               drop_remainder=True)
    results = []
    for i, batch in enumerate(loader):
      if i >= sc.eval_batches:
        break
      results.append(common.to_host(eval_step(params, shd.shard_batch(_encode(tok, batch, config), mesh))))
    return {f"eval/{k.split('/')[-1]}": v for k, v in common.mean_metrics(results).items()}

  # --- loop -----------------------------------------------------------------------
  loader = make_grain_loader(train_src, batch_size=sc.batch_size, seed=config.seed, shuffle=True, num_epochs=None,
                             start_index=start_batch)
  writer = MetricsWriter(out_dir, tensorboard=config.logging.tensorboard)
  progress = Progress(sc.steps, desc="sft", initial=int(state.step), quiet=not config.logging.progress)
  step = int(state.step)
  t_log, pending = time.time(), []
  for batch in loader:
    if step >= sc.steps:
      break
    enc = _encode(tok, batch, config)
    state, metrics = train_step(state, shd.shard_batch(enc, mesh))
    step += 1
    pending.append(metrics)
    tokens = int(enc["mask"].sum())  # real (non-padding) tokens processed
    if step % config.logging.every_steps == 0 or step == sc.steps:
      host = common.mean_metrics([common.to_host(m) for m in pending])  # one sync per log interval
      progress.update(step, loss=host["train/loss"], tokens=tokens)
      host["train/tokens_per_s"] = progress.tokens_per_second
      host["train/steps_per_s"] = len(pending) / max(time.time() - t_log, 1e-9)
      pending, t_log = [], time.time()
      writer.write(step, host)
    else:
      progress.update(step, tokens=tokens)
    if step % sc.eval_every == 0 or step == sc.steps:
      writer.write(step, evaluate(state.params))
    ckpt.save(step, state, meta={"data_position": loader.position, "config": config_to_json(config)})
  progress.close()
  ckpt.wait()
  ckpt.close()

  final_eval = evaluate(state.params)
  writer.write(step, final_eval)
  writer.close()
  common.save_params(final_params_dir(workdir), state.params, {"step": step, "stage": "sft",
                                                               "model": config.model.to_dict()})
  plot_metrics(os.path.join(out_dir, "metrics.jsonl"), {"loss": ["train/loss", "eval/nll"],
                                                        "token accuracy": ["sft/accuracy", "eval/accuracy"]},
               os.path.join(out_dir, "loss.png"), title="SFT")
  summary = {"steps": step, **final_eval}
  common.write_json(os.path.join(out_dir, "summary.json"), summary)
  print(f"[sft] done: {summary}")
  return summary
