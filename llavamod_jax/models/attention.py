"""Softmax attention in three implementations, chosen by the config key `attention`.

    xla     the einsum: scores [batch, heads, q, k] in fp32, masked, softmaxed. Runs everywhere.
    cudnn   cuDNN flash attention (`jax.nn.dot_product_attention`): GPU, bf16/fp16.
    splash  the Pallas splash kernel: TPU, under `shard_map` (XLA cannot partition a Mosaic kernel).
    auto    cudnn on GPU where it applies, splash on TPU, xla otherwise (CPU).

The kernels never hold the [q, k] scores, so temporary memory grows with seq, not seq^2. They run
self-attention without a cache (q_len == kv_len) whose mask is causal and/or key padding; the
other calls (KV-cache decoding, the SigLIP probe, a dense [batch, q, k] mask) take xla, whatever
the key says. The platform is the mesh's (set by `sharding.rules_context`), so a CPU machine that
compiles for a TPU topology (`train/plan.py`) picks splash.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.extend.core import Primitive
from jax.interpreters import mlir
from jax.sharding import PartitionSpec as P

IMPLS = ("auto", "xla", "cudnn", "splash")
SPLASH_BLOCKS = (512, 256, 128)  # tile sizes tried, largest first; the lane width is 128


def attention(q, k, v, mask, dtype, impl: str = "xla", *, causal: bool = False, q_offset=0):
  """Grouped-query softmax attention, scores and softmax in fp32.

  q: [batch, q_len, heads, head_dim]; k, v: [batch, kv_len, kv_heads, head_dim].
  mask: None, bool [batch, kv_len] (valid keys) or bool [batch, q_len, kv_len] (any pattern).
  causal: query i sees key slots <= q_offset + i (q_offset: the cache slot of the first query).
  Returns [batch, q_len, heads * head_dim] in `dtype`.
  """
  impl, refused = resolve(impl, q, k, mask, dtype, q_offset)
  if refused:
    q = q + _off_platform(jnp.zeros((), q.dtype), impl=refused[0], want=refused[1])
  if impl == "cudnn":
    out = dot_product_attention(q, k, v, mask, dtype, causal, "cudnn")
  elif impl == "splash":
    out = splash_attention(q, k, v, mask, dtype, causal)
  else:
    return einsum_attention(q, k, v, dense_mask(mask, causal, q_offset, q.shape[1], k.shape[1]),
                            dtype)
  b, s, h, d = out.shape
  return out.reshape(b, s, h * d)


def einsum_attention(q, k, v, mask, dtype):
  """The xla path: mask is None or bool [batch, q_len, kv_len]."""
  b, s, h, d = q.shape
  kv_heads = k.shape[2]
  q = q.reshape(b, s, kv_heads, h // kv_heads, d)
  scores = jnp.einsum("bskgd,btkd->bkgst", q, k, preferred_element_type=jnp.float32)
  scores = scores / math.sqrt(d)
  if mask is not None:
    scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores, axis=-1).astype(dtype)
  out = jnp.einsum("bkgst,btkd->bskgd", probs, v.astype(dtype))
  return out.reshape(b, s, h * d)


def dense_mask(mask, causal, q_offset, q_len, kv_len):
  """`mask` and the causal rule as one bool [batch, q_len, kv_len] (None when neither)."""
  if mask is not None and mask.ndim == 2:
    mask = mask[:, None, :]
  if causal:
    q_slot = q_offset + jnp.arange(q_len)[:, None]
    seen = (jnp.arange(kv_len)[None, :] <= q_slot)[None]
    mask = seen if mask is None else mask & seen
  if mask is not None:
    mask = jnp.broadcast_to(mask, (mask.shape[0], q_len, kv_len))
  return mask


# ---------------------------------------------------------------------------------------------
# Choosing the implementation (at trace time, from shapes and the platform).
# ---------------------------------------------------------------------------------------------


def platform() -> str:
  """The platform the program is compiled for: the context mesh's devices, else the default."""
  mesh = jax.sharding.get_abstract_mesh()
  device = None if mesh.empty else mesh.abstract_device
  return device.platform if device is not None else jax.default_backend()


def resolve(impl, q, k, mask, dtype, q_offset):
  """(xla | cudnn | splash, None) for this call, or (xla, (impl, platform)) where an explicit
  kernel would run off its platform: the program then traces (parameter init, `eval_shape`) but
  refuses to compile."""
  if impl not in IMPLS:
    raise ValueError(f"config key attention={impl!r}: expected one of {', '.join(IMPLS)}")
  if impl == "cudnn" and not _cudnn_dtype(dtype):
    raise ValueError(f"config key attention='cudnn' needs dtype bfloat16 or float16, got "
                     f"{jnp.dtype(dtype).name}; use attention='auto' or 'xla'")
  kernel_fits = (q.shape[1] == k.shape[1] and (mask is None or mask.ndim == 2)
                 and isinstance(q_offset, int) and q_offset == 0)
  if impl == "xla" or not kernel_fits:
    return "xla", None
  where = platform()
  if impl == "auto":
    if where == "gpu" and _cudnn_dtype(dtype) and _cudnn_head_dim(q.shape[-1]):
      return "cudnn", None
    return ("splash" if where == "tpu" else "xla"), None
  want = {"cudnn": "gpu", "splash": "tpu"}[impl]
  return (impl, None) if where == want else ("xla", (impl, want))


def _cudnn_dtype(dtype) -> bool:
  return jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16)


def _cudnn_head_dim(d: int) -> bool:
  return d % 8 == 0 and d <= 128  # what cuDNN's flash kernel takes on every generation


