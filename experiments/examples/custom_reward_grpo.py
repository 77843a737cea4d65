r"""GRPO with your own Python reward, in your own loop: the library without any config object.

  python -m experiments.examples.custom_reward_grpo --iterations=20

A tiny policy is trained to answer with a long run of "a" (reward = share of "a" in
the completion). Everything a pipeline stage does is here in ~60 lines: build a
model, a sampler, the jitted GRPO step, and loop rollout -> reward -> update.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import optax

from rlhf_jax import losses, models, rollout
from rlhf_jax.state import create_train_state
from rlhf_jax.steps import PPOState, make_ppo_step, make_prepare_fn
from rlhf_jax.tokenizer import ByteTokenizer


def reward(prompts: list[str], completions: list[str]) -> np.ndarray:
  """Your reward: any Python function of text. Here: the share of 'a' characters (0 for empty)."""
  del prompts
  return np.asarray([c.count("a") / max(len(c), 1) if c else 0.0 for c in completions], np.float32)


def main(iterations: int = 20, *, seed: int = 0, log=print) -> list[float]:
  tok = ByteTokenizer()
  cfg = models.get_model_config("tiny", n_layers=2, dim=64, mlp_dim=128)
  params = models.init_params(cfg, jax.random.PRNGKey(seed))
  prompts = [{"prompt": f"say something {i}:"} for i in range(8)]
  p_count, n, prompt_len, new_tokens, temperature = len(prompts), 8, 24, 8, 1.0

  sampler = rollout.make_sampler(cfg, tok, max_new_tokens=new_tokens, temperature=temperature, num_samples=n)
  apply_fn = models.make_apply_fn(cfg)
  tx = optax.adam(3e-3)
  step = jax.jit(make_ppo_step(apply_fn, tx, prompt_len=prompt_len, advantage="grpo", temperature=temperature,
                               kl_estimator="k3", minibatches=2), donate_argnums=0)
  prepare = jax.jit(make_prepare_fn(advantage="grpo", n=n))
  score_ref = jax.jit(lambda p, tokens, mask: losses.token_logprobs(
      apply_fn(p, tokens[:, :-1], mask[:, :-1])[0][:, prompt_len - 1:] / temperature, tokens[:, prompt_len:]))
  ref_params = params
  state = PPOState(actor=create_train_state(jax.tree.map(jnp.copy, params), tx, jax.random.PRNGKey(1)), critic=None,
                   kl=losses.init_kl_controller(0.01))

  means = []
  for it in range(iterations):
    ro = rollout.sample(sampler, state.actor.params, tok, prompts, max_prompt_len=prompt_len,
                        rng=jax.random.PRNGKey(100 + it))
    r = reward([p["prompt"] for p in ro.repeated_records()], ro.texts)
    batch = {"tokens": ro.out.tokens, "mask": ro.out.mask, "completion_mask": ro.out.completion_mask,
             "old_logprobs": ro.out.completion_logprobs,
             "ref_logprobs": score_ref(ref_params, ro.out.tokens, ro.out.mask)}
    batch, _ = prepare(batch, jnp.asarray(r).reshape(p_count, n), jax.random.PRNGKey(it))
    state, metrics = step(state, batch)
    means.append(float(r.mean()))
    log(f"iteration {it + 1}: mean reward {means[-1]:.3f}, KL {float(metrics['kl/ref']):.3f}")
  return means


if __name__ == "__main__":
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--iterations", type=int, default=20)
  main(parser.parse_args().iterations)
