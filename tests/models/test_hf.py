"""Hugging Face import/export against `transformers` itself, on tiny random checkpoints built here.

Every checkpoint is a random float32 model of one family saved with
transformers' own `save_pretrained`; nothing is downloaded. The reference
numbers are transformers' forward, generate and sequence-classification
outputs on the same tokens.
"""

import dataclasses
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
tr = pytest.importorskip("transformers")

from rlhf_jax import models, sampling  # noqa: E402
from rlhf_jax import sharding as shd  # noqa: E402
from rlhf_jax.models import hf  # noqa: E402

V, PAD, EOS = 96, 0, 1
_COMMON = dict(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-6, bos_token_id=2,
               eos_token_id=EOS, pad_token_id=PAD)
_LLAMA3 = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
               original_max_position_embeddings=16)
FAMILIES = {
    # llama3 RoPE scaling, untied head; a short original context so the scaling acts at these positions
    "llama3": (tr.LlamaConfig, tr.LlamaForCausalLM, dict(rope_scaling=_LLAMA3, rope_theta=10_000.0)),
    "llama_tied": (tr.LlamaConfig, tr.LlamaForCausalLM, dict(tie_word_embeddings=True)),
    "qwen2": (tr.Qwen2Config, tr.Qwen2ForCausalLM, dict(rope_theta=1_000_000.0)),     # QKV bias
    "qwen3": (tr.Qwen3Config, tr.Qwen3ForCausalLM, dict(head_dim=32)),               # QK-norm, head_dim != D/H
}


def _randomise(model):
  """Every weight random (HF zero-initialises biases, so a bias mapping would otherwise go untested)."""
  gen = torch.Generator().manual_seed(0)
  with torch.no_grad():
    for name, p in model.named_parameters():
      p.copy_(torch.randn(p.shape, generator=gen) * (0.2 if "norm" in name else 0.1) + (1.0 if "norm" in name else 0.0))
  return model.float().eval()


def _batch(seed=0, b=3, t=11):
  """Tokens with left padding (row 0: 3 pads, row 1: 1 pad) and positions counting real tokens."""
  rng = np.random.RandomState(seed)
  tokens = rng.randint(3, V, (b, t)).astype(np.int32)
  mask = np.ones((b, t), np.int32)
  mask[0, :3] = 0
  mask[1, :1] = 0
  tokens[mask == 0] = PAD
  return tokens, mask, np.asarray(models.positions_from_mask(jnp.asarray(mask)))


def _hf_logits(model, tokens, mask, positions):
  with torch.no_grad():
    out = model(input_ids=torch.tensor(tokens, dtype=torch.long), attention_mask=torch.tensor(mask),
                position_ids=torch.tensor(positions, dtype=torch.long))
  return out.logits.numpy()


def _rel_err(a, b, mask):
  sel = np.asarray(mask) > 0
  return float(np.abs(np.asarray(a)[sel] - np.asarray(b)[sel]).max() / np.abs(np.asarray(b)[sel]).max())


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
  """family -> (HF model, directory); qwen3 is written as several shards with an index."""
  out = {}
  for name, (config_cls, model_cls, extra) in FAMILIES.items():
    torch.manual_seed(0)
    model = _randomise(model_cls(config_cls(**_COMMON, **extra)))
    path = str(tmp_path_factory.mktemp(name))
    model.save_pretrained(path, **({"max_shard_size": "100KB"} if name == "qwen3" else {}))
    out[name] = (model, path)
  assert os.path.isfile(os.path.join(out["qwen3"][1], "model.safetensors.index.json"))
  return out


@pytest.fixture(scope="module")
def loaded(checkpoints):
  return {name: hf.load_pretrained(path) for name, (_, path) in checkpoints.items()}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_logits_equal_transformers_with_left_padding(checkpoints, loaded, family):
  model, _ = checkpoints[family]
  cfg, params = loaded[family]
  tokens, mask, positions = _batch()
  ours, _ = jax.jit(models.make_apply_fn(cfg))(params, tokens, mask)
  assert _rel_err(ours, _hf_logits(model, tokens, mask, positions), mask) < 2e-4
  if family == "llama3":  # the scaling is exercised: without it the logits differ
    plain, _ = jax.jit(models.make_apply_fn(dataclasses.replace(cfg, rope_scaling=None)))(params, tokens, mask)
    assert _rel_err(plain, ours, mask) > 1e-3


