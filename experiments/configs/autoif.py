"""AutoIF at CPU scale: scripted-supervisor data -> SFT -> offline DPO -> online DPO -> IFEval (ALGORITHMS §9).

Run (2 CPU cores; measured times and numbers in experiments/RESULTS.md, section "AutoIF and DPO"):

  python -m experiments.run --config=autoif.py --workdir=runs/autoif --config.task.data_dir=runs/autoif/data

`task.data_dir` must name the workdir's data directory: the SFT stage reads the AutoIF
records through the task `rlhf_jax.pipelines.autoif:make_sft_task`, which sees the config,
not the workdir. Stages:
  autoif       scripted supervisor (deliberate mistakes) on 24 training constraint types:
               SFT records + instruction/query-level pairs; autoif/summary.json has each
               filter's in/out counts (Table 5 shape), autoif/filters.png the chart
  sft          the tiny byte-level model on the AutoIF SFT records
  dpo          offline DPO on the AutoIF pairs, reference = SFT (β = 0.3, the paper's)
  online_dpo   from SFT: rounds of 8 samples per prompt at T = 0.8, graded by the
               instruction's verification functions, AutoIF pairs (≥ 0.5 vs 0), DPO
  run_ifeval   IFEval prompt/instruction-level strict/loose accuracy (greedy) of the SFT,
               DPO and online-DPO policies on prompts of 9 held-out constraint types
               (ifeval/report.json, also on the training types as "ifeval_seen")
Ablation: --config.autoif.cross_validation=none (in another workdir).
"""
from experiments.configs.base import get_base_config

# The 24 training types; the other 9 standalone types (and repeat_prompt) are held out for IFEval.
TRAIN_TYPES = (
    "length:max_chars", "length:min_chars", "length:max_words", "length:min_words", "length:max_sentences",
    "keywords:include", "keywords:exclude", "keywords:frequency", "keywords:letter_min",
    "case:lowercase", "case:uppercase", "case:capital_words_min",
    "format:json", "format:title", "format:bullets", "format:highlights", "format:placeholders",
    "startend:end_phrase", "startend:start_phrase",
    "punctuation:no_commas", "punctuation:end_question", "content:no_digits", "content:min_digits",
    "format:sections",
)


def testbed(config):
  """The shared AutoIF/DPO settings (dpo.py and online_dpo.py start from them)."""
  config.model.preset = "tiny"
  config.task.name = "rlhf_jax.pipelines.autoif:make_sft_task"
  config.task.data_dir = "runs/autoif/data"
  config.task.max_prompt_len = 96
  config.task.max_response_len = 192
  config.autoif.train_types = TRAIN_TYPES
  config.autoif.num_eval = 64
  config.autoif.augment_completions = 4
  config.autoif.verifiers_per_instruction = 8
  config.autoif.queries_per_instruction = 16
  config.autoif.responses_per_prompt = 8

  config.sft.steps = 300
  config.sft.batch_size = 32
  config.sft.eval_every = 100
  config.sft.eval_batches = 2
  config.sft.optimizer.learning_rate = 1e-3
  config.sft.optimizer.warmup_steps = 20

  config.dpo.steps = 100
  config.dpo.batch_size = 16
  config.dpo.eval_every = 50
  config.dpo.beta = 0.3
  config.dpo.optimizer.learning_rate = 5e-5
  config.dpo.optimizer.warmup_steps = 10

  config.online_dpo.rounds = 4
  config.online_dpo.prompts_per_round = 32
  config.online_dpo.samples_per_prompt = 8
  config.online_dpo.temperature = 0.8
  config.online_dpo.steps_per_round = 8
  config.online_dpo.batch_size = 16
  config.online_dpo.beta = 0.3
  config.online_dpo.eval_every = 2
  config.online_dpo.eval_prompts = 32
  config.online_dpo.eval_samples = 2
  config.online_dpo.rollout_batch = 16
  config.online_dpo.optimizer.learning_rate = 5e-5

  config.eval.batch_size = 32
  config.checkpoint.every_steps = 50
  config.logging.every_steps = 10
  return config


def get_config():
  config = testbed(get_base_config())
  config.stages = ("autoif", "sft", "dpo", "online_dpo", "rlhf_jax.pipelines.autoif:run_ifeval")
  return config
