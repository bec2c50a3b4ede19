"""CLIP and SigLIP towers against transformers' vision models on the same random weights."""

import jax.numpy as jnp
import numpy as np
import pytest

import tiny_hf
from llavamod_jax import hf


def _hf_hidden(ref, pix):
  import torch
  with torch.no_grad():
    out = ref(pixel_values=torch.as_tensor(pix.transpose(0, 3, 1, 2).copy()), output_hidden_states=True)
  return out


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_tower_hidden_states_match(kind, tmp_path, torch):
  import transformers
  cls = transformers.CLIPVisionModel if kind == "clip" else transformers.SiglipVisionModel
  ref = tiny_hf.randomize(cls(tiny_hf.vision_config(kind)), seed=3)
  model, params = hf.load(tiny_hf.save(ref, tmp_path / kind))
  pix = np.random.default_rng(0).standard_normal((2, 28, 28, 3)).astype(np.float32)
  out = model.apply({"params": params}, jnp.asarray(pix))
  want = _hf_hidden(ref, pix)
  assert len(out.hidden_states) == len(want.hidden_states) == 4
  for got, exp in zip(out.hidden_states, want.hidden_states):
    assert tiny_hf.rel_err(got, exp.numpy()) < 1e-4
  assert tiny_hf.rel_err(out.last_hidden_state, want.last_hidden_state.numpy()) < 1e-4
  assert tiny_hf.rel_err(out.pooled, want.pooler_output.numpy()) < 1e-4
  n_tokens = 16 + (1 if kind == "clip" else 0)
  assert out.hidden_states[-2].shape == (2, n_tokens, 24)


def test_full_clip_model_loads_its_image_tower(tmp_path, torch):
  """A two-tower CLIPModel checkpoint (what LLaVA's original code loads) gives the vision tower."""
  import transformers
  cfg = transformers.CLIPConfig(
      vision_config=tiny_hf.vision_config("clip").to_dict(),
      text_config=dict(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                       num_attention_heads=2), projection_dim=8)
  ref = tiny_hf.randomize(transformers.CLIPModel(cfg), seed=4)
  model, params = hf.load(tiny_hf.save(ref, tmp_path / "clip"))
  pix = np.random.default_rng(1).standard_normal((1, 28, 28, 3)).astype(np.float32)
  import torch as t
  with t.no_grad():
    want = ref.vision_model(pixel_values=t.as_tensor(pix.transpose(0, 3, 1, 2).copy()),
                            output_hidden_states=True).hidden_states[-2].numpy()
  got = model.apply({"params": params}, jnp.asarray(pix)).hidden_states[-2]
  assert tiny_hf.rel_err(got, want) < 1e-4


def test_channels_first_input_is_rejected(tmp_path, torch):
  import transformers
  ref = tiny_hf.randomize(transformers.CLIPVisionModel(tiny_hf.vision_config("clip")))
  model, params = hf.load(tiny_hf.save(ref, tmp_path / "c"))
  with pytest.raises(ValueError, match=r"channels-last \[images, H, W, 3\].*\(1, 3, 28, 28\)"):
    model.apply({"params": params}, jnp.zeros((1, 3, 28, 28)))
