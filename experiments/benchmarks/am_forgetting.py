r"""RL on the three-task mixture with an RM, an Advantage Model, and AM + Selective Rehearsal, over seeds (issue 12).

  python experiments/benchmarks/am_forgetting.py --workdir=runs/am_arms --seeds 0 1 2 \
      --override rm.num_prompts=1536 --override rm.steps=600 --override rm.batch_size=32

A shared base (`<workdir>/base`: the SFT and the `am` stage of am.py, trained once) is
symlinked into every run, so seeds vary the RL part only (prompt order, sampling). The
RM arm's `rm` stage (the am stage's RM: same samples, pairs, batches and steps) is
trained once, in `s0_rm`, and linked into the other seeds. Arms:
  RM     am.py with `ppo.reward_source=rm` (PPO, GAE, critic from the RM)
  AM     am.py (reward = the AM's advantage score, critic from the AM)
  AM+SR  am_sr.py (AM + the Selective Rehearsal NLL term, λ = 0.2)
`--override a.b=v` goes to every run (base included). Prints, per arm (mean ± std over
seeds): held-out T=1 success and greedy before/after, the last 10 iterations' training
reward and true score per task, and the held-out expert set's NLL drift (final − initial,
nats/token) overall and per task with its greedy score. Writes `<workdir>/am_forgetting.json`
and `.png` (expert-set NLL over iterations, every run). Finished runs are reused.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)

from experiments.benchmarks import _common  # pylint: disable=wrong-import-position
from experiments.benchmarks._common import link  # pylint: disable=wrong-import-position
from rlhf_jax.utils import read_metrics  # pylint: disable=wrong-import-position

ARMS = {  # name -> (config, overrides)
    "RM": ("am.py", {"ppo.reward_source": "rm"}),
    "AM": ("am.py", {}),
    "AM+SR": ("am_sr.py", {}),
}
DIRS = {"RM": "rm", "AM": "am", "AM+SR": "amsr"}


def run(config: str, workdir: str, args: list[str], log) -> None:
  _common.run_config(config, workdir, ["--config.logging.progress=False"] + args, log)


def ms(values) -> str:
  values = [v for v in values if v is not None]
  return f"{np.mean(values):+.3f} ± {np.std(values):.3f}" if values else "n/a"


def m(values) -> str:
  values = [v for v in values if v is not None]
  return f"{np.mean(values):.3f} ± {np.std(values):.3f}" if values else "n/a"


def main() -> int:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--workdir", default="runs/am_arms")
  ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
  ap.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
  ap.add_argument("--override", action="append", default=[], help="a.b=v passed to every run")
  ap.add_argument("--tail", type=int, default=10, help="iterations averaged for the training reward / true score")
  args = ap.parse_args()
  workdir = os.path.abspath(args.workdir)
  base = os.path.join(workdir, "base")
  os.makedirs(base, exist_ok=True)
  log = open(os.path.join(workdir, "log.txt"), "a")
  extra = [f"--config.{o}" for o in args.override]

  print("[base] SFT + am (shared)", flush=True)
  if not os.path.exists(os.path.join(base, "am", "summary.json")):
    run("am.py", base, ["--config.stages=('sft','am')"] + extra, log)

  results: dict[str, list[dict]] = {}
  for seed in args.seeds:
    for arm in args.arms:
      config, over = ARMS[arm]
      run_dir = os.path.join(workdir, f"s{seed}_{DIRS[arm]}")
      os.makedirs(run_dir, exist_ok=True)
      for sub in ("sft", "data", "am"):
        link(os.path.join(base, sub), os.path.join(run_dir, sub))
      stages = "('ppo',)"
      if arm == "RM":
        first_rm = os.path.join(workdir, f"s{args.seeds[0]}_rm", "rm")
        if seed == args.seeds[0]:
          stages = "('rm','ppo')"
        else:
          link(first_rm, os.path.join(run_dir, "rm"))
      summary_path = os.path.join(run_dir, "ppo", "summary.json")
      if not os.path.exists(summary_path):
        run(config, run_dir, [f"--config.{k}={v}" for k, v in over.items()]
            + [f"--config.stages={stages}", f"--config.seed={seed}"] + extra, log)
      with open(summary_path) as f:
        s = json.load(f)
      rows = read_metrics(os.path.join(run_dir, "ppo", "metrics.jsonl"))
      train = [r for r in rows if "true/score" in r][-args.tail:]
      s["tail"] = {k: float(np.mean([r[k] for r in train if k in r]))
                   for k in sorted({k for r in train for k in r})
                   if (k.startswith("true/score") or k.startswith("reward/score")) and any(k in r for r in train)}
      s["expert_curve"] = [(r["step"], r["expert/nll"]) for r in rows if "expert/nll" in r]
      results.setdefault(arm, []).append(s)

  names = next(iter(results.values()))[0].get("task_names", [])
  lines = ["| arm | held-out T=1 success: SFT → final | greedy: SFT → final | expert NLL drift (all) | "
           + " | ".join(f"drift {n}" for n in names) + " | expert greedy score final |",
           "|---|---|---|---|" + "---|" * len(names) + "---|"]
  for arm, runs in results.items():
    drift = lambda key: [r["expert_nll_drift"].get(key) for r in runs]
    lines.append(
        f"| {arm} | {np.mean([r['initial_success_rate'] for r in runs]):.3f} → "
        f"{m([r['final_success_rate'] for r in runs])} | {np.mean([r['initial_greedy'] for r in runs]):.3f} → "
        f"{m([r['final_greedy'] for r in runs])} | {ms(drift('expert/nll'))} | "
        + " | ".join(ms(drift(f"expert/nll/task{t}")) for t in range(len(names)))
        + f" | {m([r['expert_final'].get('expert/greedy_score') for r in runs])} |")
  table2 = ["| arm | " + " | ".join(f"{n}: reward / true score" for n in names) + " |",
            "|---|" + "---|" * len(names)]
  for arm, runs in results.items():
    cells = [f"{m([r['tail'].get(f'reward/score/task{t}') for r in runs])} / "
             f"{m([r['tail'].get(f'true/score/task{t}') for r in runs])}" for t in range(len(names))]
    table2.append(f"| {arm} | " + " | ".join(cells) + " |")

  from matplotlib.backends.backend_agg import FigureCanvasAgg  # pylint: disable=import-outside-toplevel
  from matplotlib.figure import Figure  # pylint: disable=import-outside-toplevel
  fig = Figure(figsize=(7, 4))
  FigureCanvasAgg(fig)
  ax = fig.subplots()
  for i, (arm, runs) in enumerate(results.items()):
    for j, r in enumerate(runs):
      if r["expert_curve"]:
        xs, ys = zip(*r["expert_curve"])
        ax.plot(xs, ys, color=f"C{i}", alpha=0.8, marker=".", label=arm if j == 0 else None)
  ax.set_xlabel("RL iteration")
  ax.set_ylabel("held-out expert-set NLL (nats/token)")
  ax.set_title(f"forgetting on the mixture ({len(args.seeds)} seeds)")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(os.path.join(workdir, "am_forgetting.png"), dpi=100)
  with open(os.path.join(base, "am", "summary.json")) as f:
    am_summary = json.load(f)
  with open(os.path.join(workdir, "am_forgetting.json"), "w") as f:
    json.dump({"seeds": args.seeds, "overrides": args.override, "am": am_summary, "results": results}, f, indent=2)
  print(f"\nseeds {args.seeds}, overrides {args.override}\n" + "\n".join(lines) + "\n\n"
        f"training samples, last {args.tail} iterations (reward = what the arm trained on, normalised)\n"
        + "\n".join(table2))
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
