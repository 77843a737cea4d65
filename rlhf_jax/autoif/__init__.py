"""AutoIF: instruction-following data from self-play with execution feedback (ALGORITHMS.md §9).

Each step of §9.1 is its own function; `run_autoif` chains them. Every
generated verification function and every response runs in the sandbox
(`rlhf_jax.execution`), never in this process. The supervisor model is a
protocol (`Supervisor`); `ScriptedSupervisor` is a model-free one with
deliberate mistakes for CPU runs and tests.
"""

from rlhf_jax.autoif.back_translation import NLI_LABELS, Judge, RuleBasedJudge, back_translation_filter
from rlhf_jax.autoif.constraints import Instruction, parse_catalogue_source, parse_instruction, seed_instructions, \
    standalone_types
from rlhf_jax.autoif.cross_validation import CrossValidationConfig, VerifiedInstruction, cross_validate, \
    cross_validate_instructions
from rlhf_jax.autoif.datasets import instruction_level_pairs, pair_indices, query_level_pairs, sft_records
from rlhf_jax.autoif.generation import augment_instructions, generate_verifiers
from rlhf_jax.autoif.pipeline import AutoIFConfig, AutoIFResult, run_autoif
from rlhf_jax.autoif.report import FilterReport, filter_report, format_reports
from rlhf_jax.autoif.responses import instruction_following_filter, make_query_prompts, quality_filter, \
    sample_responses, score_responses
from rlhf_jax.autoif.scripted import ErrorRates, ScriptedSupervisor
from rlhf_jax.autoif.supervisor import QueryPrompt, Supervisor, VerifierCandidate, augmentation_prompt, \
    back_translation_prompt, format_verifier_completion, parse_back_translation, parse_instruction_list, \
    parse_quality_score, parse_verifier_completion, quality_prompt, response_prompt, verifier_prompt
from rlhf_jax.autoif.verification import FunctionRun, pass_rates, run_functions, verdict_matrix

__all__ = [
    "NLI_LABELS", "Judge", "RuleBasedJudge", "back_translation_filter",
    "Instruction", "parse_catalogue_source", "parse_instruction", "seed_instructions", "standalone_types",
    "CrossValidationConfig", "VerifiedInstruction", "cross_validate", "cross_validate_instructions",
    "instruction_level_pairs", "pair_indices", "query_level_pairs", "sft_records",
    "augment_instructions", "generate_verifiers",
    "AutoIFConfig", "AutoIFResult", "run_autoif",
    "FilterReport", "filter_report", "format_reports",
    "instruction_following_filter", "make_query_prompts", "quality_filter", "sample_responses", "score_responses",
    "ErrorRates", "ScriptedSupervisor",
    "QueryPrompt", "Supervisor", "VerifierCandidate", "augmentation_prompt", "back_translation_prompt",
    "format_verifier_completion", "parse_back_translation", "parse_instruction_list", "parse_quality_score",
    "parse_verifier_completion", "quality_prompt", "response_prompt", "verifier_prompt",
    "FunctionRun", "pass_rates", "run_functions", "verdict_matrix",
]
