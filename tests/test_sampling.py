"""The jitted KV-cache sampler against full forward passes of the same model."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax import losses, models
from rlhf_jax.sampling import Sampler, SamplingParams, filter_logits, generate
from rlhf_jax.tokenizer import ByteTokenizer, encode_prompts

TOK = ByteTokenizer()
PROMPTS = ["hello", "a much longer prompt, left-padded", "x"]
PLEN = 36  # BOS + the longest prompt (34 tokens) fits: prompts are never truncated


@pytest.fixture(scope="module")
def model():
  cfg = models.get_model_config("tiny")
  params = models.init_params(cfg, jax.random.PRNGKey(0))
  # Sharpen the random model so greedy decoding is not decided by float noise.
  params = jax.tree.map(lambda x: x * 3.0 if x.ndim >= 2 else x, params)
  return cfg, params, jax.jit(models.make_apply_fn(cfg))


def _recompute_logprobs(apply, params, out, prompt_len, sp=None):
  """Log-probs of the sampled distribution, softmax(filter(logits / T)), from a full forward."""
  logits, _ = apply(params, out.tokens, out.mask)
  dist = logits[:, prompt_len - 1:-1]
  if sp is not None and sp.temperature > 0:
    dist = filter_logits(dist.astype(jnp.float32) / sp.temperature, top_k=sp.top_k, top_p=sp.top_p)
  lp = losses.token_logprobs(dist, out.completion_tokens)
  return logits, lp * out.completion_mask


@pytest.mark.parametrize("sp,draw", [
    (SamplingParams(max_new_tokens=12, temperature=1.0, num_samples=2), "gumbel"),
    (SamplingParams(max_new_tokens=12, temperature=0.7, top_k=20, top_p=0.9, num_samples=3), "gumbel"),
    (SamplingParams(max_new_tokens=12, temperature=0.7, top_k=20, top_p=0.9, num_samples=3), "inverse_cdf"),
])
def test_logprobs_equal_full_forward(model, sp, draw):
  cfg, params, apply = model
  pt, pm = encode_prompts(TOK, PROMPTS, PLEN)
  out = Sampler(cfg, sp, eos_id=TOK.eos_id, pad_id=TOK.pad_id, draw=draw)(params, pt, pm, jax.random.PRNGKey(1))
  assert out.tokens.shape == (3 * sp.num_samples, PLEN + 12)
  _, lp = _recompute_logprobs(apply, params, out, PLEN, sp)
  np.testing.assert_allclose(out.completion_logprobs, lp, atol=1e-4)
  # the N samples of a prompt share its tokens and differ in their completions
  np.testing.assert_array_equal(out.tokens[0, :PLEN], out.tokens[sp.num_samples - 1, :PLEN])
  assert not np.array_equal(out.completion_tokens[0], out.completion_tokens[1])


def test_greedy_is_argmax_of_full_forward(model):
  cfg, params, apply = model
  pt, pm = encode_prompts(TOK, PROMPTS, PLEN)
  out = Sampler(cfg, SamplingParams(max_new_tokens=10, temperature=0.0), eos_id=TOK.eos_id,
                pad_id=TOK.pad_id)(params, pt, pm, jax.random.PRNGKey(1))
  logits, _ = _recompute_logprobs(apply, params, out, PLEN)
  greedy = jnp.argmax(logits[:, PLEN - 1:-1], -1)
  np.testing.assert_array_equal(np.where(out.completion_mask, greedy, -1),
                                np.where(out.completion_mask, out.completion_tokens, -1))


def test_left_padding_changes_nothing(model):
  cfg, params, _ = model
  sp = SamplingParams(max_new_tokens=8, temperature=1.0)
  outs = []
  for width in (8, 20):
    pt, pm = encode_prompts(TOK, ["hello"], width)
    outs.append(Sampler(cfg, sp, eos_id=TOK.eos_id, pad_id=TOK.pad_id)(params, pt, pm, jax.random.PRNGKey(3)))
  np.testing.assert_array_equal(outs[0].completion_tokens, outs[1].completion_tokens)
  # equal up to float32 summation order over a shorter key axis: relative 1e-5, as the full-forward checks
  np.testing.assert_allclose(outs[0].completion_logprobs, outs[1].completion_logprobs, rtol=1e-5, atol=1e-6)


def test_eos_ends_a_row(model):
  cfg, params, _ = model
  pt, pm = encode_prompts(TOK, PROMPTS, PLEN)
  greedy = Sampler(cfg, SamplingParams(max_new_tokens=10, temperature=0.0), eos_id=TOK.eos_id,
                   pad_id=TOK.pad_id)(params, pt, pm, jax.random.PRNGKey(0))
  eos = int(greedy.completion_tokens[0, 3])  # pretend this token is EOS
  out = Sampler(cfg, SamplingParams(max_new_tokens=10, temperature=0.0), eos_id=eos,
                pad_id=TOK.pad_id)(params, pt, pm, jax.random.PRNGKey(0))
  for row in range(3):
    toks = np.asarray(greedy.completion_tokens[row])
    hits = np.flatnonzero(toks == eos)
    expected_len = hits[0] + 1 if hits.size else 10
    assert int(out.lengths[row]) == expected_len
    assert np.all(np.asarray(out.completion_mask[row, expected_len:]) == 0)
    assert np.all(np.asarray(out.completion_tokens[row, expected_len:]) == TOK.pad_id)
    np.testing.assert_array_equal(out.completion_tokens[row, :expected_len], toks[:expected_len])
  assert int(out.lengths[0]) == 4


def test_one_compilation_for_many_batches(model):
  cfg, params, _ = model
  sampler = Sampler(cfg, SamplingParams(max_new_tokens=6), eos_id=TOK.eos_id, pad_id=TOK.pad_id)
  for i, prompts in enumerate([PROMPTS, ["a", "bb", "ccc"], ["zz", "y", "hello world"]]):
    pt, pm = encode_prompts(TOK, prompts, PLEN)
    jax.block_until_ready(sampler(params, pt, pm, jax.random.PRNGKey(i)))
  assert sampler.trace_counts == {"prefill": 1, "decode": 1}


def test_top_k_one_is_greedy(model):
  cfg, params, _ = model
  pt, pm = encode_prompts(TOK, PROMPTS, PLEN)
  kw = dict(cfg=cfg, max_new_tokens=6, eos_id=TOK.eos_id, pad_id=TOK.pad_id)
  a = generate(params, pt, pm, jax.random.PRNGKey(5), temperature=1.0, top_k=1, **kw)
  b = generate(params, pt, pm, jax.random.PRNGKey(6), temperature=0.0, **kw)
  np.testing.assert_array_equal(a.completion_tokens, b.completion_tokens)


def test_filter_logits_nucleus_and_top_k():
  logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
  kept = lambda x: np.asarray(x[0] > -1e30)
  np.testing.assert_array_equal(kept(filter_logits(logits, top_p=0.7)), [True, True, False, False])
  np.testing.assert_array_equal(kept(filter_logits(logits, top_p=0.5)), [True, False, False, False])
  np.testing.assert_array_equal(kept(filter_logits(logits, top_p=0.81)), [True, True, True, False])
  np.testing.assert_array_equal(kept(filter_logits(logits, top_k=3)), [True, True, True, False])


@pytest.mark.parametrize("temperature,draw", [(1.0, "gumbel"), (0.7, "gumbel"), (1.0, "inverse_cdf")])
def test_sampling_frequencies_match_the_model(temperature, draw):
  """Samples at temperature T follow softmax(logits / T): first-token frequencies over many rows."""
  cfg = models.get_model_config("tiny", vocab_size=260)
  params = models.init_params(cfg, jax.random.PRNGKey(1))
  params = jax.tree.map(lambda x: x * 4.0 if x.ndim >= 2 else x, params)
  pt, pm = encode_prompts(TOK, ["q"], 4)
  out = Sampler(cfg, SamplingParams(max_new_tokens=1, num_samples=4000, temperature=temperature), eos_id=TOK.eos_id,
                pad_id=TOK.pad_id, draw=draw)(params, pt, pm, jax.random.PRNGKey(2))
  logits, _ = models.make_apply_fn(cfg)(params, jnp.asarray(pt), jnp.asarray(pm))
  probs = np.asarray(jax.nn.softmax(logits[0, -1] / temperature))
  # the reported log-prob of each sample is that of the distribution sampled
  np.testing.assert_allclose(np.exp(np.asarray(out.completion_logprobs[:, 0])),
                             probs[np.asarray(out.completion_tokens[:, 0])], rtol=1e-4)
  freq = np.bincount(np.asarray(out.completion_tokens[:, 0]), minlength=cfg.vocab_size) / 4000
  top = np.argsort(probs)[-5:]
  tolerance = 4 * np.sqrt(probs[top] * (1 - probs[top]) / 4000) + 1e-3  # 4 binomial standard errors
  assert np.all(np.abs(freq[top] - probs[top]) <= tolerance), (freq[top], probs[top])


def test_bad_shapes_are_named(model):
  cfg, params, _ = model
  sampler = Sampler(cfg, SamplingParams(max_new_tokens=4), eos_id=TOK.eos_id, pad_id=TOK.pad_id)
  with pytest.raises(ValueError, match="prompt_mask"):
    sampler(params, np.zeros((2, 5), np.int32), np.zeros((2, 6), np.int32), jax.random.PRNGKey(0))
  with pytest.raises(ValueError, match="top_p"):
    SamplingParams(max_new_tokens=4, top_p=0.0)


def test_first_minibatch_ratio_is_one_at_temperature(model):
  """At T = 0.7 the training forward reproduces the sampler's log-probs, so PPO's first ratio is exactly 1."""
  import optax  # pylint: disable=import-outside-toplevel
  from rlhf_jax.state import create_train_state  # pylint: disable=import-outside-toplevel
  from rlhf_jax.steps import PPOState, completion_logprobs, make_ppo_step  # pylint: disable=import-outside-toplevel
  cfg, params, _ = model
  apply_fn = models.make_apply_fn(cfg)
  sp = SamplingParams(max_new_tokens=8, temperature=0.7, num_samples=4)
  pt, pm = encode_prompts(TOK, ["ab", "cde"], 16)
  out = Sampler(cfg, sp, eos_id=TOK.eos_id, pad_id=TOK.pad_id)(params, pt, pm, jax.random.PRNGKey(3))
  lp = completion_logprobs(apply_fn, params, out.tokens, out.mask, 16, temperature=0.7)
  # Equal up to float32 summation order (KV-cache decode vs one full forward): relative 1e-5.
  np.testing.assert_allclose(np.asarray(lp * out.completion_mask), np.asarray(out.completion_logprobs), rtol=1e-5,
                             atol=1e-6)
  step = make_ppo_step(apply_fn, optax.sgd(0.0), prompt_len=16, advantage="grpo", temperature=0.7, epochs=1,
                       minibatches=1)
  state = PPOState(actor=create_train_state(params, optax.sgd(0.0), jax.random.PRNGKey(0)), critic=None,
                   kl=losses.init_kl_controller(0.0))
  batch = {"tokens": out.tokens, "mask": out.mask, "completion_mask": out.completion_mask,
           "old_logprobs": out.completion_logprobs, "ref_logprobs": out.completion_logprobs,
           "advantages": jnp.linspace(-1.0, 1.0, 8), "weights": jnp.ones(8), "scores": jnp.zeros(8)}
  _, m = jax.jit(step)(state, batch)
  assert abs(float(m["policy/ratio_mean"]) - 1.0) < 1e-5
  # The largest ratio is that of the largest single-token difference the log-probs were just held to.
  worst = float(np.max(np.abs(np.asarray(lp - out.completion_logprobs) * np.asarray(out.completion_mask))))
  assert abs(float(m["policy/ratio_max"]) - 1.0) <= np.expm1(worst) + 2e-6, worst
  assert float(m["policy/clip_frac"]) == 0.0


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_segmented_decode_equals_one_segment(model, temperature):
  """Attending over the filled part of the cache (segments) gives the tokens and log-probs of attending over all."""
  cfg, params, _ = model
  pt, pm = encode_prompts(TOK, PROMPTS, PLEN)
  sp = SamplingParams(max_new_tokens=20, temperature=temperature, num_samples=2)
  outs = [Sampler(cfg, sp, eos_id=TOK.eos_id, pad_id=TOK.pad_id, decode_segments=k)(params, pt, pm,
                                                                                   jax.random.PRNGKey(4))
          for k in (1, 5)]
  # steps 1..19 feed slots PLEN..PLEN+18: five runs of 4, 4, 4, 4, 3 steps
  assert Sampler(cfg, sp, eos_id=0, pad_id=0, decode_segments=5).segment_lengths(PLEN) == [
      PLEN + 4, PLEN + 8, PLEN + 12, PLEN + 16, PLEN + 19]
  np.testing.assert_array_equal(outs[0].completion_tokens, outs[1].completion_tokens)
  np.testing.assert_array_equal(outs[0].completion_mask, outs[1].completion_mask)
  # equal up to float32 summation order over a shorter key axis: relative 1e-5, as the full-forward checks
  np.testing.assert_allclose(outs[0].completion_logprobs, outs[1].completion_logprobs, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("sp,draw", [
    (SamplingParams(max_new_tokens=10, temperature=1.0, num_samples=2), "gumbel"),
    (SamplingParams(max_new_tokens=10, temperature=0.7, top_k=20, num_samples=1), "inverse_cdf"),
    (SamplingParams(max_new_tokens=10, temperature=0.0), "gumbel"),
])
def test_host_threads_draw_the_tokens_of_one_call(model, sp, draw):
  """Prompts split over host threads get the tokens (and log-probs, to rounding) of the single-thread call:
  the random numbers are drawn for the whole batch. Rows stop at EOS at different steps in each group."""
  cfg, params, _ = model
  pt, pm = encode_prompts(TOK, PROMPTS + ["tiny", "", "more text here"], PLEN)
  key = jax.random.PRNGKey(4)
  # An "EOS" that row 0 draws third, so that row stops early and the others later or never.
  eos = int(Sampler(cfg, sp, eos_id=-1, pad_id=TOK.pad_id, draw=draw, host_threads=1)(params, pt, pm, key)
            .completion_tokens[0, 2])
  outs = {}
  for k in (1, 2, 6):
    s = Sampler(cfg, sp, eos_id=eos, pad_id=TOK.pad_id, draw=draw, host_threads=k)
    assert s.threads_for(6) == k
    outs[k] = s(params, pt, pm, key)
    assert s.trace_counts == {"prefill": 1, "decode": 1}
  lengths = np.asarray(outs[1].lengths)
  assert lengths[0] <= 3 and lengths.max() > lengths[0], lengths
  for k in (2, 6):
    np.testing.assert_array_equal(outs[k].tokens, outs[1].tokens)
    np.testing.assert_array_equal(outs[k].completion_mask, outs[1].completion_mask)
    np.testing.assert_allclose(outs[k].completion_logprobs, outs[1].completion_logprobs, rtol=1e-5, atol=1e-5)


def test_host_threads_setting():
  from jax.sharding import Mesh  # pylint: disable=import-outside-toplevel
  from rlhf_jax.sampling import _usable_cores  # pylint: disable=import-outside-toplevel
  cfg = models.get_model_config("tiny")
  sp = SamplingParams(max_new_tokens=4, num_samples=3)
  auto = Sampler(cfg, sp, eos_id=1, pad_id=0)
  cores = _usable_cores() if jax.default_backend() == "cpu" else 1
  for n in range(1, 40):  # auto: the largest divisor of the prompt count not above the cores
    assert auto.threads_for(n) == max(d for d in range(1, min(n, cores) + 1) if n % d == 0)
  # groups cover the prompts in order; row offsets count N samples a prompt
  s3 = Sampler(cfg, sp, eos_id=1, pad_id=0, host_threads=3)
  assert s3.groups(6) == [(slice(0, 2), 0, 18), (slice(2, 4), 6, 18), (slice(4, 6), 12, 18)]
  assert Sampler(cfg, sp, eos_id=1, pad_id=0, host_threads=1).groups(6) == [(slice(0, 6), 0, None)]
  mesh = Mesh(np.array(jax.devices()[:2]), ("data",))
  if mesh.size > 1:  # several devices: one program runs them all, auto uses one thread; more is refused
    assert Sampler(cfg, sp, eos_id=1, pad_id=0, mesh=mesh).threads_for(8) == 1
    with pytest.raises(ValueError, match="needs a single device"):
      Sampler(cfg, sp, eos_id=1, pad_id=0, mesh=mesh, host_threads=2)
  with pytest.raises(ValueError, match="host_threads=4 must divide the 6 prompts"):
    Sampler(cfg, sp, eos_id=1, pad_id=0, host_threads=4).threads_for(6)
  with pytest.raises(ValueError, match="host_threads"):
    Sampler(cfg, sp, eos_id=1, pad_id=0, host_threads=0)


def test_inverse_cdf_draw_never_picks_zero_probability():
  from rlhf_jax.sampling import _inverse_cdf_draw  # pylint: disable=import-outside-toplevel
  probs = jnp.array([[0.0, 0.5, 0.0, 0.5, 0.0], [0.0, 0.0, 0.0, 0.0, 1.0], [1.0, 0.0, 0.0, 0.0, 0.0]])
  draws = jax.vmap(lambda k: _inverse_cdf_draw(probs, jax.random.uniform(k, (3, 1))))(
      jax.random.split(jax.random.PRNGKey(0), 2000))
  draws = np.asarray(draws)
  assert set(draws[:, 0]) == {1, 3} and abs(np.mean(draws[:, 0] == 1) - 0.5) < 0.05
  assert np.all(draws[:, 1] == 4) and np.all(draws[:, 2] == 0)


def test_first_argmax_is_argmax_and_gumbel_draw_is_jax_categorical():
  """The two-reduce argmax picks jnp.argmax's (first) index, ties included, and the Gumbel draw is
  `jax.random.categorical`'s: same key, same token (the recorded runs' random stream)."""
  from rlhf_jax.sampling import first_argmax, sample_token  # pylint: disable=import-outside-toplevel
  x = jax.random.normal(jax.random.PRNGKey(1), (64, 50))
  ties = jnp.round(x * 2) / 2  # many equal maxima
  for a in (x, ties, jnp.zeros((3, 7)), x.at[:, -1].set(jnp.inf)):
    np.testing.assert_array_equal(first_argmax(a), jnp.argmax(a, axis=-1))
  sp = SamplingParams(max_new_tokens=1, temperature=0.7, top_k=20)
  for seed in range(5):
    key = jax.random.PRNGKey(seed)
    token, _ = sample_token(x, key, sp)
    want = jax.random.categorical(key, filter_logits(x / 0.7, top_k=20), axis=-1)
    np.testing.assert_array_equal(token, want)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_out_in_kernel_layout_samples_the_same_tokens(model, temperature):
  """The decode reading transposed kernels draws the tokens of the stored layout (log-probs to rounding)."""
  cfg, params, _ = model
  pt, pm = encode_prompts(TOK, PROMPTS, PLEN)
  sp = SamplingParams(max_new_tokens=12, temperature=temperature, num_samples=2)
  outs = {lay: Sampler(cfg, sp, eos_id=TOK.eos_id, pad_id=TOK.pad_id, kernel_layout=lay)(params, pt, pm,
                                                                                          jax.random.PRNGKey(5))
          for lay in ("in_out", "out_in")}
  np.testing.assert_array_equal(outs["out_in"].tokens, outs["in_out"].tokens)
  np.testing.assert_allclose(outs["out_in"].completion_logprobs, outs["in_out"].completion_logprobs,
                             rtol=1e-5, atol=1e-5)


def test_kernel_layout_setting():
  from rlhf_jax.sampling import default_kernel_layout  # pylint: disable=import-outside-toplevel
  assert default_kernel_layout("cpu", "fpu sse2 fma avx avx2 bmi2") == "out_in"
  assert default_kernel_layout("cpu", "fma avx avx2 avx512f avx512bw avx512_bf16") == "in_out"
  assert default_kernel_layout("cpu", "") == "in_out"                 # no flags line (not Linux, not x86)
  assert default_kernel_layout("gpu", "fma avx avx2") == "in_out"     # accelerators choose their own layouts
  cfg = models.get_model_config("tiny")
  sp = SamplingParams(max_new_tokens=4)
  assert Sampler(cfg, sp, eos_id=1, pad_id=0).kernel_layout == default_kernel_layout()
  assert Sampler(cfg, sp, eos_id=1, pad_id=0, kernel_layout="in_out").kernel_layout == "in_out"
  with pytest.raises(ValueError, match="kernel_layout must be one of"):
    Sampler(cfg, sp, eos_id=1, pad_id=0, kernel_layout="transposed")
