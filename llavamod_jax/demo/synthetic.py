r"""The embedded demo dataset "shapes": images of coloured shapes with records in the real data formats.

    python -m llavamod_jax.demo.synthetic --out=DIR [--num_train=2000] [--num_eval=200] [--seed=0]
    manifest = synthetic.build(DIR, num_train=2000, num_eval=200, seed=0, image_size=64)

Sample i of a split is drawn from its own generator seeded by (seed, split, i), so it is the same whatever
the counts; train and eval use different streams. Each image holds 1-4 distinct (colour, shape) objects
(6 colours x 3 shapes) whose bounding circles do not overlap, drawn without anti-aliasing on a plain
light background, so the colour at an object's centre is exactly its palette colour.

Layout of DIR (image paths in the records are relative to DIR, the image root):
  images/train/000000.png ...   images/eval/000000.png ...
  captions_train.jsonl    one caption record per train image (stage 0, adaptor init)
  train.jsonl             single-turn records, one question each, with "task": caption | color | count |
  eval.jsonl              position | pope (one "yes" and one "no" per image); the gpt turn is the exact
                          reference answer
  pope_eval.jsonl         POPE-style existence questions, exactly half "yes", "category": random |
                          adversarial (negatives share a colour or a shape with a present object)
  preference_train.jsonl  RLAIF-V style {"id", "image", "question", "chosen", "rejected", ...}: the
  preference_eval.jsonl   rejected answer hallucinates an absent object or a wrong colour
  scenes.jsonl            ground truth per image (objects with colour, shape, centre, radius)
  manifest.json           name, version, seed, image_size, counts; written last
Conversation records are LLaVA JSON: {"id", "image", "conversations": [{"from": "human", "value":
"<image>\n..."}, {"from": "gpt", "value": ...}, ...]}; extra keys ("task", "category") are metadata.
Preference questions carry no "<image>" token, as in RLAIF-V; the loader adds it. Short answers are one
lower-case word ("red", "3", "left", "yes"); captions list the objects from left to right:
"A red circle, a blue square and a green triangle."

The build is written to a temporary folder beside DIR and renamed into place; a later call with the same
parameters finds the manifest and returns without writing. Local paths only; on several hosts build on one
process and wait for it.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import os
import shutil
import tempfile
from typing import Sequence

import numpy as np
from PIL import Image

NAME = "shapes"
VERSION = 2  # 2: single-question train records
COLORS = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "yellow": (240, 200, 20),
    "purple": (140, 50, 180),
    "black": (20, 20, 20),
}
SHAPES = ("circle", "square", "triangle")
COMBOS = tuple((c, s) for c in COLORS for s in SHAPES)  # the 18 object kinds
BACKGROUNDS = ((245, 245, 245), (235, 230, 215), (215, 228, 240))
SPLITS = {"train": 0, "eval": 1}
MAX_OBJECTS = 4
CAPTION_PROMPT = "Describe the image."
SHORT_ANSWER = "\nAnswer the question using a single word or phrase."


@dataclasses.dataclass(frozen=True)
class Shape:
  shape: str
  color: str
  x: float       # centre, pixels from the left
  y: float       # centre, pixels from the top
  radius: float  # of the bounding circle

  @property
  def name(self) -> str:
    return f"{self.color} {self.shape}"


@dataclasses.dataclass(frozen=True)
class Scene:
  split: str
  index: int
  size: int
  background: tuple[int, int, int]
  objects: tuple[Shape, ...]

  @property
  def image(self) -> str:
    """The image path relative to the dataset root."""
    return f"images/{self.split}/{self.index:06d}.png"

  def side(self, obj: Shape) -> str | None:
    """"left" / "right" when the whole object lies on one side of the vertical midline, else None."""
    if obj.x + obj.radius <= self.size / 2:
      return "left"
    if obj.x - obj.radius >= self.size / 2:
      return "right"
    return None

  @classmethod
  def from_dict(cls, d: dict) -> "Scene":
    """The inverse of `to_dict` (a line of scenes.jsonl)."""
    return cls(d["split"], d["index"], d["size"], tuple(d["background"]),
               tuple(Shape(o["shape"], o["color"], o["x"], o["y"], o["radius"]) for o in d["objects"]))

  def to_dict(self) -> dict:
    return {"image": self.image, "split": self.split, "index": self.index, "size": self.size,
            "background": list(self.background),
            "objects": [{"shape": o.shape, "color": o.color, "x": round(o.x, 3), "y": round(o.y, 3),
                         "radius": round(o.radius, 3)} for o in self.objects]}


def _rng(seed: int, split: str, index: int, stream: int) -> np.random.Generator:
  # stream 0 draws the scene, stream 1 the questions, so either can change without moving the other.
  return np.random.default_rng([seed, SPLITS[split], index, stream])


# ----------------------------------------------------------------------------- scenes and pixels

def scene(split: str, index: int, seed: int = 0, image_size: int = 64) -> Scene:
  """The ground truth of sample `index` of `split` ("train" or "eval")."""
  if split not in SPLITS:
    raise ValueError(f"split {split!r}: expected one of {list(SPLITS)}")
  rng = _rng(seed, split, index, 0)
  s = image_size
  background = BACKGROUNDS[rng.integers(len(BACKGROUNDS))]
  picks = rng.choice(len(COMBOS), size=rng.integers(1, MAX_OBJECTS + 1), replace=False)
  scale = 1.0
  while True:  # rejection-sample non-overlapping centres; shrink the objects if the layout is stuck
    placed: list[Shape] = []
    for k in picks:
      color, shape = COMBOS[k]
      for _ in range(50):
        r = rng.uniform(0.09, 0.15) * s * scale
        x, y = rng.uniform(r + 1, s - r - 1, size=2)
        if all((x - o.x) ** 2 + (y - o.y) ** 2 >= (r + o.radius + 1) ** 2 for o in placed):
          placed.append(Shape(shape, color, float(x), float(y), float(r)))
          break
      else:
        break
    if len(placed) == len(picks):
      return Scene(split, index, s, background, tuple(placed))
    scale *= 0.9


def _masks(sc: Scene):
  """(object, boolean pixel mask [size, size]) for each object, in drawing order."""
  ys, xs = np.mgrid[0:sc.size, 0:sc.size] + 0.5
  for o in sc.objects:
    dx, dy = xs - o.x, ys - o.y
    if o.shape == "circle":
      mask = dx ** 2 + dy ** 2 <= o.radius ** 2
    elif o.shape == "square":
      half = o.radius / np.sqrt(2)  # inscribed, so objects stay inside their non-overlapping circles
      mask = (np.abs(dx) <= half) & (np.abs(dy) <= half)
    else:  # an upward equilateral triangle with its centroid at the centre, inscribed in the circle
      depth = dy + o.radius  # from the apex down to the base at dy = radius / 2
      mask = (depth >= 0) & (dy <= o.radius / 2) & (np.abs(dx) <= depth / np.sqrt(3))
    yield o, mask


def render(sc: Scene) -> np.ndarray:
  """The scene's pixels, uint8 [size, size, 3]; hard edges, pixel centres at (i + 0.5)."""
  img = np.empty((sc.size, sc.size, 3), np.uint8)
  img[...] = sc.background
  for o, mask in _masks(sc):
    img[mask] = COLORS[o.color]
  return img


