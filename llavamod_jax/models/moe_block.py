"""Sparse top-k MoE feed-forward block: a router and E SwiGLU experts stacked as [experts, ...].

Four ways to run the experts (config `moe_dispatch` / `moe_impl`), all computing the same function
when nothing is dropped:
  * dropless "ragged": sort the (token, choice) pairs by expert, one grouped matmul per projection
    (`jax.lax.ragged_dot`), unsort and combine — k/E of the dense FLOPs; the default off CPU;
  * dropless "blocked": the same sort, then a loop over the experts and over the blocks of
    `moe_block_size` rows holding each expert's rows -- plain matmuls whose count follows the
    routing, with a custom backward pass; the default on CPU, where ragged_dot is slow
    (bench/moe_layer.py);
  * dropless "dense": every expert on every token, combined with the (mostly zero) routing weights —
    E/k x the FLOPs; a simple reference;
  * "capacity": [experts, capacity] slot buffers as in GShard, with the original's capacity factor
    (train/eval), top-1 priority and token dropping; filled by scatter and read by gather.

Under a context mesh (`jax.set_mesh`; the train/eval steps enter their arguments' mesh) whose
`expert` axis is > 1, dropless ragged/blocked dispatch runs expert-parallel: token rows go to their
experts' devices by all-to-all inside `shard_map` (models/expert_parallel.py; config
`moe_expert_parallel`: auto | all_to_all | gspmd). Routing and the sown statistics are the same
global computation either way.

Aux losses and per-layer metrics are sown into the "moe" collection (apply with mutable=["moe"]);
`llavamod_jax.moe.collect` gathers them.
"""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from llavamod_jax.models import expert_parallel, routing
from llavamod_jax.models.configs import TextConfig, to_dtype


def router_init(key, shape, dtype=jnp.float32):
  """torch.nn.Linear's default init, U(-1/sqrt(in), 1/sqrt(in)), as the original's fresh router."""
  bound = 1.0 / math.sqrt(shape[0])
  return jax.random.uniform(key, shape, dtype, -bound, bound)


class Experts(nn.Module):
  """E SwiGLU FFNs; kernels [experts, in, out] with the expert axis first (sharded over `expert`)."""

  cfg: TextConfig

  def setup(self):
    cfg = self.cfg
    pdtype = to_dtype(cfg.param_dtype)
    e, h, i = cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size or cfg.intermediate_size
    init = nn.initializers.normal(cfg.initializer_range)
    self.gate_proj = self.param("gate_proj", nn.with_logical_partitioning(init, ("expert", "embed", "mlp")),
                                (e, h, i), pdtype)
    self.up_proj = self.param("up_proj", nn.with_logical_partitioning(init, ("expert", "embed", "mlp")),
                              (e, h, i), pdtype)
    self.down_proj = self.param("down_proj", nn.with_logical_partitioning(init, ("expert", "mlp", "embed")),
                                (e, i, h), pdtype)

  def weights(self):
    dtype = to_dtype(self.cfg.dtype)
    return self.gate_proj.astype(dtype), self.up_proj.astype(dtype), self.down_proj.astype(dtype)

  def __call__(self, x):
    """x: [experts, slots, hidden] -> [experts, slots, hidden] (batched over experts)."""
    wg, wu, wd = self.weights()
    h = jax.nn.silu(jnp.einsum("esh,ehi->esi", x, wg)) * jnp.einsum("esh,ehi->esi", x, wu)
    return jnp.einsum("esi,eih->esh", h, wd)

  def every_token(self, x):
    """x: [tokens, hidden] -> [experts, tokens, hidden]: each expert on every token."""
    wg, wu, wd = self.weights()
    h = jax.nn.silu(jnp.einsum("th,ehi->eti", x, wg)) * jnp.einsum("th,ehi->eti", x, wu)
    return jnp.einsum("eti,eih->eth", h, wd)


def _blocks(group_sizes, block: int):
  """Per expert: the first sorted row and the number of `block`-row blocks covering its rows."""
  starts = jnp.cumsum(group_sizes) - group_sizes
  return starts, (group_sizes + block - 1) // block


