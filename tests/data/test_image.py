"""image.preprocess against transformers' CLIP / SigLIP image processors, and load_image's errors.

The reference is the PIL-backend processor (`CLIPImageProcessorPil`, `SiglipImageProcessorPil`), the
resize that the original LLaVA's `CLIPImageProcessor` did; without torchvision the plain class names
are that backend (checked once). Both sides do the same integer bicubic resize in PIL and the same float
arithmetic, so the results agree bit for bit; the tolerance only leaves room for other numpy builds.
"""

import importlib.util
import io

import numpy as np
import pytest
from PIL import Image

from llavamod_jax.data import image

import needs

skimage_data = needs.module("skimage.data")
transformers = needs.module("transformers")

TOL = 1e-6


def _photos():
  photos = {
      "astronaut": skimage_data.astronaut(),  # 512 x 512
      "coffee": skimage_data.coffee(),        # 400 x 600
      "chelsea": skimage_data.chelsea(),      # 300 x 451, odd width
      "rocket": skimage_data.rocket(),        # 427 x 640
      "camera": skimage_data.camera(),        # 512 x 512 greyscale
  }
  photos["wide"] = photos["astronaut"][200:261]    # 61 x 512: upsampled, odd padding
  photos["tall"] = photos["coffee"][:, 250:291]    # 400 x 41
  return {name: Image.fromarray(a) for name, a in photos.items()}


PHOTOS = _photos()
SIZES = [("clip", 336), ("clip", 224), ("siglip", 384), ("siglip", 224)]


def _processor(kind, size, pil_backend=True, **kwargs):
  if kind == "clip":
    cls = transformers.CLIPImageProcessorPil if pil_backend else transformers.CLIPImageProcessor
    proc = cls(size={"shortest_edge": size}, crop_size={"height": size, "width": size}, **kwargs)
  else:
    cls = transformers.SiglipImageProcessorPil if pil_backend else transformers.SiglipImageProcessor
    proc = cls(size={"height": size, "width": size}, **kwargs)
  return proc


def _reference(proc, img):
  out = proc(images=img, return_tensors="np")["pixel_values"]
  assert out.shape[0] == 1
  return out[0].transpose(1, 2, 0)  # [3, H, W] -> [H, W, 3]


