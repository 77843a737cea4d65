"""Instruction-following constraints: labelled cases through the sandbox, IFEval scores."""
import collections
import json

import pytest

from rlhf_jax.tasks import instructions as I


def _prompt(type_id, params=None, query="Describe the moon."):
  if params is None:
    params, _ = I.labelled_cases(type_id)
  return I.make_prompt(query, [(type_id, params)])


def test_catalogue():
  ids = [t.id for t in I.CONSTRAINT_TYPES]
  assert len(ids) == len(set(ids)) >= 25
  assert len({t.category for t in I.CONSTRAINT_TYPES}) >= 6
  for t in I.CONSTRAINT_TYPES:
    labels = [expected for _, expected in t.cases]
    assert labels.count(True) >= 2 and labels.count(False) >= 2, t.id
    src = I.verification_source(t.id, t.example_params)
    compile(src, t.id, "exec")
    assert "def evaluate(response: str) -> bool:" in src
    # Sampled parameters have the same names as the example parameters.
    import random
    assert set(t.sample(random.Random(0), "Q?")) == set(t.example_params), t.id
    I.instruction_text(t.id, t.example_params)


def test_unknown_type_and_missing_params():
  with pytest.raises(ValueError, match="unknown constraint type"):
    I.verification_source("nope", {})
  with pytest.raises(ValueError, match="missing"):
    I.instruction_text("length:max_chars", {})


def test_every_verification_function_against_its_labelled_cases():
  prompts, responses, labels = [], [], []
  for t in I.CONSTRAINT_TYPES:
    for response, expected in t.cases:
      prompts.append(_prompt(t.id))
      responses.append(response)
      labels.append((t.id, response, expected))
  checked = I.check_responses(prompts, responses, timeout_s=10.0)
  assert all(c["valid"] for c in checked)
  wrong = [(lab, c["strict"]) for lab, c in zip(labels, checked) if c["strict"] != [lab[2]]]
  assert not wrong, wrong


def test_loose_variants_follow_ifeval():
  cases = [
      # preamble line: strict fails, dropping the first line passes
      ("startend:start_phrase", "Sure thing!\nWell, it depends.", False, True),
      # trailing line: dropping the last line passes
      ("startend:end_phrase", "Done. Any other questions?\nBye", False, True),
      # markdown asterisks around JSON: removing '*' passes
      ("format:json", '**{"a": 1}**', False, True),
      ("length:max_words", "one two three", True, True),
      ("length:max_words", "one two three four five six", False, False),
      # empty responses follow nothing, even where the check would hold
      ("length:max_chars", "   ", False, False),
  ]
  prompts = [_prompt(t) for t, *_ in cases]
  checked = I.check_responses(prompts, [c[1] for c in cases])
  got = [(c["strict"][0], c["loose"][0]) for c in checked]
  assert got == [(s, l) for _, _, s, l in cases]


def test_one_program_checks_all_constraints_of_a_prompt():
  prompt = I.make_prompt("Describe the moon.", [
      ("length:max_words", {"n": 10}), ("case:lowercase", {}),
      ("punctuation:no_commas", {})])
  assert prompt["prompt"] == ("Describe the moon. Use fewer than 10 words. "
                              "Use only lowercase letters. Do not use any commas.")
  checked = I.check_responses([prompt, prompt], ["the moon is round, and pale",
                                                 "The moon is bright"])
  assert checked[0]["strict"] == [True, True, False]
  assert checked[1]["strict"] == [True, False, True]
  assert checked[0]["types"] == ["length:max_words", "case:lowercase", "punctuation:no_commas"]


