"""Config validation against the schema: fields, types, combinations."""
import json

import ml_collections
import pytest

from experiments.configs import base
from rlhf_jax.config import (ConfigError, config_to_json, data_parallel_size,
                             optimizer_kwargs, resolve_mesh_shape, stage_module,
                             validate_config)

STAGE = "rlhf_fake_stage_for_tests:run_fake"


@pytest.fixture
def config(tmp_path, monkeypatch):
  # The stage check imports nothing but needs the module to exist.
  (tmp_path / "rlhf_fake_stage_for_tests.py").write_text(
      "def run_fake(config, workdir):\n  pass\n")
  monkeypatch.syspath_prepend(str(tmp_path))
  c = base.get_base_config()
  c.stages = (STAGE,)
  return c


def _error(config, device_count=None, **kwargs) -> ConfigError:
  with pytest.raises(ConfigError) as e:
    validate_config(config, base.get_base_config(), device_count=device_count,
                    **kwargs)
  return e.value


def test_base_and_named_configs_are_valid(config):
  validate_config(config, base.get_base_config(), device_count=8)  # raises if not
  import importlib  # pylint: disable=import-outside-toplevel
  for name in ("sft", "pfppo", "pfppo_rm", "grpo", "eval", "bon", "rs", "bond", "am", "am_sr", "autoif", "dpo", "online_dpo"):
    named = importlib.import_module(f"experiments.configs.{name}").get_config()
    for devices in (1, 8):
      validate_config(named, base.get_base_config(), device_count=devices)
    named.sampling.top_p = 1.5  # and the same config with one bad field is rejected
    assert _error(named).field == "config.sampling.top_p"


def test_unknown_field_is_named(config):
  config.sampling.top_q = 0.5
  e = _error(config)
  assert e.field == "config.sampling.top_q"
  assert "config.sampling.top_q: unknown field" in str(e)
  assert "did you mean config.sampling.top_p" in str(e)


def test_unknown_section_and_missing_field(config):
  config.ppo2 = ml_collections.ConfigDict({"steps": 1})
  assert _error(config).field == "config.ppo2"
  c = base.get_base_config()
  c.stages = (STAGE,)
  del c.sampling["top_k"]
  e = _error(c)
  assert e.field == "config.sampling.top_k" and "missing" in str(e)


@pytest.mark.parametrize("path, value, message", [
    ("sampling.temperature", "hot", "expected float, got str"),
    ("sft.steps", 1.5, "expected int, got float"),
    ("sft.steps", True, "expected int, got bool"),
    ("logging.tensorboard", 1, "expected bool, got int"),
    ("model.preset", 3, "expected str, got int"),
    ("sft.batch_size", None, "None is not allowed"),
    ("model.max_seq_len", "long", "expected int, got str"),
])
def test_wrong_type_is_named(config, path, value, message):
  section, key = path.split(".")
  # Bypass ConfigDict's own type-safety, as a dict-built config would.
  config[section] = ml_collections.ConfigDict(
      dict(config[section].to_dict(), **{key: value}), type_safe=False)
  e = _error(config)
  assert e.field == f"config.{path}"
  assert message in str(e)


def test_accepted_type_conversions(config):
  config.sampling.temperature = 1  # int where float
  config.mesh.shape = [-1, 1, 1]  # list where tuple
  config.model.max_seq_len = None  # optional
  config.model.n_heads = 4
  config.algo.kl_target = 6  # int for an optional float
  validate_config(config, base.get_base_config(), device_count=8)  # raises ConfigError if any is rejected
  assert (config.sampling.temperature, config.algo.kl_target) == (1, 6)  # accepted unchanged


def test_sequence_element_types(config):
  config.mesh.shape = (-1, 1.5, 1)
  e = _error(config)
  assert e.field == "config.mesh.shape[1]" and "expected int" in str(e)
  config.mesh.shape = (-1, 1, 1)
  config.stages = (STAGE, 3)
  assert _error(config).field == "config.stages[1]"


@pytest.mark.parametrize("shape, devices, message", [
    ((-1, -1, 1), 8, "at most one entry may be -1"),
    ((3, -1, 1), 8, "do not divide the 8 devices"),
    ((2, 2, 1), 8, "has 4 devices but 8 are available"),
    ((0, 1, 1), 8, "positive or -1"),
    ((-1, 1), 8, "needs 3 entries"),
])
def test_mesh_shape_against_device_count(config, shape, devices, message):
  config.mesh.shape = shape
  e = _error(config, device_count=devices)
  assert e.field == "config.mesh.shape" and message in str(e)


