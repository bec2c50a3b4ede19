"""MoE layer cost: dropless (dense / ragged kernels) and capacity dispatch vs a dense FFN of the same
active FLOPs (a SwiGLU with k x the expert width), forward + backward, timed interleaved in one run.

    python bench/moe_layer.py [--quick] [--tokens 2048] [--hidden 256] [--inter 512]

Prints a markdown table of median times and ratios to the dense-equivalent FFN.
"""

from __future__ import annotations

import argparse
import statistics
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from llavamod_jax.models.configs import TextConfig
from llavamod_jax.models.llm import MLP
from llavamod_jax.models.moe_block import MoeBlock

VARIANTS = {
    "dropless-dense": dict(moe_impl="dense"),
    "dropless-ragged": dict(moe_impl="ragged"),
    "dropless-blocked": dict(moe_impl="blocked"),
    "capacity-1.5": dict(moe_dispatch="capacity", capacity_factor=1.5),
}


def _train_fn(module, x, train_kw):
  params = nn.unbox(module.init(jax.random.key(0), x, **train_kw)["params"])

  @jax.jit
  def step(p, x):
    def loss(p):
      out = module.apply({"params": p}, x, **train_kw, mutable=["moe"])
      out = out[0] if isinstance(out, tuple) else out
      return jnp.mean(out.astype(jnp.float32) ** 2)
    return jax.grad(loss)(p)

  return lambda: jax.block_until_ready(step(params, x))


def run(tokens: int, hidden: int, inter: int, experts: int, k: int, repeats: int) -> dict[str, float]:
  x = jnp.asarray(np.random.default_rng(0).standard_normal((1, tokens, hidden)), jnp.float32)
  base = dict(hidden_size=hidden, intermediate_size=inter, num_layers=1, num_heads=4, num_kv_heads=4,
              vocab_size=8, num_experts=experts, num_experts_per_tok=k, moe_layers=(0,))
  fns = {"dense-ffn (k x width)": _train_fn(MLP(TextConfig(**base), intermediate_size=k * inter), x, {})}
  for name, opts in VARIANTS.items():
    fns[name] = _train_fn(MoeBlock(TextConfig(**base, **opts)), x, {"train": True})
  for f in fns.values():  # compile + warm up
    f()
    f()
  times = {n: [] for n in fns}
  for _ in range(repeats):  # interleaved, so machine noise hits every variant alike
    for n, f in fns.items():
      t0 = time.perf_counter()
      f()
      times[n].append(time.perf_counter() - t0)
  return {n: statistics.median(t) for n, t in times.items()}


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--quick", action="store_true")
  ap.add_argument("--tokens", type=int, default=2048)
  ap.add_argument("--hidden", type=int, default=256)
  ap.add_argument("--inter", type=int, default=512)
  args = ap.parse_args()
  repeats = 5 if args.quick else 15
  grid = [(4, 2)] if args.quick else [(4, 1), (4, 2), (8, 1), (8, 2)]
  print(f"backend {jax.default_backend()}, {jax.device_count()} device(s); tokens {args.tokens}, "
        f"hidden {args.hidden}, expert width {args.inter}; forward+backward, median of {repeats}")
  print()
  print("| E | k | variant | ms | x dense-equivalent FFN |")
  print("|---|---|---|---|---|")
  for experts, k in grid:
    t = run(args.tokens, args.hidden, args.inter, experts, k, repeats)
    ref = t["dense-ffn (k x width)"]
    for name, v in t.items():
      print(f"| {experts} | {k} | {name} | {1e3 * v:.2f} | {v / ref:.2f} |")


if __name__ == "__main__":
  main()
