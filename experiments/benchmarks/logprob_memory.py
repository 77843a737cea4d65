"""Peak memory of completion log-probs at a 152k vocabulary: plain logits against chunked.

Both sides compute per-token log-probs of the targets and their entropy from
final hidden states [B, T, D] and an unembedding [D, V], and the gradient of
a weighted sum of them (as a policy-gradient step does) with respect to both.
The plain side materialises the [B, T, V] float32 logits
(`log_softmax(h @ W)`); the chunked side is
`rlhf_jax.models.logprobs.chunked_completion_logprobs`. Nothing is run: the
numbers are XLA's own `memory_analysis()` of each compiled forward+grad
(arguments, outputs and the temporaries XLA allocates), which is what decides
whether a step fits on an accelerator. Values of the two sides are compared on
a small shape in the same run.

    .venv/bin/python experiments/benchmarks/logprob_memory.py
    .venv/bin/python experiments/benchmarks/logprob_memory.py --batch 8 --seq-len 1024 --chunks 64,256
"""
from __future__ import annotations

import argparse
import os
import re

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from experiments.benchmarks import _common  # noqa: E402
from rlhf_jax.models.logprobs import chunked_completion_logprobs  # noqa: E402


def parse_args():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--batch", type=int, default=4)
  ap.add_argument("--seq-len", type=int, default=512)
  ap.add_argument("--dim", type=int, default=256)
  ap.add_argument("--vocab", type=int, default=151_936, help="Qwen2/Qwen3 vocabulary")
  ap.add_argument("--chunks", default="16,64,256", help="comma-separated chunk sizes")
  return ap.parse_args()


def plain(h, w, y):
  logp_all = jax.nn.log_softmax(jnp.einsum("btd,dv->btv", h, w, preferred_element_type=jnp.float32), -1)
  logp = jnp.take_along_axis(logp_all, y[..., None], -1)[..., 0]
  return logp, -jnp.sum(jnp.exp(logp_all) * logp_all, -1)


def forward_and_grad(fn):
  def loss(h, w, y, weights):
    logp, ent = fn(h, w, y)
    return jnp.sum(weights * logp) + 0.01 * jnp.sum(ent)
  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))


def memory(fn, *shapes):
  m = forward_and_grad(fn).lower(*shapes).compile().memory_analysis()
  args, out, temp = m.argument_size_in_bytes, m.output_size_in_bytes, m.temp_size_in_bytes
  return args, out, temp, args + out + temp - m.alias_size_in_bytes


def cpu_flags() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      text = f.read()
  except OSError:
    return "n/a"
  model = re.search(r"model name\s*:\s*(.*)", text)
  flags = sorted(set(re.findall(r"\b(avx512[a-z_0-9]*|avx2|avx_vnni|amx[a-z_0-9]*|fma)\b", text)))
  return f"{model.group(1).strip() if model else '?'}; {' '.join(flags) or 'no AVX2/AVX-512'}"


def main():
  args = parse_args()
  b, t, d, v = args.batch, args.seq_len, args.dim, args.vocab
  shapes = (jax.ShapeDtypeStruct((b, t, d), jnp.float32), jax.ShapeDtypeStruct((d, v), jnp.float32),
            jax.ShapeDtypeStruct((b, t), jnp.int32), jax.ShapeDtypeStruct((b, t), jnp.float32))
  mb = lambda x: x / 2**20
  rows = []
  a, o, tmp, peak = memory(plain, *shapes)
  rows.append(["plain logits", "-", mb(a), mb(o), mb(tmp), mb(peak)])
  for chunk in (int(c) for c in args.chunks.split(",")):
    fn = lambda h, w, y, c=chunk: chunked_completion_logprobs(h, w, y, chunk=c, with_entropy=True)
    a, o, tmp, peak = memory(fn, *shapes)
    rows.append(["chunked", chunk, mb(a), mb(o), mb(tmp), mb(peak)])

  # The two sides agree (small shape, run for real).
  rng = np.random.RandomState(0)
  h = jnp.asarray(rng.normal(size=(2, 40, d)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(d, 5000)) * 0.05, jnp.float32)
  y = jnp.asarray(rng.randint(0, 5000, (2, 40)))
  weights = jnp.ones((2, 40))
  (l1, g1), (l2, g2) = [forward_and_grad(f)(h, w, y, weights) for f in
                        (plain, lambda h, w, y: chunked_completion_logprobs(h, w, y, chunk=16, with_entropy=True))]
  diff = max(float(jnp.abs(l1 - l2) / jnp.abs(l1)), *(float(jnp.abs(x - z).max() / jnp.abs(x).max())
                                                   for x, z in zip(g1, g2)))

  print(f"log-probs + entropy, forward + grad wrt hidden and unembedding; hidden [{b}, {t}, {d}], V = {v:,}")
  print(f"[B, T, V] float32 logits alone: {mb(4 * b * t * v):,.0f} MiB")
  print(_common.markdown_table(["path", "chunk", "arguments MiB", "outputs MiB", "temporaries MiB", "peak MiB"], rows))
  print(f"max relative difference chunked vs plain (loss, grads; [2, 40, {d}], V=5000): {diff:.1e}")
  print(f"jax {jax.__version__}, backend {jax.default_backend()}; CPU: {cpu_flags()}; load {_common.load_average()}")


if __name__ == "__main__":
  main()
