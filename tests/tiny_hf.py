"""Tiny random Hugging Face models (torch) for parity tests.

Every floating parameter is random, including biases and norm weights (not HF's zeros/ones init), so a
mapping that drops or transposes any tensor shows up in the logits.
"""

from __future__ import annotations

import numpy as np

IMAGE_TOKEN = 120
VOCAB = 128


def randomize(model, seed: int = 0):
  import torch

  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=g, dtype=torch.float32)
      if "norm" in name and name.endswith("weight"):
        p.copy_(1.0 + 0.1 * noise)
      elif name.endswith("bias"):
        p.copy_(0.1 * noise)
      elif name.endswith(("q_proj.weight", "k_proj.weight")):
        p.copy_(0.3 * noise)  # peaked attention, so position and mask mistakes change the output
      else:
        p.copy_(0.05 * noise)
  return model.eval()


def text_config(family: str = "qwen2", tie: bool | None = None, **kw):
  import transformers

  common = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                rms_norm_eps=1e-6)
  common.update(kw)
  if family == "qwen2":
    return transformers.Qwen2Config(rope_theta=10000.0, tie_word_embeddings=bool(tie), **common)
  return transformers.LlamaConfig(rope_theta=500000.0, tie_word_embeddings=True if tie is None else tie,
                                  **common)


def vision_config(kind: str = "clip", **kw):
  import transformers

  common = dict(hidden_size=24, intermediate_size=40, num_hidden_layers=3, num_attention_heads=4,
                image_size=28, patch_size=7)
  common.update(kw)
  if kind == "clip":
    return transformers.CLIPVisionConfig(projection_dim=16, **common)
  return transformers.SiglipVisionConfig(**common)


def llava(vision: str = "clip", text: str = "qwen2", seed: int = 0, **kw):
  import transformers

  tc = text_config(text)
  cfg = transformers.LlavaConfig(
      vision_config=vision_config(vision), text_config=tc, image_token_index=IMAGE_TOKEN,
      vision_feature_select_strategy="default" if vision == "clip" else "full",
      tie_word_embeddings=tc.tie_word_embeddings, **kw)
  return randomize(transformers.LlavaForConditionalGeneration(cfg), seed)


def causal_lm(family: str = "qwen2", seed: int = 0, **kw):
  import transformers

  cls = transformers.Qwen2ForCausalLM if family == "qwen2" else transformers.LlamaForCausalLM
  return randomize(cls(text_config(family, **kw)), seed)


def save(model, path, **kw):
  model.save_pretrained(path, **kw)
  return path


def torch_logits(model, input_ids, attention_mask=None, pixel_values=None, position_ids=None):
  """Logits from a transformers model; pixel_values given channels-last like ours."""
  import torch

  kw = {"input_ids": torch.as_tensor(np.asarray(input_ids), dtype=torch.long)}
  if attention_mask is not None:
    kw["attention_mask"] = torch.as_tensor(np.asarray(attention_mask), dtype=torch.long)
  if position_ids is not None:
    kw["position_ids"] = torch.as_tensor(np.asarray(position_ids), dtype=torch.long)
  if pixel_values is not None:
    kw["pixel_values"] = torch.as_tensor(np.asarray(pixel_values).transpose(0, 3, 1, 2).copy())
  with torch.no_grad():
    return model(**kw).logits.float().numpy()


def rel_err(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.max(np.abs(a - b)) / (np.max(np.abs(b)) + 1e-12))