def _refuse(*_, impl, want, platforms=None):
  platforms = platforms or (jax.default_backend(),)
  raise ValueError(f"config key attention={impl!r} runs on {want.upper()} only; this program is "
                   f"compiled for {', '.join(platforms)}. Use attention='auto' or 'xla'.")


# Zero, on the queries of an explicit kernel off its platform: abstract evaluation passes (so
# parameters can be initialised anywhere), lowering raises the error naming the config key.
_off_platform_p = Primitive("attention_off_platform")
_off_platform_p.def_abstract_eval(lambda x, **_: x)
_off_platform_p.def_impl(_refuse)
mlir.register_lowering(_off_platform_p, lambda ctx, *a, **kw: _refuse(
    platforms=ctx.module_context.platforms, **kw))
_off_platform = _off_platform_p.bind


# ---------------------------------------------------------------------------------------------
# cuDNN (GPU).
# ---------------------------------------------------------------------------------------------


def dot_product_attention(q, k, v, mask, dtype, causal, implementation):
  """`jax.nn.dot_product_attention` -> [batch, q_len, heads, head_dim].

  cuDNN takes key padding as lengths, so a [batch, kv_len] mask is read as "the first n keys are
  valid": the data pipeline's right padding. (Left-padded generation goes through the cache, xla.)
  A row with no valid key gets one, so it stays finite, as its xla counterpart does."""
  lengths = None
  if mask is not None:
    lengths = jnp.maximum(jnp.sum(mask, axis=-1, dtype=jnp.int32), 1)
  q, k, v = (x.astype(dtype) for x in (q, k, v))
  return jax.nn.dot_product_attention(q, k, v, is_causal=causal, key_value_seq_lengths=lengths,
                                      implementation=implementation)


# ---------------------------------------------------------------------------------------------
# Splash (TPU).
# ---------------------------------------------------------------------------------------------


def splash_attention(q, k, v, mask, dtype, causal, *, interpret: bool = False):
  """The Pallas splash kernel, one call per shard of (batch, heads) -> [batch, q, heads, head_dim].

  Key padding becomes segment ids: every query is in segment 1 and sees the keys of segment 1 (the
  valid ones), which is the xla path's `causal & keys_valid`. The sequence is padded to a tile
  multiple with keys of segment 0. `interpret` runs the kernel in Python (CPU tests)."""
  from jax.experimental.pallas.ops.tpu import splash_attention as splash

  b, s, h, d = q.shape
  padded = -(-s // 128) * 128
  block = next(x for x in SPLASH_BLOCKS if padded % x == 0)
  # The kernel does not scale; scale q in fp32 before it is cast, as close to fp32 scores as bf16 allows.
  q = (q.astype(jnp.float32) / math.sqrt(d)).astype(dtype)
  q, k, v = (_heads_major(x.astype(dtype), padded) for x in (q, k, v))  # [batch, heads, seq, d]
  keys = jnp.ones((b, s), bool) if mask is None else mask.astype(bool)
  segments = None
  if mask is not None or padded != s:
    kv_ids = jnp.pad(keys, ((0, 0), (0, padded - s))).astype(jnp.int32)
    segments = splash.SegmentIds(q=jnp.ones((b, padded), jnp.int32), kv=kv_ids)

  def local(q, k, v, segments):
    # Built per shard, from the local head count; the mask is static, so blocks above the
    # diagonal are skipped, not computed and masked.
    shape = (padded, padded)
    head_mask = splash.CausalMask(shape) if causal else splash.FullMask(shape)
    kernel = splash.make_splash_mha(
        splash.MultiHeadMask([head_mask] * q.shape[1]), head_shards=1, q_seq_shards=1,
        block_sizes=_block_sizes(block), interpret=interpret)
    return jax.vmap(kernel)(q, k, v, segments)

  out = _per_shard(local, q, k, v, segments)
  return out[:, :, :s].transpose(0, 2, 1, 3)


def _heads_major(x, padded):
  return jnp.pad(x, ((0, 0), (0, padded - x.shape[1]), (0, 0), (0, 0))).transpose(0, 2, 1, 3)


def _block_sizes(block):
  from jax.experimental.pallas.ops.tpu import splash_attention as splash
  return splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block,
                           block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
                           block_q_dq=block, block_kv_dq=block)


def _per_shard(fn, q, k, v, segments):
  """`fn` under `shard_map`: batch over the mesh axes of `activation_batch`, heads over those of
  `heads` where both head counts divide, the rest replicated. Without a mesh, `fn` itself."""
  mesh = jax.sharding.get_abstract_mesh()
  free = [a for a in mesh.axis_names if a not in mesh.manual_axes] if not mesh.empty else []
  if not free:
    return fn(q, k, v, segments)
  batch = _mesh_axes("activation_batch", mesh, free, q.shape[0])
  heads = _mesh_axes("heads", mesh, free, math.gcd(q.shape[1], k.shape[1]))
  qkv = P(batch, heads, None, None)
  seg = None if segments is None else type(segments)(P(batch, None), P(batch, None))
  return jax.shard_map(fn, in_specs=(qkv, qkv, qkv, seg), out_specs=qkv, axis_names=set(free),
                       check_vma=False)(q, k, v, segments)


def _mesh_axes(logical: str, mesh, free, size: int):
  """The mesh axes the rules give `logical`, when they are free and split `size` evenly."""
  axes = nn.logical_to_mesh_axes((logical,))[0]
  axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
  if not axes or any(a not in free for a in axes):
    return None
  return axes if size % int(np.prod([mesh.shape[a] for a in axes])) == 0 else None
