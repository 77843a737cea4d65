"""SFT and GRPO from the command line on a local Hugging Face checkpoint, with and without LoRA.

The checkpoints are tiny random Llama / Qwen2 models saved here by `transformers`, with a BPE tokenizer trained
here on the synthetic task's alphabet (nothing is downloaded). Each run is `python -m experiments.run
--config=grpo.py --config.model.hf_path=DIR ...` on one CPU device; the checks: the stages' `<stage>/hf/` exports
load in transformers with logits equal to those of our final params, LoRA changes the adapted projections by a
matrix of rank <= lora_rank and leaves every other weight exactly as the checkpoint had it, GRPO trains on an
external reward model (rm.hf_path), and prompts are encoded in the checkpoint's chat template when asked.
"""

import json
import os
import re
import string
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
tr = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from experiments.configs.base import get_base_config  # noqa: E402
from rlhf_jax import models  # noqa: E402
from rlhf_jax import sharding as shd  # noqa: E402
from rlhf_jax.config import ConfigError, validate_config  # noqa: E402
from rlhf_jax.pipelines import common  # noqa: E402
from rlhf_jax.tokenizer import encode_prompts  # noqa: E402
from xla_flags import xla_flags  # noqa: E402

REPO_DIR = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
VOCAB = 320
FAMILIES_PAD = {"llama": 5}  # "<pad>": the 6th special token
_LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")
_CHATML_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
FAMILIES = {
    # Llama-3 style: BOS, EOS <|eot_id|>, untied head
    "llama": dict(config=tr.LlamaConfig, model=tr.LlamaForCausalLM, template=_LLAMA3_TEMPLATE,
                  specials=["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                            "<|eot_id|>", "<pad>"],
                  tokens=dict(bos_token="<|begin_of_text|>", eos_token="<|eot_id|>", pad_token="<pad>"), extra={}),
    # Qwen2 style: no BOS, EOS <|im_end|> (also the pad), QKV bias, tied embeddings
    "qwen2": dict(config=tr.Qwen2Config, model=tr.Qwen2ForCausalLM, template=_CHATML_TEMPLATE,
                  specials=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                  tokens=dict(eos_token="<|im_end|>", pad_token="<|endoftext|>"), extra=dict(tie_word_embeddings=True)),
}


def _make_checkpoint(family: str, path: str) -> str:
  """A random float32 checkpoint of `family` with a BPE tokenizer (trained here) and its chat template."""
  from tokenizers import decoders, models as tmodels, pre_tokenizers, trainers
  spec = FAMILIES[family]
  tok = tokenizers.Tokenizer(tmodels.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  rnd = np.random.RandomState(0)
  words = ["".join(rnd.choice(list(string.ascii_lowercase), rnd.randint(3, 6))) for _ in range(200)]
  text = [f"reverse: {w}\n{w[::-1]}" for w in words] + ["user assistant system"]
  tok.train_from_iterator(text, trainers.BpeTrainer(vocab_size=300, special_tokens=spec["specials"],
                                                    initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  hf_tok = tr.PreTrainedTokenizerFast(tokenizer_object=tok, **spec["tokens"])
  hf_tok.chat_template = spec["template"]
  hf_tok.save_pretrained(path)
  torch.manual_seed(0)
  ids = {k.replace("_token", "_token_id"): hf_tok.convert_tokens_to_ids(v) for k, v in spec["tokens"].items()}
  config = spec["config"](vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                          rms_norm_eps=1e-6, **ids, **spec["extra"])
  model = spec["model"](config).float().eval()
  model.save_pretrained(path)
  return path


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
  out = {f: _make_checkpoint(f, str(tmp_path_factory.mktemp(f))) for f in FAMILIES}
  # An external reward model for the Llama policy: same vocabulary, one label, its own (smaller) shape.
  torch.manual_seed(1)
  config = tr.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                          num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64, num_labels=1,
                          pad_token_id=FAMILIES_PAD["llama"])
  out["reward"] = str(tmp_path_factory.mktemp("reward"))
  tr.LlamaForSequenceClassification(config).float().save_pretrained(out["reward"])
  return out


def _command(workdir, hf_path, *extra):
  return [sys.executable, "-m", "experiments.run", "--config=grpo.py", f"--workdir={workdir}",
          f"--config.model.hf_path={hf_path}", "--config.task.synthetic_max_len=5", "--config.task.num_train=200",
          "--config.task.num_eval=16", "--config.task.max_response_len=8", "--config.sampling.max_new_tokens=8",
          "--config.sft.steps=6",
          "--config.sft.optimizer.total_steps=6", "--config.sft.optimizer.warmup_steps=1",
          "--config.sft.batch_size=8", "--config.sft.eval_every=6", "--config.sft.eval_batches=1",
          "--config.checkpoint.every_steps=6", "--config.ppo.iterations=2", "--config.ppo.prompts_per_iteration=4",
          "--config.ppo.samples_per_prompt=2", "--config.ppo.eval_every=2", "--config.ppo.eval_prompts=4",
          "--config.ppo.eval_samples=2", "--config.ppo.rollout_batch=4", "--config.ppo.checkpoint_every=2",
          "--config.algo.minibatches=1", "--config.logging.progress=False", "--config.logging.tensorboard=False",
          *extra]


@pytest.fixture(scope="module")
def runs(checkpoints, tmp_path_factory):
  """Two CLI runs of sft + grpo, started together: Llama, full fine-tuning, GRPO on an external reward model
  (rm.hf_path); Qwen2 with LoRA and prompts in its chat template."""
  env = dict(os.environ, PYTHONPATH=REPO_DIR)
  env["XLA_FLAGS"] = xla_flags()  # one CPU device, as a user runs it
  settings = {
      "full": (checkpoints["llama"], ["--config.task.max_prompt_len=16", f"--config.rm.hf_path={checkpoints['reward']}",
                                      "--config.ppo.reward_source=rm"]),
      "lora": (checkpoints["qwen2"], ["--config.task.max_prompt_len=32", "--config.model.chat_template=True",
                                      "--config.model.lora_rank=4", "--config.model.lora_alpha=8.0",
                                      "--config.sft.optimizer.learning_rate=1e-2",
                                      "--config.ppo.actor_optimizer.learning_rate=1e-2"]),
  }
  out, procs = {}, {}
  for name, (ckpt, extra) in settings.items():
    workdir = str(tmp_path_factory.mktemp(name))
    procs[name] = subprocess.Popen(_command(workdir, ckpt, *extra), cwd=REPO_DIR, env=env, stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, text=True)
    out[name] = workdir
  logs = {}
  for name, proc in procs.items():
    logs[name], _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, logs[name][-4000:]
    assert "[grpo] done" in logs[name], logs[name][-2000:]
  return {name: (out[name], settings[name][0], logs[name]) for name in settings}


def _our_logits(cfg, params, tokens, mask):
  logits, _ = jax.jit(models.make_apply_fn(cfg))(params, jnp.asarray(tokens), jnp.asarray(mask))
  return np.asarray(logits)


def _final_params(workdir, stage, cfg):
  mesh = shd.make_mesh((-1, 1, 1))
  params, _ = common.load_params(os.path.join(workdir, stage, "final"), models.abstract_params(cfg),
                                 common.param_shardings(cfg, mesh))
  return jax.device_get(params)


@pytest.mark.parametrize("name", ["full", "lora"])
def test_stage_exports_load_in_transformers_with_our_logits(runs, name):
  workdir, ckpt, _ = runs[name]
  cfg, _ = models.load_pretrained(ckpt)
  rng = np.random.RandomState(1)
  tokens = rng.randint(3, 290, (2, 12)).astype(np.int32)
  mask = np.ones_like(tokens)
  for stage in ("sft", "grpo"):
    export = os.path.join(workdir, stage, "hf")
    assert os.path.isfile(os.path.join(export, "tokenizer.json"))  # the checkpoint's tokenizer travels along
    model = tr.AutoModelForCausalLM.from_pretrained(export).float().eval()
    with torch.no_grad():
      theirs = model(input_ids=torch.tensor(tokens, dtype=torch.long)).logits.numpy()
    ours = _our_logits(cfg, _final_params(workdir, stage, cfg), tokens, mask)
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=2e-4 * np.abs(theirs).max())
  summary = json.load(open(os.path.join(workdir, "grpo", "summary.json")))
  assert summary["iterations"] == 2 and 0.0 <= summary["final_success_rate"] <= 1.0


def test_lora_changes_only_adapted_weights_by_low_rank(runs):
  """checkpoint -> sft/final and sft/final -> grpo/final: each stage adds (alpha/r)·A@B of rank <= r = 4 to the
  adapted projections (up to float32 rounding of the merge) and leaves every other weight bit for bit."""
  workdir, ckpt, _ = runs["lora"]
  cfg, start = models.load_pretrained(ckpt)
  start = jax.device_get(start)
  for stage in ("sft", "grpo"):
    final = _final_params(workdir, stage, cfg)
    before = dict(jax.tree_util.tree_flatten_with_path(start)[0])
    changed = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(final)[0]:
      target = "/".join(str(getattr(k, "key", k)) for k in path[-2:])
      delta = np.asarray(leaf, np.float64) - np.asarray(before[path], np.float64)
      if target in models.LORA_TARGETS:
        for layer in delta:  # scanned: [L, in..., out...]
          s = np.linalg.svd(layer.reshape(int(np.prod(layer.shape[:models.LORA_TARGETS[target]])), -1),
                            compute_uv=False)
          assert int((s > 1e-4 * s[0]).sum()) <= 4, (stage, target, s[:6])
          assert s[0] > 0 or stage == "grpo", target  # SFT moves every adapted weight (GRPO may not in 2 steps)
        changed.append(True)
      else:  # embeddings, norms, biases: frozen exactly
        assert np.array_equal(np.asarray(leaf), np.asarray(before[path])), (stage, path)
    assert len(changed) == 7 * 1  # wq wk wv wo w_gate w_up w_down (scanned: one leaf each)
    start = final


def test_external_reward_model_trains_grpo(runs):
  """rm.hf_path: GRPO's reward is the external model's score, normalised by its statistics on SFT samples."""
  workdir, _, log = runs["full"]
  line = next(l for l in log.splitlines() if "score mean" in l)
  mean, std = (float(x) for x in re.findall(r"(?:mean|std) (-?[\d.]+(?:e[-+]?\d+)?)", line))
  assert np.isfinite(mean) and std > 0
  rows = [json.loads(l) for l in open(os.path.join(workdir, "grpo", "metrics.jsonl")) if '"reward/score"' in l]
  assert len(rows) == 2 and all(np.isfinite(r["reward/score"]) and "filter/r2" in r for r in rows)
  assert json.load(open(os.path.join(workdir, "grpo", "summary.json")))["reward_source"] == "rm"


def test_chat_template_formats_prompts(checkpoints):
  config = get_base_config()
  config.model.hf_path = checkpoints["qwen2"]
  config.model.chat_template = True
  tok = common.tokenizer(config)
  assert tok.bos_id is None and tok.chat_prompts
  tokens, mask = encode_prompts(tok, ["reverse: abc\n"], 24)
  text = tok._tok.decode(tokens[0][mask[0] > 0].tolist(), skip_special_tokens=False)  # pylint: disable=protected-access
  assert text == "<|im_start|>user\nreverse: abc\n<|im_end|>\n<|im_start|>assistant\n"


def test_config_validation_of_hf_fields(checkpoints, tmp_path):
  schema = get_base_config()

  def check(**fields):
    c = get_base_config()
    c.task.max_prompt_len, c.task.max_response_len, c.sampling.max_new_tokens = 16, 8, 8  # fit 64 positions
    for k, v in fields.items():
      if "__" in k:
        section, key = k.split("__")
        c[section][key] = v
      else:
        c[k] = v
    validate_config(c, schema)

  check(model__hf_path=checkpoints["llama"], model__lora_rank=2)
  for fields, field in [({"model__hf_path": str(tmp_path)}, "config.model.hf_path"),
                        ({"model__hf_path": checkpoints["llama"], "model__dim": 32}, "config.model.dim"),
                        ({"model__lora_rank": -1}, "config.model.lora_rank"),
                        ({"model__lora_rank": 2, "stages": ("sft", "dpo")}, "config.model.lora_rank"),
                        ({"model__chat_template": True}, "config.model.chat_template"),
                        ({"rm__hf_path": checkpoints["llama"]}, "config.rm.hf_path")]:
    with pytest.raises(ConfigError) as e:
      check(**fields)
    assert e.value.field == field, (fields, str(e.value))