def png_bytes(pixels: np.ndarray) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(pixels).save(buf, format="PNG")
  return buf.getvalue()


# ----------------------------------------------------------------------------- labels

BACKGROUND = len(COMBOS)  # the patch label of a patch with (almost) no object pixels


def patch_labels(sc: Scene, patch: int, min_fraction: float = 0.125) -> np.ndarray:
  """Dense targets for a vision tower, int32 [(size // patch) ** 2] in row-major patch order: the
  index in COMBOS of the (colour, shape) kind that covers most of the patch's pixels, if it covers at
  least `min_fraction` of them, else BACKGROUND."""
  if sc.size % patch:
    raise ValueError(f"patch {patch} does not divide the image size {sc.size}")
  n = sc.size // patch
  cover = np.zeros((n * n, len(COMBOS)), np.int64)
  for o, mask in _masks(sc):
    per_patch = mask.reshape(n, patch, n, patch).sum((1, 3)).reshape(-1)
    cover[:, COMBOS.index((o.color, o.shape))] += per_patch
  best = cover.argmax(1)
  enough = cover.max(1) >= min_fraction * patch * patch
  return np.where(enough, best, BACKGROUND).astype(np.int32)


# ----------------------------------------------------------------------------- wording

def _article(word: str) -> str:
  return "an" if word[0] in "aeiou" else "a"


