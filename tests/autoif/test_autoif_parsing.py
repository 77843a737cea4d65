"""Seed instructions, template and source recognition, completion parsers, the rule-based judge,
augmentation and verifier generation with a fake supervisor, and the scripted supervisor's behaviour."""

import random

import pytest

from rlhf_jax.autoif import ErrorRates, Instruction, RuleBasedJudge, ScriptedSupervisor, augment_instructions, \
    format_verifier_completion, generate_verifiers, parse_back_translation, parse_catalogue_source, \
    parse_instruction, parse_instruction_list, parse_quality_score, parse_verifier_completion, run_functions, \
    seed_instructions, standalone_types
from rlhf_jax.autoif.scripted import satisfy, stock_answer, wrong_function
from rlhf_jax.tasks import instructions as catalogue


def test_seed_instructions_round_trip():
  for seed in range(3):
    seeds = seed_instructions(seed=seed)
    assert len(seeds) == len(catalogue.CONSTRAINT_TYPES) - 1  # repeat_prompt needs a query
    for s in seeds:
      assert s.origin == "seed"
      assert parse_instruction(s.text) == (s.type_id, s.params_dict)
      # On one line too (augmentation writes one instruction per line).
      assert parse_instruction(" ".join(s.text.split())) == (s.type_id, s.params_dict)
      src = catalogue.verification_source(s.type_id, s.params_dict)
      assert parse_catalogue_source("# a comment\n" + src) == (s.type_id, s.params_dict)
  with pytest.raises(ValueError, match="type_ids"):
    seed_instructions(type_ids=["startend:repeat_prompt"])


def test_paraphrases_and_foreign_code_are_not_recognised():
  assert parse_instruction("Answer in fewer than 40 characters.") == ("length:max_chars", {"n": 40})
  assert parse_instruction("Please answer in fewer than 40 characters.") is None
  assert parse_instruction("Answer in fewer than forty characters.") is None
  assert parse_instruction("Write in the style of a pirate.") is None
  assert parse_catalogue_source("def evaluate(response):\n    return True\n") is None
  inverted = wrong_function("inverted", "length:max_chars", {"n": 40}, random.Random(0))
  assert parse_catalogue_source(inverted) is None
  off = wrong_function("off_by_one", "length:max_chars", {"n": 40}, random.Random(0))
  assert parse_catalogue_source(off)[1]["n"] in (39, 41)


def test_completion_parsers():
  text = format_verifier_completion("import requests\ndef evaluate(r):\n    return True", [("a", True), ("b", False)])
  cand = parse_verifier_completion("Here you go:\n" + text + "\nDone.")
  assert cand.source == "def evaluate(r):\n    return True\n"  # the `requests` line is stripped
  assert cand.cases == (("a", True), ("b", False))
  bare = parse_verifier_completion('{"func": "def evaluate(r): return 1", "cases": [{"input": "x", "output": '
                                   '"yes"}, {"input": "y", "output": false}]}')
  assert bare.cases == (("y", False),)  # a case with a non-bool output is skipped
  fenced = format_verifier_completion("def evaluate(r):\n    return r.startswith('```')\n", [("```x```", True)])
  assert parse_verifier_completion(fenced).cases == (("```x```", True),)  # fences inside the JSON strings
  assert parse_verifier_completion("```json\n{broken\n```") is None
  assert parse_verifier_completion('```json\n{"cases": []}\n```') is None
  assert parse_instruction_list("1. Use commas.\n\n- Be brief.\n(3) Stop.\n* End.") == [
      "Use commas.", "Be brief.", "Stop.", "End."]
  assert parse_quality_score("Good.\nScore: 7\nscore = 8.5") == 8.5
  assert parse_quality_score("no score") is None
  assert parse_back_translation("```\n1. Use at most 2 sentences.\n```") == "Use at most 2 sentences."


def test_rule_based_judge():
  judge = RuleBasedJudge()
  premise = "Answer in fewer than 40 characters."
  assert judge([premise] * 4, ["Answer in fewer than 40 characters.", "Answer in fewer than 41 characters.",
                               "Do not use any commas.", "Respond in any way you like."]) == [
      "entailment", "contradiction", "contradiction", "neutral"]
  with pytest.raises(ValueError, match="same length"):
    judge([premise], [])