def test_config_fields_of_each_family(loaded):
  assert loaded["llama3"][0].rope_scaling_dict["rope_type"] == "llama3" and not loaded["llama3"][0].tie_embeddings
  assert loaded["llama_tied"][0].tie_embeddings and "lm_head" not in loaded["llama_tied"][1]
  assert loaded["qwen2"][0].qkv_bias and loaded["qwen2"][0].rope_theta == 1e6
  cfg3 = loaded["qwen3"][0]
  assert cfg3.qk_norm and cfg3.head_dim == 32 and cfg3.head_dim_override == 32
  assert loaded["qwen3"][1]["layers"]["block"]["attn"]["wq"].shape == (2, 64, 4, 32)
  assert models.count_params(loaded["qwen3"][1]) == cfg3.num_params()


@pytest.mark.parametrize("family", ["llama3", "qwen2", "qwen3"])
def test_greedy_generation_equals_transformers_generate(checkpoints, loaded, family):
  model, _ = checkpoints[family]
  cfg, params = loaded[family]
  tokens, mask, _ = _batch(seed=1, b=2, t=7)
  out = sampling.generate(params, tokens, mask, jax.random.PRNGKey(0), cfg=cfg, max_new_tokens=10, eos_id=EOS,
                          pad_id=PAD, temperature=0.0)
  with torch.no_grad():
    ref = model.generate(input_ids=torch.tensor(tokens, dtype=torch.long), attention_mask=torch.tensor(mask),
                         do_sample=False, max_new_tokens=10, eos_token_id=EOS, pad_token_id=PAD).numpy()
  ref_completion = np.full((2, 10), PAD)
  ref_completion[:, : ref.shape[1] - 7] = ref[:, 7:]
  np.testing.assert_array_equal(np.asarray(out.completion_tokens), ref_completion)


@pytest.mark.parametrize("family", ["llama3", "llama_tied", "qwen2", "qwen3"])
def test_export_reloads_in_transformers_with_equal_logits(checkpoints, loaded, family, tmp_path):
  model, src = checkpoints[family]
  cfg, params = loaded[family]
  out = hf.save_pretrained(cfg, params, str(tmp_path / "export"), source_dir=src,
                           max_shard_bytes=60_000 if family == "qwen2" else 4 << 30)
  reloaded = tr.AutoModelForCausalLM.from_pretrained(out).float().eval()
  assert type(reloaded) is type(model)
  tokens, mask, positions = _batch(seed=2)
  np.testing.assert_allclose(_hf_logits(reloaded, tokens, mask, positions), _hf_logits(model, tokens, mask, positions),
                             rtol=0, atol=1e-6)
  # ... and our own loader reads the export back bit for bit.
  cfg2, params2 = hf.load_pretrained(out)
  assert cfg2 == cfg
  jax.tree.map(np.testing.assert_array_equal, params2, params)


def test_export_of_our_own_init(tmp_path):
  """A model we initialised (qkv bias, qk-norm not both) exports to logits transformers reproduces."""
  cfg = models.ModelConfig(vocab_size=V, dim=48, n_layers=2, n_heads=4, n_kv_heads=2, mlp_dim=80, max_seq_len=64,
                           qk_norm=True, head_dim_override=16, tie_embeddings=False)
  params = jax.jit(lambda r: models.init_params(cfg, r))(jax.random.PRNGKey(3))
  rng = np.random.RandomState(4)  # perturb the norm scales too, so their mapping is tested
  params = jax.tree.map(lambda x: np.asarray(x) + rng.normal(0, 0.1, x.shape).astype(np.float32), params)
  reloaded = tr.AutoModelForCausalLM.from_pretrained(hf.save_pretrained(cfg, params, str(tmp_path / "e"))).eval()
  tokens, mask, positions = _batch(seed=3)
  ours, _ = jax.jit(models.make_apply_fn(cfg))(params, tokens, mask)
  assert _rel_err(ours, _hf_logits(reloaded, tokens, mask, positions), mask) < 2e-4


@pytest.fixture(scope="module")
def reward_model(tmp_path_factory):
  torch.manual_seed(1)
  model = _randomise(tr.Qwen2ForSequenceClassification(tr.Qwen2Config(**_COMMON, num_labels=1)))
  path = str(tmp_path_factory.mktemp("rm"))
  model.save_pretrained(path)
  return model, path