def describe(objects: Sequence[Shape]) -> str:
  """The canonical caption: the objects from left to right, "A red circle, a blue square and a ..."."""
  names = [f"{_article(o.name)} {o.name}" for o in sorted(objects, key=lambda o: o.x)]
  text = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
  return text[0].upper() + text[1:] + "."


@dataclasses.dataclass(frozen=True)
class QA:
  task: str
  question: str  # the full prompt text, without "<image>"
  answer: str


def caption_qa(sc: Scene) -> QA:
  return QA("caption", CAPTION_PROMPT, describe(sc.objects))


def color_qa(sc: Scene, rng: np.random.Generator) -> QA | None:
  """"What color is the circle?" about a shape that occurs exactly once."""
  unique = [o for o in sc.objects if sum(p.shape == o.shape for p in sc.objects) == 1]
  if not unique:
    return None
  o = unique[rng.integers(len(unique))]
  return QA("color", f"What color is the {o.shape}?" + SHORT_ANSWER, o.color)


def count_qa(sc: Scene, rng: np.random.Generator) -> QA:
  """"How many shapes are there?" or, half the time, "How many circles are there?" (zero included)."""
  if rng.random() < 0.5:
    return QA("count", "How many shapes are there?" + SHORT_ANSWER, str(len(sc.objects)))
  shape = SHAPES[rng.integers(len(SHAPES))]
  n = sum(o.shape == shape for o in sc.objects)
  return QA("count", f"How many {shape}s are there?" + SHORT_ANSWER, str(n))


def position_qa(sc: Scene, rng: np.random.Generator) -> QA | None:
  """"Is the red circle on the left or the right?" about an object wholly on one side."""
  sided = [o for o in sc.objects if sc.side(o)]
  if not sided:
    return None
  o = sided[rng.integers(len(sided))]
  return QA("position", f"Is the {o.name} on the left or the right?" + SHORT_ANSWER, sc.side(o))


def absent(sc: Scene, adversarial: bool = False) -> list[tuple[str, str]]:
  """(colour, shape) pairs not in the scene; adversarial ones share a colour or a shape with one that is."""
  present = {(o.color, o.shape) for o in sc.objects}
  out = [(c, s) for c in COLORS for s in SHAPES if (c, s) not in present]
  if adversarial:
    out = [(c, s) for c, s in out if any(c == pc or s == ps for pc, ps in present)]
  return out


def pope_qas(sc: Scene, rng: np.random.Generator, category: str = "random") -> list[QA]:
  """One "yes" (a present object) and one "no" (an absent one) existence question."""
  if category not in ("random", "adversarial"):
    raise ValueError(f"POPE category {category!r}: expected 'random' or 'adversarial'")
  pos = sc.objects[rng.integers(len(sc.objects))]
  negatives = absent(sc, adversarial=category == "adversarial")
  color, shape = negatives[rng.integers(len(negatives))]
  ask = "Is there {} {} in the image?" + SHORT_ANSWER
  return [QA("pope", ask.format(_article(pos.color), pos.name), "yes"),
          QA("pope", ask.format(_article(color), f"{color} {shape}"), "no")]


