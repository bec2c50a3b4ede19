"""Sparse upcycling of a dense model into the MoE student, and reading the MoE layers' aux outputs.

    moe_model, moe_params = moe.upcycle(model, params, num_experts=4, top_k=2, layers="sparse")

Each chosen layer's SwiGLU FFN is copied into every expert; the router is a fresh bias-free
Linear(hidden, experts) initialised like torch's default Linear, U(-1/sqrt(hidden), 1/sqrt(hidden)), as
the original's freshly built DeepSpeed gate. Because the k routing weights are renormalised to sum to 1
and all experts are equal, the upcycled model computes exactly what the dense one does.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
from flax import traverse_util

from llavamod_jax import models
from llavamod_jax.models.configs import LlavaConfig, TextConfig
from llavamod_jax.models import scan
from llavamod_jax.models.moe_block import router_init

def parse_layers(layers: str | Sequence[int], num_layers: int) -> tuple[int, ...]:
  """Which decoder layers become MoE: "sparse" (0, 2, 4, ...), "first_half", "second_half", "all",
  or an explicit list of indices."""
  if isinstance(layers, str):
    choices = {
        "sparse": range(0, num_layers, 2),
        "first_half": range(num_layers // 2),
        "second_half": range(num_layers // 2, num_layers),
        "all": range(num_layers),
    }
    if layers not in choices:
      raise ValueError(f"moe layers {layers!r}: expected one of {list(choices)} or a list of indices")
    return tuple(choices[layers])
  out = tuple(sorted(set(int(i) for i in layers)))
  bad = [i for i in out if not 0 <= i < num_layers]
  if bad:
    raise ValueError(f"moe layers {bad} out of range for a model with {num_layers} layers")
  return out


def moe_text_config(text: TextConfig, num_experts: int, top_k: int, layers, **options) -> TextConfig:
  if top_k > num_experts:
    raise ValueError(f"top_k={top_k} exceeds num_experts={num_experts}")
  return text.replace(num_experts=num_experts, num_experts_per_tok=top_k,
                      moe_layers=parse_layers(layers, text.num_layers),
                      moe_intermediate_size=text.moe_intermediate_size or text.intermediate_size,
                      **options)


def upcycle(model, params, num_experts: int = 4, top_k: int = 2, layers="sparse", seed: int = 0,
            **options):
  """Dense LLaVA or LM (module, params) -> MoE student (module, params).

  `options` are further TextConfig MoE fields (moe_dispatch, capacity_factor, router_noise, ...).
  Either parameter layout (models/scan.py) goes in; the result has the model's.
  """
  cfg = model.cfg
  params = scan.relayout(params, scan.unrolled_config(cfg))
  text = cfg.text if isinstance(cfg, LlavaConfig) else cfg
  if text.num_experts:
    raise ValueError("model is already a MoE model (num_experts="
                     f"{text.num_experts}); upcycle a dense model")
  new_text = moe_text_config(text, num_experts, top_k, layers, **options)
  new_cfg = cfg.replace(text=new_text) if isinstance(cfg, LlavaConfig) else new_text
  lm = params["language_model"] if isinstance(cfg, LlavaConfig) else params
  new_lm = dict(lm)
  key = jax.random.key(seed)
  for i in new_text.moe_layers:
    dense = lm[f"layers_{i}"]["mlp"]
    stack = lambda w: jnp.broadcast_to(w, (num_experts,) + w.shape)  # noqa: E731
    router = router_init(jax.random.fold_in(key, i), (text.hidden_size, num_experts),
                         dense["gate_proj"]["kernel"].dtype)
    layer = dict(lm[f"layers_{i}"])
    layer["mlp"] = {
        "router": router,
        "experts": {"gate_proj": stack(dense["gate_proj"]["kernel"]),
                    "up_proj": stack(dense["up_proj"]["kernel"]),
                    "down_proj": stack(dense["down_proj"]["kernel"])},
    }
    new_lm[f"layers_{i}"] = layer
  new_params = {**params, "language_model": new_lm} if isinstance(cfg, LlavaConfig) else new_lm
  return models.build(new_cfg), scan.relayout(new_params, new_cfg)


# ---------------------------------------------------------------------------------------------
# The "moe" collection that MoE blocks sow into.
# ---------------------------------------------------------------------------------------------


def _flat(moe_state) -> dict[str, jax.Array]:
  return {k: v[0] if isinstance(v, tuple) else v
          for k, v in traverse_util.flatten_dict(moe_state, sep="/").items()}


def per_layer(moe_state: dict[str, Any], cfg=None) -> dict[str, dict[str, jax.Array]]:
  """{"language_model/layers_0/mlp": {"load_balancing_loss": ..., "tokens_per_expert": ...}, ...}.

  A scanned model (models/scan.py) sows each statistic stacked over its scan groups; naming them per
  layer takes the scan period, which `cfg` (the model's config) gives."""
  flat = _flat(moe_state)
  counts = scan.members(list(flat))
  if counts:
    if cfg is None:
      raise ValueError("the MoE statistics of scanned layers are stacked: pass the model's config "
                       "to name them per layer")
    text = cfg.text if isinstance(cfg, LlavaConfig) else cfg
    flat = scan.unstack_collection(flat, {k: scan.text_period(text) for k in counts})
  out: dict[str, dict[str, jax.Array]] = {}
  for path, value in flat.items():
    layer, name = path.rsplit("/", 1)
    out.setdefault(layer, {})[name] = value
  return out


def stats(moe_state: dict[str, Any]) -> dict[str, jax.Array]:
  """Each statistic over every MoE layer, stacked on a leading layer axis (either layout; the
  order of the layers is not kept)."""
  out: dict[str, list[jax.Array]] = {}
  for path, value in _flat(moe_state).items():
    stacked = bool(scan.members([path]))
    out.setdefault(path.rsplit("/", 1)[1], []).append(value if stacked else value[None])
  return {k: jnp.concatenate(v) for k, v in out.items()}


def aux_losses(moe_state: dict[str, Any]) -> dict[str, jax.Array]:
  """Load-balancing and z losses summed over MoE layers (0.0 for a dense model)."""
  s = stats(moe_state)
  return {name: jnp.sum(s[name]) if name in s else jnp.float32(0.0)
          for name in ("load_balancing_loss", "z_loss")}