def test_scalar_head_equals_sequence_classification(reward_model, tmp_path):
  model, path = reward_model
  cfg, params = hf.load_pretrained(path, head="scalar")
  assert params["score_head"].shape == (64, 1) and float(params["score_bias"][0]) == 0.0
  tokens, mask, positions = _batch(seed=4)
  values, _ = jax.jit(models.make_apply_fn(cfg, head="scalar"))(params, tokens, mask)
  with torch.no_grad():
    ref = model(input_ids=torch.tensor(tokens, dtype=torch.long), attention_mask=torch.tensor(mask),
                position_ids=torch.tensor(positions, dtype=torch.long)).logits.numpy()[:, 0]
  np.testing.assert_allclose(np.asarray(values[:, -1]), ref, rtol=2e-4, atol=2e-5 * np.abs(ref).max())
  # Export and reload as a sequence classifier.
  out = hf.save_pretrained(cfg, params, str(tmp_path / "rm"), head="scalar", source_dir=path)
  again = tr.AutoModelForSequenceClassification.from_pretrained(out).eval()
  assert again.config.num_labels == 1
  with torch.no_grad():
    ref2 = again(input_ids=torch.tensor(tokens, dtype=torch.long), attention_mask=torch.tensor(mask),
                 position_ids=torch.tensor(positions, dtype=torch.long)).logits.numpy()[:, 0]
  np.testing.assert_allclose(ref2, ref, rtol=0, atol=1e-6)
  # A learned bias has no place in HF's score layer: refused unless dropped explicitly.
  biased = {**params, "score_bias": params["score_bias"] + 0.5}
  with pytest.raises(ValueError, match="score_bias"):
    hf.save_pretrained(cfg, biased, str(tmp_path / "rm2"), head="scalar")
  hf.save_pretrained(cfg, biased, str(tmp_path / "rm2"), head="scalar", drop_score_bias=True)
  # A sequence classifier has no LM head.
  with pytest.raises(ValueError, match="ForCausalLM"):
    hf.load_pretrained(path, head="lm")


def test_lm_checkpoint_as_scalar_backbone(checkpoints, loaded):
  cfg, lm_params = loaded["llama3"]
  _, params = hf.load_pretrained(checkpoints["llama3"][1], head="scalar")
  assert "lm_head" not in params and not np.any(np.asarray(params["score_head"]))
  jax.tree.map(np.testing.assert_array_equal, {k: v for k, v in params.items() if not k.startswith("score")},
               {k: v for k, v in lm_params.items() if k != "lm_head"})


def test_sharded_load_equals_single_device(checkpoints, loaded):
  mesh = shd.make_mesh((2, 2, 2))
  for family in ("llama3", "qwen3"):
    cfg, single = loaded[family]
    _, sharded = hf.load_pretrained(checkpoints[family][1], mesh=mesh)
    expected = shd.logical_to_sharding(models.logical_axes(cfg), mesh)
    for x, want in zip(jax.tree.leaves(sharded), jax.tree.leaves(expected)):
      assert x.sharding.is_equivalent_to(want, x.ndim)
    wq = sharded["layers"]["block"]["attn"]["wq"]  # [L, D, H, Dh]: embed over fsdp, heads over tensor
    assert wq.addressable_shards[0].data.shape == (2, 32, 2, wq.shape[-1])
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(sharded), jax.device_get(single))


def test_unscanned_layers_load(checkpoints, loaded):
  cfg, params = hf.load_pretrained(checkpoints["qwen2"][1], scan_layers=False)
  np.testing.assert_array_equal(params["layer_1"]["attn"]["bq"], loaded["qwen2"][1]["layers"]["block"]["attn"]["bq"][1])
  tokens, mask, _ = _batch()
  a, _ = jax.jit(models.make_apply_fn(cfg))(params, tokens, mask)
  b, _ = jax.jit(models.make_apply_fn(loaded["qwen2"][0]))(loaded["qwen2"][1], tokens, mask)
  np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_transformers_4x_config_keys_read_the_same(checkpoints):
  with open(os.path.join(checkpoints["llama3"][1], "config.json")) as f:
    v5 = json.load(f)
  assert "rope_parameters" in v5
  v4 = {k: v for k, v in v5.items() if k not in ("rope_parameters", "dtype")}
  rope = dict(v5["rope_parameters"])
  v4["rope_theta"] = rope.pop("rope_theta")
  v4["rope_scaling"] = {"type" if k == "rope_type" else k: v for k, v in rope.items()}
  v4["torch_dtype"] = "float32"
  assert hf.config_from_hf(v4) == hf.config_from_hf(v5)
  assert hf.config_from_hf(v4, dtype="bfloat16").param_dtype == "bfloat16"


