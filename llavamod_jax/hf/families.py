"""Hugging Face families: config.json <-> our configs, and one tensor-name table per family.

A table row is (hf_key, flax_path, kind). `{i}` stands for a layer index. `kind` says how a torch tensor
becomes a Flax parameter: "linear" transposes (out, in) -> (in, out), "conv" permutes (O, I, kh, kw) ->
(kh, kw, I, O), "copy" keeps it. Keys are relative to a component; `route` maps a checkpoint key in any
accepted spelling to (component, relative key), and `SAVE_PREFIX` gives the spelling we write.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import numpy as np

from llavamod_jax.models.configs import LlavaConfig, TextConfig, VisionConfig

TEXT_TYPES = ("qwen2", "llama", "qwen2_moe")
VISION_TYPES = {"clip_vision_model": "clip", "siglip_vision_model": "siglip"}


def _linear(hf: str, flax: str, bias: bool = False) -> list[tuple[str, str, str]]:
  rows = [(f"{hf}.weight", f"{flax}/kernel", "linear")]
  return rows + ([(f"{hf}.bias", f"{flax}/bias", "copy")] if bias else [])


def _layer_norm(hf: str, flax: str) -> list[tuple[str, str, str]]:
  return [(f"{hf}.weight", f"{flax}/scale", "copy"), (f"{hf}.bias", f"{flax}/bias", "copy")]


# ----------------------------------------------------------------------------------------------
# Tables (rows for parameters a given config does not have, e.g. q bias on LLaMA, never match).
# ----------------------------------------------------------------------------------------------

DECODER = [
    ("model.embed_tokens.weight", "embed_tokens/embedding", "copy"),
    *_linear("model.layers.{i}.self_attn.q_proj", "layers_{i}/self_attn/q_proj", bias=True),
    *_linear("model.layers.{i}.self_attn.k_proj", "layers_{i}/self_attn/k_proj", bias=True),
    *_linear("model.layers.{i}.self_attn.v_proj", "layers_{i}/self_attn/v_proj", bias=True),
    *_linear("model.layers.{i}.self_attn.o_proj", "layers_{i}/self_attn/o_proj"),
    *_linear("model.layers.{i}.mlp.gate_proj", "layers_{i}/mlp/gate_proj"),
    *_linear("model.layers.{i}.mlp.up_proj", "layers_{i}/mlp/up_proj"),
    *_linear("model.layers.{i}.mlp.down_proj", "layers_{i}/mlp/down_proj"),
    ("model.layers.{i}.input_layernorm.weight", "layers_{i}/input_layernorm/weight", "copy"),
    ("model.layers.{i}.post_attention_layernorm.weight", "layers_{i}/post_attention_layernorm/weight",
     "copy"),
    ("model.norm.weight", "norm/weight", "copy"),
    *_linear("lm_head", "lm_head"),
    # Qwen2-MoE sparse blocks: router (E, H) and experts one tensor per expert, as transformers saves
    # them; `{e}` rows stack into the [experts, ...] parameter. The fused rows are transformers'
    # in-memory layout (gate_up_proj [E, 2I, H], down_proj [E, H, I]), accepted when loading.
    ("model.layers.{i}.mlp.gate.weight", "layers_{i}/mlp/router", "linear"),
    ("model.layers.{i}.mlp.experts.{e}.gate_proj.weight", "layers_{i}/mlp/experts/gate_proj", "linear"),
    ("model.layers.{i}.mlp.experts.{e}.up_proj.weight", "layers_{i}/mlp/experts/up_proj", "linear"),
    ("model.layers.{i}.mlp.experts.{e}.down_proj.weight", "layers_{i}/mlp/experts/down_proj", "linear"),
    ("model.layers.{i}.mlp.experts.gate_up_proj", "layers_{i}/mlp/experts/gate_proj", "fused_gate"),
    ("model.layers.{i}.mlp.experts.gate_up_proj", "layers_{i}/mlp/experts/up_proj", "fused_up"),
    ("model.layers.{i}.mlp.experts.down_proj", "layers_{i}/mlp/experts/down_proj", "expert_linear"),
    # The original code's DeepSpeed MoE layers (hf/original.py).
    ("model.layers.{i}.mlp.deepspeed_moe.gate.wg.weight", "layers_{i}/mlp/router", "linear"),
    *[(f"model.layers.{{i}}.mlp.deepspeed_moe.experts.deepspeed_experts.{{e}}.{n}.weight",
       f"layers_{{i}}/mlp/experts/{n}", "linear") for n in ("gate_proj", "up_proj", "down_proj")],
]
# Qwen2-MoE's shared expert, always empty in our students (shared_expert_intermediate_size=0).
SHARED_EXPERT = (r"model\.layers\.\d+\.mlp\.shared_expert\.(gate|up|down)_proj\.weight",
                 r"model\.layers\.\d+\.mlp\.shared_expert_gate\.weight")

VISION = [
    ("embeddings.patch_embedding.weight", "embeddings/patch_embedding/kernel", "conv"),
    ("embeddings.patch_embedding.bias", "embeddings/patch_embedding/bias", "copy"),
    ("embeddings.class_embedding", "embeddings/class_embedding", "copy"),
    ("embeddings.position_embedding.weight", "embeddings/position_embedding/embedding", "copy"),
    *_layer_norm("pre_layrnorm", "pre_layrnorm"),
    *[row for n in ("q_proj", "k_proj", "v_proj", "out_proj")
      for row in _linear(f"encoder.layers.{{i}}.self_attn.{n}", f"layers_{{i}}/self_attn/{n}", True)],
    *_layer_norm("encoder.layers.{i}.layer_norm1", "layers_{i}/layer_norm1"),
    *_layer_norm("encoder.layers.{i}.layer_norm2", "layers_{i}/layer_norm2"),
    *_linear("encoder.layers.{i}.mlp.fc1", "layers_{i}/mlp/fc1", True),
    *_linear("encoder.layers.{i}.mlp.fc2", "layers_{i}/mlp/fc2", True),
    *_layer_norm("post_layernorm", "post_layernorm"),
    ("head.probe", "head/probe", "copy"),
    ("head.attention.in_proj_weight", "head/in_proj/kernel", "linear"),
    ("head.attention.in_proj_bias", "head/in_proj/bias", "copy"),
    *_linear("head.attention.out_proj", "head/out_proj", True),
    *_layer_norm("head.layernorm", "head/layernorm"),
    *_linear("head.mlp.fc1", "head/mlp/fc1", True),
    *_linear("head.mlp.fc2", "head/mlp/fc2", True),
]

PROJECTOR = [*_linear("linear_1", "linear_1", True), *_linear("linear_2", "linear_2", True),
             # the original code's nn.Sequential(Linear, GELU, Linear)
             *_linear("0", "linear_1", True), *_linear("2", "linear_2", True)]

# Tensors a checkpoint may hold that are not parameters of the model we build (skipped and counted);
# regular expressions over component-relative keys.
VISION_IGNORED = (r"embeddings\.position_ids",)
CLIP_MODEL_IGNORED_PREFIXES = ("text_model.", "text_projection.", "visual_projection.", "logit_scale",
                               "logit_bias")


# ----------------------------------------------------------------------------------------------
# Routing checkpoint keys to components.
# ----------------------------------------------------------------------------------------------

LLAVA_ROUTES = [  # (accepted prefix, component, prefix of the relative key)
    # The original code (hf/original.py): LLaVA-MoD / MoE-LLaVA, then LLaVA-1.5.
    ("model.image_tower.image_tower.vision_model.", "vision_tower", ""),
    ("model.mm_projector.image_spatial_proj.", "multi_modal_projector", ""),
    ("model.vision_tower.vision_tower.vision_model.", "vision_tower", ""),
    ("model.mm_projector.", "multi_modal_projector", ""),
    ("language_model.model.", "language_model", "model."),
    ("language_model.lm_head.", "language_model", "lm_head."),
    ("model.language_model.", "language_model", "model."),
    ("lm_head.", "language_model", "lm_head."),
    ("model.vision_tower.vision_model.", "vision_tower", ""),
    ("model.vision_tower.", "vision_tower", ""),
    ("vision_tower.vision_model.", "vision_tower", ""),
    ("vision_tower.", "vision_tower", ""),
    ("model.multi_modal_projector.", "multi_modal_projector", ""),
    ("multi_modal_projector.", "multi_modal_projector", ""),
    ("model.", "language_model", "model."),  # the original's language model, last: the catch-all
]
VISION_ROUTES = [("vision_model.", "", ""), ("", "", "")]  # transformers 5 drops "vision_model."
TEXT_ROUTES = [("", "", "")]

# How we write each component (transformers 5 writes LLaVA in this spelling by default).
LLAVA_SAVE = {"language_model": "language_model.", "vision_tower": "vision_tower.",
              "multi_modal_projector": "multi_modal_projector."}


def route(key: str, routes) -> tuple[str, str] | None:
  for prefix, component, rel in routes:
    if key.startswith(prefix):
      return component, rel + key[len(prefix):]
  return None


@dataclasses.dataclass(frozen=True)
class Layout:
  """How one kind of model is spelled on disk."""

  routes: list  # (accepted key prefix, component, prefix of the relative key)
  tables: dict[str, list]  # component -> table
  save_prefix: dict[str, str]  # component -> the key prefix we write
  ignored: tuple[str, ...] = ()  # patterns of relative keys that are not parameters (buffers)
  ignored_prefixes: tuple[str, ...] = ()  # whole-key prefixes of other models' parts


def layout(cfg) -> Layout:
  if isinstance(cfg, LlavaConfig):
    return Layout(LLAVA_ROUTES, {"language_model": DECODER, "vision_tower": VISION,
                                 "multi_modal_projector": PROJECTOR}, LLAVA_SAVE,
                  VISION_IGNORED + SHARED_EXPERT)
  if isinstance(cfg, VisionConfig):
    return Layout(VISION_ROUTES, {"": VISION}, {"": ""}, VISION_IGNORED,
                  CLIP_MODEL_IGNORED_PREFIXES)
  return Layout(TEXT_ROUTES, {"": DECODER}, {"": ""}, SHARED_EXPERT)


def extra_tensors(cfg) -> dict[str, np.ndarray]:
  """Tensors transformers expects that carry nothing: Qwen2-MoE's empty shared expert and its gate."""
  text = cfg.text if isinstance(cfg, LlavaConfig) else cfg
  if isinstance(cfg, VisionConfig) or not text.num_experts:
    return {}
  prefix = LLAVA_SAVE["language_model"] if isinstance(cfg, LlavaConfig) else ""
  h, out = text.hidden_size, {}
  for i in text.moe_layers:
    base = f"{prefix}model.layers.{i}.mlp."
    out[base + "shared_expert.gate_proj.weight"] = np.zeros((0, h), np.float32)
    out[base + "shared_expert.up_proj.weight"] = np.zeros((0, h), np.float32)
    out[base + "shared_expert.down_proj.weight"] = np.zeros((h, 0), np.float32)
    out[base + "shared_expert_gate.weight"] = np.zeros((1, h), np.float32)
  return out


