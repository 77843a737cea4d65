"""A user's own task, defined outside the package, trains with SFT + GRPO from the command line."""

import json
import os
import subprocess
import sys
import textwrap

from xla_flags import xla_flags

REPO_DIR = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

USER_TASK = textwrap.dedent('''
    import random
    from rlhf_jax.tasks import FunctionTask

    def _records(split, n):
      rnd = random.Random(split)
      words = ["".join(rnd.choice("abcd") for _ in range(rnd.randint(2, 4))) for _ in range(n)]
      return [{"prompt": f"copy: {w}\\n", "response": w, "word": w} for w in words]

    def grade(records, completions):
      # the grader sees every column of the record
      return [1.0 if c == r["word"] else 0.5 * (c[:1] == r["word"][:1]) for r, c in zip(records, completions)]

    def make_task(config):
      assert config.task.max_prompt_len == 16  # the run's config is passed in
      return FunctionTask("copy", {"train": _records("train", 200), "test": _records("test", 16)}, grade)
''')


def test_user_task_trains_with_grpo_from_the_command_line(tmp_path):
  (tmp_path / "my_user_tasks.py").write_text(USER_TASK)
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([REPO_DIR, str(tmp_path)]))
  env["XLA_FLAGS"] = xla_flags()  # one CPU device, as a user runs it
  workdir = tmp_path / "run"
  cmd = [sys.executable, "-m", "experiments.run", "--config=grpo.py", f"--workdir={workdir}",
         "--config.task.name=my_user_tasks:make_task", "--config.task.max_prompt_len=16",
         "--config.task.max_response_len=8", "--config.model.n_layers=1", "--config.model.dim=32",
         "--config.model.mlp_dim=64", "--config.sft.steps=10", "--config.sft.optimizer.total_steps=10",
         "--config.sft.optimizer.warmup_steps=2", "--config.sft.batch_size=8", "--config.ppo.iterations=2",
         "--config.ppo.prompts_per_iteration=4", "--config.ppo.samples_per_prompt=2", "--config.ppo.eval_every=2",
         "--config.ppo.eval_prompts=4", "--config.ppo.eval_samples=2", "--config.ppo.rollout_batch=4",
         "--config.logging.progress=False", "--config.logging.tensorboard=False"]
  proc = subprocess.run(cmd, cwd=REPO_DIR, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  summary = json.load(open(workdir / "grpo" / "summary.json"))
  assert summary["task"] == "copy" and summary["advantage"] == "grpo" and summary["iterations"] == 2
  assert 0.0 <= summary["final_success_rate"] <= 1.0
  assert "[grpo] done" in proc.stdout


def test_unknown_user_task_is_a_usage_error(tmp_path):
  proc = subprocess.run([sys.executable, "-m", "experiments.run", "--config=grpo.py", f"--workdir={tmp_path}",
                         "--config.task.name=no_such_module_xyz:make_task"], cwd=REPO_DIR, capture_output=True,
                        text=True, timeout=120, env=dict(os.environ, PYTHONPATH=REPO_DIR))
  assert proc.returncode == 2
  assert "config.task.name" in proc.stderr and "no_such_module_xyz" in proc.stderr
