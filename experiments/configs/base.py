"""The config schema: every field rlhf_jax reads, with a typed default.

Named configs (`experiments/configs/<name>.py`) start from `get_base_config()`
and set values; they may not add fields — `rlhf_jax.config.validate_config`
rejects any field that is not here. Adding a field is one line in the section
that owns it. Optional fields are `placeholder(<type>)`: their default is None
and a command-line override is parsed as `<type>`.

Sequences are tuples (ml_collections' command line parses tuples, not lists):
`--config.stages="('sft','rm')"`, `--config.mesh.shape="(2,2,2)"`.
"""
import ml_collections
from ml_collections import config_dict

placeholder = config_dict.placeholder


def optimizer_config(**overrides) -> ml_collections.ConfigDict:
  """The keyword arguments of `rlhf_jax.state.make_optimizer`, as a section.

  `total_steps = None` means "the owning stage's `steps`".
  """
  c = ml_collections.ConfigDict()
  c.name = "adamw"
  c.learning_rate = 3e-4
  c.schedule = "cosine"
  c.warmup_steps = 0
  c.total_steps = placeholder(int)
  c.end_lr_ratio = 0.1
  c.b1 = 0.9
  c.b2 = 0.95
  c.eps = 1e-8
  c.weight_decay = 0.0
  c.grad_clip = 1.0
  c.update(overrides)
  return c