# ----------------------------------------------------------------------------------------------
# Configs.
# ----------------------------------------------------------------------------------------------

_TEXT_OWNED = {
    "model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
    "num_attention_heads", "num_key_value_heads", "head_dim", "rope_theta", "rope_parameters",
    "rope_scaling", "rms_norm_eps", "attention_bias", "tie_word_embeddings", "max_position_embeddings",
    "architectures", "dtype", "torch_dtype", "transformers_version", "layer_types", "hidden_act",
    "mlp_bias", "_name_or_path", "num_experts", "num_experts_per_tok", "moe_intermediate_size",
    "shared_expert_intermediate_size", "norm_topk_prob", "decoder_sparse_step", "mlp_only_layers",
    "qkv_bias", "initializer_range",
}
_VISION_OWNED = {
    "model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "image_size", "patch_size", "num_channels", "layer_norm_eps", "hidden_act", "vision_use_head",
    "architectures", "dtype", "torch_dtype", "transformers_version", "_name_or_path",
}
_LLAVA_OWNED = {
    "model_type", "text_config", "vision_config", "image_token_index", "image_token_id",
    "vision_feature_layer", "vision_feature_select_strategy", "projector_hidden_act",
    "multimodal_projector_bias", "architectures", "dtype", "torch_dtype", "transformers_version",
    "tie_word_embeddings", "image_seq_length", "_name_or_path",
}


