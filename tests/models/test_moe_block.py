"""The MoE block: every dispatch path against a per-token plain-loop reference; drops; gradients."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llavamod_jax.models.configs import TextConfig
from llavamod_jax.models.moe_block import MoeBlock
from moe_reference import reference_block


def _cfg(**kw):
  base = dict(hidden_size=16, intermediate_size=24, num_layers=1, num_heads=2, num_kv_heads=1,
              vocab_size=32, num_experts=4, num_experts_per_tok=2, moe_layers=(0,))
  base.update(kw)
  return TextConfig(**base)


def _setup(cfg, tokens=(2, 9), seed=0):
  x = jnp.asarray(np.random.default_rng(seed).standard_normal(tokens + (cfg.hidden_size,)), jnp.float32)
  params = MoeBlock(cfg).init(jax.random.key(seed), x)["params"]
  return x, nn.unbox(params)


IMPLS = {"dense": dict(moe_impl="dense"), "ragged": dict(moe_impl="ragged"),
         "blocked": dict(moe_impl="blocked", moe_block_size=4), "capacity": dict(moe_dispatch="capacity")}


@pytest.mark.parametrize("options", list(IMPLS.values()), ids=list(IMPLS))
@pytest.mark.parametrize("k,experts", [(2, 4), (1, 4), (2, 8)])
def test_matches_plain_loop_when_nothing_dropped(options, k, experts):
  cfg = _cfg(num_experts=experts, num_experts_per_tok=k, eval_capacity_factor=float(experts), **options)
  x, params = _setup(cfg)
  out = MoeBlock(cfg).apply({"params": params}, x)
  want, _, kept = reference_block(np.asarray(x), params, k)
  assert kept.all()
  np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("factor", [0.5, 0.75, 1.5])
def test_capacity_drops_like_the_original(factor):
  cfg = _cfg(moe_dispatch="capacity", capacity_factor=factor)
  x, params = _setup(cfg, tokens=(3, 11), seed=1)
  out, state = MoeBlock(cfg).apply({"params": params}, x, True, mutable=["moe"])
  capacity = int(np.ceil(33 / 4 * factor * 2))
  want, _, kept = reference_block(np.asarray(x), params, 2, capacity=capacity)
  if factor < 1:
    assert (~kept).any()
  np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)
  dropped = float(state["moe"]["fraction_dropped"][0])
  assert dropped == pytest.approx(1 - kept.mean())
  # At evaluation the capacity factor is the (larger) eval one: with 4 experts top-2, nothing drops.
  _, st = MoeBlock(cfg).apply({"params": params}, x, False, mutable=["moe"])
  assert float(st["moe"]["fraction_dropped"][0]) == 0.0


def test_unnormalised_weights_option():
  cfg = _cfg(norm_topk_prob=False, moe_impl="dense")
  x, params = _setup(cfg, seed=2)
  want, _, _ = reference_block(np.asarray(x), params, 2, normalize=False)
  np.testing.assert_allclose(MoeBlock(cfg).apply({"params": params}, x), want, rtol=1e-5, atol=1e-5)


def test_gumbel_router_noise_needs_and_uses_an_rng():
  cfg = _cfg(router_noise="gumbel", moe_impl="dense")
  x, params = _setup(cfg, tokens=(4, 16), seed=3)
  with pytest.raises(Exception, match="router"):
    MoeBlock(cfg).apply({"params": params}, x)
  a = MoeBlock(cfg).apply({"params": params}, x, rngs={"router": jax.random.key(1)})
  b = MoeBlock(cfg).apply({"params": params}, x, rngs={"router": jax.random.key(2)})
  clean = MoeBlock(_cfg(moe_impl="dense")).apply({"params": params}, x)
  assert not np.allclose(a, b) and not np.allclose(a, clean)


@pytest.mark.parametrize("options", list(IMPLS.values()), ids=list(IMPLS))
def test_gradients_reach_router_and_every_expert(options):
  cfg = _cfg(**options)
  x, params = _setup(cfg, tokens=(4, 16), seed=4)

  def loss(p):
    out, state = MoeBlock(cfg).apply({"params": p}, x, True, mutable=["moe"])
    return jnp.mean(out ** 2) + 0.01 * state["moe"]["load_balancing_loss"][0]

  g = jax.grad(loss)(params)
  assert float(jnp.abs(g["router"]).sum()) > 0
  for name, w in g["experts"].items():
    per_expert = jnp.abs(w).reshape(cfg.num_experts, -1).sum(-1)
    assert (per_expert > 0).all(), name


def test_load_balancing_loss_gradient_matches_finite_differences():
  cfg = _cfg(moe_impl="dense")
  x, params = _setup(cfg, seed=5)

  def lb(router):
    p = {**params, "router": router}
    return MoeBlock(cfg).apply({"params": p}, x, mutable=["moe"])[1]["moe"]["load_balancing_loss"][0]

  r = params["router"]
  g = jax.grad(lb)(r)
  d = np.random.default_rng(0).standard_normal(r.shape).astype(np.float32)
  eps = 1e-2
  fd = (lb(r + eps * d) - lb(r - eps * d)) / (2 * eps)
  assert float(jnp.sum(g * d)) == pytest.approx(float(fd), rel=2e-2, abs=1e-4)


@pytest.mark.parametrize("block", [1, 3, 64])
def test_blocked_kernel_any_block_size(block):
  cfg = _cfg(num_experts=5, moe_impl="blocked", moe_block_size=block)
  x, params = _setup(cfg, tokens=(2, 13), seed=6)
  want, _, _ = reference_block(np.asarray(x), params, 2)
  np.testing.assert_allclose(MoeBlock(cfg).apply({"params": params}, x), want, rtol=1e-5, atol=1e-5)
