"""Preference-pair construction of the RM stage (host side, no model)."""

import json

from rlhf_jax.pipelines.rm import make_pairs


def test_pairs_are_better_over_worse_of_the_same_prompt():
  groups = [{"key": "a", "prompt": "P", "completions": ["ok1", "bad1", "ok1", "bad2", "half"],
             "scores": [1.0, 0.0, 1.0, 0.0, 0.5]},
            {"key": "b", "prompt": "Q", "completions": ["bad"], "scores": [0.0]}]
  pairs = make_pairs(groups, max_pairs=10, min_gap=0.0, seed=0)
  assert sorted((p["chosen"], p["rejected"]) for p in pairs) == [
      ("half", "bad1"), ("half", "bad2"), ("ok1", "bad1"), ("ok1", "bad2"), ("ok1", "half")]
  meta = [json.loads(p["metadata"]) for p in pairs]
  assert all(p["prompt"] == "P" and m["key"] == "a" and m["chosen_score"] > m["rejected_score"]
             for p, m in zip(pairs, meta))
  assert len(make_pairs(groups, max_pairs=1, min_gap=0.0, seed=0)) == 1
  # a minimum grade gap keeps only the clear contrasts
  wide = make_pairs(groups, max_pairs=10, min_gap=0.6, seed=0)
  assert sorted((p["chosen"], p["rejected"]) for p in wide) == [("ok1", "bad1"), ("ok1", "bad2")]