def _extra(d: dict[str, Any], owned: set[str], **more) -> str:
  out = {k: v for k, v in d.items() if k not in owned}
  out.update({k: v for k, v in more.items() if v})
  return json.dumps(out, sort_keys=True)


def _rope_theta(d: dict[str, Any], where: str) -> float:
  rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
  kind = rope.get("rope_type", rope.get("type", "default"))
  if kind != "default":
    raise NotImplementedError(f"{where}: rope type {kind!r} is not supported (only 'default')")
  return float(rope.get("rope_theta", d.get("rope_theta", 10000.0)))


def text_from_hf(d: dict[str, Any], where: str, dtype: str, param_dtype: str,
                 source: str = "") -> TextConfig:
  import transformers

  model_type = d.get("model_type")
  if model_type not in TEXT_TYPES:
    raise ValueError(f"{where}: text model_type {model_type!r} is not supported; expected one of "
                     f"{list(TEXT_TYPES)}")
  full = transformers.AutoConfig.for_model(**d).to_dict()  # fills the family's defaults
  if full.get("use_sliding_window"):
    raise NotImplementedError(f"{where}: use_sliding_window=true is not supported")
  if model_type == "llama" and (full.get("attention_bias") or full.get("mlp_bias")):
    raise NotImplementedError(f"{where}: LLaMA with attention_bias/mlp_bias is not supported")
  if full.get("hidden_act", "silu") != "silu":
    raise NotImplementedError(f"{where}: hidden_act {full['hidden_act']!r} (expected 'silu')")
  moe = {}
  if model_type == "qwen2_moe":
    if full.get("shared_expert_intermediate_size"):
      raise NotImplementedError(f"{where}: Qwen2-MoE with a shared expert (shared_expert_intermediate_"
                                f"size={full['shared_expert_intermediate_size']}) is not supported")
    n, step, dense = full["num_experts"], full.get("decoder_sparse_step", 1), full["mlp_only_layers"]
    moe = dict(num_experts=n, num_experts_per_tok=full["num_experts_per_tok"],
               moe_intermediate_size=full["moe_intermediate_size"],
               norm_topk_prob=bool(full["norm_topk_prob"]),
               moe_layers=tuple(i for i in range(full["num_hidden_layers"])
                                if n and i not in dense and (i + 1) % step == 0))
  return TextConfig(**moe,
      model_type=model_type, vocab_size=full["vocab_size"], hidden_size=full["hidden_size"],
      intermediate_size=full["intermediate_size"], num_layers=full["num_hidden_layers"],
      num_heads=full["num_attention_heads"],
      num_kv_heads=full.get("num_key_value_heads") or full["num_attention_heads"],
      head_dim=full.get("head_dim") or 0, rope_theta=_rope_theta(full, where),
      rms_norm_eps=full["rms_norm_eps"],
      attention_bias=model_type == "qwen2" or bool(full.get("qkv_bias", model_type == "qwen2_moe")),
      tie_word_embeddings=bool(full.get("tie_word_embeddings", False)),
      max_position_embeddings=full["max_position_embeddings"],
      initializer_range=float(full.get("initializer_range", 0.02)), dtype=dtype, param_dtype=param_dtype,
      hf_extra=_extra(d, _TEXT_OWNED, _name_or_path=source))


