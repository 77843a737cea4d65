"""The reward–KL frontier of J-BOND against REINFORCE (RLOO) and best-of-N (ALGORITHMS §6.5 at CPU scale).

  python -m experiments.benchmarks.bond_frontier --base=/tmp/runs/base200 --out=runs/bond_frontier \
      --iterations=30 --seeds=0

On the RL testbed of experiments/configs/grpo.py (synthetic `reverse:` task, SFT stopped early),
with the task's grade as the reward of every method (reward_source "task"):
  jbond   the bond stage, J-BOND (1 policy + 2 anchor samples per prompt, EMA anchor), β × η grid
  rloo    the grpo stage with algo.advantage=rloo: REINFORCE with a leave-one-out baseline over
          2 samples per prompt and a k3 KL loss term to the SFT reference, one run per KL coefficient
  bon     the bon stage: best-of-N of the SFT policy for N = 1..16 (reward vs its KL estimate / bound)
Both trained methods use 16 prompts an iteration, the same learning rate and the same SFT start;
J-BOND draws 3 policy/anchor samples a prompt, RLOO 2 (J-BOND also draws M reference samples for
its quantile metrics, which do not enter its update).

Every run lives in `<out>/<run>_s<seed>/` (the base's sft/ and data/ symlinked in) and is reused
when finished, so an interrupted benchmark continues where it stopped. Writes `<out>/frontier.png`
(left: reward against KL(π‖π_ref) along every run, 5-iteration moving averages, with best-of-N;
right: J-BOND's effective N against the reference next to twice the anchor's) and
`<out>/frontier.md` (the table; printed too). `--report_only` redraws from finished runs.

Reading it: the trajectories' reward is the mean task grade of the iteration's policy samples
(train prompts) and their KL the mean sequence-summed k1 estimate log π(y) − log π_ref(y) on those
samples (the same quantity for both methods); best-of-N is measured on 64 held-out prompts. The
table's held-out columns are the T=1 grade / success on 64 held-out prompts × 4 samples.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

from experiments.benchmarks._common import load_average, set_threads


def _config(kind: str, *, iterations: int, seed: int, beta: float = 0.5, eta: float = 0.02, kl_coef: float = 0.01,
            lr: float = 1e-4, ns=(1, 2, 4, 8, 16)):
  from experiments.configs import grpo  # pylint: disable=import-outside-toplevel
  from experiments.configs.base import get_base_config  # pylint: disable=import-outside-toplevel
  c = grpo.testbed(get_base_config())
  c.seed = seed
  c.logging.progress = False
  c.logging.tensorboard = False
  if kind == "jbond":
    c.stages = ("bond",)
    b = c.bond
    b.iterations, b.prompts_per_iteration, b.variant = iterations, 16, "jbond"
    b.beta, b.eta, b.gamma, b.reward_source, b.reference_samples = beta, eta, 0.0, "task", 4
    b.eval_every, b.eval_prompts, b.eval_samples, b.checkpoint_every = iterations, 64, 4, 10
    b.rollout_batch = 32
    b.optimizer.learning_rate = lr
  elif kind == "rloo":
    c.stages = ("grpo",)
    c.algo.name, c.algo.advantage, c.algo.strategy = "rloo", "rloo", "none"
    c.algo.kl_coef, c.algo.kl_estimator = kl_coef, "k3"
    p = c.ppo
    p.iterations, p.prompts_per_iteration, p.samples_per_prompt, p.reward_source = iterations, 16, 2, "task"
    p.eval_every, p.eval_prompts, p.eval_samples, p.checkpoint_every = iterations, 64, 4, 10
    p.actor_optimizer.learning_rate = lr
  elif kind == "bon":
    c.stages = ("bon",)
    c.bon.ns, c.bon.num_prompts, c.bon.reward_source, c.bon.rollout_batch = tuple(ns), 64, "task", 32
  else:
    raise ValueError(f"unknown kind {kind!r}")
  return c


def _runs(args) -> list[tuple[str, str, dict]]:
  """Best-of-N first, then J-BOND and RLOO runs interleaved (a partial benchmark still compares both)."""
  runs = [("bon_s0", "bon", {"seed": 0})]
  for seed in args.seeds:
    jb = [(f"jbond_b{b:g}_e{e:g}_s{seed}", "jbond", {"beta": b, "eta": e, "seed": seed})
          for e in args.etas for b in args.betas]
    rl = [(f"rloo_kl{kl:g}_s{seed}", "rloo", {"kl_coef": kl, "seed": seed}) for kl in args.kl_coefs]
    for i in range(max(len(jb), len(rl))):
      runs += jb[i:i + 1] + rl[i:i + 1]
  return runs


def _workdir(out: str, name: str, base: str) -> str:
  wd = os.path.join(out, name)
  os.makedirs(wd, exist_ok=True)
  for sub in ("sft", "data"):
    link = os.path.join(wd, sub)
    if not os.path.exists(link):
      os.symlink(os.path.abspath(os.path.join(base, sub)), link)
  return wd


def _run_one(kind: str, config, workdir: str) -> dict:
  from rlhf_jax.pipelines import bon, bond, grpo  # pylint: disable=import-outside-toplevel
  fn = {"jbond": bond.run_bond, "rloo": grpo.run_grpo, "bon": bon.run_bon}[kind]
  return fn(config, workdir)


def _smooth(x: np.ndarray, w: int = 5) -> np.ndarray:
  if len(x) < w:
    return x
  return np.convolve(x, np.ones(w) / w, mode="valid")


def _trajectory(workdir: str, kind: str) -> dict[str, np.ndarray]:
  from rlhf_jax.utils import read_metrics  # pylint: disable=import-outside-toplevel
  stage = "bond" if kind == "jbond" else "grpo"
  rows = [r for r in read_metrics(os.path.join(workdir, stage, "metrics.jsonl")) if "kl/ref" in r]
  keys = ("kl/ref", "kl/ref_k3", "true/score", "true/success_rate", "effective_n/policy", "effective_n/anchor",
          "quantile/policy_vs_ref", "quantile/anchor_vs_ref", "policy/entropy", "kl/anchor")
  return {k: np.asarray([r[k] for r in rows], np.float64) for k in keys if rows and k in rows[0]}


def _bon_calibrated_n(q: float, bon_table: dict) -> float:
  """The N whose best-of-N win rate (against one reference sample) equals q: log-linear interpolation of the
  measured BoN curve (the task's ties make q/(1 − q) a poor inverse); clipped to the measured range."""
  ns = sorted(int(n) for n in bon_table)
  wr = np.maximum.accumulate([bon_table[str(n)]["win_rate"] for n in ns])  # np.interp needs it monotone
  return float(2 ** np.interp(q, wr, np.log2(ns)))


def report(args, results: dict) -> str:
  from rlhf_jax.pipelines.bon import save_xy_plot  # pylint: disable=import-outside-toplevel
  bon_summary = results.get("bon_s0", {}).get("summary")
  bon_table = bon_summary["table"] if bon_summary else None
  lines = ["| run | iters | reward (last 5) | KL k1 (last 5) | KL k3 (last 5) | held-out grade start → end | "
           "held-out success start → end | greedy start → end | eff. N policy / anchor (last 10) | "
           "BoN-calibrated N policy / anchor | wall s |", "|" + "---|" * 11]
  curves, neff_curves, agg = [], [], {}
  styles = {"jbond": "-", "rloo": "--"}
  for name, res in results.items():
    kind, s = res["kind"], res.get("summary")
    if kind == "bon" or not s:
      continue
    t = _trajectory(res["workdir"], kind)
    if not t:
      continue
    last = lambda k, w=5: float(np.mean(t[k][-w:])) if k in t else float("nan")
    neff = (f"{last('effective_n/policy', 10):.2f} / {last('effective_n/anchor', 10):.2f}"
            if "effective_n/policy" in t else "–")
    cal = "–"
    if bon_table and "quantile/policy_vs_ref" in t:
      cal = (f"{_bon_calibrated_n(last('quantile/policy_vs_ref', 10), bon_table):.2f} / "
             f"{_bon_calibrated_n(last('quantile/anchor_vs_ref', 10), bon_table):.2f}")
    f = lambda v: "n/a" if v is None else f"{v:.3f}"
    lines.append(f"| {name} | {s.get('iterations')} | {last('true/score'):.3f} | {last('kl/ref'):.3f} | "
                 f"{last('kl/ref_k3'):.3f} | {f(s.get('initial_score'))} → {f(s.get('final_score'))} | "
                 f"{f(s.get('initial_success_rate'))} → {f(s.get('final_success_rate'))} | "
                 f"{f(s.get('initial_greedy'))} → {f(s.get('final_greedy'))} | {neff} | {cal} | "
                 f"{s.get('wall_s', float('nan')):.0f} |")
    agg.setdefault(name.rsplit("_s", 1)[0], []).append(
        {"reward": last("true/score"), "kl": last("kl/ref"), "grade": s.get("final_score"),
         "success": s.get("final_success_rate"), "greedy": s.get("final_greedy")})
    # one colour and one legend entry per setting (its seeds share them), so the legend stays readable
    setting = name.rsplit("_s", 1)[0]
    color = f"C{list(agg).index(setting) % 10}"
    first = len(agg[setting]) == 1
    curves.append((setting if first else None, _smooth(t["kl/ref"]), _smooth(t["true/score"]), color + styles[kind]))
    if "effective_n/policy" in t:
      its = np.arange(1, len(t["effective_n/policy"]) + 1)
      sm = _smooth(t["effective_n/policy"])
      neff_curves.append((f"{setting} policy" if first else None, its[-len(sm):], sm, color + "-"))
      sa = _smooth(2 * t["effective_n/anchor"])
      neff_curves.append((f"{setting} 2 × anchor" if first else None, its[-len(sa):], sa, color + ":"))
  if agg:
    lines += ["", "Per setting, mean ± sd over seeds:", "",
              "| setting | seeds | reward (last 5) | KL k1 (last 5) | held-out grade end | held-out success end | "
              "greedy end |", "|---|---|---|---|---|---|---|"]
    for setting, vals in agg.items():
      ms = lambda k: (f"{np.mean([v[k] for v in vals]):.3f} ± {np.std([v[k] for v in vals]):.3f}"
                      if all(v[k] is not None for v in vals) else "n/a")
      lines.append(f"| {setting} | {len(vals)} | {ms('reward')} | {ms('kl')} | {ms('grade')} | {ms('success')} | "
                   f"{ms('greedy')} |")
  if bon_table:
    ns = sorted(int(n) for n in bon_table)
    lines += ["", "Best-of-N of the SFT policy (64 held-out prompts, reward = task grade):", "",
              "| N | true score | success | win rate vs 1 sample | KL estimate | KL bound |", "|---|---|---|---|---|---|"]
    for n in ns:
      row = bon_table[str(n)]
      lines.append(f"| {n} | {row['true_score']:.3f} | {row['success_rate']:.3f} | {row['win_rate']:.3f} | "
                   f"{row['kl_estimate']:.3f} | {row['kl_bound']:.3f} |")
    curves.append(("best-of-N (KL estimate)", [bon_table[str(n)]["kl_estimate"] for n in ns],
                   [bon_table[str(n)]["true_score"] for n in ns], "ko-"))
    curves.append(("best-of-N (KL bound)", [bon_table[str(n)]["kl_bound"] for n in ns],
                   [bon_table[str(n)]["true_score"] for n in ns], "kx:"))
  panels = [{"xlabel": "KL(π ‖ π_ref) (nats, k1 on the policy's samples)", "ylabel": "reward (mean task grade)",
             "title": "reward vs KL (5-iteration moving averages)", "curves": curves}]
  if neff_curves:
    panels.append({"xlabel": "iteration", "ylabel": "effective N = q/(1 − q) vs reference samples",
                   "title": "does J-BOND track Bo-2 of its anchor?", "curves": neff_curves})
  png = save_xy_plot(panels, os.path.join(args.out, "frontier.png"),
                     title=f"J-BOND vs RLOO vs best-of-N on the reverse: testbed (seeds {list(args.seeds)})")
  table = "\n".join(lines)
  with open(os.path.join(args.out, "frontier.md"), "w") as fh:
    fh.write(table + "\n")
  return f"{table}\n\nplot: {png}"


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--base", default="/tmp/runs/base200", help="a workdir with a finished testbed SFT (sft/, data/)")
  ap.add_argument("--out", default="runs/bond_frontier")
  ap.add_argument("--iterations", type=int, default=30)
  ap.add_argument("--seeds", type=int, nargs="+", default=[0])
  ap.add_argument("--betas", type=float, nargs="+", default=[0.0, 0.5, 1.0])
  ap.add_argument("--etas", type=float, nargs="+", default=[0.02, 0.1])
  ap.add_argument("--kl_coefs", type=float, nargs="+", default=[0.01, 0.1, 1.0])
  ap.add_argument("--lr", type=float, default=1e-4)
  ap.add_argument("--only", default="", help="run only the runs whose name contains this")
  ap.add_argument("--report_only", action="store_true")
  args = ap.parse_args(argv)
  set_threads(2)
  if not os.path.isdir(os.path.join(args.base, "sft")):
    print(f"--base {args.base} has no sft/ directory (a finished testbed SFT)", file=sys.stderr)
    return 2
  os.makedirs(args.out, exist_ok=True)
  print(f"# bond_frontier: load average {load_average()}", flush=True)
  results = {}
  for name, kind, kw in _runs(args):
    seed = kw.pop("seed")
    wd = _workdir(args.out, name, args.base)
    stage_dir = os.path.join(wd, {"jbond": "bond", "rloo": "grpo", "bon": "bon"}[kind])
    summary_path = os.path.join(stage_dir, "summary.json")
    todo = not args.report_only and (not args.only or args.only in name)
    if todo:
      t0 = time.time()
      config = _config(kind, iterations=args.iterations, seed=seed, lr=args.lr, **kw)
      from rlhf_jax.pipelines.common import SettingsChanged  # pylint: disable=import-outside-toplevel
      try:
        _run_one(kind, config, wd)
        print(f"# {name}: {time.time() - t0:.0f} s (load {load_average()})", flush=True)
      except SettingsChanged as e:  # e.g. the schema gained fields since: the finished run is reported as it is
        print(f"# {name}: not rerun, its finished result is reported as it is: {str(e)[:300]}", flush=True)
    summary = None
    if os.path.exists(summary_path):
      with open(summary_path) as fh:
        summary = json.load(fh)
    results[name] = {"kind": kind, "workdir": wd, "summary": summary}
  print(report(args, results))
  print(f"# load average at end {load_average()}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