def _expand2square_by_hand(img, mean):
  """The original LLaVA's pad: a new canvas in the mean colour, the image pasted at the centre."""
  img = img.convert("RGB")
  w, h = img.size
  if w == h:
    return img
  side = max(w, h)
  canvas = Image.new("RGB", (side, side), tuple(int(x * 255) for x in mean))
  canvas.paste(img, ((side - w) // 2, (side - h) // 2))
  return canvas


def _assert_close(ours, ref):
  assert ours.dtype == np.float32 and ours.shape == ref.shape
  diff = float(np.abs(ours - ref).max())
  assert diff <= TOL, diff


@pytest.mark.parametrize("kind,size", SIZES)
@pytest.mark.parametrize("name", sorted(PHOTOS))
def test_square_matches_processor(name, kind, size):
  proc = _processor(kind, size)
  img = PHOTOS[name]
  ours = image.preprocess(img, kind=kind, size=size, aspect="square")
  assert ours.shape == (size, size, 3)
  _assert_close(ours, _reference(proc, img))
  _assert_close(image.preprocess(img, kind=kind, size=size, aspect="none"), ours)


@pytest.mark.parametrize("kind,size", SIZES)
@pytest.mark.parametrize("name", sorted(PHOTOS))
def test_pad_matches_expand2square_then_processor(name, kind, size):
  proc = _processor(kind, size)
  img = PHOTOS[name]
  ref = _reference(proc, _expand2square_by_hand(img, proc.image_mean))
  _assert_close(image.preprocess(img, kind=kind, size=size, aspect="pad"), ref)


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_without_torchvision_the_plain_class_is_the_pil_processor(kind):
  """What `CLIPImageProcessor(...)` gives a user without torchvision is the reference above; with
  torchvision it is another backend (its own bicubic kernel), which this project does not follow."""
  if importlib.util.find_spec("torchvision") is not None:
    pytest.skip("torchvision is installed: the plain class resizes with torchvision")
  proc = _processor(kind, 224, pil_backend=False)
  assert proc.backend == "pil"
  img = PHOTOS["chelsea"]
  np.testing.assert_array_equal(_reference(proc, img), _reference(_processor(kind, 224), img))


def test_pad_keeps_the_whole_image_and_fills_with_the_mean():
  # A white 20 x 60 strip: after padding the top and bottom bands are the mean colour, which the
  # processor maps to (int(m * 255) / 255 - m) / s, close to zero.
  img = Image.new("RGB", (60, 20), (255, 255, 255))
  x = image.preprocess(img, kind="clip", size=60, aspect="pad")
  fill = np.asarray(image.pad_color(image.CLIP_MEAN), np.float32) / 255
  expected = (fill - np.asarray(image.CLIP_MEAN, np.float32)) / np.asarray(image.CLIP_STD, np.float32)
  np.testing.assert_allclose(x[0, 0], expected, atol=1e-6)
  np.testing.assert_allclose(x[-1, -1], expected, atol=1e-6)
  assert np.all(x[30, :] > 1.5)  # the white strip spans the full width
  assert image.pad_color(image.CLIP_MEAN) == (122, 116, 104)
  assert image.pad_color(image.SIGLIP_MEAN) == (127, 127, 127)


def _modes():
  rgb = np.asarray(PHOTOS["chelsea"])
  alpha = np.tile(np.linspace(0, 255, rgb.shape[1]).astype(np.uint8), (rgb.shape[0], 1))
  grey = np.asarray(PHOTOS["camera"])[:300, :400]
  palette = Image.fromarray(rgb).convert("P")
  palette_t = palette.copy()
  palette_t.info["transparency"] = int(np.asarray(palette)[0, 0])
  return {
      "RGBA": Image.fromarray(np.dstack([rgb, alpha]), "RGBA"),
      "L": Image.fromarray(grey),
      "LA": Image.fromarray(np.dstack([grey, alpha[:300, :400]]), "LA"),
      "P": palette,
      "P_transparency": palette_t,
  }


@pytest.mark.parametrize("mode", ["RGBA", "L", "LA", "P", "P_transparency"])
@pytest.mark.parametrize("kind,size", [("clip", 224), ("siglip", 224)])
def test_colour_modes_match_processor(mode, kind, size):
  img = _modes()[mode]
  proc = _processor(kind, size, pil_backend=True)
  _assert_close(image.preprocess(img, kind=kind, size=size, aspect="square"), _reference(proc, img))
  # "pad" sees the image as the processor would: transparency over white, then the canvas.
  rgb = image.to_rgb(img)
  assert rgb.mode == "RGB"
  ref = _reference(proc, _expand2square_by_hand(rgb, proc.image_mean))
  _assert_close(image.preprocess(img, kind=kind, size=size, aspect="pad"), ref)


def test_custom_mean_std():
  mean, std = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)
  img = PHOTOS["coffee"]
  proc = _processor("clip", 224, pil_backend=True, image_mean=list(mean), image_std=list(std))
  _assert_close(image.preprocess(img, "clip", 224, "square", mean=mean, std=std), _reference(proc, img))
  ref = _reference(proc, _expand2square_by_hand(img, mean))
  _assert_close(image.preprocess(img, "clip", 224, "pad", mean=mean, std=std), ref)


def test_numpy_input_and_blank():
  a = np.asarray(PHOTOS["rocket"])
  _assert_close(image.preprocess(a, "siglip", 224), image.preprocess(PHOTOS["rocket"], "siglip", 224))
  b = image.blank(224)
  assert b.shape == (224, 224, 3) and b.dtype == np.float32 and not b.any()


def test_bad_arguments():
  with pytest.raises(ValueError, match="kind"):
    image.preprocess(PHOTOS["coffee"], kind="vit")
  with pytest.raises(ValueError, match="aspect"):
    image.preprocess(PHOTOS["coffee"], aspect="anyres")


def _png_bytes(img):
  buf = io.BytesIO()
  img.save(buf, format="PNG")
  return buf.getvalue()


def test_load_image_roundtrip(tmp_path):
  path = tmp_path / "cat.png"
  path.write_bytes(_png_bytes(PHOTOS["chelsea"]))
  for src in (path, str(path), path.read_bytes()):
    img = image.load_image(src)
    assert img.mode == "RGB" and img.size == PHOTOS["chelsea"].size
    np.testing.assert_array_equal(np.asarray(img), np.asarray(PHOTOS["chelsea"]))


def test_load_image_missing(tmp_path):
  path = tmp_path / "nope" / "missing.jpg"
  with pytest.raises(image.ImageError, match="missing.jpg") as e:
    image.load_image(path)
  assert e.value.reason == "missing" and e.value.source == str(path)
  assert isinstance(e.value, ValueError)
  with pytest.raises(image.ImageError, match="cannot be read"):
    image.load_image(tmp_path)  # a folder


@pytest.mark.parametrize("payload", ["garbage", "empty", "truncated", "bad_header"])
def test_load_image_corrupt(tmp_path, payload):
  png = _png_bytes(PHOTOS["coffee"])
  data = {
      "garbage": b"this is not an image at all",
      "empty": b"",
      "truncated": png[: len(png) // 2],
      "bad_header": png[:8] + b"\x00" * 64 + png[72:],
  }[payload]
  path = tmp_path / f"{payload}.png"
  path.write_bytes(data)
  with pytest.raises(image.ImageError, match=f"{payload}.png") as e:
    image.load_image(path)
  assert e.value.reason == "corrupt"
  with pytest.raises(image.ImageError, match="record-7.jpg") as e:
    image.load_image(data, name="record-7.jpg")
  assert e.value.reason == "corrupt"