def hallucinate(sc: Scene, rng: np.random.Generator) -> tuple[str, list[Shape]]:
  """A wrong object list for a rejected caption: an absent object added ("add"), or one object's colour
  ("color") or shape ("shape") changed to a pair that is not in the scene."""
  present = {(o.color, o.shape) for o in sc.objects}
  options: dict[str, list[list[Shape]]] = {"add": [], "color": [], "shape": []}
  x = float(rng.uniform(0, sc.size))  # where the invented object sits in the left-to-right order
  options["add"] = [list(sc.objects) + [Shape(s, c, x, 0.0, 0.0)] for c, s in absent(sc)]
  for i, o in enumerate(sc.objects):
    for c in COLORS:
      if (c, o.shape) not in present:
        options["color"].append([*sc.objects[:i], dataclasses.replace(o, color=c), *sc.objects[i + 1:]])
    for s in SHAPES:
      if (o.color, s) not in present:
        options["shape"].append([*sc.objects[:i], dataclasses.replace(o, shape=s), *sc.objects[i + 1:]])
  kinds = [k for k in options if options[k]]
  kind = kinds[rng.integers(len(kinds))]
  return kind, options[kind][rng.integers(len(options[kind]))]


# ----------------------------------------------------------------------------- records

def _conversation(record_id: str, sc: Scene, qas: Sequence[QA], **extra) -> dict:
  turns = []
  for i, qa in enumerate(qas):
    turns.append({"from": "human", "value": ("<image>\n" if i == 0 else "") + qa.question})
    turns.append({"from": "gpt", "value": qa.answer})
  return {"id": record_id, "image": sc.image, "conversations": turns, **extra}


def records(sc: Scene, seed: int = 0) -> dict[str, list[dict]]:
  """Every record of one image: "captions", "preference", and "train" (train split) or "eval" and
  "pope" (eval split)."""
  rng = _rng(seed, sc.split, sc.index, 1)
  base = f"{NAME}-{sc.split}-{sc.index:06d}"
  cap = caption_qa(sc)
  color, count, position = color_qa(sc, rng), count_qa(sc, rng), position_qa(sc, rng)
  short = [qa for qa in (color, count, position) if qa is not None]
  out: dict[str, list[dict]] = {"captions": [_conversation(f"{base}-caption", sc, [cap], task="caption")]}

  # One question per record in both splits: in one multi-turn record the questions give each other's
  # answers away (a position question names a present object, which answers a POPE question), and a
  # model trained on those learns to read the conversation instead of the image (version 1 did).
  out[sc.split] = out["captions"] + [_conversation(f"{base}-{qa.task}", sc, [qa], task=qa.task)
                                     for qa in short]
  out[sc.split] += [_conversation(f"{base}-pope-{qa.answer}", sc, [qa], task="pope", category="random")
                    for qa in pope_qas(sc, rng, "random")]
  if sc.split == "eval":
    out["pope"] = [_conversation(f"{base}-pope-{cat}-{qa.answer}", sc, [qa], task="pope", category=cat)
                   for cat in ("random", "adversarial") for qa in pope_qas(sc, rng, cat)]

  kind, wrong = hallucinate(sc, rng)
  prefs = [{"id": f"{base}-pref-caption", "image": sc.image, "question": cap.question,
            "chosen": cap.answer, "rejected": describe(wrong), "task": "caption", "hallucination": kind}]
  if color is not None:
    others = [c for c in COLORS if c != color.answer]
    prefs.append({"id": f"{base}-pref-color", "image": sc.image, "question": color.question,
                  "chosen": color.answer, "rejected": others[rng.integers(len(others))],
                  "task": "color", "hallucination": "color"})
  out["preference"] = prefs
  return out


# ----------------------------------------------------------------------------- build

def _params(num_train: int, num_eval: int, seed: int, image_size: int) -> dict:
  return {"name": NAME, "version": VERSION, "seed": seed, "image_size": image_size,
          "num_train": num_train, "num_eval": num_eval}


def read_manifest(out_dir: str | os.PathLike) -> dict | None:
  try:
    with open(os.path.join(out_dir, "manifest.json")) as f:
      return json.load(f)
  except (FileNotFoundError, json.JSONDecodeError):
    return None


