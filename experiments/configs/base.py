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
  # Layers per iteration of the scan over layers (ModelConfig.scan_unroll): -1 = auto (all of them on CPU, where
  # the straight-line backward is 10–35% faster; 1 on accelerators: short compiles at depth). Not a shape field.
  config.model.scan_unroll = -1
  # Rows per forward/backward chunk of the SFT, DPO and RM steps and of RL scoring and updates (gradient accumulation:
  # the same gradient, a smaller working set): -1 = auto (~1k tokens a chunk on CPU, whole batches on
  # accelerators), 0 = off, k = at most k rows (the largest divisor of the batch's rows up to k). Auto is off with
  # LoRA (the chunk loop would also carry an accumulator the size of the frozen base).
  config.model.microbatch = -1
  # A local Hugging Face checkpoint directory (config.json, *.safetensors, tokenizer.json) to start from instead
  # of the preset: Llama / Qwen2 / Qwen3 *ForCausalLM. "" = the preset (random init, byte tokenizer). With it
  # `preset` is ignored, the shape overrides above must stay unset (the checkpoint fixes the shape; validation
  # refuses them), dtype/param_dtype still apply, and the tokenizer is the checkpoint's.
  config.model.hf_path = ""
  config.model.chat_template = False  # prompts as one user turn in the checkpoint's chat template (needs hf_path)
  config.model.lora_rank = 0          # LoRA adapters of this rank on the attention/MLP projections; 0 = full weights
  config.model.lora_alpha = 16.0      # LoRA scale: W' = W + (lora_alpha / lora_rank) · A @ B

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
  # mixture (task.name = "mixture"): members, each "synthetic[:t1+t2]" | "instructions" | "minicode[:levels]",
  # drawn with these weights (one per member); records are tagged task_id / task_name (rlhf_jax/tasks/mixture.py).
  config.task.mixture_tasks = ("synthetic:reverse", "synthetic:sort", "synthetic:double")
  config.task.mixture_weights = (1.0, 1.0, 1.0)

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
  config.sft.max_consecutive_skips = 10   # non-finite (skipped) updates in a row before the run stops
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
  # An external reward model instead of the rm stage's: a local *ForSequenceClassification checkpoint (1 label)
  # that shares the policy's tokenizer; used by ppo/grpo with reward_source "rm". "" = the rm stage's model.
  config.rm.hf_path = ""
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
  config.ppo.max_consecutive_skips = 3    # iterations whose updates were all non-finite before the run stops
  config.ppo.logprob_chunk = 0            # > 0: log-probs this many positions at a time, no [B,G,V] logits (big vocab)
  # Reward the policy is trained on. "rm": the learned reward model (the method). "task": the task's exact
  # grader, plus optional noise of std `reward_noise` ("constant" everywhere, or "midrange": scaled by
  # 1 − |2s − 1|, largest at mid-range scores s, the premise of PF-PPO; ALGORITHMS.md §4.10) — a controlled
  # mechanism test, never the grader passed off as a learned RM.
  config.ppo.reward_source = "rm"
  config.ppo.reward_noise = 0.0
  config.ppo.reward_noise_shape = "midrange"
  config.ppo.rollout_batch = 16           # prompts per sampler call (evaluations)
  # The critic (advantage "gae") starts from the reward model, its head rescaled to predict the normalised reward
  # ("rm", InstructGPT), or from the SFT backbone with a zero value head ("sft").
  config.ppo.critic_init = "rm"
  config.ppo.entropy_coef = 0.0
  config.ppo.threshold = placeholder(float)        # top / top_random / top_bottom (normalised reward)
  config.ppo.lower_threshold = placeholder(float)  # top_bottom
  config.ppo.pow_k = 2.0                           # pow_k exponent
  config.ppo.actor_optimizer = optimizer_config(learning_rate=1e-5, schedule="constant", grad_clip=1.0)
  config.ppo.critic_optimizer = optimizer_config(learning_rate=1e-4, schedule="constant", grad_clip=1.0)

  # Best-of-N inference (bon stage, ALGORITHMS §5): max(ns) + 1 samples per held-out prompt from a policy, once;
  # best-of-N is the best of the first N (ties: first index), the last sample is the single reference sample.
  config.bon = ml_collections.ConfigDict()
  config.bon.ns = (1, 2, 4, 8, 16)   # the N reported (prefixes of one draw of max(ns) samples)
  config.bon.num_prompts = 64        # held-out prompts (task.eval_split)
  config.bon.reward_source = "rm"    # "rm": the learned reward model (rm stage) | "task": the task's grader
  config.bon.params_dir = ""         # the sampled policy (= π_ref); "" = <workdir>/sft/final
  config.bon.rollout_batch = 16      # prompts per sampler call

  # Rejection-sampling fine-tuning (rs stage, ALGORITHMS §7): rounds of sample N -> select -> SFT on the selected.
  config.rs = ml_collections.ConfigDict()
  config.rs.rounds = 3
  config.rs.prompts_per_round = 128   # train prompts sampled each round (a fresh slice every round)
  config.rs.samples_per_prompt = 8    # N
  config.rs.selection = "best_of_n"   # best_of_n (the best per prompt) | threshold (every sample > rs.threshold)
  config.rs.threshold = placeholder(float)  # strict cut r > threshold (§7); with best_of_n a floor on the best
  config.rs.reward_source = "task"    # "rm" | "task" (selection reward; the task's grade is always the true score)
  config.rs.sft_steps = 50            # SFT steps per round on the selected pairs
  config.rs.sft_batch_size = 32
  config.rs.eval_prompts = 64         # fixed held-out prompts evaluated before round 1 and after every round
  config.rs.eval_samples = 4
  config.rs.rollout_batch = 32        # prompts per sampler call
  config.rs.optimizer = optimizer_config(learning_rate=1e-4, schedule="constant", grad_clip=1.0)

  # BOND / J-BOND (bond stage, ALGORITHMS §6): policy and anchor start from SFT; the reference is SFT (frozen).
  config.bond = ml_collections.ConfigDict()
  config.bond.iterations = 100
  config.bond.prompts_per_iteration = 16
  config.bond.variant = "jbond"       # jbond (2 anchor samples, crude reward −log 16 / 0) | bond (MC quantile)
  config.bond.anchor_samples = 2      # k anchor samples per prompt (J-BOND: exactly 2)
  config.bond.n = 2                   # best-of-n target (J-BOND: 2; plain BOND: n <= anchor_samples)
  config.bond.beta = 0.5              # Jeffreys mix: weight of the backward KL term
  config.bond.eta = 0.02              # anchor EMA rate (0 = frozen anchor)
  config.bond.gamma = 0.0             # extra KL(π‖π_anchor) coefficient
  config.bond.hard_anchor_every = placeholder(int)  # K: hard anchor copy every K steps instead of the EMA
  config.bond.baseline = "loo"        # loo (leave-one-out mean return of the other prompts) | none
  config.bond.reward_source = "rm"    # "rm" | "task"
  config.bond.reference_samples = 4   # M samples of π_ref per prompt each iteration: the policy's reward quantile
  config.bond.eval_every = 10         # iterations between held-out evaluations
  config.bond.eval_at_start = True
  config.bond.eval_prompts = 64
  config.bond.eval_samples = 4
  config.bond.checkpoint_every = 10   # iterations between resumable checkpoints of the whole BONDState
  config.bond.rollout_batch = 16      # prompts per sampler call (evaluations)
  config.bond.optimizer = optimizer_config(learning_rate=1e-4, schedule="constant", grad_clip=1.0)

  # Advantage Model stage (am.py): on the rm stage's pairs (the `rm` section: sampling, pairs, steps, batch size,
  # optimizer) it trains an AM and, beside it on the same batches, an RM. AM loss (a reconstruction, §10.2):
  # BT + mean_coef·(per-prompt E[a]=0) + bound_coef·relu(|a|−bound)² + regulation_coef·(per-task mean/var).
  config.am = ml_collections.ConfigDict()
  config.am.mean_coef = 1.0
  config.am.bound_coef = 1.0
  config.am.bound = 5.0
  config.am.regulation_coef = 0.1
  config.am.stats_momentum = 0.9   # EMA momentum of the running per-task statistics
  config.am.importance_clip = 5.0  # upper clip of π/π' (the stage's pairs are the target policy's: w = 1)
  config.am.target_var = 1.0       # per-task score variance the regulation aims at
  config.am.hist_bins = 20         # bins of the per-task score histograms (am/scores.png)

  # Selective Rehearsal in the ppo/grpo stages (§10.2; needs ppo.reward_source "am"): each iteration the prompts
  # are clustered (k-means on mean-pooled policy hidden states) and the `per_cluster` expert (SFT "response")
  # examples of each cluster with the highest AM score get an NLL term of weight `coef` in every minibatch.
  config.sr = ml_collections.ConfigDict()
  config.sr.coef = 0.0          # λ_R; 0 = off (the update is then bitwise the plain one)
  config.sr.clusters = 4        # c, k-means clusters of an iteration's prompts (<= ppo.prompts_per_iteration)
  config.sr.per_cluster = 1     # expert examples kept per cluster
  # Forgetting, in the ppo/grpo stages (any reward source): per task, the NLL of the held-out expert (SFT)
  # responses and the greedy score, at every evaluation. Adds metrics only; training is unchanged.
  config.sr.expert_eval = False

  # Offline DPO (pipelines/dpo.py): preference pairs, reference log-probs precomputed once per dataset.
  config.dpo = ml_collections.ConfigDict()
  config.dpo.pairs_dir = ""       # a pair dataset's version directory; "" = the pairs the autoif stage wrote here
  config.dpo.reference_dir = ""   # reference policy params; "" = <workdir>/sft/final
  config.dpo.init_dir = ""        # initial policy params; "" = the reference
  config.dpo.beta = 0.1           # β of the DPO logit β·h
  config.dpo.loss_type = "sigmoid"  # sigmoid | ipo | hinge
  config.dpo.label_smoothing = 0.0  # ε of cDPO (sigmoid only)
  config.dpo.steps = 200
  config.dpo.batch_size = 16      # pairs per step
  config.dpo.eval_every = 50      # steps between held-out pair evaluations (the dataset's validation split)
  config.dpo.optimizer = optimizer_config(learning_rate=1e-5, schedule="cosine", warmup_steps=10)

  # Online / iterative DPO (pipelines/online_dpo.py): sample K per prompt, grade, AutoIF pairs, DPO, repeat.
  config.online_dpo = ml_collections.ConfigDict()
  config.online_dpo.rounds = 4
  config.online_dpo.prompts_per_round = 32   # train prompts sampled each round
  config.online_dpo.samples_per_prompt = 8   # K
  config.online_dpo.temperature = placeholder(float)  # sampling temperature; None = sampling.temperature (AutoIF 0.8)
  config.online_dpo.reward_source = "task"   # task (the task's grader) | rm (the rm stage's model, min-max per prompt)
  config.online_dpo.pos_threshold = 0.5      # positives: accuracy >= this (> with pos_strict); negatives: == 0
  config.online_dpo.pos_strict = False       # False = the official code's >= 0.5, True = the paper's > 0.5
  config.online_dpo.max_pos = 2              # positives sampled per prompt
  config.online_dpo.max_neg = 2              # negatives sampled per prompt (all pos × neg pairs are used)
  config.online_dpo.steps_per_round = 8      # DPO steps on each round's pairs
  config.online_dpo.batch_size = 16          # pairs per step (fewer pairs: padded with weight 0)
  config.online_dpo.reference_dir = ""       # reference policy; "" = <workdir>/sft/final
  config.online_dpo.init_dir = ""            # initial policy; "" = the reference
  config.online_dpo.reference_update = "sft"  # sft (fixed reference) | previous (reference = the round's start)
  config.online_dpo.reference = "precomputed"  # precomputed (once per round) | inline (in the jitted step)
  config.online_dpo.beta = 0.1
  config.online_dpo.loss_type = "sigmoid"
  config.online_dpo.label_smoothing = 0.0
  config.online_dpo.eval_every = 1           # rounds between held-out evaluations
  config.online_dpo.eval_at_start = True
  config.online_dpo.eval_prompts = 32        # fixed held-out prompts of the task's eval split
  config.online_dpo.eval_samples = 2         # T samples per held-out prompt
  config.online_dpo.rollout_batch = 16       # prompts per sampler call
  config.online_dpo.optimizer = optimizer_config(learning_rate=1e-5, schedule="constant")

  # AutoIF data (pipelines/autoif.py): instructions, verifiers, cross-validation, responses -> SFT set and pairs.
  config.autoif = ml_collections.ConfigDict()
  config.autoif.supervisor = "scripted"     # scripted | policy | policy_responses (scripted Stage 1, policy answers)
  config.autoif.policy_dir = ""             # the policy supervisor's params; "" = <workdir>/sft/final
  config.autoif.temperature = 0.8           # policy supervisor sampling temperature
  config.autoif.batch_size = 16             # policy supervisor prompts per sampler call
  config.autoif.train_types = ()            # seed constraint types; () = every standalone catalogue type
  config.autoif.eval_types = ()             # held-out IFEval types; () = the catalogue types not in train_types
  config.autoif.num_eval = 64               # IFEval prompts per evaluation split (run_ifeval)
  config.autoif.eval_max_constraints = 1    # constraints per IFEval prompt
  config.autoif.augment_completions = 4     # self-instruct completions (5 instructions each; 0 = seeds only)
  config.autoif.verifiers_per_instruction = 8  # K candidate functions (+ cases) per instruction
  config.autoif.cross_validation = "paper"  # paper (> 0.5) | code (>= 3 functions, >= 10 cases, 0.8) | none
  config.autoif.back_translation = True     # back-translation + rule-based NLI judge
  config.autoif.queries_per_instruction = 16
  config.autoif.query_chars = (20, 300)     # queries kept when min < len < max (the official code)
  config.autoif.responses_per_prompt = 8
  config.autoif.response_threshold = 0.5    # SFT responses need accuracy > this
  config.autoif.quality_filter = True       # the supervisor's 0-10 quality score must be >= min_quality_score
  config.autoif.min_quality_score = 8.0
  config.autoif.pair_strict = False         # query-level positives: >= 0.5 (code) or > 0.5 (paper)
  config.autoif.eval_fraction = 0.1         # share of prompts written to the validation splits
  config.autoif.timeout_s = 5.0             # sandbox limit of one verification program
  config.autoif.max_workers = placeholder(int)  # concurrent sandboxes; None = CPU count
  # Scripted supervisor's wrong-function kinds ("hangs" costs a full timeout per program: left out by default).
  config.autoif.scripted_wrong_kinds = ("off_by_one", "always_true", "inverted", "raises", "syntax_error")

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
