"""Image loading and the CLIP / SigLIP preprocessing of LLaVA, channels-last, in numpy.

    pixels = image.preprocess(image.load_image(path), kind="clip", size=336, aspect="pad")  # [336, 336, 3]

The numbers equal those of transformers' `CLIPImageProcessor` / `SiglipImageProcessor` (the PIL backend
that transformers 5 uses without torchvision; the tests compare both spellings):
- clip:   resize the shortest side to `size` (the other side `int(size * long / short)`), bicubic;
          center crop `size` x `size` at offset `(side - size) // 2`; rescale 1/255 (in float64, then
          float32); normalise with the OpenAI CLIP mean/std.
- siglip: resize to exactly `size` x `size`, bicubic; rescale; normalise with mean = std = 0.5.

`aspect`:
- "pad":    the original LLaVA's `expand2square`: paste the image centred on a square canvas filled with
            the mean colour as 0-255 integers (`int(m * 255)`, truncated), then the processor. Nothing is
            cropped away.
- "square": the processor only (CLIP's center crop drops the sides of a non-square image).
- "none":   an alias of "square", for configs that name the processor-only path that way.

Colour modes: every image is converted to RGB the way transformers does it, compositing transparency
onto white. (The original LLaVA calls PIL's `.convert("RGB")` at load time, which drops alpha instead;
the two differ only on transparent pixels.)

Text-only samples: we recommend that they carry no `<image>` token and no pixel values. When a batch
needs a fixed-shape pixel array anyway, fill the slot with `blank(size)` (zeros after normalisation,
i.e. the mean colour, the LLaVA convention of `torch.zeros(3, H, W)`) and mark the sample as having no
image, so its features are never spliced into the text. A sample whose text has no `<image>` never
consumes image features, whatever the pixel slot holds.
"""

from __future__ import annotations

import io
import os
from typing import Sequence

import numpy as np
from PIL import Image

from llavamod_jax import fileutil

# The processors' defaults (transformers.image_utils.OPENAI_CLIP_* and IMAGENET_STANDARD_*).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
SIGLIP_MEAN = (0.5, 0.5, 0.5)
SIGLIP_STD = (0.5, 0.5, 0.5)
DEFAULTS = {"clip": (CLIP_MEAN, CLIP_STD), "siglip": (SIGLIP_MEAN, SIGLIP_STD)}
ASPECTS = ("pad", "square", "none")


class ImageError(ValueError):
  """An image that cannot be read. `reason` is "missing" or "corrupt"; `source` names the file."""

  def __init__(self, message: str, *, source: str, reason: str):
    super().__init__(message)
    self.source = source
    self.reason = reason


def load_image(path_or_bytes: str | os.PathLike | bytes | bytearray | memoryview,
               name: str | None = None) -> Image.Image:
  """Reads and fully decodes an image file (local, or a URI such as gs://...) or encoded bytes into
  memory; the mode is left as stored.

  Raises `ImageError` (a ValueError) naming the file, or `name` for bytes, when it is missing, unreadable,
  empty or not a decodable image (truncated files included)."""
  if isinstance(path_or_bytes, (bytes, bytearray, memoryview)):
    source = name or "<image bytes>"
    data = bytes(path_or_bytes)
  else:
    source = os.fspath(path_or_bytes)
    try:
      with fileutil.open_file(source, "rb") as f:
        data = f.read()
    except FileNotFoundError as e:
      raise ImageError(f"image file {source!r} does not exist", source=source, reason="missing") from e
    except OSError as e:
      raise ImageError(f"image file {source!r} cannot be read: {e}", source=source, reason="missing") from e
  if not data:
    raise ImageError(f"image {source!r} is empty (0 bytes)", source=source, reason="corrupt")
  try:
    img = Image.open(io.BytesIO(data))
    img.load()  # PIL decodes lazily; truncated data only fails here
  except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError, ...
    raise ImageError(f"image {source!r} ({len(data)} bytes) cannot be decoded: {type(e).__name__}: {e}",
                     source=source, reason="corrupt") from e
  return img