def text_to_hf(cfg: TextConfig, dtype: str) -> dict[str, Any]:
  d = json.loads(cfg.hf_extra)
  d.pop("_name_or_path", None)
  d.update(
      model_type=cfg.model_type, vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
      intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_layers,
      num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
      rms_norm_eps=cfg.rms_norm_eps, tie_word_embeddings=cfg.tie_word_embeddings,
      max_position_embeddings=cfg.max_position_embeddings, hidden_act="silu", dtype=dtype,
      initializer_range=cfg.initializer_range,
      rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta})
  if cfg.head_dim and cfg.head_dim != cfg.hidden_size // cfg.num_heads:
    d["head_dim"] = cfg.head_dim
  if cfg.num_experts or cfg.model_type == "qwen2_moe":  # any sparse student exports as Qwen2-MoE
    d.update(
        model_type="qwen2_moe", num_experts=cfg.num_experts,
        num_experts_per_tok=cfg.num_experts_per_tok,
        moe_intermediate_size=cfg.moe_intermediate_size or cfg.intermediate_size,
        shared_expert_intermediate_size=0, norm_topk_prob=cfg.norm_topk_prob, decoder_sparse_step=1,
        mlp_only_layers=[i for i in range(cfg.num_layers) if i not in cfg.moe_layers],
        qkv_bias=cfg.attention_bias)
  elif cfg.model_type == "llama":
    d.update(attention_bias=False, mlp_bias=False)
  d["architectures"] = [{"qwen2": "Qwen2ForCausalLM", "llama": "LlamaForCausalLM",
                         "qwen2_moe": "Qwen2MoeForCausalLM"}[d["model_type"]]]
  return d


