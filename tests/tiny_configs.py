"""The base config shrunk for the pipeline smoke tests (imported by them; not a test module).

A 2-layer 64-wide model, the synthetic task on short words, a short SFT and RM,
synchronous checkpoints and quiet logs. Each test file sets its own stage sections
on top and validates the result.
"""

from experiments.configs.base import get_base_config


def tiny_config():
  c = get_base_config()
  c.model.preset = "tiny"
  c.model.n_layers = 2
  c.model.dim = 64
  c.model.mlp_dim = 128
  c.task.name = "synthetic"
  c.task.synthetic_max_len = 5
  c.task.num_train = 400
  c.task.num_eval = 40
  c.task.max_prompt_len = 20
  c.task.max_response_len = 8
  c.sft.steps = 40
  c.sft.batch_size = 16
  c.sft.eval_every = 20
  c.sft.eval_batches = 1
  c.sft.optimizer.learning_rate = 3e-3
  c.rm.num_prompts = 16  # 4 held out
  c.rm.samples_per_prompt = 4
  c.rm.include_reference = True
  c.rm.eval_fraction = 0.25
  c.rm.steps = 12
  c.rm.batch_size = 8
  c.rm.optimizer.learning_rate = 1e-3
  c.checkpoint.every_steps = 10
  c.checkpoint.async_save = False
  c.logging.every_steps = 5
  c.logging.progress = False
  c.logging.tensorboard = False
  return c