def _vma(x) -> frozenset:
  return jax.typeof(x).manual_axis_type.varying


def _varying_like(x, ref):
  """`x` marked as varying over the manual mesh axes `ref` varies over (inside `shard_map`, a loop's
  carry must have its body's type); a no-op outside."""
  axes = tuple(sorted(_vma(ref) - _vma(x)))
  return jax.lax.pcast(x, axes, to="varying") if axes else x


def _summed_like(grad, ref):
  """The gradient of an input that varies over fewer manual axes than its uses (expert weights
  shared by a device's token rows): summed over the extra axes, as autodiff of the implicit
  broadcast would."""
  axes = tuple(sorted(_vma(grad) - _vma(ref)))
  return jax.lax.psum(grad, axes) if axes else grad


def _blocked_forward(x, group_sizes, wg, wu, wd, block: int):
  """(out [rows, hidden], gate and up pre-activations [rows + block, inter] for the backward pass)."""
  rows, hidden = x.shape
  inter = wg.shape[2]
  starts, num_blocks = _blocks(group_sizes, block)
  xp = jnp.pad(x, ((0, block), (0, 0)))  # a last block may run past the rows
  zeros = lambda width: _varying_like(jnp.zeros((rows + block, width), x.dtype), x)

  def expert(e, carry):
    wge, wue, wde = wg[e], wu[e], wd[e]

    def one_block(j, carry):
      out, gate, up = carry
      r0 = starts[e] + j * block
      xb = jax.lax.dynamic_slice_in_dim(xp, r0, block)
      a, u = xb @ wge, xb @ wue
      y = (jax.nn.silu(a) * u) @ wde
      # The block's rows past this expert's belong to later experts (or to none): overwritten by
      # them, or zeroed below.
      put = lambda buf, v: jax.lax.dynamic_update_slice_in_dim(buf, v, r0, 0)
      return put(out, y), put(gate, a), put(up, u)

    return jax.lax.fori_loop(0, num_blocks[e], one_block, carry)

  out, gate, up = jax.lax.fori_loop(0, wg.shape[0], expert, (zeros(hidden), zeros(inter), zeros(inter)))
  routed = (jnp.arange(rows) < jnp.sum(group_sizes))[:, None]
  return jnp.where(routed, out[:rows], 0), (gate, up)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _blocked(x, group_sizes, wg, wu, wd, block):
  return _blocked_forward(x, group_sizes, wg, wu, wd, block)[0]


def _blocked_fwd(x, group_sizes, wg, wu, wd, block):
  out, (gate, up) = _blocked_forward(x, group_sizes, wg, wu, wd, block)
  return out, (x, group_sizes, wg, wu, wd, gate, up)