def vision_from_hf(d: dict[str, Any], where: str, dtype: str, param_dtype: str,
                   source: str = "") -> VisionConfig:
  import transformers

  if d.get("model_type") in ("clip", "siglip"):  # a full two-tower model: keep its image tower
    d = {**(d.get("vision_config") or {}), "model_type": f"{d['model_type']}_vision_model"}
  model_type = d.get("model_type")
  if model_type not in VISION_TYPES:
    raise ValueError(f"{where}: vision model_type {model_type!r} is not supported; expected one of "
                     f"{list(VISION_TYPES)}")
  full = transformers.AutoConfig.for_model(**d).to_dict()
  is_siglip = model_type == "siglip_vision_model"
  return VisionConfig(
      model_type=model_type, hidden_size=full["hidden_size"],
      intermediate_size=full["intermediate_size"], num_layers=full["num_hidden_layers"],
      num_heads=full["num_attention_heads"], image_size=full["image_size"],
      patch_size=full["patch_size"], num_channels=full.get("num_channels", 3),
      layer_norm_eps=full["layer_norm_eps"], hidden_act=full["hidden_act"],
      use_head=bool(is_siglip and full.get("vision_use_head", True)), dtype=dtype,
      param_dtype=param_dtype, hf_extra=_extra(d, _VISION_OWNED, _name_or_path=source))


def vision_to_hf(cfg: VisionConfig, dtype: str) -> dict[str, Any]:
  d = json.loads(cfg.hf_extra)
  d.pop("_name_or_path", None)
  d.update(
      model_type=cfg.model_type, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
      num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
      image_size=cfg.image_size, patch_size=cfg.patch_size, num_channels=cfg.num_channels,
      layer_norm_eps=cfg.layer_norm_eps, hidden_act=cfg.hidden_act, dtype=dtype)
  if not cfg.is_clip:
    d["vision_use_head"] = cfg.use_head
  d["architectures"] = ["CLIPVisionModel" if cfg.is_clip else "SiglipVisionModel"]
  return d


