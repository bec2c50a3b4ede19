"""LLaVA (CLIP/SigLIP tower + projector + Qwen2/LLaMA) against transformers on the same weights."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tiny_hf
from llavamod_jax import hf

COMBOS = [("clip", "qwen2"), ("siglip", "qwen2"), ("clip", "llama")]


def _prompt(rng, n_image_tokens, images_per_row, length):
  """Token ids with each row's images as runs of image tokens at random places."""
  ids = rng.integers(0, 100, (len(images_per_row), length))
  for row, n in enumerate(images_per_row):
    starts = sorted(rng.choice(length // n - n_image_tokens, 1)[0] + k * (length // n) for k in range(n))
    for s in starts:
      ids[row, s:s + n_image_tokens] = tiny_hf.IMAGE_TOKEN
  return ids


@pytest.fixture(scope="module", params=COMBOS, ids=["-".join(c) for c in COMBOS])
def pair(request, tmp_path_factory, torch):
  vision, text = request.param
  ref = tiny_hf.llava(vision, text, seed=2)
  model, params = hf.load(tiny_hf.save(ref, tmp_path_factory.mktemp("llava")))
  return ref, model, params


def test_logits_match_transformers(pair):
  ref, model, params = pair
  rng = np.random.default_rng(0)
  ids = _prompt(rng, model.cfg.num_image_tokens, [1, 1], 24)
  pix = rng.standard_normal((2, 28, 28, 3)).astype(np.float32)
  got = model.apply({"params": params}, jnp.asarray(ids), jnp.asarray(pix)).logits
  assert tiny_hf.rel_err(got, tiny_hf.torch_logits(ref, ids, pixel_values=pix)) < 1e-4


def test_several_images_per_sample_and_padding(pair):
  ref, model, params = pair
  rng = np.random.default_rng(1)
  n = model.cfg.num_image_tokens
  ids = _prompt(rng, n, [2, 1], 2 * n + 10)
  mask = np.ones_like(ids)
  mask[1, -4:] = 0  # right padding on the second row
  pix = rng.standard_normal((3, 28, 28, 3)).astype(np.float32)
  got = np.asarray(model.apply({"params": params}, jnp.asarray(ids), jnp.asarray(pix),
                               jnp.asarray(mask)).logits)
  want = tiny_hf.torch_logits(ref, ids, mask, pixel_values=pix)
  valid = mask.astype(bool)
  assert tiny_hf.rel_err(got[valid], want[valid]) < 1e-4


def test_text_only_batch(pair):
  ref, model, params = pair
  ids = np.random.default_rng(2).integers(0, 100, (2, 7))
  got = model.apply({"params": params}, jnp.asarray(ids)).logits
  assert tiny_hf.rel_err(got, tiny_hf.torch_logits(ref, ids)) < 1e-4


def test_feature_layer_list(tmp_path, torch):
  ref = tiny_hf.llava("clip", "qwen2", seed=5, vision_feature_layer=[-3, -1])
  model, params = hf.load(tiny_hf.save(ref, tmp_path / "m"))
  assert params["multi_modal_projector"]["linear_1"]["kernel"].shape[0] == 2 * 24
  rng = np.random.default_rng(3)
  ids = _prompt(rng, model.cfg.num_image_tokens, [1], 20)
  pix = rng.standard_normal((1, 28, 28, 3)).astype(np.float32)
  got = model.apply({"params": params}, jnp.asarray(ids), jnp.asarray(pix)).logits
  assert tiny_hf.rel_err(got, tiny_hf.torch_logits(ref, ids, pixel_values=pix)) < 1e-4


def test_image_token_count_mismatch_is_an_error(pair):
  _, model, params = pair
  n = model.cfg.num_image_tokens
  ids = np.zeros((1, n + 4), np.int32)
  ids[0, 1:1 + n - 1] = tiny_hf.IMAGE_TOKEN  # one token short
  pix = jnp.zeros((1, 28, 28, 3))
  with pytest.raises(ValueError, match=rf"input_ids hold {n - 1} image tokens.*1 image\(s\) x {n}"):
    model.apply({"params": params}, jnp.asarray(ids), pix)
  ids[0, 1:1 + n] = tiny_hf.IMAGE_TOKEN
  with pytest.raises(ValueError, match="no pixel_values"):
    model.apply({"params": params}, jnp.asarray(ids))


def test_row_owned_image_slots_with_padding_images(pair):
  """The data pipeline's layout: K slots per row, blanks unread; equals transformers' in-order fill."""
  ref, model, params = pair
  rng = np.random.default_rng(4)
  n = model.cfg.num_image_tokens
  ids = _prompt(rng, n, [2, 1], 2 * n + 10)  # row 0: two images, row 1: one image
  real = rng.standard_normal((3, 28, 28, 3)).astype(np.float32)
  slots = np.concatenate([real[:2], real[2:], np.zeros((1, 28, 28, 3), np.float32)])  # K = 2
  image_mask = np.array([1, 1, 1, 0])
  got = model.apply({"params": params}, jnp.asarray(ids), jnp.asarray(slots),
                    image_mask=jnp.asarray(image_mask)).logits
  want = tiny_hf.torch_logits(ref, ids, pixel_values=real)
  assert tiny_hf.rel_err(got, want) < 1e-4
  with pytest.raises(ValueError, match="mismatch in row 1: 1 image tokens"):
    bad = ids.copy()
    bad[1, np.flatnonzero(bad[1] == tiny_hf.IMAGE_TOKEN)[:n - 1]] = 5
    model.apply({"params": params}, jnp.asarray(bad), jnp.asarray(slots),
                image_mask=jnp.asarray(image_mask))


@pytest.mark.parametrize("std", [0.02, 0.1])
def test_initializer_range_sets_every_fresh_matrix(std, tmp_path, torch):
  """A model built from scratch draws its LM and projector matrices from N(0, initializer_range²), as
  transformers does for the text config's field; the field survives an HF round trip."""
  import transformers

  from llavamod_jax import models
  from llavamod_jax.models.configs import LlavaConfig, TextConfig, VisionConfig

  text = TextConfig(vocab_size=256, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4,
                    num_kv_heads=2, num_experts=4, moe_layers=(1,), initializer_range=std)
  cfg = LlavaConfig(text=text, vision=VisionConfig(hidden_size=32, intermediate_size=64, num_layers=1,
                                                   num_heads=2, image_size=28, patch_size=14),
                    image_token_id=255)
  model = models.build(cfg)
  params = models.init_params(model, 0)
  flat = {"/".join(str(getattr(k, "key", k)) for k in path): np.asarray(v)
          for path, v in jax.tree_util.tree_flatten_with_path(params)[0]}
  checked = 0
  for name, value in flat.items():
    if name.startswith("vision_tower") or value.ndim < 2 or name.endswith("router"):
      continue  # the tower keeps its own init; the router is torch.nn.Linear's, as in the original
    assert value.std() == pytest.approx(std, rel=0.1), name
    assert abs(value.mean()) < 0.1 * std, name
    checked += 1
  assert checked >= 2 * 7 + 3  # 2 layers x (q, k, v, o, and the FFN's three) + embed, head, projector
  out = hf.save(model, params, tmp_path / "hf")
  assert transformers.AutoConfig.from_pretrained(out).text_config.initializer_range == std
  assert hf.load(out)[0].cfg.text.initializer_range == std
