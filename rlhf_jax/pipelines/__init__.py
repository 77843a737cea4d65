"""Pipeline stages: the host loops that train and evaluate, one module per stage.

A stage ``x`` is the plain function ``rlhf_jax.pipelines.x.run_x(config, workdir)``
(``sft``, ``rm``, ``ppo``, ``grpo``, ``eval``, ``r2``, ...); ``experiments/run.py``
imports each stage named in ``config.stages`` by that rule. The shared helpers
live in ``common``, ``rollout``, ``task_data`` and ``analysis``.

Nothing is imported here: ``import rlhf_jax.pipelines`` stays cheap, and a
stage's dependencies (jax, orbax, tensorflow-datasets) load only with the stage.
"""
