"""Decoder-only language model of the Qwen2 and LLaMA families (pre-norm, GQA, RoPE, SwiGLU).

Pure functional: the KV cache is an explicit argument and result, not module state, so prefill and
decode steps are plain jitted functions of (params, cache, tokens).

Masks. Without a cache, `attention_mask` is [batch, seq] (1 = real token) and attention is causal over
the sequence. With a cache of length T, `attention_mask` is [batch, T] over cache slots, the new tokens
are written at slots `cache_index .. cache_index + seq - 1`, and a query at slot p sees slots <= p.
Positions default to 0..seq-1 (transformers' default when no position_ids are given); left-padded
generation passes its own.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from llavamod_jax.models.configs import TextConfig, to_dtype
from llavamod_jax.models.layers import (Linear, RMSNorm, apply_rope, attention, constrain, remat,
                                        rope_cos_sin)
from llavamod_jax.models.moe_block import MoeBlock
from llavamod_jax.models.scan import SCANNED, text_period

BATCH_AXES = ("activation_batch", "activation_length", "activation_embed")


@flax.struct.dataclass
class LMOutput:
  logits: Any  # [batch, seq, vocab], None when compute_logits=False
  hidden_states: Any  # [batch, seq, hidden] after the final norm
  cache: Any = None


def init_cache(cfg: TextConfig, batch: int, max_len: int, dtype=None) -> list[dict[str, jax.Array]]:
  """Zeroed KV cache: one {"k", "v"} of [batch, max_len, kv_heads, head_dim] per layer; with
  `scan_layers`, one per member of the scan group, stacked over the groups like the parameters."""
  dtype = dtype or to_dtype(cfg.dtype)
  shape = (batch, max_len, cfg.num_kv_heads, cfg.resolved_head_dim)
  n = cfg.num_layers
  if cfg.scan_layers:
    p = text_period(cfg)
    n, shape = p, (cfg.num_layers // p,) + shape
  return [{"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)} for _ in range(n)]


class Attention(nn.Module):
  cfg: TextConfig

  @nn.compact
  def __call__(self, x, cos, sin, mask, cache=None, cache_index=None):
    cfg = self.cfg
    dtype, pdtype = to_dtype(cfg.dtype), to_dtype(cfg.param_dtype)
    b, s, _ = x.shape
    hd = cfg.resolved_head_dim

    init = nn.initializers.normal(cfg.initializer_range)

    def proj(name, heads, axes, bias):  # named for the remat policies that keep it (layers.py)
      y = Linear(heads * hd, axes, bias, dtype, pdtype, init, name=name)(x)
      return checkpoint_name(y, name).reshape(b, s, heads, hd)

    q = proj("q_proj", cfg.num_heads, ("embed", "heads"), cfg.attention_bias)
    k = proj("k_proj", cfg.num_kv_heads, ("embed", "kv"), cfg.attention_bias)
    v = proj("v_proj", cfg.num_kv_heads, ("embed", "kv"), cfg.attention_bias)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    new_cache = None
    if cache is not None:
      start = (0, cache_index, 0, 0)
      k = jax.lax.dynamic_update_slice(cache["k"], k.astype(cache["k"].dtype), start)
      v = jax.lax.dynamic_update_slice(cache["v"], v.astype(cache["v"].dtype), start)
      new_cache = {"k": k, "v": v}
    out = attention(q, k, v, mask, dtype, cfg.attention, causal=True,
                    q_offset=0 if cache is None else cache_index)
    out = Linear(cfg.hidden_size, ("heads", "embed"), False, dtype, pdtype, init, name="o_proj")(out)
    out = checkpoint_name(out, "o_proj")
    return out, new_cache


class MLP(nn.Module):
  """SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""

  cfg: TextConfig
  intermediate_size: int = 0

  @nn.compact
  def __call__(self, x):
    cfg = self.cfg
    dtype, pdtype = to_dtype(cfg.dtype), to_dtype(cfg.param_dtype)
    inter = self.intermediate_size or cfg.intermediate_size
    init = nn.initializers.normal(cfg.initializer_range)
    gate = Linear(inter, ("embed", "mlp"), False, dtype, pdtype, init, name="gate_proj")(x)
    up = Linear(inter, ("embed", "mlp"), False, dtype, pdtype, init, name="up_proj")(x)
    return Linear(cfg.hidden_size, ("mlp", "embed"), False, dtype, pdtype, init, name="down_proj")(
        jax.nn.silu(gate) * up)


def is_moe_layer(cfg: TextConfig, layer: int) -> bool:
  return bool(cfg.num_experts) and layer in cfg.moe_layers


class DecoderLayer(nn.Module):
  cfg: TextConfig
  layer: int

  @nn.compact
  def __call__(self, x, cos, sin, mask, cache=None, cache_index=None, train=False):
    cfg = self.cfg
    dtype, pdtype = to_dtype(cfg.dtype), to_dtype(cfg.param_dtype)
    h, new_cache = Attention(cfg, name="self_attn")(
        RMSNorm(cfg.rms_norm_eps, dtype, pdtype, name="input_layernorm")(x), cos, sin, mask, cache,
        cache_index)
    x = x + h
    h = RMSNorm(cfg.rms_norm_eps, dtype, pdtype, name="post_attention_layernorm")(x)
    if is_moe_layer(cfg, self.layer):
      h = MoeBlock(cfg, name="mlp")(h, train)
    else:
      h = MLP(cfg, name="mlp")(h)
    x = constrain(x + h, BATCH_AXES)
    return x, new_cache


