"""Building blocks shared by the language model and the vision towers.

Every parameter is created with logical axis names (`embed`, `mlp`, `heads`, `kv`, `vocab`, ...); a mesh
and a rules table (`llavamod_jax.sharding`) turn them into device placements. Torch Linear weights are
(out, in); our kernels are (in, out).
"""

from __future__ import annotations

from typing import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from llavamod_jax.models.attention import attention  # noqa: F401 - the layers' entry point

Dtype = jnp.dtype
default_kernel_init = nn.initializers.normal(stddev=0.02)


class Linear(nn.Module):
  """y = x @ kernel (+ bias), kernel [in, out] with logical axes `kernel_axes`."""

  features: int
  kernel_axes: tuple[str, str]
  use_bias: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  kernel_init: Callable = default_kernel_init

  @nn.compact
  def __call__(self, x):
    kernel = self.param(
        "kernel", nn.with_logical_partitioning(self.kernel_init, self.kernel_axes),
        (x.shape[-1], self.features), self.param_dtype)
    y = jnp.dot(x.astype(self.dtype), kernel.astype(self.dtype))
    if self.use_bias:
      bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, self.kernel_axes[1:]),
                        (self.features,), self.param_dtype)
      y = y + bias.astype(self.dtype)
    return y


class RMSNorm(nn.Module):
  """Qwen2/LLaMA RMSNorm: statistics in fp32, scaled in the input dtype (as transformers does)."""

  eps: float = 1e-6
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    weight = self.param("weight", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
                        (x.shape[-1],), self.param_dtype)
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return weight.astype(self.dtype) * normed.astype(self.dtype)


def layer_norm(eps: float, dtype, param_dtype, name: str | None = None) -> nn.LayerNorm:
  """torch-style LayerNorm (two-pass variance, fp32 statistics)."""
  return nn.LayerNorm(
      epsilon=eps, dtype=dtype, param_dtype=param_dtype, use_fast_variance=False, name=name,
      scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("norm",)))


ACTIVATIONS = {
    "silu": jax.nn.silu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),  # exact (erf) GELU, torch's default
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
}


def activation(name: str) -> Callable:
  if name not in ACTIVATIONS:
    raise ValueError(f"unsupported activation {name!r}; expected one of {sorted(ACTIVATIONS)}")
  return ACTIVATIONS[name]


# ---------------------------------------------------------------------------------------------
# Rotary position embedding (rotate-half / non-interleaved, as transformers' Qwen2 and LLaMA).
# ---------------------------------------------------------------------------------------------


def rope_cos_sin(positions, head_dim: int, theta: float):
  """cos, sin: [batch, seq, head_dim] in fp32 for integer `positions` [batch, seq]."""
  inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
  freqs = positions.astype(jnp.float32)[..., None] * inv_freq  # [batch, seq, head_dim / 2]
  emb = jnp.concatenate([freqs, freqs], axis=-1)
  return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x, cos, sin):
  """x: [batch, seq, heads, head_dim]."""
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
  cos, sin = cos[:, :, None, :].astype(x.dtype), sin[:, :, None, :].astype(x.dtype)
  return x * cos + rotated * sin


# What a rematerialised layer keeps for the backward pass (MaxText's names where they exist):
# none: no remat (every activation kept); full keeps nothing (least memory, one more forward);
# save_dots keeps every matmul output; save_dots_no_batch the matmuls against weights, not
# attention's (which grow with seq^2); save_qkv_proj the q/k/v projections, save_out_proj the
# attention output projection, save_dot_except_mlp all four projections (not the FFN's, the largest).
_POLICY = jax.checkpoint_policies
REMAT_POLICIES = {
    "none": None,
    "full": _POLICY.nothing_saveable,
    "save_dots": _POLICY.dots_saveable,
    "save_dots_no_batch": _POLICY.dots_with_no_batch_dims_saveable,
    "save_qkv_proj": _POLICY.save_only_these_names("q_proj", "k_proj", "v_proj"),
    "save_out_proj": _POLICY.save_only_these_names("o_proj"),
    "save_dot_except_mlp": _POLICY.save_only_these_names("q_proj", "k_proj", "v_proj", "o_proj"),
}


def remat(layer_cls, policy: str, **kw):
  """`layer_cls` rematerialised in the backward pass, keeping what `policy` names."""
  if policy not in REMAT_POLICIES:
    raise ValueError(f"remat_policy {policy!r}: expected one of {sorted(REMAT_POLICIES)}")
  if policy == "none":
    return layer_cls
  return nn.remat(layer_cls, policy=REMAT_POLICIES[policy], **kw)


def constrain(x, axes: Sequence[str | None]):
  """Activation sharding constraint by logical names; a no-op outside a mesh + rules context."""
  return nn.with_logical_constraint(x, tuple(axes))