def _blocked_bwd(block, res, dout):
  """The same loop backwards: each block's input gradient, and its expert's weight gradients summed
  in the loop (fp32) -- no per-block weight copies, no scatter-add."""
  x, group_sizes, wg, wu, wd, gate, up = res
  rows, hidden = x.shape
  starts, num_blocks = _blocks(group_sizes, block)
  xp = jnp.pad(x, ((0, block), (0, 0)))
  dp = jnp.pad(dout, ((0, block), (0, 0)))
  f32 = jnp.float32

  def expert(e, carry):
    dx, dwg, dwu, dwd = carry
    wge, wue, wde = wg[e], wu[e], wd[e]

    def one_block(j, carry):
      dx, gg, gu, gd = carry
      r0 = starts[e] + j * block
      take = lambda buf: jax.lax.dynamic_slice_in_dim(buf, r0, block)
      mine = (j * block + jnp.arange(block) < group_sizes[e])[:, None]
      xb, a, u = take(xp), take(gate), take(up)
      dy = jnp.where(mine, take(dp), 0)  # rows of later experts add nothing to this one's weights
      sig = jax.nn.sigmoid(a)
      silu = a * sig
      gd = gd + jnp.dot((silu * u).T, dy, preferred_element_type=f32)
      dh = dy @ wde.T
      da = dh * u * sig * (1 + a * (1 - sig))
      du = dh * silu
      gg = gg + jnp.dot(xb.T, da, preferred_element_type=f32)
      gu = gu + jnp.dot(xb.T, du, preferred_element_type=f32)
      dxb = da @ wge.T + du @ wue.T
      return jax.lax.dynamic_update_slice_in_dim(dx, dxb, r0, 0), gg, gu, gd

    acc = lambda w: _varying_like(jnp.zeros(w.shape[1:], f32), x)
    dx, gg, gu, gd = jax.lax.fori_loop(0, num_blocks[e], one_block, (dx, acc(wg), acc(wu), acc(wd)))
    return (dx, dwg.at[e].set(gg.astype(wg.dtype)), dwu.at[e].set(gu.astype(wu.dtype)),
            dwd.at[e].set(gd.astype(wd.dtype)))

  init = tuple(_varying_like(jnp.zeros(shape, dtype), x) for shape, dtype in
               (((rows + block, hidden), x.dtype), (wg.shape, wg.dtype), (wu.shape, wu.dtype),
                (wd.shape, wd.dtype)))
  dx, dwg, dwu, dwd = jax.lax.fori_loop(0, wg.shape[0], expert, init)
  routed = (jnp.arange(rows) < jnp.sum(group_sizes))[:, None]
  return (jnp.where(routed, dx[:rows], 0), None, _summed_like(dwg, wg), _summed_like(dwu, wu),
          _summed_like(dwd, wd))


_blocked.defvjp(_blocked_fwd, _blocked_bwd)


def blocked_swiglu(x, experts_sorted, group_sizes, wg, wu, wd, *, block: int):
  """Grouped SwiGLU from plain matmuls: a loop over the experts and, inside, over the blocks of
  `block` sorted rows that hold each one's rows.

  x: [rows, hidden] sorted by expert, group_sizes [experts] -> [rows, hidden]; rows past the groups
  give zero. (`experts_sorted` is unused; the signature matches `ragged_swiglu`'s.) The loops' trip
  counts are the routing's own block counts, so the work is the routed rows plus at most one partial
  block per expert -- not a static worst case -- and each expert's weights are read in place
  (bench/moe_layer.py). A custom VJP runs the same loops backwards.
  """
  del experts_sorted
  return _blocked(x, group_sizes, wg, wu, wd, block)


def ragged_swiglu(x, experts_sorted, group_sizes, wg, wu, wd):
  """x: [rows, hidden] sorted by expert, group_sizes [experts] -> [rows, hidden]; rows past the
  groups give zero. (`experts_sorted` is unused; the signature matches `blocked_swiglu`'s.)"""
  del experts_sorted
  h = (jax.nn.silu(jax.lax.ragged_dot(x, wg, group_sizes))
       * jax.lax.ragged_dot(x, wu, group_sizes))
  return jax.lax.ragged_dot(h, wd, group_sizes)


def _impl(cfg: TextConfig) -> str:
  if cfg.moe_dispatch == "capacity":
    return "capacity"
  if cfg.moe_impl == "auto":  # measured in bench/moe_layer.py: ragged_dot is slow on CPU
    return "blocked" if jax.default_backend() == "cpu" else "ragged"
  return cfg.moe_impl


def _expert_mesh(cfg: TextConfig, impl: str):
  """The mesh to dispatch over by all-to-all (models/expert_parallel.py), or None: run locally and
  let GSPMD place the work."""
  mode = cfg.moe_expert_parallel
  if mode not in ("auto", "all_to_all", "gspmd"):
    raise ValueError(f"moe_expert_parallel must be 'auto', 'all_to_all' or 'gspmd', got {mode!r}")
  mesh = None if mode == "gspmd" else expert_parallel.expert_mesh()
  if mesh is not None and impl not in ("ragged", "blocked"):
    if mode == "all_to_all":
      raise ValueError(f"moe_expert_parallel='all_to_all' needs dropless dispatch with moe_impl "
                       f"ragged, blocked or auto; got moe_dispatch={cfg.moe_dispatch!r}, "
                       f"moe_impl={cfg.moe_impl!r}")
    return None
  return mesh