def to_rgb(img: Image.Image) -> Image.Image:
  """RGB, with any transparency (an alpha band or a palette/greyscale transparency key) over white."""
  if img.mode == "RGB":
    return img
  if "A" in img.getbands() or img.info.get("transparency") is not None:
    rgba = img.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, rgba).convert("RGB")
  return img.convert("RGB")


def expand_to_square(img: Image.Image, fill: Sequence[int]) -> Image.Image:
  """The RGB image centred on a square canvas of its longer side filled with `fill` (0-255 ints)."""
  w, h = img.size
  if w == h:
    return img
  side = max(w, h)
  canvas = np.empty((side, side, 3), np.uint8)
  canvas[...] = np.asarray(fill, np.uint8)
  top, left = (side - h) // 2, (side - w) // 2
  canvas[top:top + h, left:left + w] = np.asarray(img)
  return Image.fromarray(canvas)


def pad_color(mean: Sequence[float]) -> tuple[int, ...]:
  """The canvas colour of "pad": the normalisation mean as truncated 0-255 integers, as the original."""
  return tuple(int(m * 255) for m in mean)


def resize_shortest_side(img: Image.Image, size: int) -> Image.Image:
  """Shortest side to `size`, the other to `int(size * long / short)` (rounded down), bicubic."""
  w, h = img.size
  short, long = (w, h) if w <= h else (h, w)
  new_long = int(size * long / short)
  new_w, new_h = (size, new_long) if w <= h else (new_long, size)
  return img.resize((new_w, new_h), resample=Image.Resampling.BICUBIC)


def center_crop(pixels: np.ndarray, size: int) -> np.ndarray:
  """The central `size` x `size` window of [H, W, C] pixels, at ((H - size) // 2, (W - size) // 2)."""
  h, w = pixels.shape[:2]
  if h < size or w < size:
    raise ValueError(f"center_crop: image {h}x{w} is smaller than the crop {size}x{size}")
  top, left = (h - size) // 2, (w - size) // 2
  return pixels[top:top + size, left:left + size]


def preprocess(pil_image: Image.Image | np.ndarray, kind: str = "clip", size: int = 336,
               aspect: str = "pad", mean: Sequence[float] | None = None,
               std: Sequence[float] | None = None) -> np.ndarray:
  """One image -> float32 [size, size, 3], what `CLIPImageProcessor` / `SiglipImageProcessor` (with
  `size`, and for CLIP `crop_size`, set to `size`) return, channels-last. `mean`/`std` override the
  processor defaults (and with "pad" the canvas colour). A uint8 [H, W, 3] array is accepted too."""
  if kind not in DEFAULTS:
    raise ValueError(f"image kind {kind!r}: expected one of {list(DEFAULTS)}")
  if aspect not in ASPECTS:
    raise ValueError(f"image aspect {aspect!r}: expected one of {list(ASPECTS)}")
  default_mean, default_std = DEFAULTS[kind]
  mean = tuple(default_mean if mean is None else mean)
  std = tuple(default_std if std is None else std)
  if len(mean) != 3 or len(std) != 3:
    raise ValueError(f"image mean {mean} / std {std}: expected 3 values each (RGB)")

  img = Image.fromarray(np.asarray(pil_image)) if isinstance(pil_image, np.ndarray) else pil_image
  img = to_rgb(img)
  if aspect == "pad":
    img = expand_to_square(img, pad_color(mean))
  if kind == "clip":
    pixels = center_crop(np.asarray(resize_shortest_side(img, size)), size)
  else:
    pixels = np.asarray(img.resize((size, size), resample=Image.Resampling.BICUBIC))
  # Rescale in float64 then cast, normalise in float32: the processors' order of rounding.
  x = (pixels.astype(np.float64) * (1 / 255)).astype(np.float32)
  return (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)


def blank(size: int) -> np.ndarray:
  """The pixel slot of a sample without an image: float32 zeros [size, size, 3] (the mean colour)."""
  return np.zeros((size, size, 3), np.float32)
