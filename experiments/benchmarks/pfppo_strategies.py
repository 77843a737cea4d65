r"""PF-PPO strategy comparison on MiniCode (the paper's Tables 1 and 2 at CPU scale).

  python experiments/benchmarks/pfppo_strategies.py --workdir=runs/strategies --seeds 0 1 2

1. Trains SFT and the reward model once (`pfppo.py`, stages sft, rm) in
   `<workdir>/base`; every PPO run starts from them. Seeds vary the RL part
   (prompt order, sampling, filtration), not SFT/RM — training SFT three times
   does not fit the budget, and it is the RL ordering the paper claims.
2. Table 1: R² (binned and unbinned) of the RM reward against the sandbox's
   pass/fail per strategy on the SFT policy's samples (`r2` stage, validation
   prompts).
3. Table 2: greedy pass@1 on the MiniCode test split for SFT only, PPO-S
   (1 sample per prompt, N× the prompts), PPO-M (`none`: all N), BoN, BR, BW,
   each PPO variant with every seed.
`--base DIR` starts from the SFT + RM of an earlier comparison, e.g. for the
control experiment that trains on the sandbox outcome + noise instead of the
RM (`--override ppo.reward_source=oracle`).
Writes `<workdir>/strategies.json`, `strategies.png` (pass@1), `strategies_r2.png` (Table 1) and prints the
markdown tables that go into experiments/RESULTS.md. Every run gets pfppo.py plus
`COMPARISON_OVERRIDES` below; extra `--override a.b=v` flags are passed to every
run and replace those (e.g. `--override ppo.iterations=8`).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

from rlhf_jax.utils import read_metrics

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

STRATEGIES = {  # name -> config overrides
    "PPO-S": {"algo.strategy": "none", "ppo.samples_per_prompt": 1, "_ppo_s": True},
    "PPO-M": {"algo.strategy": "none"},
    "BoN": {"algo.strategy": "best_of_n"},
    "BR": {"algo.strategy": "best_random"},
    "BW": {"algo.strategy": "best_worst"},
}


# On top of pfppo.py (whose SFT and RM are cut to fit the 10-minute default run): the better
# 300 × 32 SFT policy, an RM on 256 prompts, and an actor learning rate that moves the policy.
COMPARISON_OVERRIDES = {
    "sft.batch_size": 32,
    "rm.num_prompts": 256, "rm.steps": 80, "rm.batch_size": 16, "rm.optimizer.learning_rate": 1e-4,
    "ppo.actor_optimizer.learning_rate": 5e-5, "ppo.eval_every": 10,
}


def run(workdir: str, overrides: dict, extra: list[str], log) -> None:
  cmd = [sys.executable, "-m", "experiments.run", "--config=pfppo.py", f"--workdir={workdir}"]
  cmd += [f"--config.{k}={v}" for k, v in overrides.items()] + [f"--config.{o}" for o in extra]
  log.write("$ " + " ".join(cmd) + "\n")
  log.flush()
  start = time.time()
  proc = subprocess.run(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, check=False)
  if proc.returncode:
    raise SystemExit(f"run failed ({proc.returncode}): {' '.join(cmd)}; see the log")
  print(f"  done in {time.time() - start:.0f} s: {workdir}", flush=True)


def link(src: str, dst: str) -> None:
  if not os.path.lexists(dst):
    os.symlink(os.path.abspath(src), dst)


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--workdir", default="runs/strategies")
  parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
  parser.add_argument("--strategies", nargs="+", default=list(STRATEGIES), choices=list(STRATEGIES))
  parser.add_argument("--override", action="append", default=[], help="a.b=v passed to every run")
  parser.add_argument("--base", default=None,
                      help="finished SFT + RM workdir to start from (default <workdir>/base; trained if missing)")
  args = parser.parse_args()
  given = {o.split("=", 1)[0] for o in args.override}
  args.override = [f"{k}={v}" for k, v in COMPARISON_OVERRIDES.items() if k not in given] + args.override
  workdir = os.path.abspath(args.workdir)
  base = os.path.abspath(args.base) if args.base else os.path.join(workdir, "base")
  os.makedirs(base, exist_ok=True)
  os.makedirs(workdir, exist_ok=True)
  log = open(os.path.join(workdir, "log.txt"), "a")
  data_dir = os.path.join(base, "data")
  # SFT and every PPO run are scored on the same problems: the whole MiniCode test split.
  common = {"task.data_dir": data_dir, "logging.progress": False, "ppo.eval_problems": 0, "eval.num_problems": 0}

  print("[1/3] SFT + reward model (shared)", flush=True)
  if not os.path.exists(os.path.join(base, "eval", "report.json")):
    run(base, {**common, "stages": "('sft','rm','eval')", "eval.split": "test", "sampling.temperature": 0.0},
        args.override, log)
  print("[2/3] R² per strategy on the SFT policy (validation prompts)", flush=True)
  if not os.path.exists(os.path.join(base, "r2", "table.json")):
    run(base, {**common, "stages": "('r2',)", "eval.params_dir": os.path.join(base, "sft", "final"),
               "eval.split": "validation", "eval.num_problems": 128}, args.override, log)

  print("[3/3] PPO variants × seeds", flush=True)
  p_default = None
  results: dict[str, list[float]] = {}
  diag: dict[str, list[dict]] = {}  # per run: final KL, mean RM–truth correlation, mean sample pass rate
  for seed in args.seeds:
    for name in args.strategies:
      over = dict(STRATEGIES[name])
      ppo_s = over.pop("_ppo_s", False)
      run_dir = os.path.join(workdir, f"{name}_seed{seed}")
      os.makedirs(run_dir, exist_ok=True)
      link(os.path.join(base, "sft"), os.path.join(run_dir, "sft"))
      link(os.path.join(base, "rm"), os.path.join(run_dir, "rm"))
      summary_path = os.path.join(run_dir, "ppo", "summary.json")
      if not os.path.exists(summary_path):
        if ppo_s:  # same number of sampled responses per iteration as the N-sample variants
          if p_default is None:
            sys.path.insert(0, REPO)
            from experiments.configs import pfppo  # pylint: disable=import-outside-toplevel
            cfg = pfppo.get_config()
            for o in args.override:
              k, v = o.split("=", 1)
              if k in ("ppo.prompts_per_iteration", "ppo.samples_per_prompt"):
                cfg[k.split(".")[0]][k.split(".")[1]] = int(v)
            p_default = (cfg.ppo.prompts_per_iteration, cfg.ppo.samples_per_prompt)
          over["ppo.prompts_per_iteration"] = p_default[0] * p_default[1]
        run(run_dir, {**common, **over, "stages": "('ppo',)", "seed": seed, "ppo.eval_at_start": False},
            args.override, log)
      with open(summary_path) as f:
        results.setdefault(name, []).append(float(json.load(f)["final_pass@1"]))
      rows = [r for r in read_metrics(os.path.join(run_dir, "ppo", "metrics.jsonl")) if "kl/ref" in r]
      diag.setdefault(name, []).append({"kl": rows[-1]["kl/ref"],
                                        "rm_corr": float(np.nanmean([r["true/rm_corr"] for r in rows])),
                                        "pass_rate": float(np.mean([r["true/pass_rate"] for r in rows]))})

  with open(os.path.join(base, "eval", "report.json")) as f:
    sft_report = json.load(f)
  sft_pass = float(sft_report.get("pass@1", sft_report.get("overall", {}).get("pass@1", float("nan"))))
  with open(os.path.join(base, "r2", "table.json")) as f:
    r2 = json.load(f)

  table1 = ["| strategy | binned R² | unbinned R² | kept samples |", "|---|---|---|---|"]
  for k, v in r2["table"].items():
    table1.append(f"| {k} | {v['r2_binned']:.3f} | {v['r2']:.3f} | {v['kept']} |")
  table2 = ["| method | greedy pass@1 (test), mean ± std | per seed | final KL | RM–truth corr | sample pass rate |",
            "|---|---|---|---|---|---|", f"| SFT | {sft_pass:.3f} | (shared) | | | |"]
  for name, vals in results.items():
    d = {k: np.mean([x[k] for x in diag[name]]) for k in ("kl", "rm_corr", "pass_rate")}
    table2.append(f"| {name} | {np.mean(vals):.3f} ± {np.std(vals):.3f} | {', '.join(f'{v:.3f}' for v in vals)} "
                  f"| {d['kl']:.2f} | {d['rm_corr']:+.2f} | {d['pass_rate']:.3f} |")
  out = {"sft_pass@1": sft_pass, "r2_sft": r2, "pass@1": results, "diagnostics": diag, "seeds": args.seeds,
         "overrides": args.override}
  with open(os.path.join(workdir, "strategies.json"), "w") as f:
    json.dump(out, f, indent=2)
  try:
    sys.path.insert(0, REPO)
    from rlhf_jax.utils import plot_bars  # pylint: disable=import-outside-toplevel
    means = {"SFT": sft_pass, **{k: float(np.mean(v)) for k, v in results.items()}}
    errs = {"SFT": 0.0, **{k: float(np.std(v)) for k, v in results.items()}}
    plot_bars(means, os.path.join(workdir, "strategies.png"), title="MiniCode test greedy pass@1", ylabel="pass@1",
              errors=errs)
    plot_bars({k: v["r2_binned"] for k, v in r2["table"].items()}, os.path.join(workdir, "strategies_r2.png"),
              title="binned R² of RM reward vs pass on the SFT policy's samples", ylabel="R²")
  except Exception as e:  # pylint: disable=broad-except
    print(f"(plot skipped: {e})")
  print(f"\nTable 1 — R² on the SFT policy ({r2['prompts']} prompts × {r2['samples_per_prompt']} samples, "
        f"pass rate {r2['pass_rate']:.3f})\n" + "\n".join(table1))
  print(f"\nTable 2 — greedy pass@1, seeds {args.seeds}\n" + "\n".join(table2))
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
