"""Best-of-N inference (ALGORITHMS §5): N samples per prompt, the best by reward, and the `bon` stage.

  scorer = rm_scorer(rm_params, cfg)            # on device, on the sampled tokens (or task_scorer(task))
  texts, indices, scores = best_of_n(sampler, params, tok, records, scorer, n, max_prompt_len=L, rng=key)

`best_of_n` draws `sampler.sampling.num_samples` (≥ n) completions per record through
the rollout path, scores them, and returns each record's best of the first n
(ties: the first index, `bon.best_of_n_indices`). With a sampler of N = n = 1 it
returns exactly `rollout.generate_texts` at the same key.

The `bon` stage measures best-of-N of one policy π_ref (default the SFT policy) on
`bon.num_prompts` held-out prompts. It samples max(ns) + 1 completions per prompt
once; best-of-N for every N in `bon.ns` is the best of the first N (prefixes of one
draw, so the curves are paired), and the last sample is the single independent
reference sample of the win rate. For each N it reports
  reward      mean reward of the selected samples (RM or the task's grade: `bon.reward_source`)
  true score  mean task grade of the selected samples, and their success rate (grade = 1)
  win rate    against the reference sample, by reward (ties half); ≤ N/(N + 1)
  KL          `bon.bon_kl_estimate` on the empirical reward law of all max(ns) + 1 samples of a prompt
              (prompt mean), beside the bound log N − (N − 1)/N
Writes `<workdir>/bon/`: `bon.png` (reward and true score against N and against KL),
`samples.jsonl` (every prompt's samples, rewards and grades), `summary.json`.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Callable, Optional, Sequence

import jax
import numpy as np

from rlhf_jax import bon, models, rollout
from rlhf_jax.pipelines import common, rm as rm_stage, sft
from rlhf_jax.steps import make_score_fn
from rlhf_jax.tasks.base import success

Scorer = Callable[[rollout.Rollout], np.ndarray]


# --- scorers: a Rollout -> this host's rewards [P_local · N], prompt-major ------------------------
def rm_scorer(rm_params: Any, cfg: models.ModelConfig) -> Scorer:
  """Rewards of a reward model (scalar head), computed on device on the sampled token buffers."""
  score = jax.jit(make_score_fn(models.make_apply_fn(cfg, head="scalar")))
  return lambda ro: rollout.local_rows(score(rm_params, ro.out.tokens, ro.out.mask)).astype(np.float32)


def task_scorer(task) -> Scorer:
  """The task's grade of the decoded completions (the true score) as the reward."""
  return lambda ro: rollout.grade(task, ro.records, ro.texts, n=ro.n).astype(np.float32)


def make_scorer(source: str, config, workdir: str, mesh, task, cfg: models.ModelConfig) -> Scorer:
  """The reward of the bon / rs / bond stages: the workdir's reward model ("rm") or the task's grade ("task")."""
  if source == "rm":
    rm_params, _ = rm_stage.load_reward_model(config, workdir, mesh)
    return rm_scorer(rm_params, cfg)
  return task_scorer(task)


def sample_scored(sampler, params: Any, tok, records: Sequence[dict], score_fn: Scorer, *, max_prompt_len: int,
                  rng: jax.Array, batch_size: Optional[int] = None, mesh=None) -> tuple[list[str], np.ndarray]:
  """N completions per record and their rewards: (texts [R·N] record-major, rewards [R, N]).

  Fixed-size sampler calls of `batch_size` records (default: all at once); the last
  is padded by repetition and trimmed, and call i uses `fold_in(rng, i)` like
  `rollout.generate_texts`.
  """
  if not records:
    raise ValueError("`records` is empty: nothing to sample")
  n = sampler.sampling.num_samples
  batch_size = len(records) if batch_size is None else batch_size
  texts: list[str] = []
  rewards = []
  for i in range(0, len(records), batch_size):
    chunk = list(records[i:i + batch_size])
    real = len(chunk)
    chunk += [chunk[-1]] * (batch_size - real)
    ro = rollout.sample(sampler, params, tok, chunk, max_prompt_len=max_prompt_len, rng=jax.random.fold_in(rng, i),
                        mesh=mesh)
    r = np.asarray(score_fn(ro), np.float32).reshape(batch_size, n)
    texts.extend(ro.texts[:real * n])
    rewards.append(r[:real])
  return texts, np.concatenate(rewards, 0)


