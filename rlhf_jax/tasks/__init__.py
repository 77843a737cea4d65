"""Verifiable tasks: MiniCode, HumanEval and instruction following."""
from rlhf_jax.tasks import humaneval, instructions, minicode
from rlhf_jax.tasks.instructions import score_instruction_responses
from rlhf_jax.tasks.minicode import Problem, generate_problems, program_for
