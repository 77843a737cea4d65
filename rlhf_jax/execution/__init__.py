"""Code execution: a sandbox for running generated programs against unit tests."""
from rlhf_jax.execution.grading import PLAIN_TYPES, guarded_program
from rlhf_jax.execution.pool import cache_key, clear_cache, execute_many
from rlhf_jax.execution.sandbox import (
    ISOLATION_LEVELS,
    STATUSES,
    ExecutionResult,
    Limits,
    execute,
    isolation_level,
)

__all__ = [
    "ExecutionResult",
    "ISOLATION_LEVELS",
    "Limits",
    "PLAIN_TYPES",
    "STATUSES",
    "cache_key",
    "clear_cache",
    "execute",
    "execute_many",
    "guarded_program",
    "isolation_level",
]