def test_mesh_checks_without_device_count(config):
  config.mesh.shape = (-1, -1, 1)
  assert "at most one" in str(_error(config))
  config.mesh.shape = (2, 2, 2)
  validate_config(config, base.get_base_config())  # no devices known: fine


def test_mesh_axis_names_fixed(config):
  config.mesh.axis_names = ("batch", "fsdp", "tensor")
  assert _error(config).field == "config.mesh.axis_names"


def test_resolve_mesh_and_data_parallel_size(config):
  assert resolve_mesh_shape((-1, 1, 1), 8) == (8, 1, 1)
  assert resolve_mesh_shape((2, -1, 2), 8) == (2, 2, 2)
  config.mesh.shape = (2, -1, 2)
  assert data_parallel_size(config, 8) == 4


@pytest.mark.parametrize("path, value, message", [
    ("sampling.top_p", 0.0, "must be in (0, 1]"),
    ("sampling.top_p", 1.5, "must be in (0, 1]"),
    ("sampling.temperature", -0.1, "must be >= 0"),
    ("sampling.top_k", -1, "must be >= 0"),
    ("sampling.max_new_tokens", 0, "must be >= 1"),
    ("sft.optimizer.learning_rate", 0.0, "must be > 0"),
    ("optimizer.learning_rate", -1e-3, "must be > 0"),
    ("sft.optimizer.schedule", "exp", "must be one of"),
    ("sft.optimizer.name", "lamb", "must be one of"),
    ("sft.optimizer.end_lr_ratio", 1.5, "must be in [0, 1]"),
    ("sft.optimizer.b2", 1.0, "must be in [0, 1)"),
    ("model.dtype", "float8", "must be one of"),
    ("model.n_layers", 0, "must be >= 1"),
    ("model.scan_unroll", 0, "must be -1 (auto) or a number of layers >= 1"),
    ("model.microbatch", -2, "must be -1 (auto), 0 (off) or a number of rows"),
    ("algo.kl_estimator", "k4", "must be one of"),
    ("algo.strategy", "best_of_all", "must be one of"),
    ("algo.loss_agg", "sum", "must be one of"),
    ("algo.gamma", 1.5, "must be in [0, 1]"),
    ("algo.kl_target", -1.0, "must be > 0"),
    ("sft.steps", 0, "must be >= 1"),
    ("checkpoint.every_steps", 0, "must be >= 1"),
    ("sft.batch_size", 0, "must be >= 1"),
])
def test_impossible_values(config, path, value, message):
  *sections, key = path.split(".")
  node = config
  for s in sections:
    node = node[s]
  node[key] = value
  e = _error(config)
  assert e.field == f"config.{path}", str(e)
  assert message in str(e)


def test_batch_size_divisible_by_data_parallel_size(config):
  config.sft.batch_size = 12
  config.mesh.shape = (-1, 1, 1)
  validate_config(config, base.get_base_config())  # unknown device count
  e = _error(config, device_count=8)
  assert e.field == "config.sft.batch_size"
  assert "not divisible by the data-parallel size 8" in str(e)
  config.mesh.shape = (2, 2, -1)  # dp = 4 divides 12
  validate_config(config, base.get_base_config(), device_count=8)


def test_heads_divisible_by_kv_heads(config):
  config.model.n_heads = 8
  validate_config(config, base.get_base_config())  # the preset's 2 kv heads divide 8
  config.model.n_kv_heads = 3
  e = _error(config)
  assert e.field == "config.model.n_kv_heads" and "n_heads=8" in str(e)
  config.model.n_kv_heads = 4
  validate_config(config, base.get_base_config())
  config.model.n_heads = 6  # 6 does not divide the preset's dim 128
  config.model.n_kv_heads = 3
  assert _error(config).field == "config.model.n_heads"


def test_warmup_not_beyond_total_steps(config):
  config.sft.steps = 100
  config.sft.optimizer.warmup_steps = 101
  e = _error(config)
  assert e.field == "config.sft.optimizer.warmup_steps"
  assert "config.sft.steps = 100" in str(e)
  config.sft.optimizer.total_steps = 200  # explicit total wins
  validate_config(config, base.get_base_config())
  config.sft.optimizer.total_steps = 50
  assert "config.sft.optimizer.total_steps = 50" in str(_error(config))


