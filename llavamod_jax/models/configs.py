"""Model configurations: frozen dataclasses, hashable so Flax modules can hold them.

These describe what the code computes. The Hugging Face side (config.json <-> these) lives in
`llavamod_jax.hf.families`; fields HF carries that we do not compute with (token ids, ...) ride along
in `hf_extra` so an exported model keeps them.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import jax.numpy as jnp

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def to_dtype(name: str):
  if name not in DTYPES:
    raise ValueError(f"unknown dtype {name!r}; expected one of {sorted(DTYPES)}")
  return DTYPES[name]


@dataclasses.dataclass(frozen=True)
class TextConfig:
  """A decoder-only LM of the Qwen2 / LLaMA family (dense), optionally with MoE FFN layers."""

  model_type: str = "qwen2"  # qwen2 | llama | qwen2_moe
  vocab_size: int = 151936
  hidden_size: int = 896
  intermediate_size: int = 4864
  num_layers: int = 24
  num_heads: int = 14
  num_kv_heads: int = 2
  head_dim: int = 0  # 0: hidden_size // num_heads
  rope_theta: float = 1_000_000.0
  rms_norm_eps: float = 1e-6
  attention_bias: bool = True  # q/k/v bias (Qwen2); o_proj never has one
  tie_word_embeddings: bool = False
  max_position_embeddings: int = 32768
  # Std of the normal init of every embedding and matrix of a model built from scratch (HF's field of
  # the same name); the projector's too, as transformers' LLaVA takes the text config's.
  initializer_range: float = 0.02
  # Mixture of experts (0 experts: dense everywhere).
  num_experts: int = 0
  num_experts_per_tok: int = 2
  moe_layers: tuple[int, ...] = ()
  moe_intermediate_size: int = 0  # 0: intermediate_size
  norm_topk_prob: bool = True  # renormalise the k routing weights to sum to 1
  moe_dispatch: str = "dropless"  # dropless | capacity (the original's token dropping)
  moe_impl: str = "auto"  # dropless kernels: auto | dense | ragged | blocked (see moe_block.py)
  moe_block_size: int = 128  # rows per block of the "blocked" kernel
  # Expert parallelism under a context mesh with an `expert` axis > 1 (dropless ragged/blocked):
  # auto | all_to_all: shard_map + all-to-all (models/expert_parallel.py) | gspmd: let XLA place it.
  moe_expert_parallel: str = "auto"
  capacity_factor: float = 1.5  # capacity dispatch, training
  eval_capacity_factor: float = 2.0  # capacity dispatch, evaluation
  min_capacity: int = 0
  router_noise: str = "none"  # none | gumbel (the original: Gumbel noise on choices after the first)
  # Numerics and memory.
  dtype: str = "float32"  # compute dtype
  param_dtype: str = "float32"
  remat: bool = False  # recompute each decoder layer in the backward pass
  remat_policy: str = "full"  # what remat keeps of a layer (layers.REMAT_POLICIES)
  # Run the layers as one `nn.scan` over stacked parameters (compile time independent of depth); the
  # parameter tree then holds `scanned_layers` instead of `layers_0 ..` (models/scan.py converts).
  scan_layers: bool = False
  attention: str = "auto"  # auto | xla | cudnn | splash (layers.attention)
  hf_extra: str = "{}"  # JSON: HF config fields carried through unchanged

  @property
  def resolved_head_dim(self) -> int:
    return self.head_dim or self.hidden_size // self.num_heads

  def replace(self, **kw) -> "TextConfig":
    return dataclasses.replace(self, **kw)


@dataclasses.dataclass(frozen=True)
class VisionConfig:
  """A ViT image tower: CLIP (class token, pre-layernorm, quick_gelu) or SigLIP (no CLS, tanh GELU)."""

  model_type: str = "clip_vision_model"  # clip_vision_model | siglip_vision_model
  hidden_size: int = 1024
  intermediate_size: int = 4096
  num_layers: int = 24
  num_heads: int = 16
  image_size: int = 336
  patch_size: int = 14
  num_channels: int = 3
  layer_norm_eps: float = 1e-5
  hidden_act: str = "quick_gelu"
  use_head: bool = False  # SigLIP's attention-pooling head (unused by LLaVA, kept for round trips)
  dtype: str = "float32"
  param_dtype: str = "float32"
  remat: bool = False
  remat_policy: str = "full"
  scan_layers: bool = False  # as TextConfig.scan_layers
  attention: str = "auto"  # as TextConfig.attention
  hf_extra: str = "{}"

  @property
  def is_clip(self) -> bool:
    return self.model_type.startswith("clip")

  @property
  def num_patches(self) -> int:
    return (self.image_size // self.patch_size) ** 2

  @property
  def num_positions(self) -> int:
    return self.num_patches + (1 if self.is_clip else 0)

  def replace(self, **kw) -> "VisionConfig":
    return dataclasses.replace(self, **kw)


@dataclasses.dataclass(frozen=True)
class LlavaConfig:
  """Vision tower + mlp2x_gelu projector + decoder LM; image features fill the image-token slots."""

  text: TextConfig = TextConfig()
  vision: VisionConfig = VisionConfig()
  image_token_id: int = 151646
  vision_feature_layer: int | tuple[int, ...] = -2
  vision_feature_select_strategy: str = "default"  # default: drop CLS | full: keep all tokens
  projector_hidden_act: str = "gelu"
  projector_bias: bool = True
  hf_extra: str = "{}"

  @property
  def num_image_tokens(self) -> int:
    """Image tokens one image expands to."""
    n = self.vision.num_positions
    # "default" drops the first token whatever the tower (transformers does the same for SigLIP).
    return n - 1 if self.vision_feature_select_strategy == "default" else n

  def replace(self, **kw) -> "LlavaConfig":
    return dataclasses.replace(self, **kw)


def extra(cfg) -> dict[str, Any]:
  return json.loads(cfg.hf_extra)


def to_dict(cfg) -> dict[str, Any]:
  """JSON-able dict of any of the configs above (nested), tagged with its kind."""
  d = dataclasses.asdict(cfg)
  d["__kind__"] = type(cfg).__name__
  return d


def from_dict(d: dict[str, Any]):
  d = dict(d)
  kind = d.pop("__kind__", None)
  if kind == "LlavaConfig":
    d["text"] = from_dict({**d["text"], "__kind__": "TextConfig"})
    d["vision"] = from_dict({**d["vision"], "__kind__": "VisionConfig"})
    if isinstance(d.get("vision_feature_layer"), list):
      d["vision_feature_layer"] = tuple(d["vision_feature_layer"])
    return LlavaConfig(**d)
  if kind == "TextConfig":
    d["moe_layers"] = tuple(d.get("moe_layers", ()))
    return TextConfig(**d)
  if kind == "VisionConfig":
    return VisionConfig(**d)
  raise ValueError(f"model config dict has unknown or missing '__kind__': {kind!r}")