def best_of_n(sampler, params: Any, tok, records: Sequence[dict], score_fn: Scorer, n: int, *, max_prompt_len: int,
              rng: jax.Array, batch_size: Optional[int] = None, mesh=None) -> tuple[list[str], np.ndarray, np.ndarray]:
  """Each record's best of n completions by reward: (texts [R], indices [R] in [0, n), scores [R]).

  Args:
    sampler: a rollout sampler drawing N ≥ n samples per prompt (`rollout.make_sampler(num_samples=N)`);
      the best is taken among the first n (ties: the first index).
    params: the sampled policy's parameters.
    tok: the tokenizer.
    records: task records with "prompt".
    score_fn: `Rollout -> rewards [P·N]` (`rm_scorer`, `task_scorer`, or your own).
    n: best-of-n size, 1 ≤ n ≤ N.
    max_prompt_len, rng, batch_size, mesh: as `sample_scored`.
  """
  num = sampler.sampling.num_samples
  if not isinstance(n, int) or not 1 <= n <= num:
    raise ValueError(f"`n` must be an int in [1, {num}] (the sampler's num_samples), got {n!r}")
  texts, rewards_RxN = sample_scored(sampler, params, tok, records, score_fn, max_prompt_len=max_prompt_len, rng=rng,
                                     batch_size=batch_size, mesh=mesh)
  idx = np.asarray(bon.best_of_n_indices(rewards_RxN[:, :n]))
  best = [texts[i * num + int(j)] for i, j in enumerate(idx)]
  return best, idx, rewards_RxN[np.arange(len(idx)), idx]


def bon_table(rewards_PxM: np.ndarray, truth_PxM: np.ndarray, reference_reward_P: np.ndarray,
              ns: Sequence[int]) -> dict[int, dict[str, float]]:
  """Best-of-N statistics for each N from one draw: rewards/grades [P, M] (M ≥ max N) and a reference sample.

  The KL estimate uses all M samples of a prompt (and the reference one) as π_ref's reward law.
  """
  if max(ns) > rewards_PxM.shape[1]:
    raise ValueError(f"max(ns)={max(ns)} exceeds the {rewards_PxM.shape[1]} samples per prompt")
  law_PxM = np.concatenate([rewards_PxM, reference_reward_P[:, None]], 1)
  out = {}
  for n in ns:
    idx = np.asarray(bon.best_of_n_indices(rewards_PxM[:, :n]))
    rows = np.arange(len(idx))
    reward, truth = rewards_PxM[rows, idx], truth_PxM[rows, idx]
    out[int(n)] = {
        "reward": float(reward.mean()), "true_score": float(truth.mean()),
        "success_rate": float(success(truth).mean()),
        "win_rate": float(bon.win_rate(reward, reference_reward_P)),
        "kl_estimate": float(np.mean(bon.bon_kl_estimate(law_PxM, n=int(n)))),
        "kl_bound": float(bon.bon_kl_bound(int(n))),
        "win_rate_bound": n / (n + 1.0),
    }
  return out


