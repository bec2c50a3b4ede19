"""A tiny LLaVA over the trained test BPE, and a training workdir made by hand (the loop's contract)."""

from __future__ import annotations

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import text_tokenizers
from llavamod_jax import checkpoint, models, moe, workdir
from llavamod_jax.models import configs

IMAGE_SIZE = 28


def tokenizer():
  return text_tokenizers.trained_bpe()


def llava_config(vision: str = "clip") -> configs.LlavaConfig:
  tok = tokenizer()
  text = configs.TextConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=48, num_layers=2,
                            num_heads=4, num_kv_heads=2, rope_theta=10000.0,
                            max_position_embeddings=512)
  kw = dict(hidden_size=24, intermediate_size=40, num_layers=2, num_heads=4, image_size=IMAGE_SIZE,
            patch_size=7)
  tower = (configs.VisionConfig(**kw) if vision == "clip" else
           configs.VisionConfig(model_type="siglip_vision_model", hidden_act="gelu_pytorch_tanh",
                                layer_norm_eps=1e-6, **kw))
  return configs.LlavaConfig(
      text=text, vision=tower, image_token_id=tok.convert_tokens_to_ids("<image>"),
      vision_feature_select_strategy="default" if vision == "clip" else "full")


def random_params(model, seed: int = 0, scale: float = 0.3):
  """Random params of the model's shapes (norm weights near 1), faster than its init."""
  rng = np.random.default_rng(seed)

  def draw(path, s):
    name = jax.tree_util.keystr(path)
    x = rng.standard_normal(s.shape).astype(np.float32)
    return jnp.asarray(1.0 + 0.1 * x if "norm" in name and "scale" in name else scale * x, s.dtype)

  return jax.tree_util.tree_map_with_path(draw, nn.unbox(models.abstract_params(model)))


def student(seed: int = 0):
  """An MoE student (experts made different from each other), as the mimic stage leaves it."""
  dense = models.build(llava_config())
  model, params = moe.upcycle(dense, random_params(dense, seed), num_experts=4, top_k=2,
                              layers="sparse", seed=seed)
  rng = np.random.default_rng(seed + 1)
  params = jax.tree_util.tree_map_with_path(
      lambda p, x: x + 0.05 * rng.standard_normal(x.shape).astype(np.float32)
      if "experts" in jax.tree_util.keystr(p) else x, params)
  return model, params


def run_info(model, **kw) -> workdir.RunInfo:
  tok = tokenizer()
  cfg = model.cfg
  kind = "clip" if cfg.vision.is_clip else "siglip"
  return workdir.RunInfo(
      template="qwen", image=workdir.ImageSettings(kind, cfg.vision.image_size, "pad"),
      image_token_id=cfg.image_token_id, num_image_tokens=cfg.num_image_tokens,
      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, stage="mimic", **kw)


def make_workdir(path, model, params, *, step: int = 3, **info_kw):
  """WORKDIR/{checkpoints/<step>, tokenizer/, run.json, metrics.jsonl} as the training loop writes it."""
  checkpoint.save_model(path / workdir.CHECKPOINTS, model, params, step=step)
  tokenizer().save_pretrained(path / workdir.TOKENIZER)
  info = run_info(model, **info_kw)
  info.write(path)
  (path / workdir.METRICS).write_text(json.dumps({"step": step, "loss": 1.0}) + "\n")
  return info
