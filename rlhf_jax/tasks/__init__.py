"""Tasks: the seam every stage uses (`Task`: name, eval_split, load, grade) and the built-in tasks."""
from rlhf_jax.tasks import humaneval, instructions, minicode
from rlhf_jax.tasks.base import FunctionTask, Task, success
from rlhf_jax.tasks.mixture import MixtureTask
from rlhf_jax.tasks.instructions import score_instruction_responses
from rlhf_jax.tasks.minicode import Problem, generate_problems, program_for
from rlhf_jax.tasks.registry import TASKS, make_task