def test_bfloat16_checkpoint(checkpoints, tmp_path):
  """A bf16 checkpoint (the usual release format) loads in bf16 by default, or in float32 on request."""
  model, _ = checkpoints["qwen2"]
  path = str(tmp_path / "bf16")
  model.to(torch.bfloat16).save_pretrained(path)
  model.float()
  cfg, params = hf.load_pretrained(path)
  assert cfg.param_dtype == cfg.dtype == "bfloat16"
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(params))
  w = model.model.layers[1].self_attn.k_proj.weight.detach().to(torch.bfloat16).float().numpy()
  np.testing.assert_array_equal(np.asarray(params["layers"]["block"]["attn"]["wk"][1], np.float32),
                                w.T.reshape(64, 2, 16))
  cfg32, params32 = hf.load_pretrained(path, dtype="float32")
  assert cfg32.param_dtype == "float32" and params32["embedding"].dtype == jnp.float32


def test_model_config_rejects_bad_hf_fields():
  with pytest.raises(ValueError, match="ModelConfig.rope_scaling.*yarn"):
    models.get_model_config("tiny", rope_scaling={"rope_type": "yarn", "factor": 2.0})
  with pytest.raises(ValueError, match="ModelConfig.rope_scaling.*lacks"):
    models.get_model_config("tiny", rope_scaling={"rope_type": "llama3", "factor": 8.0})
  with pytest.raises(ValueError, match="head_dim_override"):
    models.get_model_config("tiny", head_dim_override=7)


def test_clear_errors(checkpoints, tmp_path):
  src = checkpoints["llama_tied"][1]
  # Unsupported architecture.
  bad = shutil.copytree(src, tmp_path / "arch")
  conf = json.loads((bad / "config.json").read_text())
  (bad / "config.json").write_text(json.dumps({**conf, "architectures": ["MistralForCausalLM"]}))
  with pytest.raises(ValueError, match="MistralForCausalLM.*not supported"):
    hf.load_pretrained(str(bad))
  # Shape mismatch: the config promises a wider MLP than the tensors hold.
  bad = shutil.copytree(src, tmp_path / "shape")
  (bad / "config.json").write_text(json.dumps({**conf, "intermediate_size": 128}))
  with pytest.raises(ValueError, match=r"mlp\.\w+_proj\.weight.*shape"):
    hf.load_pretrained(str(bad))
  # Missing tensor.
  from safetensors.numpy import load_file, save_file
  bad = shutil.copytree(src, tmp_path / "missing")
  tensors = load_file(str(bad / "model.safetensors"))
  del tensors["model.layers.1.self_attn.k_proj.weight"]
  save_file(tensors, str(bad / "model.safetensors"), metadata={"format": "pt"})
  with pytest.raises(ValueError, match=r"model\.layers\.1\.self_attn\.k_proj\.weight.*missing"):
    hf.load_pretrained(str(bad))
  with pytest.raises(ValueError, match="head"):
    hf.load_pretrained(src, head="value")
  # A 2-label classifier is not a reward model.
  conf2 = {**conf, "architectures": ["LlamaForSequenceClassification"], "id2label": {"0": "a", "1": "b"}}
  bad = shutil.copytree(src, tmp_path / "labels")
  (bad / "config.json").write_text(json.dumps(conf2))
  with pytest.raises(ValueError, match="num_labels=1"):
    hf.load_pretrained(str(bad), head="scalar")


# The tiny preset's parameter tree before the HF fields were added (they default off).
_TINY_TREE = {
    "embedding": (260, 128), "final_norm/scale": (128,), "layers/block/attn/wk": (4, 128, 2, 32),
    "layers/block/attn/wo": (4, 4, 32, 128), "layers/block/attn/wq": (4, 128, 4, 32),
    "layers/block/attn/wv": (4, 128, 2, 32), "layers/block/attn_norm/scale": (4, 128),
    "layers/block/mlp/w_down": (4, 384, 128), "layers/block/mlp/w_gate": (4, 128, 384),
    "layers/block/mlp/w_up": (4, 128, 384), "layers/block/mlp_norm/scale": (4, 128),
}


