"""Expert-parallel all-to-all dispatch on 8 simulated CPU devices: output, gradients and the sown aux
losses/metrics equal the single-device dropless block (tests/test_sharding.py runs a whole mimic
step this way). Runs in a subprocess because the device count is fixed when jax starts."""

import json
import os
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(r'''
    import json
    import flax.linen as nn
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from llavamod_jax import sharding
    from llavamod_jax.models.configs import TextConfig
    from llavamod_jax.models.moe_block import MoeBlock

    AXES = ("data", "fsdp", "expert", "tensor")
    mesh_of = lambda shape: Mesh(np.asarray(jax.devices()).reshape(shape), AXES)  # noqa: E731

    def rel(a, b):
      a, b = np.asarray(a), np.asarray(b)
      return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-8))

    worst = lambda a, b: max(rel(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))  # noqa
    out = {}

    def block_cfg(**opts):
      base = dict(hidden_size=16, intermediate_size=24, num_layers=1, num_heads=2, num_kv_heads=1,
                  vocab_size=32, num_experts=4, num_experts_per_tok=2, moe_layers=(0,))
      return TextConfig(**{**base, **opts})

    def block_case(name, mesh_shape, tokens, **opts):
      block = MoeBlock(block_cfg(**opts))
      x = jnp.asarray(np.random.default_rng(0).standard_normal(tokens + (16,)), jnp.float32)
      boxed = jax.jit(block.init)(jax.random.key(0), x)["params"]
      params = nn.unbox(boxed)

      def loss(p, x):
        y, state = block.apply({"params": p}, x, True, mutable=["moe"])
        return jnp.sum(y * jnp.cos(y)) + state["moe"]["load_balancing_loss"][0], (y, state["moe"])
      f = jax.jit(jax.value_and_grad(loss, has_aux=True, argnums=(0, 1)))
      (l1, (y1, s1)), g1 = f(params, x)
      mesh = mesh_of(mesh_shape)
      p = jax.tree.map(jax.device_put, params, sharding.param_shardings(boxed, mesh))
      xs = jax.device_put(x, NamedSharding(mesh, P(("data", "fsdp"))))
      with jax.set_mesh(mesh):
        (l, (y, s)), g = f(p, xs)
        hlo = f.lower(p, xs).as_text()
      assert set(s) == set(s1) == {"load_balancing_loss", "z_loss", "tokens_per_expert",
                                   "fraction_dropped", "router_entropy"}, sorted(s)
      out[name] = {"loss": rel(l, l1), "out": rel(y, y1), "grads": worst(g, g1), "aux": worst(s, s1),
                   "all_to_all": "all_to_all" in hlo}

    # 36 tokens on 8 devices: padding rows; one expert per device.
    block_case("blocked_expert8", (1, 1, 8, 1), (4, 9), num_experts=8, moe_impl="blocked",
               moe_block_size=4)
    block_case("blocked_data2_expert4", (2, 1, 4, 1), (4, 8), moe_impl="blocked", moe_block_size=4)
    # Two experts per device, top-1; the experts' fsdp and tensor shards are gathered inside.
    block_case("ragged_top1_fsdp2_expert2_tensor2", (1, 2, 2, 2), (2, 8), moe_impl="ragged",
               num_experts_per_tok=1)
    # A scanned LM (MoE in every other layer): the all-to-all runs inside the scan body, and the
    # sharded scanned model equals the unrolled one on one device.
    from llavamod_jax import models, moe
    from llavamod_jax.models import scan
    lm_cfg = block_cfg(num_layers=4, moe_layers=(0, 2), moe_impl="ragged")
    lm = models.build(lm_cfg)
    lm_params = models.init_params(lm, 0)
    ids = jnp.asarray(np.random.default_rng(1).integers(0, 32, (4, 6)))

    def lm_loss(m):
      def fn(p):
        o, st = m.apply({"params": p}, ids, mutable=["moe"], train=True)
        return jnp.mean(o.logits ** 2) + moe.aux_losses(st["moe"])["load_balancing_loss"]
      return jax.jit(jax.value_and_grad(fn))
    l1, g1 = lm_loss(lm)(lm_params)
    slm = models.build(lm_cfg.replace(scan_layers=True))
    mesh = mesh_of((2, 1, 4, 1))
    sp = jax.tree.map(jax.device_put, scan.relayout(lm_params, slm.cfg),
                      sharding.param_shardings(models.abstract_params(slm), mesh))
    with jax.set_mesh(mesh):
      l, g = lm_loss(slm)(sp)
      hlo = lm_loss(slm).lower(sp).as_text()
    out["lm_scanned_expert4"] = {"loss": rel(l, l1), "out": 0.0, "aux": 0.0,
                                 "grads": worst(scan.relayout(g, lm_cfg), g1),
                                 "all_to_all": "all_to_all" in hlo}

    # Traced only: GSPMD on request (no all-to-all), and errors a user can act on.
    x = jax.ShapeDtypeStruct((2, 8, 16), jnp.float32)
    traced = {}
    for name, opts in {"gspmd": dict(moe_expert_parallel="gspmd"),
                       "capacity": dict(moe_dispatch="capacity", moe_expert_parallel="all_to_all"),
                       "indivisible": dict(num_experts=6)}.items():
      block = MoeBlock(block_cfg(**opts))
      try:
        with jax.set_mesh(mesh_of((2, 1, 4, 1))):
          traced[name] = "all_to_all" in jax.jit(block.init).lower(jax.random.key(0), x).as_text()
      except ValueError as e:
        traced[name] = str(e)
    out["traced"] = traced

    print("RESULT" + json.dumps(out))
''')


def test_all_to_all_dispatch_matches_one_device():
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
  p = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True,
                     timeout=600)
  assert p.returncode == 0, p.stderr[-4000:]
  out = json.loads(p.stdout.split("RESULT", 1)[1])
  traced = out.pop("traced")
  for name, r in out.items():
    assert max(r["loss"], r["out"], r["grads"], r["aux"]) < 1e-4, (name, r)
    assert r["all_to_all"], name
  assert traced["gspmd"] is False
  assert "moe_expert_parallel='all_to_all' needs dropless dispatch" in traced["capacity"]
  assert "num_experts=6 is not divisible by the mesh's expert axis (4)" in traced["indivisible"]
