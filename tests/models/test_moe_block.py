"""The MoE block: every dispatch path against a per-token plain-loop reference; drops; gradients."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llavamod_jax.models.configs import TextConfig
from llavamod_jax.models.moe_block import MoeBlock, blocked_swiglu
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


def _per_row_swiglu(x, group_sizes, wg, wu, wd):
  """Reference for the grouped kernels: each sorted row through its own expert's weights (gathered
  per row, differentiated by plain autodiff); rows past the groups give zero."""
  rows = x.shape[0]
  bounds = jnp.cumsum(group_sizes)
  expert = jnp.searchsorted(bounds, jnp.arange(rows), side="right")
  routed = expert < group_sizes.shape[0]
  e = jnp.minimum(expert, group_sizes.shape[0] - 1)
  h = jax.nn.silu(jnp.einsum("rh,rhi->ri", x, wg[e])) * jnp.einsum("rh,rhi->ri", x, wu[e])
  return jnp.where(routed[:, None], jnp.einsum("ri,rih->rh", h, wd[e]), 0)


@pytest.mark.parametrize("group_sizes,block", [
    ((5, 0, 7, 3), 4),   # an expert without rows; rows not a multiple of the block
    ((0, 15, 0, 0), 4),  # every row to one expert
    ((1, 1, 1, 1), 8),   # a block much larger than any group
    ((6, 2, 0, 4), 1),   # one row per block
    ((3, 4, 2, 1), 3),   # 10 routed rows of 15: the last five (dropped / padding rows) give zero
])
def test_blocked_kernel_values_and_gradients(group_sizes, block):
  rng = np.random.default_rng(7)
  rows, hidden, inter = 15, 6, 10
  gs = jnp.asarray(group_sizes, jnp.int32)
  x, dout = (jnp.asarray(rng.standard_normal((rows, hidden)), jnp.float32) for _ in range(2))
  w = [jnp.asarray(0.5 * rng.standard_normal(s), jnp.float32) for s in
       ((4, hidden, inter), (4, hidden, inter), (4, inter, hidden))]
  experts_sorted = jnp.repeat(jnp.arange(5), jnp.asarray(group_sizes + (rows - sum(group_sizes),)),
                              total_repeat_length=rows)
  kernel = functools.partial(blocked_swiglu, experts_sorted=experts_sorted, block=block)

  def loss(f, x, *w):
    return jnp.sum(f(x, group_sizes=gs, wg=w[0], wu=w[1], wd=w[2]) * dout)

  got = jax.jit(kernel)(x, group_sizes=gs, wg=w[0], wu=w[1], wd=w[2])
  want = _per_row_swiglu(x, gs, *w)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  g_got = jax.jit(jax.grad(functools.partial(loss, kernel), argnums=(0, 1, 2, 3)))(x, *w)
  g_want = jax.grad(functools.partial(loss, _per_row_swiglu), argnums=(0, 1, 2, 3))(x, *w)
  for name, a, b in zip(("x", "gate", "up", "down"), g_got, g_want):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5, err_msg=name)
  # An expert without rows gets an exactly zero weight gradient.
  for e, size in enumerate(group_sizes):
    if size == 0:
      assert all(float(jnp.abs(g[e]).max()) == 0 for g in g_got[1:])


def test_blocked_kernel_gradients_through_the_block_match_dense_dispatch():
  """The whole block (routing, sort, kernel, combine) differentiated: blocked equals dense."""
  grads = {}
  for impl in ("dense", "blocked"):
    cfg = _cfg(num_experts=4, num_experts_per_tok=1, moe_impl=impl, moe_block_size=4)
    x, params = _setup(cfg, tokens=(2, 11), seed=8)

    def loss(p, x, cfg=cfg):
      out, state = MoeBlock(cfg).apply({"params": p}, x, True, mutable=["moe"])
      return jnp.sum(jnp.sin(out)) + state["moe"]["load_balancing_loss"][0]

    grads[impl] = jax.grad(loss, argnums=(0, 1))(params, x)
  for a, b in zip(jax.tree.leaves(grads["blocked"]), jax.tree.leaves(grads["dense"])):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
