"""LLaVA: vision tower -> mlp2x_gelu projector -> image features scattered into the LM's embeddings.

Each `<image>` placeholder in the text has already been expanded to `num_image_tokens` copies of
`image_token_id`; image i of `pixel_values` ([images, H, W, 3], all samples' images in order) fills the
i-th run of those tokens, reading the batch row-major as transformers' masked_scatter does.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from llavamod_jax.models.configs import LlavaConfig, to_dtype
from llavamod_jax.models.layers import Linear, activation
from llavamod_jax.models.llm import DecoderLM
from llavamod_jax.models.vision import VisionTower


@flax.struct.dataclass
class LlavaOutput:
  logits: Any
  hidden_states: Any
  cache: Any = None


class Projector(nn.Module):
  """mlp2x_gelu: Linear -> GELU (exact) -> Linear."""

  cfg: LlavaConfig

  @nn.compact
  def __call__(self, x):
    cfg = self.cfg
    dtype, pdtype = to_dtype(cfg.text.dtype), to_dtype(cfg.text.param_dtype)
    h = cfg.text.hidden_size
    x = Linear(h, (None, "embed"), cfg.projector_bias, dtype, pdtype, name="linear_1")(x)
    x = activation(cfg.projector_hidden_act)(x)
    return Linear(h, ("mlp", "embed"), cfg.projector_bias, dtype, pdtype, name="linear_2")(x)


def _is_concrete(x) -> bool:
  return not isinstance(x, jax.core.Tracer)


class Llava(nn.Module):
  cfg: LlavaConfig

  def setup(self):
    self.vision_tower = VisionTower(self.cfg.vision)
    self.multi_modal_projector = Projector(self.cfg)
    self.language_model = DecoderLM(self.cfg.text)

  def image_features(self, pixel_values):
    """[images, H, W, 3] -> projected features [images, num_image_tokens, text_hidden]."""
    cfg = self.cfg
    hs = self.vision_tower(pixel_values).hidden_states
    layer = cfg.vision_feature_layer
    feats = (hs[layer] if isinstance(layer, int) else jnp.concatenate([hs[i] for i in layer], -1))
    if cfg.vision_feature_select_strategy == "default":
      feats = feats[:, 1:]
    elif cfg.vision_feature_select_strategy != "full":
      raise ValueError(f"vision_feature_select_strategy must be 'default' or 'full', "
                       f"got {cfg.vision_feature_select_strategy!r}")
    return self.multi_modal_projector(feats)

  def embed(self, input_ids, pixel_values=None):
    cfg = self.cfg
    is_image = input_ids == cfg.image_token_id
    if pixel_values is None:
      if _is_concrete(input_ids) and bool(is_image.any()):
        raise ValueError(f"input_ids hold {int(is_image.sum())} image tokens "
                         f"(id {cfg.image_token_id}) but no pixel_values were given")
      # Without images every id is text, as in transformers: a decode step may emit the image token id.
      return self.language_model.embed(input_ids)
    # The image token id may lie outside the embedding table; its rows are replaced anyway.
    x = self.language_model.embed(jnp.where(is_image, 0, input_ids))
    feats = self.image_features(pixel_values)
    feats = feats.reshape(-1, feats.shape[-1]).astype(x.dtype)  # [images * tokens, hidden]
    if _is_concrete(input_ids) and int(is_image.sum()) != feats.shape[0]:
      raise ValueError(
          f"image token count mismatch: input_ids hold {int(is_image.sum())} image tokens "
          f"(id {cfg.image_token_id}) but pixel_values give {pixel_values.shape[0]} image(s) x "
          f"{cfg.num_image_tokens} features = {feats.shape[0]}")
    slot = jnp.cumsum(is_image.reshape(-1)) - 1  # which feature row each image token takes
    gathered = feats[jnp.clip(slot, 0, feats.shape[0] - 1)].reshape(x.shape)
    return jnp.where(is_image[..., None], gathered, x)

  def __call__(self, input_ids, pixel_values=None, attention_mask=None, position_ids=None, *,
               cache=None, cache_index=None, compute_logits: bool = True,
               train: bool = False) -> LlavaOutput:
    out = self.language_model(
        attention_mask=attention_mask, position_ids=position_ids,
        inputs_embeds=self.embed(input_ids, pixel_values), cache=cache, cache_index=cache_index,
        compute_logits=compute_logits, train=train)
    return LlavaOutput(logits=out.logits, hidden_states=out.hidden_states, cache=out.cache)

  def logits(self, hidden_states):
    return self.language_model.logits(hidden_states)