def test_presets_unchanged():
  cfg = models.PRESETS["tiny"]
  assert not (cfg.qkv_bias or cfg.qk_norm) and cfg.head_dim_override is None and cfg.rope_scaling is None
  tree = {"/".join(k.key for k in path): tuple(x.shape)
          for path, x in jax.tree_util.tree_flatten_with_path(models.abstract_params(cfg))[0]}
  assert tree == _TINY_TREE
  assert models.count_params(models.abstract_params(cfg)) == cfg.num_params() == 820_864
  hash(models.get_model_config("tiny", rope_scaling=dict(_LLAMA3)))  # stays hashable (the sampler caches by it)


# ----------------------------------------------------------------------------- tokenizer

_LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")
_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
             "<pad>"]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
  """A byte-level BPE trained here on a few strings, saved by transformers with a Llama-3-style chat template."""
  tokenizers = pytest.importorskip("tokenizers")
  from tokenizers import decoders, models as tmodels, pre_tokenizers, trainers
  tok = tokenizers.Tokenizer(tmodels.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  text = ["def add(a, b):\n    return a + b", "Write a function that reverses a list.", "hello world"]
  tok.train_from_iterator(text * 3, trainers.BpeTrainer(vocab_size=300, special_tokens=_SPECIALS,
                                                         initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  hf_tok = tr.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
                                      pad_token="<pad>")
  hf_tok.chat_template = _LLAMA3_TEMPLATE
  path = str(tmp_path_factory.mktemp("tok"))
  hf_tok.save_pretrained(path)
  return hf_tok, path


def test_tokenizer_and_chat_template_equal_transformers(tokenizer_dir):
  from rlhf_jax.tokenizer import HFTokenizer, chat_prompt, encode_prompts
  hf_tok, path = tokenizer_dir
  tok = HFTokenizer.from_pretrained_dir(path)
  assert (tok.bos_id, tok.eos_id, tok.pad_id) == (hf_tok.bos_token_id, hf_tok.eos_token_id, hf_tok.pad_token_id)
  text = "Write a function that adds a and b: é ✓"
  assert tok.encode(text) == hf_tok.encode(text, add_special_tokens=False)
  assert tok.decode(tok.encode(text) + [tok.eos_id, 5, 6]) == text  # stops at EOS
  messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "reverse a list "}]
  rendered = hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
  assert "<|begin_of_text|>" + tok.apply_chat_template(messages) == rendered
  # chat_prompt -> encode_prompts gives exactly transformers' tokenised chat (BOS once, from encode_prompts).
  want = hf_tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
  want = list(want["input_ids"] if hasattr(want, "keys") else want)
  tokens, mask = encode_prompts(tok, [chat_prompt(tok, "reverse a list ", system="Be brief.")], len(want) + 3)
  assert tokens[0, 3:].tolist() == want and mask[0].tolist() == [0] * 3 + [1] * len(want)
  assert tokens[0, :3].tolist() == [tok.pad_id] * 3


def test_tokenizer_legacy_config_without_bos(tokenizer_dir, tmp_path):
  """transformers-4.x layout: template inside tokenizer_config.json, AddedToken dicts, no BOS (as Qwen)."""
  from rlhf_jax.tokenizer import ByteTokenizer, HFTokenizer, chat_prompt
  _, path = tokenizer_dir
  shutil.copy(os.path.join(path, "tokenizer.json"), tmp_path / "tokenizer.json")
  conf = {"bos_token": None, "eos_token": {"content": "<|end_of_text|>", "__type": "AddedToken"},
          "chat_template": "{% for m in messages %}[{{ m.role }}]{{ m.content }}{{ eos_token }}{% endfor %}"
                           "{% if add_generation_prompt %}[assistant]{% endif %}"}
  (tmp_path / "tokenizer_config.json").write_text(json.dumps(conf))
  tok = HFTokenizer.from_pretrained_dir(str(tmp_path))
  assert tok.bos_id is None and tok.eos_id == _SPECIALS.index("<|end_of_text|>") and tok.pad_id == tok.eos_id
  assert chat_prompt(tok, "hi") == "[user]hi<|end_of_text|>[assistant]"
  with pytest.raises(ValueError, match="chat template"):
    chat_prompt(ByteTokenizer(), "hi")
  with pytest.raises(ValueError, match="tokenizer.json"):
    HFTokenizer.from_pretrained_dir(str(tmp_path / "nowhere"))
