"""Flax (linen) models: decoder LM, ViT towers, LLaVA."""

from llavamod_jax.models.configs import LlavaConfig, TextConfig, VisionConfig
from llavamod_jax.models.llava import Llava
from llavamod_jax.models.llm import DecoderLM, init_cache
from llavamod_jax.models.vision import VisionTower

__all__ = ["DecoderLM", "Llava", "LlavaConfig", "TextConfig", "VisionConfig", "VisionTower", "build",
           "init_cache", "abstract_params", "init_params", "dummy_inputs", "forward", "lm_head"]


def build(cfg):
  """The module for a model config."""
  if isinstance(cfg, LlavaConfig):
    return Llava(cfg)
  if isinstance(cfg, TextConfig):
    return DecoderLM(cfg)
  if isinstance(cfg, VisionConfig):
    return VisionTower(cfg)
  raise TypeError(f"no model for config of type {type(cfg).__name__}")


def dummy_inputs(cfg) -> dict:
  """Smallest inputs that touch every parameter of a model (for init and shape inference)."""
  import jax.numpy as jnp

  if isinstance(cfg, LlavaConfig):
    v = cfg.vision
    return {"input_ids": jnp.full((1, cfg.num_image_tokens), cfg.image_token_id, jnp.int32),
            "pixel_values": jnp.zeros((1, v.image_size, v.image_size, v.num_channels), jnp.float32)}
  if isinstance(cfg, TextConfig):
    return {"input_ids": jnp.zeros((1, 1), jnp.int32)}
  return {"pixel_values": jnp.zeros((1, cfg.image_size, cfg.image_size, cfg.num_channels), jnp.float32)}


def _init(model, rng):
  return model.init(rng, **dummy_inputs(model.cfg))["params"]


def abstract_params(model):
  """Parameter shapes/dtypes as `nn.LogicallyPartitioned` ShapeDtypeStructs (no memory used)."""
  import jax

  return jax.eval_shape(lambda: _init(model, jax.random.key(0)))


def init_params(model, seed: int = 0):
  """Random parameters (plain nested dict of arrays) for a model."""
  import flax.linen as nn
  import jax

  return nn.unbox(jax.jit(lambda rng: _init(model, rng))(jax.random.key(seed)))


def forward(model, params, batch, prefix: str = "", *, train: bool = False, rng=None,
            logits: bool = True):
  """`model` on a batch's arrays -> (output, the MoE collection: aux losses and routing metrics).

  `prefix` reads that view's arrays (`teacher_input_ids`, ...; data.pipeline) where the batch has
  them, the shared ones elsewhere. `rng` feeds router noise; `logits=False` leaves the LM head out
  (for chunked losses)."""
  def get(name):
    return batch.get(prefix + name, batch.get(name))

  rngs = {"router": rng} if rng is not None else {}
  out, state = model.apply({"params": params}, get("input_ids"), get("pixel_values"),
                           get("attention_mask"), image_mask=get("image_mask"), train=train,
                           compute_logits=logits, mutable=["moe"], rngs=rngs)
  return out, state.get("moe", {})


def lm_head(model, params):
  """The LM head alone, for losses that differentiate it apart from the model (losses.fused_*):
  -> (head_params, fn) with head_params the part of `params` the head reads (the `lm_head` kernel,
  or the token embedding when the embeddings are tied; same nesting as in `params`) and
  fn(head_params, hidden_states) -> logits, what `model.logits` computes."""
  text = model.cfg.text if isinstance(model.cfg, LlavaConfig) else model.cfg
  path = ("language_model",) if isinstance(model.cfg, LlavaConfig) else ()
  name = "embed_tokens" if text.tie_word_embeddings else "lm_head"
  sub = params
  for key in path:
    sub = sub[key]
  head = {name: sub[name]}
  for key in reversed(path):
    head = {key: head}

  def fn(head_params, hidden_states):
    return model.apply({"params": head_params}, hidden_states, method=model.logits)
  return head, fn
