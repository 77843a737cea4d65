"""tunix side of `ppo_vs_tunix.py`: time PPO iterations of google-tunix 0.1.7's PPOLearner.

Run with the tunix venv's python (tunix pins its own jax/flax), normally by the
orchestrator, which passes the shapes and the prompt file and reads the last
stdout line (prefixed with `RESULT_JSON `):

    .venv-tunix/bin/python experiments/benchmarks/_tunix_ppo_worker.py \
        --prompts-file /tmp/prompts.npy --mini-batch 16 --new-tokens 64 --warmup 2 --iters 5

Setup mirrored from the rlhf_jax side (see ppo_vs_tunix.py for the differences):
  * actor, reference, critic and reward model: tunix `Llama3` with the shape of
    our `tiny` preset (vocab 260, dim 128, 4 layers, 4 heads, 2 KV heads, head
    dim 32, MLP 384, RoPE 1e4, RMSNorm eps 1e-6), random weights, float32. The
    lm head is untied (`weight_tying=False`) because tunix's
    `create_critic_model` replaces `lm_head` with a Linear(D, 1) value head; the
    critic and the reward model are built that way (reward model: its own
    random backbone).
  * `Llama3` 0.1.7 does not accept the `segment_ids` that tunix's
    `compute_score` (critic values, RM scores, value loss) passes; the subclass
    below drops the argument (a no-op: it is the non-pad mask, already in the
    attention mask).
  * prompts: the token ids of the orchestrator's `.npy` file, passed through
    tunix's string interface by an id-list tokenizer ("17 203 5 ..."), so both
    sides see exactly the same prompt tokens (no BOS added, no padding).
  * EOS disabled (eos token outside the vocabulary) and the pad id outside the
    vocabulary: every row generates exactly `--new-tokens` tokens and every
    completion mask is all ones, as on our side.
  * PPO: full batch = all prompts of one iteration (one tunix "global step"),
    `mini_batch_size` rows per optimizer update, `num_iterations` epochs,
    beta=0.04 k3 ("low_var_kl") KL in the reward, GAE(γ=1, λ=0.95), clip 0.2,
    value clip 0.2; Adam(b1 .9, b2 .95) with global-norm clipping 1.0 for both
    actor and critic.

Timing: a tunix iteration is one global step of `learner.train`; the start of
every global step is recorded (wrapping `_run_global_step`); the end of the
last one is the start of the empty global step that finds the data exhausted.
Iteration i lasts start[i+1] − start[i] and includes everything tunix does
between global steps (metrics buffering/logging). Phases are measured by
wrapping `rl_cluster.generate` (rollout), `_generate_and_compute_advantage`
minus rollout (score: old/ref log-probs, values, rewards, GAE) and
`update_actor` + `update_critic` (update; the wrapper waits for the updated
parameters so the split is clean).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time


def parse_args():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--prompts-file", required=True, help=".npy int32 [iterations, prompts, prompt_len]")
  ap.add_argument("--new-tokens", type=int, default=64)
  ap.add_argument("--mini-batch", type=int, default=16, help="rows per optimizer update (tunix mini_batch_size)")
  ap.add_argument("--epochs", type=int, default=1, help="tunix PPOConfig.num_iterations")
  ap.add_argument("--warmup", type=int, default=2, help="untimed iterations (compilation)")
  ap.add_argument("--iters", type=int, default=5, help="timed iterations")
  ap.add_argument("--vocab", type=int, default=260)
  ap.add_argument("--dim", type=int, default=128)
  ap.add_argument("--layers", type=int, default=4)
  ap.add_argument("--heads", type=int, default=4)
  ap.add_argument("--kv-heads", type=int, default=2)
  ap.add_argument("--mlp", type=int, default=384)
  ap.add_argument("--rope-theta", type=float, default=10_000.0)
  ap.add_argument("--norm-eps", type=float, default=1e-6)
  ap.add_argument("--temperature", type=float, default=1.0)
  ap.add_argument("--lr", type=float, default=1e-6)
  ap.add_argument("--threads", type=int, default=2)
  return ap.parse_args()


class IdTokenizer:
  """Space-separated token ids <-> strings; the duck-typed tokenizer tunix accepts."""

  def __init__(self, *, pad_id: int, eos_id: int):
    self._pad, self._eos = pad_id, eos_id

  def encode(self, text, **kwargs):
    return [int(t) for t in str(text).split()]

  def decode(self, ids, **kwargs):
    return " ".join(str(int(t)) for t in ids)

  def bos_id(self):
    return None  # tunix adds no BOS when bos_id() is falsy

  def eos_id(self):
    return self._eos

  def pad_id(self):
    return self._pad


def main():
  args = parse_args()
  for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ.setdefault(var, str(args.threads))
  os.environ.setdefault("JAX_PLATFORMS", "cpu")

  import numpy as np
  import jax
  import optax
  from flax import nnx
  from tunix.models.llama3 import model as llama3_lib
  from tunix.rl import rl_cluster as rl_cluster_lib
  from tunix.rl import utils as rl_utils
  from tunix.rl.ppo import ppo_learner as ppo_lib
  from tunix.rl.rollout import base_rollout
  import tunix

  prompts = np.load(args.prompts_file)
  n_iter_total, n_prompts, prompt_len = prompts.shape
  if n_iter_total < args.warmup + args.iters:
    raise ValueError(f"--prompts-file holds {n_iter_total} iterations, need warmup+iters={args.warmup + args.iters}")
  if n_prompts % args.mini_batch:
    raise ValueError(f"--mini-batch={args.mini_batch} must divide the {n_prompts} prompts of an iteration")
  if prompts.min() < 0 or prompts.max() >= args.vocab:
    raise ValueError("prompt ids must lie in [0, vocab)")

  class Llama3(llama3_lib.Llama3):
    """tunix 0.1.7's Llama3 accepting (and ignoring) the `segment_ids` its PPO path passes."""

    def __call__(self, input_tokens, positions, cache, attention_mask, segment_ids=None, **kwargs):
      del segment_ids  # the non-pad mask; `attention_mask` already encodes it
      return super().__call__(input_tokens, positions, cache, attention_mask, **kwargs)

  cfg = llama3_lib.ModelConfig(
      num_layers=args.layers, vocab_size=args.vocab, embed_dim=args.dim, hidden_dim=args.mlp,
      num_heads=args.heads, head_dim=args.dim // args.heads, num_kv_heads=args.kv_heads,
      rope_theta=int(args.rope_theta), norm_eps=args.norm_eps, weight_tying=False)

  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("fsdp", "tp"))
  with mesh:
    actor = Llama3(cfg, rngs=nnx.Rngs(0))
    reference = Llama3(cfg, rngs=nnx.Rngs(0))          # same init as the actor
    critic = rl_utils.create_critic_model(actor, seed=1)  # actor backbone + Linear(D, 1)
    reward = rl_utils.create_critic_model(Llama3(cfg, rngs=nnx.Rngs(2)), seed=3)

  # Ids outside the vocabulary: never sampled, so no EOS stop and no pad in a completion.
  tokenizer = IdTokenizer(pad_id=args.vocab, eos_id=args.vocab + 1)

  def tx():
    return optax.chain(optax.clip_by_global_norm(1.0), optax.adam(args.lr, b1=0.9, b2=0.95, eps=1e-8))

  rollout_config = base_rollout.RolloutConfig(
      max_tokens_to_generate=args.new_tokens, max_prompt_length=prompt_len,
      kv_cache_size=prompt_len + args.new_tokens, temperature=args.temperature, top_p=1.0, top_k=None,
      eos_tokens=[args.vocab + 1])
  n_total = args.warmup + args.iters
  roles = rl_cluster_lib.Role
  cluster_config = rl_cluster_lib.ClusterConfig(
      role_to_mesh={r: mesh for r in (roles.ACTOR, roles.CRITIC, roles.REFERENCE, roles.ROLLOUT, roles.REWARD)},
      rollout_engine="vanilla",
      offload_to_cpu=False,
      training_config=rl_cluster_lib.RLTrainingConfig(
          actor_optimizer=tx(), critic_optimizer=tx(), eval_every_n_steps=10**9,
          max_steps=10**9, mini_batch_size=args.mini_batch, pbar_description=None),
      rollout_config=rollout_config,
  )
  cluster = rl_cluster_lib.RLCluster(actor=actor, critic=critic, reference=reference, reward=reward,
                                     tokenizer=tokenizer, cluster_config=cluster_config)
  ppo_config = ppo_lib.PPOConfig(num_iterations=args.epochs, beta=0.04, kl_method="low_var_kl", gamma=1.0,
                                 gae_lambda=0.95, epsilon=0.2, clip_range_value=0.2, entropy_coef=None)
  learner = ppo_lib.PPOLearner(rl_cluster=cluster, ppo_config=ppo_config)

  # --- timing hooks (instance attributes shadow the methods) ---------------------------
  starts: list[float] = []
  cpu_starts: list[float] = []  # process CPU time (all threads) at the same instants
  phase: dict[str, list[float]] = {"rollout": [], "prepare": [], "update": []}
  step_of = lambda: len(starts) - 1  # noqa: E731  (index of the running global step)

  def add(name, dt):
    i = step_of()
    while len(phase[name]) <= i:
      phase[name].append(0.0)
    phase[name][i] += dt

  def timed(name, fn, sync=None):
    def wrapper(*a, **kw):
      t0 = time.perf_counter()
      out = fn(*a, **kw)
      if sync is not None:
        jax.block_until_ready(sync())
      add(name, time.perf_counter() - t0)
      return out
    return wrapper

  run_global_step = learner._run_global_step

  def global_step(*a, **kw):
    starts.append(time.perf_counter())
    cpu_starts.append(time.process_time())
    print(f"[tunix worker] global step {len(starts) - 1} starts", file=sys.stderr, flush=True)
    return run_global_step(*a, **kw)

  learner._run_global_step = global_step
  cluster.generate = timed("rollout", cluster.generate)
  learner._generate_and_compute_advantage = timed("prepare", learner._generate_and_compute_advantage)
  cluster.update_actor = timed("update", cluster.update_actor,
                               sync=lambda: nnx.state(cluster.actor_trainer.model, nnx.Param))
  cluster.update_critic = timed("update", cluster.update_critic,
                                sync=lambda: nnx.state(cluster.critic_trainer.model, nnx.Param))

  train_ds = [{"prompts": np.array([" ".join(map(str, row)) for row in batch])} for batch in prompts[:n_total]]
  t_begin = time.perf_counter()
  learner.train(train_ds)
  jax.block_until_ready((nnx.state(cluster.actor_trainer.model, nnx.Param),
                         nnx.state(cluster.critic_trainer.model, nnx.Param)))
  t_end, cpu_end = time.perf_counter(), time.process_time()
  # tunix starts one more global step that ends at once in StopIteration (the
  # data is exhausted); its start is the end of the last real one (the update
  # wrappers have waited for the parameters by then).
  if len(starts) not in (n_total, n_total + 1):
    raise RuntimeError(f"expected {n_total} global steps, tunix ran {len(starts)}")
  if cluster.actor_trainer.train_steps != n_total * (n_prompts // args.mini_batch) * args.epochs:
    raise RuntimeError(f"actor made {cluster.actor_trainer.train_steps} updates, expected "
                       f"{n_total * (n_prompts // args.mini_batch) * args.epochs}")

  bounds = starts[:n_total] + [starts[n_total] if len(starts) > n_total else t_end]
  iter_s = [bounds[i + 1] - bounds[i] for i in range(n_total)]
  cpu_bounds = cpu_starts[:n_total] + [cpu_starts[n_total] if len(cpu_starts) > n_total else cpu_end]
  cpu_s = [cpu_bounds[i + 1] - cpu_bounds[i] for i in range(n_total)]
  timed_idx = range(args.warmup, n_total)
  med = lambda xs: statistics.median([xs[i] for i in timed_idx])  # noqa: E731
  rollout_s = med(phase["rollout"])
  prepare_s = med(phase["prepare"])
  # score = prepare minus rollout, per iteration, then the median
  score_list = [phase["prepare"][i] - phase["rollout"][i] for i in range(n_total)]
  result = {
      "side": "tunix",
      "tunix_version": getattr(tunix, "__version__", "0.1.7"),
      "jax_version": jax.__version__,
      "prompts": int(n_prompts), "samples_per_prompt": 1, "prompt_len": int(prompt_len),
      "new_tokens": args.new_tokens, "mini_batch": args.mini_batch, "epochs": args.epochs,
      "iteration_s": statistics.median([iter_s[i] for i in timed_idx]),
      "iteration_s_all": iter_s,
      "cpu_s": statistics.median([cpu_s[i] for i in timed_idx]),
      "rollout_s": rollout_s,
      "score_s": med(score_list),
      "update_s": med(phase["update"]),
      "prepare_s": prepare_s,
      "first_iteration_s": iter_s[0],
      "setup_s": starts[0] - t_begin,
      "actor_updates": cluster.actor_trainer.train_steps,
      "max_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20,  # KiB on Linux
  }
  print("RESULT_JSON " + json.dumps(result), flush=True)


if __name__ == "__main__":
  sys.exit(main())
