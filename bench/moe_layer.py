"""MoE layer cost: dropless (dense / ragged / blocked kernels) and capacity dispatch vs a dense FFN of
the same active FLOPs (a SwiGLU with k x the expert width), forward + backward, timed interleaved.

    python bench/moe_layer.py [--quick] [--tokens 2048] [--hidden 256] [--inter 512]

Prints a markdown table of median times and ratios to the dense-equivalent FFN.
"""

from __future__ import annotations

import argparse
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import benchutil as bu
from llavamod_jax.models.configs import TextConfig
from llavamod_jax.models.llm import MLP
from llavamod_jax.models.moe_block import MoeBlock


REFERENCE = "dense-equivalent FFN"
VARIANTS = {
    "dropless-dense": dict(moe_impl="dense"),
    "dropless-ragged": dict(moe_impl="ragged"),
    "dropless-blocked": dict(moe_impl="blocked"),
    "dropless-blocked-64": dict(moe_impl="blocked", moe_block_size=64),
    "capacity-1.5": dict(moe_dispatch="capacity", capacity_factor=1.5),
}


def _train_fn(module, x, train_kw):
  params = nn.unbox(jax.jit(lambda: module.init(jax.random.key(0), x, **train_kw))()["params"])

  # Gradients of the parameters and of the input: inside a model a layer's input gradient is always
  # needed (the layers below), and without it XLA would drop the reference's input-gradient matmuls.
  @jax.jit
  def step(p, x):
    def loss(p, x):
      out = module.apply({"params": p}, x, **train_kw, mutable=["moe"])
      out = out[0] if isinstance(out, tuple) else out
      return jnp.mean(out.astype(jnp.float32) ** 2)
    return jax.grad(loss, argnums=(0, 1))(p, x)

  return lambda: jax.block_until_ready(step(params, x))


def time_grid(tokens: int, hidden: int, inter: int, experts: int, k: int, repeats: int,
              variants=tuple(VARIANTS)) -> dict[str, float]:
  """Median seconds of forward + backward of each variant at one (experts, k)."""
  x = jnp.asarray(np.random.default_rng(0).standard_normal((1, tokens, hidden)), jnp.float32)
  base = dict(hidden_size=hidden, intermediate_size=inter, num_layers=1, num_heads=4, num_kv_heads=4,
              vocab_size=8, num_experts=experts, num_experts_per_tok=k, moe_layers=(0,))
  fns = {REFERENCE: _train_fn(MLP(TextConfig(**base), intermediate_size=k * inter), x, {})}
  for name in variants:
    opts = VARIANTS[name]
    if opts.get("moe_block_size", 0) >= tokens:
      continue
    fns[name] = _train_fn(MoeBlock(TextConfig(**base, **opts)), x, {"train": True})
  times = bu.interleaved(fns, repeats, warmup=2)
  return {n: bu.median(t) for n, t in times.items()}


def run(profile: bu.Profile, log=print) -> dict:
  p = profile
  rows = []
  for experts, k in p.moe_grid:
    t = time_grid(p.moe_tokens, p.moe_hidden, p.moe_inter, experts, k, p.moe_repeats, p.moe_variants)
    ref = t[REFERENCE]
    rows.append({"experts": experts, "k": k, "ref_s": ref, "ratios": {n: v / ref for n, v in t.items()}})
    log(f"  E={experts} k={k}: " + ", ".join(f"{n} x{v / ref:.2f}" for n, v in t.items() if n != REFERENCE))
  return {"tokens": p.moe_tokens, "hidden": p.moe_hidden, "inter": p.moe_inter, "repeats": p.moe_repeats,
          "rows": rows, "default": "dropless-blocked"}


def markdown(res: dict) -> str:
  names = [n for n in res["rows"][0]["ratios"] if n != REFERENCE]
  lines = [
      f"Forward + backward (gradients of the parameters and of the input) of one MoE block, {res['tokens']:,} tokens, hidden {res['hidden']}, expert "
      f"width {res['inter']}, median of {res['repeats']} interleaved runs. Reference: a SwiGLU FFN of "
      f"width k x {res['inter']} (the same active FLOPs per token); cells are time / reference. "
      "`dropless-blocked` (block 128) is the CPU default; `-64` is the same kernel with "
      "`moe_block_size=64`; `capacity-1.5` drops what overflows 1.5x the even share (the original's "
      "training setting).",
      "",
      "| E | k | dense-equivalent FFN | " + " | ".join(names) + " |",
      "|---|---|---|" + "---|" * len(names),
  ]
  for r in res["rows"]:
    cells = [f"**{r['ratios'][n]:.2f}**" if n == res["default"] else f"{r['ratios'].get(n, float('nan')):.2f}"
             for n in names]
    lines.append(f"| {r['experts']} | {r['k']} | 1.00 ({1e3 * r['ref_s']:.0f} ms) | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--quick", action="store_true")
  ap.add_argument("--tokens", type=int, default=None)
  ap.add_argument("--hidden", type=int, default=None)
  ap.add_argument("--inter", type=int, default=None)
  args = ap.parse_args()
  p = bu.QUICK if args.quick else bu.FULL
  p = dataclasses.replace(p, **{f"moe_{k}": v for k, v in
                                dict(tokens=args.tokens, hidden=args.hidden, inter=args.inter).items() if v})
  print(f"backend {jax.default_backend()}, {jax.device_count()} device(s)")
  print(markdown(run(p)))


if __name__ == "__main__":
  main()
