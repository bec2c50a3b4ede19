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
import numpy as np

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
    h, init = cfg.text.hidden_size, nn.initializers.normal(cfg.text.initializer_range)
    x = Linear(h, (None, "embed"), cfg.projector_bias, dtype, pdtype, init, name="linear_1")(x)
    x = activation(cfg.projector_hidden_act)(x)
    return Linear(h, ("mlp", "embed"), cfg.projector_bias, dtype, pdtype, init, name="linear_2")(x)


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
    layers = ((cfg.vision_feature_layer,) if isinstance(cfg.vision_feature_layer, int)
              else tuple(cfg.vision_feature_layer))
    feats = jnp.concatenate(self.vision_tower(pixel_values, select=layers).selected, -1)
    if cfg.vision_feature_select_strategy == "default":
      feats = feats[:, 1:]
    elif cfg.vision_feature_select_strategy != "full":
      raise ValueError(f"vision_feature_select_strategy must be 'default' or 'full', "
                       f"got {cfg.vision_feature_select_strategy!r}")
    return self.multi_modal_projector(feats)

  def embed(self, input_ids, pixel_values=None, image_mask=None):
    """Token embeddings with image features in the image-token slots.

    image_mask None: transformers' layout — `pixel_values` holds exactly the batch's images, taken
    in order by the image tokens of row 0, then row 1, ... With `image_mask` [images] (the data
    pipeline's layout): row r owns slots r*K .. r*K+K-1 (K = images / batch), real images first;
    padding slots are never read.
    """
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
    feats = self.image_features(pixel_values)  # [images, tokens, hidden]
    n_tok = feats.shape[1]
    feats = feats.reshape(-1, feats.shape[-1]).astype(x.dtype)  # [images * tokens, hidden]
    if image_mask is None:  # transformers' rule: the batch's image tokens, row-major, in order
      if _is_concrete(input_ids) and int(is_image.sum()) != feats.shape[0]:
        raise ValueError(
            f"image token count mismatch: input_ids hold {int(is_image.sum())} image tokens "
            f"(id {cfg.image_token_id}) but pixel_values give {pixel_values.shape[0]} image(s) x "
            f"{n_tok} features = {feats.shape[0]}")
      slot = (jnp.cumsum(is_image.reshape(-1)) - 1).reshape(is_image.shape)
    else:  # each row owns an equal share of the image slots (the data pipeline's layout)
      b = input_ids.shape[0]
      if pixel_values.shape[0] % b:
        raise ValueError(f"pixel_values has {pixel_values.shape[0]} images, not a multiple of the "
                         f"batch size {b} (each row owns images_per_sample slots)")
      per_row = pixel_values.shape[0] // b
      if _is_concrete(input_ids) and _is_concrete(image_mask):
        want = np.asarray(image_mask).reshape(b, per_row).sum(1) * n_tok
        have = np.asarray(is_image).sum(1)
        bad = np.flatnonzero(want != have)
        if bad.size:
          r = int(bad[0])
          raise ValueError(f"image token count mismatch in row {r}: {int(have[r])} image tokens "
                           f"(id {cfg.image_token_id}) for {int(want[r]) // n_tok} real image(s) "
                           f"x {n_tok} features")
      slot = jnp.arange(b)[:, None] * (per_row * n_tok) + jnp.cumsum(is_image, axis=1) - 1
    gathered = feats[jnp.clip(slot, 0, feats.shape[0] - 1)]
    return jnp.where(is_image[..., None], gathered, x)

  def __call__(self, input_ids, pixel_values=None, attention_mask=None, position_ids=None, *,
               image_mask=None, cache=None, cache_index=None, compute_logits: bool = True,
               train: bool = False) -> LlavaOutput:
    out = self.language_model(
        attention_mask=attention_mask, position_ids=position_ids,
        inputs_embeds=self.embed(input_ids, pixel_values, image_mask), cache=cache,
        cache_index=cache_index,
        compute_logits=compute_logits, train=train)
    return LlavaOutput(logits=out.logits, hidden_states=out.hidden_states, cache=out.cache)

  def logits(self, hidden_states):
    return self.language_model.logits(hidden_states)
