"""Sparse top-k MoE feed-forward block: a router and E SwiGLU experts stacked as [experts, ...].

Four ways to run the experts (config `moe_dispatch` / `moe_impl`), all computing the same function
when nothing is dropped:
  * dropless "ragged": sort the (token, choice) pairs by expert, one grouped matmul per projection
    (`jax.lax.ragged_dot`), unsort and combine — k/E of the dense FLOPs; the default off CPU;
  * dropless "blocked": the same sort, each expert's rows padded to whole blocks and one batched
    matmul over blocks with per-block expert weights — plain matmuls, the default on CPU where
    ragged_dot is slow (bench/moe_layer.py);
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
    init = nn.initializers.normal(0.02)
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


def blocked_swiglu(x, experts_sorted, group_sizes, wg, wu, wd, *, block: int):
  """Grouped SwiGLU without ragged kernels: each expert's rows padded to whole blocks of `block`
  rows, every block multiplied by its own expert's weights in one batched matmul.

  x: [rows, hidden] sorted by expert (`experts_sorted` [rows]; a row of expert >= num_experts is
  skipped and gives zero) -> [rows, hidden]. The padding costs at most experts x block extra rows;
  gathering weights per block costs 1/block of the FLOPs.
  """
  rows, hidden = x.shape
  num_experts = group_sizes.shape[0]
  padded = (group_sizes + block - 1) // block * block
  pad_start = jnp.cumsum(padded) - padded  # [experts]
  start = jnp.cumsum(group_sizes) - group_sizes
  num_blocks = -(-(rows + num_experts * (block - 1)) // block)  # static upper bound
  owner = jnp.minimum(experts_sorted, num_experts - 1)
  dest = jnp.where(experts_sorted < num_experts,
                   pad_start[owner] + jnp.arange(rows) - start[owner], num_blocks * block)  # [rows]
  block_owner = jnp.searchsorted(jnp.cumsum(padded), jnp.arange(num_blocks) * block, side="right")
  block_owner = jnp.minimum(block_owner, num_experts - 1)
  xb = (jnp.zeros((num_blocks * block, hidden), x.dtype).at[dest].set(x, mode="drop")
        .reshape(num_blocks, block, hidden))
  h = (jax.nn.silu(jnp.einsum("nbh,nhi->nbi", xb, wg[block_owner]))
       * jnp.einsum("nbh,nhi->nbi", xb, wu[block_owner]))
  out = jnp.einsum("nbi,nih->nbh", h, wd[block_owner]).reshape(num_blocks * block, hidden)
  return out.at[dest].get(mode="fill", fill_value=0)


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
