"""ViT image towers: CLIP (class token, pre-layernorm, quick_gelu) and SigLIP (no CLS, tanh GELU).

Input `pixel_values` is channels-last [images, H, W, 3]. The tower returns every hidden state
(`hidden_states[0]` is the embedding output, `hidden_states[i]` the output of layer i), as
transformers does, so LLaVA can pick `vision_feature_layer` (e.g. -2).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import flax.struct
import jax.numpy as jnp

from llavamod_jax.models.configs import VisionConfig, to_dtype
from llavamod_jax.models.layers import Linear, activation, attention, layer_norm, remat
from llavamod_jax.models.scan import SCANNED

_init = nn.initializers.normal(0.02)


@flax.struct.dataclass
class VisionOutput:
  hidden_states: tuple  # num_layers + 1 tensors of [images, tokens, hidden] (() when not kept)
  last_hidden_state: Any
  pooled: Any
  selected: tuple = ()  # the hidden states `select` asked for, in its order


class VisionAttention(nn.Module):
  cfg: VisionConfig

  @nn.compact
  def __call__(self, x):
    cfg = self.cfg
    dtype, pdtype = to_dtype(cfg.dtype), to_dtype(cfg.param_dtype)
    b, s, _ = x.shape
    hd = cfg.hidden_size // cfg.num_heads
    q, k, v = (Linear(cfg.hidden_size, ("embed", "heads"), True, dtype, pdtype, name=n)(x)
               .reshape(b, s, cfg.num_heads, hd) for n in ("q_proj", "k_proj", "v_proj"))
    out = attention(q, k, v, None, dtype, cfg.attention)
    return Linear(cfg.hidden_size, ("heads", "embed"), True, dtype, pdtype, name="out_proj")(out)


class VisionMLP(nn.Module):
  cfg: VisionConfig

  @nn.compact
  def __call__(self, x):
    cfg = self.cfg
    dtype, pdtype = to_dtype(cfg.dtype), to_dtype(cfg.param_dtype)
    x = Linear(cfg.intermediate_size, ("embed", "mlp"), True, dtype, pdtype, name="fc1")(x)
    x = activation(cfg.hidden_act)(x)
    return Linear(cfg.hidden_size, ("mlp", "embed"), True, dtype, pdtype, name="fc2")(x)


class EncoderLayer(nn.Module):
  cfg: VisionConfig

  @nn.compact
  def __call__(self, x):
    cfg = self.cfg
    dtype, pdtype = to_dtype(cfg.dtype), to_dtype(cfg.param_dtype)
    x = x + VisionAttention(cfg, name="self_attn")(
        layer_norm(cfg.layer_norm_eps, dtype, pdtype, name="layer_norm1")(x))
    return x + VisionMLP(cfg, name="mlp")(
        layer_norm(cfg.layer_norm_eps, dtype, pdtype, name="layer_norm2")(x))


def _layer_cls(cfg: VisionConfig):
  return remat(EncoderLayer, cfg.remat_policy) if cfg.remat else EncoderLayer


class EncoderStep(nn.Module):
  """The body `nn.scan` repeats (scan_layers): one layer on the carry (x, kept). `kept` holds the
  hidden states at the indices `select` names (hidden_states numbering: 0 the embeddings, i the
  output of layer i), so only those are kept, not one per layer; with `all_outputs` every layer's
  output is a scan output too."""

  cfg: VisionConfig
  select: tuple[int, ...] = ()
  all_outputs: bool = True

  @nn.compact
  def __call__(self, carry, index):
    x, kept = carry
    x = _layer_cls(self.cfg)(self.cfg, name="layer_0")(x)
    kept = tuple(jnp.where(index + 1 == i, x, k) for i, k in zip(self.select, kept))
    return (x, kept), (x if self.all_outputs else None)


class Embeddings(nn.Module):
  cfg: VisionConfig

  @nn.compact
  def __call__(self, pixel_values):
    cfg = self.cfg
    dtype, pdtype = to_dtype(cfg.dtype), to_dtype(cfg.param_dtype)
    p = cfg.patch_size
    patches = nn.Conv(
        cfg.hidden_size, (p, p), strides=(p, p), padding="VALID", use_bias=not cfg.is_clip,
        dtype=dtype, param_dtype=pdtype, name="patch_embedding",
        kernel_init=nn.with_logical_partitioning(_init, (None, None, None, "embed")),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)),
    )(pixel_values.astype(dtype))
    n = patches.shape[0]
    x = patches.reshape(n, -1, cfg.hidden_size)
    if cfg.is_clip:
      cls = self.param("class_embedding", nn.with_logical_partitioning(_init, ("embed",)),
                       (cfg.hidden_size,), pdtype)
      x = jnp.concatenate([jnp.broadcast_to(cls.astype(dtype), (n, 1, cfg.hidden_size)), x], axis=1)
    pos = nn.Embed(cfg.num_positions, cfg.hidden_size, dtype=dtype, param_dtype=pdtype,
                   name="position_embedding",
                   embedding_init=nn.with_logical_partitioning(_init, (None, "embed")))
    return x + pos(jnp.arange(x.shape[1]))[None]


class PoolingHead(nn.Module):
  """SigLIP's multihead attention pooling (a learned probe attends over the tokens)."""

  cfg: VisionConfig

  @nn.compact
  def __call__(self, x):
    cfg = self.cfg
    dtype, pdtype = to_dtype(cfg.dtype), to_dtype(cfg.param_dtype)
    d, heads = cfg.hidden_size, cfg.num_heads
    n, s, _ = x.shape
    probe = self.param("probe", nn.with_logical_partitioning(_init, (None, None, "embed")), (1, 1, d),
                       pdtype)
    in_proj = Linear(3 * d, ("embed", "heads"), True, dtype, pdtype, name="in_proj")
    out_proj = Linear(d, ("heads", "embed"), True, dtype, pdtype, name="out_proj")
    query = jnp.broadcast_to(probe.astype(dtype), (n, 1, d))
    q = in_proj(query)[..., :d].reshape(n, 1, heads, d // heads)
    kv = in_proj(x)
    k = kv[..., d:2 * d].reshape(n, s, heads, d // heads)
    v = kv[..., 2 * d:].reshape(n, s, heads, d // heads)
    h = out_proj(attention(q, k, v, None, dtype, cfg.attention))
    h = h + VisionMLP(cfg, name="mlp")(layer_norm(cfg.layer_norm_eps, dtype, pdtype, name="layernorm")(h))
    return h[:, 0]


class VisionTower(nn.Module):
  cfg: VisionConfig

  @nn.compact
  def __call__(self, pixel_values, select: tuple[int, ...] | None = None) -> VisionOutput:
    """select: hidden_states indices (negative from the end) to return in `selected`; a scanned
    tower then keeps only those instead of every layer's output."""
    cfg = self.cfg
    dtype, pdtype = to_dtype(cfg.dtype), to_dtype(cfg.param_dtype)
    if pixel_values.ndim != 4 or pixel_values.shape[-1] != cfg.num_channels:
      raise ValueError(f"pixel_values must be channels-last [images, H, W, {cfg.num_channels}], "
                       f"got shape {tuple(pixel_values.shape)}")
    x = Embeddings(cfg, name="embeddings")(pixel_values)
    if cfg.is_clip:
      x = layer_norm(cfg.layer_norm_eps, dtype, pdtype, name="pre_layrnorm")(x)
    hidden_states = [x]
    wanted = tuple(i % (cfg.num_layers + 1) for i in (select or ()))
    if cfg.scan_layers:
      scanned = nn.scan(EncoderStep, variable_axes={"params": 0}, split_rngs={"params": True},
                        in_axes=0, length=cfg.num_layers,
                        metadata_params={nn.PARTITION_NAME: "layers"})
      (x, kept), outputs = scanned(cfg, wanted, select is None, name=SCANNED)(
          (x, (x,) * len(wanted)), jnp.arange(cfg.num_layers))
      if select is None:
        hidden_states += [outputs[i] for i in range(cfg.num_layers)]
      else:
        hidden_states = []
    else:
      for i in range(cfg.num_layers):
        x = _layer_cls(cfg)(cfg, name=f"layers_{i}")(x)
        hidden_states.append(x)
    post = layer_norm(cfg.layer_norm_eps, dtype, pdtype, name="post_layernorm")
    if cfg.is_clip:  # CLIP keeps the raw encoder output and pools the normed class token
      last, pooled = x, post(x[:, 0])
    else:
      last = post(x)
      pooled = PoolingHead(cfg, name="head")(last) if cfg.use_head else None
    if not cfg.scan_layers:
      kept = tuple(hidden_states[i] for i in wanted)
    return VisionOutput(hidden_states=tuple(hidden_states), last_hidden_state=last, pooled=pooled,
                        selected=kept)