def llava_from_hf(d: dict[str, Any], where: str, dtype: str, param_dtype: str,
                  source: str = "") -> LlavaConfig:
  if "text_config" not in d or "vision_config" not in d:
    raise ValueError(f"{where}: a llava config needs 'text_config' and 'vision_config'")
  text_d = dict(d["text_config"])
  if "tie_word_embeddings" not in text_d and "tie_word_embeddings" in d:
    text_d["tie_word_embeddings"] = d["tie_word_embeddings"]
  layer = d.get("vision_feature_layer", -2)
  return LlavaConfig(
      text=text_from_hf(text_d, f"{where} (text_config)", dtype, param_dtype),
      vision=vision_from_hf(d["vision_config"], f"{where} (vision_config)", dtype, param_dtype),
      image_token_id=d.get("image_token_id", d.get("image_token_index", 32000)),
      vision_feature_layer=tuple(layer) if isinstance(layer, list) else int(layer),
      vision_feature_select_strategy=d.get("vision_feature_select_strategy", "default"),
      projector_hidden_act=d.get("projector_hidden_act", "gelu"),
      projector_bias=d.get("multimodal_projector_bias", True),
      hf_extra=_extra(d, _LLAVA_OWNED, _name_or_path=source))


def llava_to_hf(cfg: LlavaConfig, dtype: str) -> dict[str, Any]:
  d = json.loads(cfg.hf_extra)
  d.pop("_name_or_path", None)
  layer = cfg.vision_feature_layer
  d.update(
      model_type="llava", text_config=text_to_hf(cfg.text, dtype),
      vision_config=vision_to_hf(cfg.vision, dtype), image_token_index=cfg.image_token_id,
      vision_feature_layer=list(layer) if isinstance(layer, tuple) else layer,
      vision_feature_select_strategy=cfg.vision_feature_select_strategy,
      projector_hidden_act=cfg.projector_hidden_act, multimodal_projector_bias=cfg.projector_bias,
      tie_word_embeddings=cfg.text.tie_word_embeddings, image_seq_length=cfg.num_image_tokens,
      dtype=dtype, architectures=["LlavaForConditionalGeneration"])
  for sub in ("text_config", "vision_config"):
    d[sub].pop("architectures", None)
  return d


def config_from_hf(d: dict[str, Any], where: str, dtype: str, param_dtype: str, source: str = ""):
  """Our model config for an HF config dict (LLaVA, causal LM, or a CLIP/SigLIP tower); the original
  code's LLaVA configs are hf/original.py's."""
  model_type = d.get("model_type")
  if model_type == "llava":
    return llava_from_hf(d, where, dtype, param_dtype, source)
  if model_type in TEXT_TYPES:
    return text_from_hf(d, where, dtype, param_dtype, source)
  if model_type in VISION_TYPES or model_type in ("clip", "siglip"):
    return vision_from_hf(d, where, dtype, param_dtype, source)
  raise ValueError(
      f"{where}: model_type {model_type!r} (architectures {d.get('architectures')}) is not supported; "
      f"expected 'llava', one of {list(TEXT_TYPES)}, or a CLIP/SigLIP vision model")


def config_to_hf(cfg, dtype: str) -> dict[str, Any]:
  if isinstance(cfg, LlavaConfig):
    return llava_to_hf(cfg, dtype)
  if isinstance(cfg, VisionConfig):
    return vision_to_hf(cfg, dtype)
  return text_to_hf(cfg, dtype)


def source_dir(cfg) -> str:
  """The HF directory a config was read from ('' when built from scratch)."""
  return json.loads(cfg.hf_extra).get("_name_or_path", "")