class FakeSupervisor:
  def augment_instructions(self, seeds, n):
    return ["1. Do not use any commas.\n2. do not use  any commas.\n3. " + "x" * 400] * n

  def write_verifiers(self, instructions, k):
    good = format_verifier_completion("def evaluate(r):\n    return ',' not in r\n", [("a", True)])
    return [[good] + ["Sorry."] * (k - 1) for _ in instructions]


def test_augmentation_dedups_and_reports():
  seeds = [Instruction("Do not use any commas.", "seed", "punctuation:no_commas", ())]
  out, report = augment_instructions(FakeSupervisor(), seeds, num_completions=2)
  assert [i.text for i in out] == ["Do not use any commas."]
  assert report == {"name": "augmentation", "unit": "instructions", "in": 7, "out": 1, "removed": 6, "seeds": 1,
                    "generated": 6, "duplicates": 4, "too_long": 2}


def test_generate_verifiers_drops_malformed_completions():
  cands, report = generate_verifiers(FakeSupervisor(), [Instruction("Do not use any commas.")], k=3)
  assert len(cands[0]) == 1 and cands[0][0].cases == (("a", True),)
  assert report["in"] == 3 and report["out"] == 1 and report["instructions_with_candidates"] == 1


def test_scripted_supervisor_without_errors_is_right():
  """No mistakes: every function is the catalogue verifier and every response meets its instruction."""
  sup = ScriptedSupervisor(seed=0, error_rates=dict(unverifiable_instruction=0, malformed_completion=0,
                                                    wrong_function=0, mislabelled_case=0, mistranslation=0,
                                                    off_instruction=0, off_topic=0))
  seeds = seed_instructions(seed=0)
  texts = [s.text for s in seeds]
  completions = sup.write_verifiers(texts, 1)
  cands = [parse_verifier_completion(c[0]) for c in completions]
  assert all(parse_catalogue_source(c.source) == (s.type_id, s.params_dict) for c, s in zip(cands, seeds))
  from rlhf_jax.autoif import QueryPrompt
  prompts = [QueryPrompt(i, t, "Describe the moon.", f"Describe the moon. {t}") for i, t in enumerate(texts)]
  responses = sup.respond(prompts, 2)
  runs = run_functions([c.source for c in cands], responses, timeout_s=10.0)
  failed = [(t, r) for t, r, run in zip(texts, responses, runs) if run.verdicts != (True, True)]
  assert not failed
  # Case labels are the catalogue verifier's verdicts.
  case_runs = run_functions([c.source for c in cands], [[x for x, _ in c.cases] for c in cands], timeout_s=10.0)
  assert all(run.verdicts == tuple(y for _, y in c.cases) for c, run in zip(cands, case_runs))
  assert sup.back_translate([c.source for c in cands]) == [" ".join(t.split()) for t in texts]


def test_scripted_supervisor_mistakes():
  sup = ScriptedSupervisor(seed=0, error_rates=dict(off_instruction=1.0, off_topic=0.0))
  from rlhf_jax.autoif import QueryPrompt
  qp = QueryPrompt(0, "Use only lowercase letters.", "Describe the moon.", "")
  # Off-instruction responses are the stock answer, which starts with a capital letter.
  assert all(r[0].isupper() for r in sup.respond([qp], 5)[0])
  assert sup.rate_quality(["i"], ["Describe the moon."], ["The moon is bright."])[0].endswith("Score: 9")
  assert sup.rate_quality(["i"], ["Describe the moon."], ["Tea is hot."])[0].endswith("Score: 2")
  with pytest.raises(ValueError, match="off_topic"):
    ScriptedSupervisor(error_rates={"off_topic": 2.0})
  with pytest.raises(ValueError, match="unknown fields"):
    ScriptedSupervisor(error_rates={"typo": 0.1})
  with pytest.raises(ValueError, match="wrong_function_kinds"):
    ErrorRates(wrong_function_kinds=("nope",))
  assert stock_answer("Describe the moon.", random.Random(0)).startswith("Moon")
  assert set(standalone_types()) >= {"length:max_chars", "format:json"}
  assert satisfy("case:uppercase", {}, "abc", random.Random(0)) == "ABC"