def _matches(manifest: dict | None, params: dict) -> bool:
  return manifest is not None and all(manifest.get(k) == v for k, v in params.items())


def _write(root: str, num_train: int, num_eval: int, seed: int, image_size: int) -> dict:
  files = {name: [] for name in ("captions_train", "train", "eval", "pope_eval", "preference_train",
                                 "preference_eval", "scenes")}
  for split, count in (("train", num_train), ("eval", num_eval)):
    os.makedirs(os.path.join(root, "images", split))
    for i in range(count):
      sc = scene(split, i, seed, image_size)
      with open(os.path.join(root, sc.image), "wb") as f:
        f.write(png_bytes(render(sc)))
      recs = records(sc, seed)
      files["scenes"].append(sc.to_dict())
      files[f"preference_{split}"] += recs["preference"]
      if split == "train":
        files["captions_train"] += recs["captions"]
        files["train"] += recs["train"]
      else:
        files["eval"] += recs["eval"]
        files["pope_eval"] += recs["pope"]
  for name, recs in files.items():
    with open(os.path.join(root, f"{name}.jsonl"), "w") as f:
      f.writelines(json.dumps(r) + "\n" for r in recs)
  manifest = {**_params(num_train, num_eval, seed, image_size),
              "files": {f"{name}.jsonl": len(recs) for name, recs in files.items()}}
  with open(os.path.join(root, "manifest.json"), "w") as f:
    json.dump(manifest, f, indent=1, sort_keys=True)
    f.write("\n")
  return manifest


def build(out_dir: str | os.PathLike, num_train: int = 2000, num_eval: int = 200, seed: int = 0,
          image_size: int = 64, overwrite: bool = False) -> dict:
  """Writes the dataset to `out_dir` (layout in the module docstring) and returns its manifest.

  A complete build with the same parameters is kept as it is. A previous shapes build with other
  parameters is replaced; any other non-empty `out_dir` raises FileExistsError unless `overwrite`."""
  if num_train < 0 or num_eval < 0 or image_size < 32:
    raise ValueError(f"shapes: num_train={num_train}, num_eval={num_eval} must be >= 0 and "
                     f"image_size={image_size} >= 32")
  out_dir = os.path.abspath(os.fspath(out_dir))
  params = _params(num_train, num_eval, seed, image_size)
  existing = read_manifest(out_dir)
  if _matches(existing, params):
    return existing
  if os.path.isdir(out_dir) and os.listdir(out_dir) and not overwrite and (
      existing is None or existing.get("name") != NAME):
    raise FileExistsError(f"{out_dir} is not empty and holds no shapes build (no manifest.json); "
                          "pass overwrite=True (--overwrite) to replace it")

  parent = os.path.dirname(out_dir)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.tmp-", dir=parent)
  try:
    manifest = _write(tmp, num_train, num_eval, seed, image_size)
    if os.path.isdir(out_dir) and os.listdir(out_dir):
      old = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.old-", dir=parent)
      os.replace(out_dir, old)  # onto the empty placeholder
      os.replace(tmp, out_dir)
      shutil.rmtree(old)
    else:
      try:
        os.replace(tmp, out_dir)
      except OSError:  # another process finished the same build first
        if not _matches(read_manifest(out_dir), params):
          raise
  finally:
    if os.path.exists(tmp):
      shutil.rmtree(tmp)
  return manifest


def main(argv: Sequence[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description="Build the synthetic shapes dataset.")
  parser.add_argument("--out", required=True, help="output folder (the image root of the records)")
  parser.add_argument("--num_train", type=int, default=2000, help="train images")
  parser.add_argument("--num_eval", type=int, default=200, help="held-out images")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--image_size", type=int, default=64, help="square image side in pixels")
  parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
  args = parser.parse_args(argv)
  manifest = build(args.out, args.num_train, args.num_eval, args.seed, args.image_size, args.overwrite)
  print(json.dumps(manifest, indent=1, sort_keys=True))


if __name__ == "__main__":
  main()