def get_base_config() -> ml_collections.ConfigDict:
  """Returns the full schema with defaults."""
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.stages = ("sft",)

  # --- model ------------------------------------------------------------------
  config.model = ml_collections.ConfigDict()
  config.model.preset = "tiny"
  config.model.dtype = "float32"        # activations / compute
  config.model.param_dtype = "float32"  # stored parameters
  # Overrides of the preset's shape; None keeps the preset's value.
  config.model.max_seq_len = placeholder(int)
  config.model.vocab_size = placeholder(int)
  config.model.dim = placeholder(int)
  config.model.n_layers = placeholder(int)
  config.model.n_heads = placeholder(int)
  config.model.n_kv_heads = placeholder(int)
  config.model.mlp_dim = placeholder(int)

  # --- task / data --------------------------------------------------------------
  config.task = ml_collections.ConfigDict()
  # A built-in task (synthetic | minicode | humaneval | instructions, rlhf_jax/tasks/registry.py) or your own
  # as "package.module:make_task" (make_task(config) -> Task).
  config.task.name = "synthetic"
  config.task.data_dir = ""  # "" = <workdir>/data
  config.task.seed = 0
  config.task.max_prompt_len = 128
  config.task.max_response_len = 128
  config.task.difficulties = (1, 2, 3)  # MiniCode levels used (problems longer than the lengths are skipped)
  config.task.num_train = 10_000
  config.task.num_eval = 500
  config.task.synthetic_tasks = ("reverse",)  # synthetic: the string transforms (rlhf_jax/data/synthetic.py)
  config.task.synthetic_max_len = 8           # synthetic: longest word

  # --- sampling ---------------------------------------------------------------
  config.sampling = ml_collections.ConfigDict()
  config.sampling.temperature = 1.0
  config.sampling.top_k = 0    # 0 = off
  config.sampling.top_p = 1.0  # 1 = off
  config.sampling.max_new_tokens = 64
  config.sampling.num_samples = 1

  # --- optimizer ----------------------------------------------------------------
  # The template each stage's own `optimizer` section is copied from when the
  # schema is built; set a stage's values with --config.<stage>.optimizer.*.
  config.optimizer = optimizer_config()

  # --- stages -------------------------------------------------------------------
  config.sft = ml_collections.ConfigDict()
  config.sft.steps = 500
  config.sft.batch_size = 32
  config.sft.eval_every = 100
  config.sft.eval_batches = 4
  config.sft.optimizer = optimizer_config(**config.optimizer.to_dict())

  # Reward model: pairs from the SFT policy's samples, labelled by the task's grader.
  config.rm = ml_collections.ConfigDict()
  config.rm.num_prompts = 256          # train prompts sampled for pairs
  config.rm.samples_per_prompt = 8     # SFT samples per prompt
  config.rm.temperature = placeholder(float)  # sampling temperature of those samples; None = sampling.temperature
  config.rm.max_pairs_per_prompt = 4   # (better, worse) pairs kept per prompt
  config.rm.min_score_gap = 0.0        # a pair needs grades differing by more than this
  config.rm.include_reference = False  # also grade each record's reference response as a candidate
  config.rm.eval_fraction = 0.2        # prompts held out for pairwise accuracy / calibration
  config.rm.steps = 200
  config.rm.batch_size = 16
  config.rm.margin = placeholder(float)
  config.rm.optimizer = optimizer_config(**config.optimizer.to_dict())

  # The RL loop shared by the ppo and grpo stages (algo.advantage picks the estimator):
  # actor = SFT policy, reference = SFT (frozen), critic (advantage "gae" only) = RM or SFT backbone.
  config.ppo = ml_collections.ConfigDict()
  config.ppo.iterations = 20
  config.ppo.prompts_per_iteration = 16   # P; PPO-S uses P·N prompts with 1 sample each
  config.ppo.samples_per_prompt = 5       # N (the paper's 5)
  config.ppo.eval_every = 5               # iterations between held-out evaluations
  config.ppo.eval_at_start = True         # also evaluate the SFT policy before the first iteration
  config.ppo.eval_prompts = 64            # fixed held-out prompts (task.eval_split) tracked every evaluation
  config.ppo.eval_samples = 4             # T = sampling.temperature samples per held-out prompt (pass@k up to this)
  config.ppo.checkpoint_every = 5         # iterations between resumable checkpoints of the whole RL state
  config.ppo.r2_bins = 10
  # Reward the policy is trained on. "rm": the learned reward model (the method). "task": the task's exact
  # grader, plus optional noise of std `reward_noise` ("constant" everywhere, or "midrange": scaled by
  # 1 − |2s − 1|, largest at mid-range scores s, the premise of PF-PPO; ALGORITHMS.md §4.10) — a controlled
  # mechanism test, never the grader passed off as a learned RM.
  config.ppo.reward_source = "rm"
  config.ppo.reward_noise = 0.0
  config.ppo.reward_noise_shape = "midrange"
  config.ppo.rollout_batch = 16           # prompts per sampler call (evaluations)
  config.ppo.entropy_coef = 0.0
  config.ppo.threshold = placeholder(float)        # top / top_random / top_bottom (normalised reward)
  config.ppo.lower_threshold = placeholder(float)  # top_bottom
  config.ppo.pow_k = 2.0                           # pow_k exponent
  config.ppo.actor_optimizer = optimizer_config(learning_rate=1e-5, schedule="constant", grad_clip=1.0)
  config.ppo.critic_optimizer = optimizer_config(learning_rate=1e-4, schedule="constant", grad_clip=1.0)

  # Evaluation stage (eval.py): a policy checkpoint on a task.
  config.eval = ml_collections.ConfigDict()
  config.eval.params_dir = ""     # "" = the latest policy in the workdir (grpo/ppo final, else sft/final)
  config.eval.task = ""           # "" = task.name; else another task of the registry (e.g. humaneval)
  config.eval.split = ""          # "" = the task's eval split
  config.eval.num_problems = 0    # 0 = all
  config.eval.num_samples = 1     # > 1 samples at sampling.temperature for pass@k
  config.eval.ks = (1,)
  config.eval.batch_size = 32

  # --- algorithm (RL stages extend this section) --------------------------------
  config.algo = ml_collections.ConfigDict()
  config.algo.name = "sft"
  config.algo.advantage = "gae"     # gae (critic) | grpo | rloo | reinforce (critic-free, group of N samples)
  config.algo.kl_coef = 0.02
  config.algo.kl_target = placeholder(float)  # None = fixed KL coefficient
  config.algo.kl_horizon = 10_000
  config.algo.kl_estimator = "k1"  # in the reward (gae) or the loss term (group advantages); k3 is >= 0
  config.algo.clip_eps = 0.2
  config.algo.value_clip_eps = 0.2
  config.algo.gamma = 1.0
  config.algo.lam = 0.95
  config.algo.epochs = 1
  config.algo.minibatches = 4
  config.algo.strategy = "best_random"
  config.algo.loss_agg = "seq_mean_token_mean"
  config.algo.reward_clip = 10.0

  # --- mesh -------------------------------------------------------------------
  config.mesh = ml_collections.ConfigDict()
  config.mesh.shape = (-1, 1, 1)  # one -1 at most: fill with the remaining devices
  config.mesh.axis_names = ("data", "fsdp", "tensor")  # fixed

  # --- checkpoints, logging -------------------------------------------------------
  config.checkpoint = ml_collections.ConfigDict()
  config.checkpoint.every_steps = 100
  config.checkpoint.max_to_keep = 3
  config.checkpoint.async_save = True

  config.logging = ml_collections.ConfigDict()
  config.logging.every_steps = 10
  config.logging.tensorboard = True
  config.logging.progress = True
  return config


def get_config() -> ml_collections.ConfigDict:
  """`--config=base.py` runs the defaults."""
  return get_base_config()
