"""Install as a user would: the wheel that `pip install .` builds ships every package.

`rlhf_jax/pipelines/` once had no `__init__.py`, so `packages = find:` skipped it
and a non-editable install had no stage at all. The wheel is built from a copy of
the source tree (the checkout is left untouched) and its file list is read from
the zip; nothing is installed.
"""
import os
import shutil
import subprocess
import sys
import zipfile

import pytest

REPO_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCES = ("setup.cfg", "pyproject.toml", "README.md", "rlhf_jax", "experiments")


@pytest.fixture(scope="module")
def wheel_files(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("wheel")
  src = tmp / "src"
  src.mkdir()
  ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", "runs", "build")
  for name in SOURCES:
    path = os.path.join(REPO_DIR, name)
    if os.path.isdir(path):
      shutil.copytree(path, src / name, ignore=ignore)
    else:
      shutil.copy(path, src / name)
  p = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                      "--no-index", "-q", "-w", str(tmp / "dist"), str(src)],
                     capture_output=True, text=True, timeout=300)
  assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
  (wheel,) = (tmp / "dist").glob("rlhf_jax-*.whl")
  with zipfile.ZipFile(wheel) as zf:
    return set(zf.namelist())


@pytest.mark.parametrize("path", [
    "rlhf_jax/pipelines/__init__.py", "rlhf_jax/pipelines/ppo.py", "rlhf_jax/pipelines/sft.py",
    "rlhf_jax/tasks/base.py", "rlhf_jax/execution/_runner.py", "experiments/run.py",
    "experiments/configs/pfppo.py", "experiments/configs/base.py",
])
def test_wheel_ships(wheel_files, path):
  assert path in wheel_files, sorted(f for f in wheel_files if f.startswith(path.split("/")[0]))


def test_wheel_ships_every_module_of_the_source_tree(wheel_files):
  missing = []
  for top in ("rlhf_jax", "experiments"):
    for root, dirs, files in os.walk(os.path.join(REPO_DIR, top)):
      dirs[:] = [d for d in dirs if d != "__pycache__"]
      if "__init__.py" not in files:
        continue  # not a package (e.g. experiments/results holds PNGs)
      for f in files:
        if f.endswith(".py"):
          rel = os.path.relpath(os.path.join(root, f), REPO_DIR).replace(os.sep, "/")
          if rel not in wheel_files:
            missing.append(rel)
  assert not missing, missing


def test_every_source_directory_with_modules_is_a_package():
  # A directory of modules without __init__.py is silently left out of the wheel.
  for top in ("rlhf_jax", "experiments"):
    for root, dirs, files in os.walk(os.path.join(REPO_DIR, top)):
      dirs[:] = [d for d in dirs if d != "__pycache__"]
      if any(f.endswith(".py") for f in files):
        assert "__init__.py" in files, f"{os.path.relpath(root, REPO_DIR)} has modules but no __init__.py"


def test_viz_extra_offers_tensorboard():
  import configparser
  cfg = configparser.ConfigParser()
  cfg.read(os.path.join(REPO_DIR, "setup.cfg"))
  assert "tensorboard" in cfg["options.extras_require"]["viz"].split()