def test_sequence_lengths_fit_the_model(config):
  config.task.max_prompt_len = 100
  config.sampling.max_new_tokens = 64
  config.task.max_response_len = 28
  config.model.max_seq_len = 128
  e = _error(config)
  assert e.field == "config.sampling.max_new_tokens"
  assert "exceeds model.max_seq_len (128)" in str(e)
  config.sampling.max_new_tokens = 28
  validate_config(config, base.get_base_config())
  config.task.max_response_len = 29
  assert _error(config).field == "config.task.max_response_len"


def test_unknown_stage(config):
  config.stages = (STAGE, "no_such_stage")
  e = _error(config)
  assert e.field == "config.stages[1]"
  assert "unknown stage 'no_such_stage'" in str(e)
  assert "rlhf_jax.pipelines.no_such_stage" in str(e)
  config.stages = ()
  assert _error(config).field == "config.stages"


def test_stage_module_names():
  assert stage_module("sft") == ("rlhf_jax.pipelines.sft", "run_sft")
  assert stage_module("pkg.mod:fn") == ("pkg.mod", "fn")


def test_custom_checks_are_appended(config):
  from rlhf_jax.config import DEFAULT_CHECKS

  def no_big_models(c, device_count):
    if c.model.n_layers and c.model.n_layers > 2:
      raise ConfigError("config.model.n_layers", "too big for this test")

  config.model.n_layers = 3
  validate_config(config, base.get_base_config())
  with pytest.raises(ConfigError, match="too big"):
    validate_config(config, base.get_base_config(),
                    checks=DEFAULT_CHECKS + (no_big_models,))


def test_optimizer_kwargs_feed_make_optimizer(config):
  from rlhf_jax import state
  config.sft.steps = 77
  kwargs = optimizer_kwargs(config.sft)
  assert kwargs["total_steps"] == 77 and kwargs["name"] == "adamw"
  state.make_optimizer(**kwargs)  # every key is a make_optimizer argument
  config.sft.optimizer.total_steps = 10
  assert optimizer_kwargs(config.sft)["total_steps"] == 10


def test_stage_optimizer_is_a_copy_of_the_template():
  c = base.get_base_config()
  assert c.sft.optimizer.to_dict() == c.optimizer.to_dict()
  c.optimizer.learning_rate = 1.0
  assert c.sft.optimizer.learning_rate != 1.0


def test_config_to_json_roundtrip(config):
  text = config_to_json(config)
  data = json.loads(text)
  assert data["mesh"]["shape"] == [-1, 1, 1]
  assert data["sampling"]["top_p"] == 1.0
  assert data["model"]["max_seq_len"] is None
  assert data["sft"]["optimizer"]["name"] == "adamw"


@pytest.mark.parametrize("path,value,message", [
    ("task.name", "minicod", "did you mean 'minicode'"),
    ("task.name", "no_such_pkg_xyz:make_task", "no module"),
    ("task.num_train", 0, ">= 1"),
    ("eval.task", "humanevl", "unknown task"),
    ("rm.num_prompts", 0, ">= 2"),
    ("rm.eval_fraction", -0.5, "(0, 1)"),
    ("rm.samples_per_prompt", 1, ">= 2"),
    ("sft.steps", -1, ">= 1"),
    ("sft.optimizer.learning_rate", float("inf"), "finite"),
    ("algo.kl_coef", float("nan"), "finite"),
    ("ppo.reward_source", "oracle", "'rm'"),
    ("algo.advantage", "vtrace", "must be one of"),
])
def test_fields_rejected_before_compute(config, path, value, message):
  """Issue 14.5: each of these failed only after compute (or was accepted) before."""
  section, _, key = path.rpartition(".")
  node = config
  for part in section.split("."):
    node = node[part]
  node[key] = value
  e = _error(config)
  assert e.field == f"config.{path}", str(e)
  assert message in str(e), str(e)


def test_eval_ks_beyond_the_samples(config):
  config.eval.num_samples = 2
  config.eval.ks = (1, 5)
  assert _error(config).field == "config.eval.ks[1]"


def test_rl_stages_refuse_top_p_and_need_a_group_for_critic_free_advantages(config, monkeypatch):
  c = base.get_base_config()
  c.stages = ("grpo",)
  c.algo.advantage = "grpo"
  c.algo.strategy = "none"
  c.sampling.top_p = 0.9
  assert _error(c).field == "config.sampling.top_p"
  c.sampling.top_p = 1.0
  c.ppo.samples_per_prompt = 1
  assert _error(c).field == "config.ppo.samples_per_prompt"
  c.ppo.samples_per_prompt = 4
  c.algo.advantage = "gae"
  assert _error(c).field == "config.algo.advantage"