class MoeBlock(nn.Module):
  cfg: TextConfig

  @nn.compact
  def __call__(self, x, train: bool = False):
    cfg = self.cfg
    dtype = to_dtype(cfg.dtype)
    b, s, h = x.shape
    tokens = x.reshape(b * s, h)
    e, k = cfg.num_experts, cfg.num_experts_per_tok
    kernel = self.param("router", nn.with_logical_partitioning(router_init, ("embed", None)), (h, e),
                        to_dtype(cfg.param_dtype))
    # The router runs in fp32 whatever the compute dtype (as DeepSpeed's gate does).
    logits = jnp.dot(tokens.astype(jnp.float32), kernel.astype(jnp.float32))  # [tokens, experts]
    noise = (routing.gumbel_noise(self.make_rng("router"), logits.shape)
             if cfg.router_noise == "gumbel" else None)
    experts = Experts(cfg, name="experts")
    impl = _impl(cfg)
    mesh = _expert_mesh(cfg, impl)

    if impl == "capacity":
      factor = cfg.capacity_factor if train else cfg.eval_capacity_factor
      capacity = routing.expert_capacity(b * s, e, k, factor, cfg.min_capacity)
      r = routing.route_with_capacity(logits, k, capacity, noise=noise)
      # Each kept (token, choice) owns a unique (expert, slot); a dropped one points past the end and
      # is discarded by the scatter and read back as zero. Same result as GShard's one-hot dispatch
      # and combine einsums, without their tokens x experts x capacity tensors (quadratic in tokens).
      slot = jnp.where(r.kept, r.positions, capacity)
      rows = jnp.broadcast_to(tokens.astype(dtype)[:, None], (b * s, k, h))
      buffer = jnp.zeros((e, capacity, h), dtype).at[r.experts, slot].set(rows, mode="drop")
      expert_out = experts(buffer)  # [experts, capacity, hidden]
      picked = expert_out.at[r.experts, slot].get(mode="fill", fill_value=0)  # [tokens, k, hidden]
      out = jnp.einsum("tkh,tk->th", picked, r.weights.astype(dtype))
    else:
      r = routing.route_dropless(logits, k, normalize=cfg.norm_topk_prob, noise=noise)
      if impl == "dense":
        combine = jnp.sum(jax.nn.one_hot(r.experts, e, dtype=jnp.float32) * r.weights[..., None], 1)
        expert_out = experts.every_token(tokens.astype(dtype))  # [E, T, H]
        out = jnp.einsum("te,eth->th", combine.astype(dtype), expert_out)
      elif impl in ("ragged", "blocked"):
        local = (ragged_swiglu if impl == "ragged" else
                 functools.partial(blocked_swiglu, block=cfg.moe_block_size))
        if mesh is not None:
          out = expert_parallel.dispatch(tokens.astype(dtype), r.experts, r.weights,
                                         *experts.weights(), mesh=mesh, local_experts=local)
        else:
          flat = r.experts.reshape(-1)  # [T * k]
          order = jnp.argsort(flat, stable=True)
          group_sizes = jnp.bincount(flat, length=e).astype(jnp.int32)
          rows = local(tokens.astype(dtype)[order // k], flat[order], group_sizes, *experts.weights())
          unsorted = jnp.zeros_like(rows).at[order].set(rows).reshape(b * s, k, h)
          out = jnp.einsum("tkh,tk->th", unsorted, r.weights.astype(dtype))
      else:
        raise ValueError(f"moe_impl must be 'auto', 'dense', 'ragged' or 'blocked', "
                         f"got {cfg.moe_impl!r}")

    self.sow("moe", "load_balancing_loss", routing.load_balancing_loss(r))
    self.sow("moe", "z_loss", routing.z_loss(logits))
    for name, value in routing.metrics(r).items():
      self.sow("moe", name, value)
    return out.reshape(b, s, h).astype(dtype)