def save_xy_plot(panels: Sequence[dict], out_png: str, *, title: str) -> str:
  """One row of line plots. A panel is {"xlabel", "ylabel", "title", "curves": [(label, xs, ys, style)],
  "xscale" (optional)}. Written atomically (Agg canvas, no pyplot)."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # pylint: disable=import-outside-toplevel
  from matplotlib.figure import Figure  # pylint: disable=import-outside-toplevel
  fig = Figure(figsize=(5.5 * len(panels), 4.2), layout="constrained")
  FigureCanvasAgg(fig)
  axes = fig.subplots(1, len(panels), squeeze=False)[0]
  for ax, p in zip(axes, panels):
    for label, xs, ys, style in p["curves"]:
      ax.plot(xs, ys, style, label=label, markersize=4, linewidth=1.2)
    if p.get("xscale"):
      ax.set_xscale(p["xscale"], **({"base": 2} if p["xscale"] == "log" else {}))
    ax.set_xlabel(p["xlabel"])
    ax.set_ylabel(p["ylabel"])
    ax.set_title(p.get("title", ""), fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
  fig.suptitle(title, fontsize=11)
  os.makedirs(os.path.dirname(os.path.abspath(out_png)), exist_ok=True)
  tmp = f"{out_png}.tmp-{os.getpid()}"
  fig.savefig(tmp, dpi=100, format="png")
  os.replace(tmp, out_png)
  return out_png


def plot_bon(table: dict[int, dict[str, float]], out_png: str, *, title: str, reward_label: str) -> str:
  ns = sorted(table)
  col = lambda k: [table[n][k] for n in ns]
  curves = [(reward_label, ns, col("reward"), "o-"), ("true score (task grade)", ns, col("true_score"), "s-"),
            ("success rate", ns, col("success_rate"), "^--")]
  kl_curves = [(f"{lbl} vs KL estimate", col("kl_estimate"), ys, sty) for lbl, _, ys, sty in curves]
  kl_curves.append(("true score vs bound log N − (N−1)/N", col("kl_bound"), col("true_score"), "x:"))
  return save_xy_plot([
      {"xlabel": "N (samples per prompt)", "ylabel": "mean over prompts", "title": "best-of-N against N",
       "curves": curves, "xscale": "log"},
      {"xlabel": "KL(π_BoN ‖ π_ref) (nats)", "ylabel": "mean over prompts", "title": "best-of-N against KL",
       "curves": kl_curves},
  ], out_png, title=title)


def run_bon(config, workdir: str) -> dict[str, Any]:
  out_dir = common.stage_dir(workdir, "bon")
  common.check_provenance(out_dir, config, "bon")
  summary_path = os.path.join(out_dir, "summary.json")
  if os.path.exists(summary_path):
    print(f"[bon] reusing the finished stage in {out_dir}")
    with open(summary_path) as f:
      return {"reused": True, **json.load(f)}
  bc = config.bon
  ns = sorted({int(n) for n in bc.ns})
  m = max(ns) + 1
  plen, rlen = config.task.max_prompt_len, config.task.max_response_len
  t0 = time.time()

  # --- mesh, policy, reward, data ------------------------------------------------------
  mesh = common.make_mesh(config)
  tok = common.tokenizer(config)
  task = common.make_task(config, workdir)
  cfg = common.model_config(config)
  params_dir = bc.params_dir or sft.final_params_dir(workdir)
  params, _ = common.load_params(params_dir, models.abstract_params(cfg), common.param_shardings(cfg, mesh))
  score_fn = make_scorer(bc.reward_source, config, workdir, mesh, task, cfg)
  records = rollout.load_fitted(task, tok, task.eval_split, max_prompt_len=plen, stage="bon")[:bc.num_prompts]
  sampler = rollout.make_sampler(cfg, tok, max_new_tokens=rlen, temperature=config.sampling.temperature,
                                 top_k=config.sampling.top_k, top_p=config.sampling.top_p, num_samples=m, mesh=mesh)

  # --- one draw of max(ns) + 1 samples per prompt ----------------------------------------
  print(f"[bon] {len(records)} {task.name} prompts × {m} samples of {params_dir}, reward = {bc.reward_source}")
  texts, rewards_PxM = sample_scored(sampler, params, tok, records, score_fn, max_prompt_len=plen,
                                     rng=jax.random.PRNGKey(config.seed + 21), batch_size=bc.rollout_batch, mesh=mesh)
  truth_PxM = rollout.grade(task, records, texts, n=m).reshape(len(records), m)
  table = bon_table(rewards_PxM[:, :-1], truth_PxM[:, :-1], rewards_PxM[:, -1], ns)
  with open(os.path.join(out_dir, "samples.jsonl"), "w") as f:
    for i, r in enumerate(records):
      f.write(json.dumps({"prompt": r["prompt"], "completions": texts[i * m:(i + 1) * m],
                          "rewards": rewards_PxM[i].tolist(), "grades": truth_PxM[i].tolist()}) + "\n")

  # --- report ------------------------------------------------------------------------------
  reward_label = "RM reward" if bc.reward_source == "rm" else "reward (task grade)"
  plot_bon(table, os.path.join(out_dir, "bon.png"), title=f"best-of-N on {task.name} ({len(records)} held-out "
           f"prompts, reward: {bc.reward_source})", reward_label=reward_label)
  summary = {"stage": "bon", "task": task.name, "policy": params_dir, "reward_source": bc.reward_source,
             "prompts": len(records), "samples_per_prompt": m, "temperature": config.sampling.temperature,
             "ns": ns, "table": {str(n): v for n, v in table.items()}, "wall_s": time.time() - t0}
  common.write_json(os.path.join(out_dir, "summary.json"), summary)
  print("[bon]    N   reward   true  success  win_rate  KL_est  KL_bound")
  for n in ns:
    row = table[n]
    print(f"[bon] {n:4d}  {row['reward']:7.3f}  {row['true_score']:.3f}  {row['success_rate']:.3f}    "
          f"{row['win_rate']:.3f}   {row['kl_estimate']:.3f}   {row['kl_bound']:.3f}")
  return summary
