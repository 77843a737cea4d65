"""The records a stage trains on: the config's task, with what does not fit skipped and counted."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from rlhf_jax import rollout
from rlhf_jax.pipelines import common


def sft_split(config, workdir: str, split: str) -> Sequence[Mapping[str, Any]]:
  """Records with "prompt" and "response" for SFT; `split` is "train" or "eval" (the task's eval split).

  Records whose BOS + prompt or response + EOS do not fit `task.max_prompt_len` /
  `task.max_response_len` are skipped and counted, never truncated.
  """
  task = common.make_task(config, workdir)
  real_split = task.eval_split if split == "eval" else split
  records = rollout.load_fitted(task, common.tokenizer(config), real_split,
                                max_prompt_len=config.task.max_prompt_len,
                                max_response_len=config.task.max_response_len, stage="sft")
  missing = sum(1 for r in records if not r.get("response"))
  if missing:
    raise ValueError(f"config.task.name={task.name!r}: {missing} of {len(records)} {real_split!r} records have no "
                     "'response' to train SFT on (this task only grades completions)")
  return records
