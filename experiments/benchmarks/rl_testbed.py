r"""RL on the testbed, over seeds: GRPO and PPO with the exact reward, and the PF-PPO strategy comparison.

  python experiments/benchmarks/rl_testbed.py core --workdir=runs/testbed --seeds 0 1 2
  python experiments/benchmarks/rl_testbed.py strategies --workdir=runs/testbed --seeds 0 1 2 --tag rm \
      --config pfppo_rm.py --base runs/testbed/base_rm
  python experiments/benchmarks/rl_testbed.py strategies --workdir=runs/testbed --seeds 0 1 2 --tag exact
  python experiments/benchmarks/rl_testbed.py strategies --workdir=runs/testbed --seeds 0 1 2 --tag noisy \
      --override ppo.reward_noise=0.5 --override ppo.reward_noise_shape=midrange

A shared base (`<workdir>/base`: the testbed SFT of grpo.py/pfppo.py, and with
`--config pfppo_rm.py` its reward model, trained once; `--base DIR` reuses another) is
symlinked into every run, so seeds vary the RL part only (prompt order, sampling,
filtration) — the reused SFT the issue allows.
- `core`: the grpo stage (grpo.py) and the ppo stage with GAE + critic, both on the
  task's exact grade (`ppo.reward_source=task`), per seed; table of held-out T=1
  success and greedy success before/after, KL and wall time, and the held-out curves.
- `strategies`: Table 2 (held-out success per strategy: PPO-S, PPO-M, BoN, BR, BW) per
  seed, on the reward of `--config`: pfppo.py (default) trains on the exact grade (with
  `--override` e.g. the grade + mid-range noise, the §4.10 mechanism test); pfppo_rm.py on
  the learned RM, and then also Table 1 (R² of the RM reward against the grade per
  strategy, r2 stage on the SFT policy).
Writes `<workdir>/<mode>[_<tag>].json`, `.png` and prints the markdown tables for
experiments/RESULTS.md; finished runs are reused (the harness resumes).
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
from rlhf_jax.utils import plot_bars, read_metrics  # pylint: disable=wrong-import-position

CORE = {  # name -> (config, stage, overrides)
    "GRPO": ("grpo.py", "grpo", {}),
    "PPO": ("pfppo.py", "ppo", {"ppo.reward_source": "task", "algo.strategy": "none",
                                "ppo.samples_per_prompt": 8}),
}
STRATEGIES = {
    "PPO-S": {"algo.strategy": "none", "ppo.samples_per_prompt": 1, "algo.advantage": "gae", "_ppo_s": True},
    "PPO-M": {"algo.strategy": "none"},
    "BoN": {"algo.strategy": "best_of_n"},
    "BR": {"algo.strategy": "best_random"},
    "BW": {"algo.strategy": "best_worst"},
}


def run(config: str, workdir: str, overrides: dict, extra: list[str], log) -> float:
  return _common.run_config(config, workdir, [f"--config.{k}={v}" for k, v in overrides.items()]
                            + [f"--config.{o}" for o in extra], log)


def eval_curve(run_dir: str, stage: str) -> list[tuple[int, float]]:
  rows = read_metrics(os.path.join(run_dir, stage, "metrics.jsonl"))
  return [(r["step"], r["eval/success_rate"]) for r in rows if "eval/success_rate" in r]


def mean_std(values) -> str:
  return f"{np.mean(values):.3f} ± {np.std(values):.3f}"


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("mode", choices=("core", "strategies"))
  parser.add_argument("--workdir", default="runs/testbed")
  parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
  parser.add_argument("--methods", nargs="+", default=None, help="subset of the mode's methods")
  parser.add_argument("--override", action="append", default=[], help="a.b=v passed to every RL run")
  parser.add_argument("--tag", default="", help="suffix of the output files and run directories")
  parser.add_argument("--base", default=None, help="finished SFT (+ RM) workdir to start from")
  parser.add_argument("--config", default="pfppo.py", choices=("pfppo.py", "pfppo_rm.py"),
                      help="strategies: the PF-PPO config (exact grade, or the learned RM)")
  args = parser.parse_args()
  workdir = os.path.abspath(args.workdir)
  base = os.path.abspath(args.base) if args.base else os.path.join(workdir, "base")
  os.makedirs(base, exist_ok=True)
  log = open(os.path.join(workdir, "log.txt"), "a")
  quiet = {"logging.progress": False}
  tag = f"_{args.tag}" if args.tag else ""

  print("[base] SFT + reward model (shared)", flush=True)
  with_rm = args.mode == "strategies" and args.config == "pfppo_rm.py"
  if not os.path.exists(os.path.join(base, "rm" if with_rm else "sft", "summary.json")):
    run(args.config if with_rm else "pfppo.py", base, {**quiet, "stages": "('sft','rm')" if with_rm else "('sft',)"},
        [], log)

  methods = args.methods or list(CORE if args.mode == "core" else STRATEGIES)
  results: dict[str, list[dict]] = {}
  for seed in args.seeds:
    for name in methods:
      if args.mode == "core":
        config, stage, over = CORE[name]
        over = dict(over)
      else:
        config, stage, over = args.config, "ppo", dict(STRATEGIES[name])
        if over.pop("_ppo_s", False):  # as many sampled responses per iteration as the N-sample variants
          over["ppo.prompts_per_iteration"] = 16 * 5
      run_dir = os.path.join(workdir, f"{args.mode}{tag}", f"{name}_seed{seed}")
      os.makedirs(run_dir, exist_ok=True)
      # core: the exact reward, and a critic from the SFT backbone (no RM in the loop at all)
      for sub in ("sft", "rm", "data") if with_rm else ("sft", "data"):
        link(os.path.join(base, sub), os.path.join(run_dir, sub))
      summary_path = os.path.join(run_dir, stage, "summary.json")
      if not os.path.exists(summary_path):
        run(config, run_dir, {**quiet, **over, "stages": f"('{stage}',)", "seed": seed}, args.override, log)
      with open(summary_path) as f:
        s = json.load(f)
      s["curve"] = eval_curve(run_dir, stage)
      results.setdefault(name, []).append(s)

  lines = ["| method | held-out T=1 success: SFT → final (mean ± std) | per seed (final) | gain (points) "
           "| greedy success: SFT → final | final KL (k1 / k3) | wall (s) |", "|---|---|---|---|---|---|---|"]
  for name, runs in results.items():
    init = [r["initial_success_rate"] for r in runs]
    fin = [r["final_success_rate"] for r in runs]
    gains = [100 * (f - i) for f, i in zip(fin, init)]
    lines.append(
        f"| {name} | {np.mean(init):.3f} → {mean_std(fin)} | {', '.join(f'{v:.3f}' for v in fin)} | "
        f"{np.mean(gains):+.1f} ± {np.std(gains):.1f} | {np.mean([r['initial_greedy'] for r in runs]):.3f} → "
        f"{mean_std([r['final_greedy'] for r in runs])} | {np.mean([r['final_kl'] for r in runs]):.2f} / "
        f"{np.mean([r['final_kl_k3'] for r in runs]):.2f} | {np.mean([r['wall_s'] for r in runs]):.0f} |")
  out = {"mode": args.mode, "config": args.config, "seeds": args.seeds, "overrides": args.override,
         "results": results}
  table1 = []
  if with_rm:
    r2_path = os.path.join(base, "r2", "table.json")
    if not os.path.exists(r2_path):
      run(args.config, base, {**quiet, "stages": "('r2',)", "eval.params_dir": os.path.join(base, "sft", "final"),
                             "eval.num_problems": 128}, [], log)
    with open(r2_path) as f:
      r2 = json.load(f)
    out["r2_sft"] = r2
    table1 = ["| strategy | binned R² | unbinned R² | kept samples |", "|---|---|---|---|"]
    table1 += [f"| {k} | {v['r2_binned']:.3f} | {v['r2']:.3f} | {v['kept']} |" for k, v in r2["table"].items()]
    with open(os.path.join(base, "rm", "summary.json")) as f:
      out["rm"] = json.load(f)
  with open(os.path.join(workdir, f"{args.mode}{tag}.json"), "w") as f:
    json.dump(out, f, indent=2)

  from matplotlib.backends.backend_agg import FigureCanvasAgg  # pylint: disable=import-outside-toplevel
  from matplotlib.figure import Figure  # pylint: disable=import-outside-toplevel
  fig = Figure(figsize=(7, 4))
  FigureCanvasAgg(fig)
  ax = fig.subplots()
  for i, (name, runs) in enumerate(results.items()):
    for j, r in enumerate(runs):
      xs, ys = zip(*r["curve"]) if r["curve"] else ((), ())
      ax.plot(xs, ys, color=f"C{i}", alpha=0.8, label=name if j == 0 else None, marker=".")
  ax.set_xlabel("RL iteration")
  ax.set_ylabel("held-out success rate (T = 1 samples)")
  ax.set_title(f"testbed: {args.mode}{tag} ({len(args.seeds)} seeds)")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(os.path.join(workdir, f"{args.mode}{tag}.png"), dpi=100)
  if args.mode == "strategies":
    plot_bars({k: float(np.mean([r["final_success_rate"] for r in v])) for k, v in results.items()},
              os.path.join(workdir, f"{args.mode}{tag}_bars.png"), ylabel="held-out success (T=1)",
              title="final held-out success per strategy", errors={k: float(np.std([r["final_success_rate"]
                                                                                     for r in v]))
                                                                  for k, v in results.items()})
  # R² of the reward each run trained on against the grade, per strategy, on its first rollout (the SFT policy's
  # samples): Table 1 for whatever reward the runs used (the RM, or the grade + noise).
  firsts = [r["r2_first_rollout"] for runs in results.values() for r in runs if r.get("r2_first_rollout")]
  firsts = [f for f in firsts if len(f) == max(len(g) for g in firsts)]  # PPO-S (1 sample) has only "none"
  if firsts:
    names = list(firsts[0])
    table1b = ["| strategy | binned R² (mean ± std over runs) | unbinned R² |", "|---|---|---|"]
    table1b += [f"| {k} | {mean_std([f[k]['r2_binned'] for f in firsts])} | {mean_std([f[k]['r2'] for f in firsts])} |"
                for k in names]
    out["r2_first_rollout"] = {k: {"r2_binned": float(np.mean([f[k]["r2_binned"] for f in firsts])),
                                   "r2": float(np.mean([f[k]["r2"] for f in firsts]))} for k in names}
    print(f"\nTable 1 (first rollout of each of {len(firsts)} runs: the trained-on reward vs the grade)\n"
          + "\n".join(table1b))
  if table1:
    print(f"\nTable 1 — R² on the SFT policy ({out['r2_sft']['prompts']} prompts × "
          f"{out['r2_sft']['samples_per_prompt']} samples)\n" + "\n".join(table1))
  print(f"\n{args.mode}{tag}, seeds {args.seeds}\n" + "\n".join(lines))
  with open(os.path.join(workdir, f"{args.mode}{tag}.json"), "w") as f:
    json.dump(out, f, indent=2)
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
