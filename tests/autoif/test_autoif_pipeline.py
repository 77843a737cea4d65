"""AutoIF end to end with the scripted supervisor: every filter removes something, and what comes out is right.

The supervisor's deliberate mistakes (unverifiable instructions, malformed
completions, wrong functions, flipped case labels, mistranslations,
off-instruction and off-topic responses) give each filter work; the SFT
responses and the chosen sides of the DPO pairs are then checked against the
catalogue's own verifier in the sandbox. Hanging verifiers are left out of
this run for time (they cost a full timeout each) and tested in
test_autoif_verification.py and test_autoif_cross_validation.py.
"""

import numpy as np
import pytest

from rlhf_jax.autoif import AutoIFConfig, ScriptedSupervisor, format_reports, parse_instruction, run_autoif, \
    seed_instructions
from rlhf_jax.tasks import instructions as catalogue

TYPES = ["length:max_chars", "keywords:include", "case:lowercase", "punctuation:no_commas", "format:bullets",
         "content:min_digits", "format:json"]


@pytest.fixture(scope="module")
def result():
  sup = ScriptedSupervisor(seed=0, error_rates={"wrong_function_kinds": ("off_by_one", "always_true", "inverted",
                                                                         "raises", "syntax_error")})
  config = AutoIFConfig(seed=0, augment_completions=2, verifiers_per_instruction=6, queries_per_instruction=2,
                        responses_per_prompt=4, query_chars=(20, 300), timeout_s=5.0)
  return run_autoif(sup, config, seeds=seed_instructions(seed=0, type_ids=TYPES))


def _followed(instructions, responses):
  """Strict verdicts of the catalogue verifier of each instruction on its response (sandbox)."""
  prompts = []
  for ins in instructions:
    type_id, params = parse_instruction(ins)
    prompts.append(catalogue.make_prompt("Describe the moon.", [(type_id, params)]))
  checked = catalogue.check_responses(prompts, list(responses), timeout_s=10.0)
  assert all(c["valid"] for c in checked)
  return [c["strict"][0] for c in checked]


def test_every_filter_removes_something(result):
  reports = {r["name"]: r for r in result.reports}
  assert list(reports) == ["augmentation", "verifier_generation", "cross_validation", "back_translation", "queries",
                           "instruction_following", "quality", "instruction_pairs", "query_pairs"], \
      format_reports(result.reports)
  for name in ("augmentation", "verifier_generation", "cross_validation", "back_translation", "queries",
               "instruction_following", "quality"):
    r = reports[name]
    assert r["in"] > r["out"] > 0 and r["removed"] == r["in"] - r["out"], (name, r)
  cv = reports["cross_validation"]
  assert cv["functions_in"] > cv["functions_compiled"] > cv["functions_out"] > 0
  assert cv["cases_in"] > cv["cases_out"] > 0
  assert reports["back_translation"]["labels"].get("contradiction", 0) > 0
  # Stage 2 sizes: every surviving instruction × 2 queries, 4 responses each.
  assert len(result.prompts) == 2 * len(result.verified) == reports["instruction_following"]["prompts_in"]
  assert result.accuracy.shape == (len(result.prompts), 4)
  assert reports["instruction_following"]["out"] == int(np.sum(np.nan_to_num(result.accuracy) > 0.5))


def test_outputs_satisfy_their_instructions(result):
  assert len(result.sft) > 10 and len(result.pairs) > 10
  assert {p["metadata"]["level"] for p in result.pairs} == {"instruction", "query"}
  sft_ok = _followed([r["metadata"]["instruction"] for r in result.sft], [r["response"] for r in result.sft])
  chosen_ok = _followed([p["metadata"]["instruction"] for p in result.pairs], [p["chosen"] for p in result.pairs])
  rejected_ok = _followed([p["metadata"]["instruction"] for p in result.pairs],
                          [p["rejected"] for p in result.pairs])
  assert all(sft_ok) and all(chosen_ok)
  assert not any(rejected_ok)
  for r in result.sft:
    assert r["prompt"].endswith(r["metadata"]["instruction"]) and r["metadata"]["quality"] >= 8
    assert r["metadata"]["accuracy"] > 0.5
  for p in result.pairs:
    assert p["metadata"]["chosen_accuracy"] >= 0.5 and p["metadata"]["rejected_accuracy"] == 0.0
