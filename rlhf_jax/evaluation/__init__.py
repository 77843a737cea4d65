"""Evaluation: pass@k and the harness that turns sandbox results into reports."""
from rlhf_jax.evaluation.metrics import pass_at_k
from rlhf_jax.evaluation.harness import (evaluate_code_completions,
                                         evaluate_instruction_completions, pass_at_k_summary)

__all__ = ["pass_at_k", "evaluate_code_completions", "evaluate_instruction_completions",
           "pass_at_k_summary"]
