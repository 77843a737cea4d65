"""A tiny synthetic text task for SFT smoke tests.

Prompt/response pairs of deterministic string transformations over random
lowercase words, e.g. ``"reverse: abc\\n" -> "cba"``. A byte-level model
learns them in seconds, so a pipeline test can check that the SFT loss falls
and that greedy samples become exact.
"""
from __future__ import annotations

import hashlib
import random
from typing import Callable

__all__ = ["SYNTHETIC_TASKS", "generate_synthetic", "SPLITS"]

SPLITS = ("train", "test")
_TEST_FRACTION = 0.1

SYNTHETIC_TASKS: dict[str, Callable[[str], str]] = {
    "reverse": lambda s: s[::-1],
    "upper": lambda s: s.upper(),
    "sort": lambda s: "".join(sorted(s)),
    "double": lambda s: "".join(c * 2 for c in s),
    "first": lambda s: s[0],
    "length": lambda s: str(len(s)),
}


def _split_of(task: str, word: str) -> str:
  u = int.from_bytes(hashlib.sha256(f"{task}|{word}".encode()).digest()[:8], "big") / 2.0**64
  return "test" if u < _TEST_FRACTION else "train"


def generate_synthetic(split: str, num_examples: int, *, seed: int = 0,
                       tasks: tuple[str, ...] = ("reverse",),
                       min_len: int = 3, max_len: int = 8,
                       alphabet: str = "abcdefghij") -> list[dict]:
  """Distinct examples ``{"prompt": f"{task}: {word}\\n", "response": ..., "task"}``.

  The split of an example is a hash of (task, word), so train and test never
  share one. Words are drawn with ``random.Random(seed)``.

  Args:
    split: "train" or "test".
    num_examples: number of distinct examples.
    seed: sampling seed.
    tasks: task names from ``SYNTHETIC_TASKS``.
    min_len, max_len: word length range.
    alphabet: letters words are drawn from.

  Returns:
    The examples, in generation order.
  """
  if split not in SPLITS:
    raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
  unknown = [t for t in tasks if t not in SYNTHETIC_TASKS]
  if unknown or not tasks:
    raise ValueError(f"tasks must be a non-empty subset of {sorted(SYNTHETIC_TASKS)}, got {tasks!r}")
  if not 1 <= min_len <= max_len:
    raise ValueError(f"need 1 <= min_len <= max_len, got {min_len}, {max_len}")
  space = len(tasks) * sum(len(alphabet) ** n for n in range(min_len, max_len + 1))
  if num_examples > 0.5 * space * (_TEST_FRACTION if split == "test" else 1 - _TEST_FRACTION):
    raise ValueError(f"num_examples={num_examples} is too many for this word space")
  rng = random.Random(f"synthetic:{seed}:{split}")
  out, seen = [], set()
  while len(out) < num_examples:
    task = rng.choice(tasks)
    word = "".join(rng.choice(alphabet) for _ in range(rng.randint(min_len, max_len)))
    if (task, word) in seen or _split_of(task, word) != split:
      continue
    seen.add((task, word))
    out.append({"prompt": f"{task}: {word}\n", "response": SYNTHETIC_TASKS[task](word),
                "task": task})
  return out