class DecoderGroup(nn.Module):
  """`period` consecutive decoder layers: the body `nn.scan` repeats (scan_layers). Member j computes
  as layer j, which is what every layer j + g * period is (models/scan.py)."""

  cfg: TextConfig
  period: int

  @nn.compact
  def __call__(self, x, cos, sin, mask, cache, cache_index, train):
    new_cache = None if cache is None else []
    for j in range(self.period):
      x, c = _layer_cls(self.cfg)(self.cfg, j, name=f"layer_{j}")(
          x, cos, sin, mask, None if cache is None else cache[j], cache_index, train)
      if cache is not None:
        new_cache.append(c)
    return x, new_cache


def _layer_cls(cfg: TextConfig):
  # `train` (arg 7 counting self) only picks the MoE capacity factor: static under remat.
  return remat(DecoderLayer, cfg.remat_policy, static_argnums=(7,)) if cfg.remat else DecoderLayer


def _scanned(cfg: TextConfig):
  """DecoderGroup scanned over num_layers / period groups: parameters and the sown MoE statistics
  stacked on a leading `layers` axis, x the carry, the cache scanned, the rest broadcast."""
  p = text_period(cfg)
  return nn.scan(
      DecoderGroup, variable_axes={"params": 0, "moe": 0},
      split_rngs={"params": True, "router": True},
      in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, 0, nn.broadcast, nn.broadcast),
      length=cfg.num_layers // p, metadata_params={nn.PARTITION_NAME: "layers"})(cfg, p)


class DecoderLM(nn.Module):
  """Qwen2 / LLaMA causal LM. Parameter names mirror transformers' so the HF tables stay readable."""

  cfg: TextConfig

  def setup(self):
    cfg = self.cfg
    dtype, pdtype = to_dtype(cfg.dtype), to_dtype(cfg.param_dtype)
    self.embed_tokens = nn.Embed(
        cfg.vocab_size, cfg.hidden_size, dtype=dtype, param_dtype=pdtype,
        embedding_init=nn.with_logical_partitioning(nn.initializers.normal(cfg.initializer_range),
                                                    ("vocab", "embed")))
    if cfg.scan_layers:
      setattr(self, SCANNED, _scanned(cfg))
    else:
      self.layers = [_layer_cls(cfg)(cfg, i) for i in range(cfg.num_layers)]
    self.norm = RMSNorm(cfg.rms_norm_eps, dtype, pdtype)
    if not cfg.tie_word_embeddings:
      self.lm_head = Linear(cfg.vocab_size, ("embed", "vocab"), False, dtype, pdtype,
                            nn.initializers.normal(cfg.initializer_range))

  def embed(self, input_ids):
    return self.embed_tokens(input_ids)

  def logits(self, hidden_states):
    """LM head on (final-normed) hidden states; used by chunked losses on slices of the sequence."""
    if self.cfg.tie_word_embeddings:
      return self.embed_tokens.attend(hidden_states)
    return self.lm_head(hidden_states)

  def __call__(self, input_ids=None, pixel_values=None, attention_mask=None, position_ids=None, *,
               image_mask=None, inputs_embeds=None, cache=None, cache_index=None,
               compute_logits: bool = True, train: bool = False) -> LMOutput:
    """Same signature as `Llava.__call__`; a text-only LM takes no images."""
    cfg = self.cfg
    if pixel_values is not None or image_mask is not None:
      raise ValueError("this is a text-only language model; pixel_values must be None")
    x = self.embed(input_ids) if inputs_embeds is None else inputs_embeds.astype(to_dtype(cfg.dtype))
    b, s, _ = x.shape
    x = constrain(x, BATCH_AXES)

    if cache is None:
      if position_ids is None:
        position_ids = jnp.broadcast_to(jnp.arange(s), (b, s))
      keys_valid = (jnp.ones((b, s), bool) if attention_mask is None else attention_mask.astype(bool))
    else:
      if cache_index is None:
        raise ValueError("cache given without cache_index (the slot of the first new token)")
      total = cache[0]["k"].shape[-3]  # [(groups,) batch, slots, kv_heads, head_dim]
      if position_ids is None:
        position_ids = jnp.broadcast_to(cache_index + jnp.arange(s), (b, s))
      keys_valid = (jnp.ones((b, total), bool) if attention_mask is None
                    else attention_mask.astype(bool))
    # Attention is causal over slots (a query at slot p sees slots <= p) and sees only valid keys:
    # the [batch, keys] mask goes down as is, so the fused kernels never build a [q, k] one.
    mask = keys_valid

    cos, sin = rope_cos_sin(position_ids, cfg.resolved_head_dim, cfg.rope_theta)
    if cfg.scan_layers:
      x, new_cache = getattr(self, SCANNED)(x, cos, sin, mask, cache, cache_index, train)
    else:
      new_cache = [] if cache is not None else None
      for i, layer in enumerate(self.layers):
        x, c = layer(x, cos, sin, mask, None if cache is None else cache[i], cache_index, train)
        if cache is not None:
          new_cache.append(c)
    hidden = self.norm(x)
    logits = self.logits(hidden) if compute_logits else None
    return LMOutput(logits=logits, hidden_states=hidden, cache=new_cache)
