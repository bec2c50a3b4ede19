"""MoE layer on a (data, expert) mesh: expert-parallel all-to-all dropless dispatch vs GSPMD.

    python bench/expert_parallel.py [--quick]

Forward + backward of one MoE block (router, experts, aux loss), timed interleaved, on simulated CPU
devices (the script re-runs itself in a subprocess with XLA_FLAGS=--xla_force_host_platform_device_count
when jax has fewer devices):
  (a) `moe_expert_parallel="all_to_all"`: shard_map, all-to-all to the experts' devices, blocked
      grouped matmul per device, dropless (buffers sized for the worst case);
  (b) GSPMD capacity dispatch (`moe_dispatch="capacity"`, factor 1.5, tokens may drop);
  (c) GSPMD dropless blocked (`moe_expert_parallel="gspmd"`), the sort + grouped matmul of the
      single-device block with XLA choosing the communication.
Simulated CPU devices share the host's cores and "communicate" by memcpy, so the ratios say little
about TPU/GPU interconnects; they do show the extra rows the worst-case buffers compute.

`run(quick) -> dict` is the entry point for bench/run.py; `main()` prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

DEVICES = 8
VARIANTS = {
    "a2a-dropless": dict(moe_expert_parallel="all_to_all", moe_impl="blocked"),
    "gspmd-capacity-1.5": dict(moe_expert_parallel="gspmd", moe_dispatch="capacity",
                               capacity_factor=1.5),
    "gspmd-dropless": dict(moe_expert_parallel="gspmd", moe_impl="blocked"),
}
BASELINE = "gspmd-dropless"


def _settings(quick: bool) -> dict:
  if quick:
    return dict(mesh=(2, 4), batch=8, seq=128, hidden=128, inter=256, experts=8, k=2, repeats=5)
  return dict(mesh=(2, 4), batch=16, seq=256, hidden=256, inter=512, experts=8, k=2, repeats=15)


def _measure(s: dict) -> dict:
  """Runs in a process that has the simulated devices."""
  import flax.linen as nn
  import jax
  import jax.numpy as jnp
  import numpy as np
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

  from llavamod_jax import sharding
  from llavamod_jax.models.configs import TextConfig
  from llavamod_jax.models.moe_block import MoeBlock

  data, expert = s["mesh"]
  mesh = Mesh(np.asarray(jax.devices()[:data * expert]).reshape(data, 1, expert, 1),
              ("data", "fsdp", "expert", "tensor"))
  x = jax.device_put(
      jnp.asarray(np.random.default_rng(0).standard_normal((s["batch"], s["seq"], s["hidden"])),
                  jnp.float32), NamedSharding(mesh, P(("data", "fsdp"))))
  base = dict(hidden_size=s["hidden"], intermediate_size=s["inter"], num_layers=1, num_heads=4,
              num_kv_heads=4, vocab_size=8, num_experts=s["experts"], num_experts_per_tok=s["k"],
              moe_layers=(0,))

  def make(opts):
    block = MoeBlock(TextConfig(**base, **opts))
    boxed = block.init(jax.random.key(0), x)["params"]
    params = jax.tree.map(jax.device_put, nn.unbox(boxed), sharding.param_shardings(boxed, mesh))

    @jax.jit
    def step(p, x):
      def loss(p):
        out, state = block.apply({"params": p}, x, True, mutable=["moe"])
        return jnp.mean(out ** 2) + 0.01 * state["moe"]["load_balancing_loss"][0]
      return jax.grad(loss)(p)

    def call():
      with jax.set_mesh(mesh):
        jax.block_until_ready(step(params, x))
    return call

  fns = {name: make(opts) for name, opts in VARIANTS.items()}
  for f in fns.values():  # compile + warm up
    f()
    f()
  times = {n: [] for n in fns}
  for _ in range(s["repeats"]):  # interleaved, so machine noise hits every variant alike
    for n, f in fns.items():
      t0 = time.perf_counter()
      f()
      times[n].append(time.perf_counter() - t0)
  ms = {n: 1e3 * statistics.median(t) for n, t in times.items()}
  return {"backend": jax.default_backend(), "devices": data * expert, "settings": s, "ms": ms,
          "ratio": {n: v / ms[BASELINE] for n, v in ms.items()}}


def run(quick: bool = False) -> dict:
  """Median ms and ratio to GSPMD dropless of each variant; runs in a subprocess if jax has too few
  devices (the device count is fixed when jax starts)."""
  s = _settings(quick)
  import jax
  if jax.device_count() >= s["mesh"][0] * s["mesh"][1]:
    return _measure(s)
  env = {**os.environ, "JAX_PLATFORMS": "cpu",
         "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} "
                      f"--xla_force_host_platform_device_count={DEVICES}".strip()}
  p = subprocess.run([sys.executable, __file__, "--json"] + (["--quick"] if quick else []), env=env,
                     capture_output=True, text=True, check=False)
  if p.returncode:
    raise RuntimeError(f"bench/expert_parallel.py subprocess failed:\n{p.stderr[-4000:]}")
  return json.loads(p.stdout.strip().splitlines()[-1])


def table(result: dict) -> str:
  s = result["settings"]
  header = (f"{result['backend']}, {result['devices']} simulated devices, mesh (data {s['mesh'][0]}, "
            f"expert {s['mesh'][1]}); tokens {s['batch'] * s['seq']}, hidden {s['hidden']}, expert "
            f"width {s['inter']}, E {s['experts']}, k {s['k']}; forward+backward, median of "
            f"{s['repeats']} (simulated CPU devices: not representative of TPU/GPU)")
  lines = [header, "", f"| variant | ms | x {BASELINE} |", "|---|---|---|"]
  for name, ms in result["ms"].items():
    lines.append(f"| {name} | {ms:.2f} | {result['ratio'][name]:.2f} |")
  return "\n".join(lines)


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--quick", action="store_true")
  ap.add_argument("--json", action="store_true", help="print the result as one JSON line")
  args = ap.parse_args()
  if args.json:
    print(json.dumps(_measure(_settings(args.quick))))
  else:
    print(table(run(args.quick)))


if __name__ == "__main__":
  main()