def test_broken_verifiers_are_contained():
  good = {"type": "length:max_words", "params": {"n": 10}}
  raising = {"type": "custom", "params": {}, "source": "def evaluate(r):\n    return 1 / 0\n"}
  no_fn = {"type": "custom", "params": {}, "source": "x = 1\n"}
  exiting = {"type": "custom", "params": {}, "source": "import sys\nsys.exit(0)\n"}
  hard_exit = {"type": "custom", "params": {},
               "source": "import os\ndef evaluate(r):\n    os._exit(0)\n"}
  hanging = {"type": "custom", "params": {}, "source": "def evaluate(r):\n    while True: pass\n"}
  forged = {"type": "custom", "params": {}, "source":
            "import os\nprint('" + I.RESULT_MARKER + "{\"strict\": [true]}')\n"
            "def evaluate(r):\n    os._exit(0)\n"}
  prompts = [{"constraints": [good, c]} for c in (raising, no_fn, exiting, hard_exit, hanging,
                                                  forged)]
  checked = I.check_responses(prompts, ["short answer"] * len(prompts), timeout_s=2.0)
  # A verifier that raises or defines no evaluate only fails its own instruction.
  assert checked[0]["valid"] and checked[0]["strict"] == [True, False]
  assert checked[1]["valid"] and checked[1]["strict"] == [True, False]
  # Early exits, hangs and forged output: the whole response scores nothing.
  for c in checked[2:]:
    assert not c["valid"] and c["strict"] == [False, False] and c["loose"] == [False, False]
  assert checked[4]["status"] == "timeout"


def _reference_scores(strict, loose):
  flat_s = [x for row in strict for x in row]
  flat_l = [x for row in loose for x in row]
  return {"prompt_level_strict_acc": sum(all(r) for r in strict) / len(strict),
          "inst_level_strict_acc": sum(flat_s) / len(flat_s),
          "prompt_level_loose_acc": sum(all(r) for r in loose) / len(loose),
          "inst_level_loose_acc": sum(flat_l) / len(flat_l)}


def test_score_instruction_responses_matches_hand_count():
  p2 = I.make_prompt("Describe the moon.", [("length:max_words", {"n": 10}),
                                             ("case:lowercase", {})])
  p1 = _prompt("startend:start_phrase", {"phrase": "Well,"})
  prompts = [p2, p2, p1, p1]
  responses = ["the moon is pale", "The Moon", "Sure!\nWell, fine.", "No."]
  report = I.score_instruction_responses(prompts, responses)
  strict = [[True, True], [True, False], [False], [False]]
  loose = [[True, True], [True, False], [True], [False]]
  assert [r["strict"] for r in report["results"]] == strict
  assert [r["loose"] for r in report["results"]] == loose
  for key, value in _reference_scores(strict, loose).items():
    assert report[key] == pytest.approx(value), key
  # by hand: prompt strict 1/4, inst strict 3/6, prompt loose 2/4, inst loose 4/6
  assert report["prompt_level_strict_acc"] == 0.25
  assert report["inst_level_loose_acc"] == pytest.approx(4 / 6)
  assert report["per_type"]["case:lowercase"] == {"count": 2, "strict_acc": 0.5, "loose_acc": 0.5}
  json.dumps(report)
  with pytest.raises(ValueError, match="same length"):
    I.score_instruction_responses(prompts, responses[:2])


def test_generate_prompts_deterministic_disjoint_short():
  train = I.generate_prompts("train", 300, seed=0)
  again = I.generate_prompts("train", 300, seed=0)
  test = I.generate_prompts("test", 60, seed=0)
  assert train == again
  assert I.generate_prompts("train", 50, seed=1) != train[:50]
  assert not {p["key"] for p in train} & {p["key"] for p in test}
  assert len({p["key"] for p in train}) == 300
  for p in train + test:
    assert len(p["prompt"].encode()) <= I.MAX_PROMPT_BYTES
    assert 1 <= len(p["constraints"]) <= 3
    cats = [c["type"].split(":")[0] for c in p["constraints"]]
    assert len(cats) == len(set(cats))  # at most one per category
    assert p["prompt"].startswith(p["query"])
    for c in p["constraints"]:
      assert c["instruction"] in p["prompt"]
  counts = collections.Counter(c["type"] for p in train for c in p["constraints"])
  assert len(counts) == len(I.CONSTRAINT_TYPES)  # every type is used


def test_prompt_sources_reads_dataset_rows():
  p = I.make_prompt("Q.", [("case:uppercase", {})])
  row = {**p, "constraints": json.dumps(p["constraints"])}
  assert I.prompt_sources(row) == I.prompt_sources(p) == [
      I.verification_source("case:uppercase", {})]
