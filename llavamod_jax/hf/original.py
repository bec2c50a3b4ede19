"""Checkpoints of the original code: LLaVA-MoD / MoE-LLaVA (`llava_qwen2`, `moe_llava_qwen2`, ...)
and LLaVA-1.5 (`llava` / `llava_llama` with `mm_vision_tower`), read without DeepSpeed or torch.

Their config.json is the language model's own config (flat) plus the multimodal keys: the image tower
(`mm_image_tower` or `mm_vision_tower`: a hub id or a CLIP directory), `mm_vision_select_layer`,
`mm_vision_select_feature` (patch: drop CLS; cls_patch: keep it), the projector type
(`image_projector_type` in LLaVA-MoD, `mm_projector_type` in LLaVA-1.5; mlp2x_gelu) and, for the MoE
students, a `moe` dict (`moe_layers_idx`, `num_experts` per MoE layer, `top_k_experts`, capacity
factors, `use_residual`). Their tensor names are accepted by `families` (routes and table rows:
`model.image_tower.image_tower.vision_model.*`, `model.mm_projector[.image_spatial_proj].{0,2}.*`,
`model.layers.N.mlp.deepspeed_moe.gate.wg.weight`, `...deepspeed_experts.E.{gate,up,down}_proj`).

The original code marks image positions with the id -200, outside the vocabulary; here the image
token id is the vocabulary size (one past the last embedding row: its slots are filled with image
features and never embedded). DeepSpeed's gate (softmax, top-k, renormalised for k > 1; Gumbel noise
on the second choice; capacity-bounded dispatch) becomes our router with deterministic dropless
dispatch by default; the original's capacity factors are kept in the config for `moe.dispatch=
capacity`, the noise is `moe.router_noise=gumbel`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from llavamod_jax.hf import families
from llavamod_jax.models.configs import LlavaConfig, VisionConfig

# The original's model_type -> the transformers family whose computation ours reproduces.
FAMILIES = {
    "llava_qwen2": "qwen2", "moe_llava_qwen2": "qwen2",
    "llava_qwen1_5": "qwen2", "moe_llava_qwen1_5": "qwen2",  # Qwen1.5 is transformers' qwen2
    "llava_llama": "llama", "moe_llava_llama": "llama", "llava": "llama",  # llava: LLaVA-1.5
    "llava_mistral": "mistral", "moe_llava_mistral": "mistral",  # when LLaMA-shaped
}
UNSUPPORTED = ("llava_qwen", "moe_llava_qwen", "llava_phi", "moe_llava_phi", "llava_stablelm",
               "moe_llava_stablelm", "llava_minicpm", "moe_llava_minicpm", "llava_gemma2",
               "moe_llava_gemma2", "llava_mpt")
# Image towers the original configs name by hub id, with their published configurations (used
# when the checkpoint holds the tower's weights and no directory of it is given).
KNOWN_TOWERS = {
    "openai/clip-vit-large-patch14-336": dict(image_size=336),
    "openai/clip-vit-large-patch14": dict(image_size=224),
}
_CLIP_L = dict(model_type="clip_vision_model", hidden_size=1024, intermediate_size=4096,
               num_hidden_layers=24, num_attention_heads=16, patch_size=14, hidden_act="quick_gelu",
               layer_norm_eps=1e-5, projection_dim=768)
_MULTIMODAL_KEYS = ("mm_", "image_", "video_", "moe", "tune_", "freeze_", "unfreeze_", "s2",
                    "tokenizer_", "use_mm_", "pretrain_", "X", "lora")


def is_original(d: dict[str, Any]) -> bool:
  """Whether a config.json is the original code's (not transformers' LLaVA with text_config)."""
  t = d.get("model_type")
  return (t in FAMILIES or t in UNSUPPORTED) and "text_config" not in d


def tower_name(d: dict[str, Any]) -> str | None:
  return d.get("mm_image_tower") or d.get("mm_vision_tower")


def llava_config(d: dict[str, Any], where: str, dtype: str, param_dtype: str, source: str = "",
                 vision_dir: str | None = None) -> LlavaConfig:
  """Our LlavaConfig for an original config.json (`vision_dir`: the image tower's directory)."""
  model_type = d.get("model_type")
  if model_type in UNSUPPORTED or model_type not in FAMILIES:
    raise ValueError(f"{where}: model_type {model_type!r} of the original code is not supported: its "
                     f"language model is not one we compute (supported: {sorted(FAMILIES)})")
  family = FAMILIES[model_type]
  text_d = {k: v for k, v in d.items() if not k.startswith(_MULTIMODAL_KEYS)
            and k not in ("architectures", "model_type", "auto_map")}
  if family == "mistral":
    if text_d.pop("sliding_window", None) not in (None, 0) and d.get("use_sliding_window", True):
      raise NotImplementedError(f"{where}: Mistral with a sliding window is not supported")
    family = "llama"
  text_d["model_type"] = family
  moe = _moe_fields(d.get("moe"), where, text_d) if model_type.startswith("moe_") else {}
  text = families.text_from_hf(text_d, where, dtype, param_dtype).replace(**moe)
  projector = d.get("image_projector_type") or d.get("mm_projector_type") or "linear"
  if projector != "mlp2x_gelu":
    raise NotImplementedError(f"{where}: projector {projector!r} is not supported (only mlp2x_gelu)")
  merge = d.get("mm_patch_merge_type", "flat")
  if merge != "flat" or d.get("image_aspect_ratio") == "anyres":
    raise NotImplementedError(f"{where}: mm_patch_merge_type {merge!r} / image_aspect_ratio "
                              f"{d.get('image_aspect_ratio')!r} (LLaVA-NeXT's any-resolution tiles) "
                              "is not supported; one image of the tower's size per image token run")
  feature = d.get("mm_vision_select_feature", "patch")
  if feature not in ("patch", "cls_patch"):
    raise ValueError(f"{where}: mm_vision_select_feature {feature!r}: expected patch or cls_patch")
  extra = {"original_model_type": model_type, "image_tower": tower_name(d),
           "_name_or_path": source}
  return LlavaConfig(
      text=text, vision=vision_config(d, where, dtype, param_dtype, vision_dir),
      image_token_id=text.vocab_size, vision_feature_layer=int(d.get("mm_vision_select_layer", -2)),
      vision_feature_select_strategy="default" if feature == "patch" else "full",
      projector_hidden_act="gelu", projector_bias=True, hf_extra=json.dumps(extra, sort_keys=True))


def _moe_fields(moe: dict | None, where: str, text_d: dict) -> dict[str, Any]:
  if not moe or not moe.get("moe_layers_idx"):
    raise ValueError(f"{where}: an MoE model_type needs a 'moe' dict with 'moe_layers_idx'")
  layers = [int(i) for i in moe["moe_layers_idx"]]
  experts = moe.get("num_experts")
  experts = experts if isinstance(experts, list) else [experts] * len(layers)
  if len(set(experts)) != 1 or len(experts) != len(layers):
    raise NotImplementedError(f"{where}: moe.num_experts {experts} for moe_layers_idx {layers}: "
                              "every MoE layer must have the same number of experts")
  if moe.get("use_residual"):
    raise NotImplementedError(f"{where}: moe.use_residual=true (residual MoE) is not supported")
  k = int(moe.get("top_k_experts", 2))
  return dict(num_experts=int(experts[0]), num_experts_per_tok=k, moe_layers=tuple(sorted(layers)),
              moe_intermediate_size=int(text_d["intermediate_size"]),
              # DeepSpeed's top-2 gate renormalises the two weights; its top-1 gate keeps the
              # softmax probability.
              norm_topk_prob=k > 1,
              capacity_factor=float(moe.get("capacity_factor", 1.0)),
              eval_capacity_factor=float(moe.get("eval_capacity_factor", 1.0)),
              min_capacity=int(moe.get("min_capacity", 4)))


def vision_config(d: dict[str, Any], where: str, dtype: str, param_dtype: str,
                  vision_dir: str | None) -> VisionConfig:
  """The image tower's config: from `vision_dir`, the directory the config names, or the published
  configuration of a known hub id."""
  tower = tower_name(d)
  directory = vision_dir or (tower if tower and (Path(tower) / "config.json").exists() else None)
  if directory:
    cfg = json.loads((Path(directory) / "config.json").read_text())
    if cfg.get("model_type") == "llava" and "vision_config" in cfg:
      cfg = {**cfg["vision_config"]}
    return families.vision_from_hf(cfg, f"{directory}/config.json", dtype, param_dtype,
                                   source=str(Path(directory).resolve()))
  if tower in KNOWN_TOWERS:
    return families.vision_from_hf({**_CLIP_L, **KNOWN_TOWERS[tower]}, f"{where} ({tower})", dtype,
                                   param_dtype)
  raise ValueError(f"{where}: the image tower {tower!r} (mm_image_tower / mm_vision_tower) is not a "
                   "local directory: give its CLIP directory (hf.load(..., vision_dir=DIR); in a run "
                   "config, the model source's vision_hf_dir)")


def vision_dir_of(cfg: LlavaConfig, vision_dir: str | None) -> str | None:
  """Where an original checkpoint's tower weights come from when the checkpoint lacks them."""
  if vision_dir:
    return vision_dir
  tower = json.loads(cfg.hf_extra).get("image_tower")
  return tower if tower and (Path(tower) / "config.json").exists() else None

