"""Throughput of `launch/evaluate.py --benchmark` (docs/evaluation.md): the embedded demo's student on
small synthetic POPE- and MMBench-format benchmarks made of scikit-image photos.

    python bench/eval_speed.py [--pope=96] [--mmbench_rows=24] [--batch_size=8] [--max_new_tokens=4]
                               [--image_workers=2] [--length_multiple=16] [--repeats=2]
                               [--out=FILE.json]

The student is the one `configs/mimic.py` distils (the demo tokenizer; a scratch LLaVA of the
config's sizes with a 64-pixel CLIP tower, upcycled to 4 experts, top-2, on layers 0, 2, ...), with
random weights, exported as an HF directory. Weights change the speed only through when an answer
stops: random weights never stop early, so every answer runs to --max_new_tokens (a trained model
answers these in a token or two and EOS). The photos are stored at their own sizes (up to 1411 px),
as JPEG files for POPE and base64 JPEG inside the TSV for MMBench, so decoding costs what it costs on
COCO-sized images.

Each benchmark runs --repeats times in one process: the first pass compiles generation once per batch
shape, later passes reuse the programs. One markdown row per pass: questions and generated tokens per
second, and the share of the wall time spent generating and preprocessing (tokenisation plus waiting
for images; the decoding itself runs on worker threads, overlapped with generation, and its summed
time is the last column).
"""

from __future__ import annotations

import argparse
import base64
import importlib.util
import io
import json
import os
import platform
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry",
          "camera", "coins", "moon", "clock", "colorwheel", "retina")
OBJECTS = ("person", "cat", "cup", "rocket", "dog", "car", "clock", "coin", "star", "book", "chair",
           "bird", "boat", "bottle", "horse", "plate")
SUFFIX = "\nAnswer the question using a single word or phrase."
HINTS = ("", "The picture was taken in daylight.",
         "Look closely at the objects in the foreground and in the background of the image before "
         "you choose, and think about what each of them could be.")


def _module(path: Path, name: str):
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


# ---------------------------------------------------------------------------------------------
# The model and the benchmark files.
# ---------------------------------------------------------------------------------------------


def demo_student(root: Path) -> Path:
  """configs/mimic.py's student with random weights, exported as an HF directory under `root`."""
  from llavamod_jax import export, workdir
  from llavamod_jax.demo import assets
  from llavamod_jax.train import build

  cfg = _module(REPO / "configs" / "mimic.py", "mimic_config").get_config()
  d = cfg.demo
  d.cache = str(root / "demo_cache")
  d.shapes.num_train, d.shapes.num_eval = 64, 8  # only the tokenizer is trained on them
  tokenizer = assets.ensure_tokenizer(d)
  cfg.student.init = "scratch"
  cfg.student.scratch.image_size = d.shapes.image_size
  model, params = build.load_model(cfg.student, tokenizer, cfg, role="student")
  info = workdir.RunInfo(
      template=cfg.data.template, stage="mimic",
      image=workdir.ImageSettings("clip", model.cfg.vision.image_size, cfg.data.image_aspect),
      image_token_id=model.cfg.image_token_id, num_image_tokens=model.cfg.num_image_tokens,
      eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
  return export.export_hf(model, params, tokenizer, info, root / "student")


def photos() -> list[tuple[str, bytes]]:
  """(name, JPEG bytes) of scikit-image's photos at their own sizes."""
  from PIL import Image
  from skimage import data

  out = []
  for name in PHOTOS:
    buf = io.BytesIO()
    Image.fromarray(getattr(data, name)()).convert("RGB").save(buf, "JPEG", quality=90)
    out.append((name, buf.getvalue()))
  return out


def write_pope(root: Path, n: int, images: list[tuple[str, bytes]]):
  """llava_pope_test.jsonl, val2014/ and coco/coco_pope_<category>.json of `n` questions."""
  (root / "val2014").mkdir(parents=True)
  (root / "coco").mkdir()
  for name, jpeg in images:
    (root / "val2014" / f"{name}.jpg").write_bytes(jpeg)
  questions, labels = [], {"adversarial": [], "popular": [], "random": []}
  for i in range(n):
    category = sorted(labels)[i % 3]
    image, obj = f"{images[i % len(images)][0]}.jpg", OBJECTS[(7 * i) % len(OBJECTS)]
    text = f"Is there a {obj} in the image?"
    questions.append({"question_id": i, "image": image, "text": text + SUFFIX, "category": category})
    labels[category].append({"question_id": len(labels[category]) + 1, "image": image, "text": text,
                             "label": "yes" if i % 2 else "no"})
  (root / "llava_pope_test.jsonl").write_text("".join(json.dumps(q) + "\n" for q in questions))
  for category, rows in labels.items():
    (root / "coco" / f"coco_pope_{category}.json").write_text(
        "".join(json.dumps(r) + "\n" for r in rows))
  return root / "llava_pope_test.jsonl", root / "val2014", root / "coco"


def write_mmbench(path: Path, rows: int, images: list[tuple[str, bytes]]) -> Path:
  """An MMBench dev-format TSV of `rows` four-option questions (each asked in 4 rotations)."""
  header = ["index", "question", "hint", "A", "B", "C", "D", "answer", "image", "category",
            "l2-category"]
  lines = ["\t".join(header)]
  for i in range(rows):
    name, jpeg = images[i % len(images)]
    options = [OBJECTS[(i + k * 5) % len(OBJECTS)] for k in range(4)]
    lines.append("\t".join([
        str(i), f"Which of these is closest to what photo {name} shows?", HINTS[i % 3] or "nan",
        *options, "ABCD"[i % 4], base64.b64encode(jpeg).decode(), "object_localization",
        "finegrained_perception"]))
  path.write_text("\n".join(lines) + "\n")
  return path


# ---------------------------------------------------------------------------------------------
# Timing.
# ---------------------------------------------------------------------------------------------


def run(evaluate, name: str, args: list[str], repeats: int, out: Path) -> list[dict]:
  rows = []
  for r in range(repeats):
    scores = evaluate.main(evaluate.parse(["evaluate", f"--benchmark={name}", *args,
                                           f"--out={out / f'{name}_{r}.json'}"]))
    g = scores["generation"]
    rows.append({"benchmark": name, "pass": r + 1, **g,
                 "tokens_per_second": g["tokens"] / g["total_s"]})
  return rows


def table(rows: list[dict]) -> str:
  lines = ["| benchmark | pass | questions | batches | shapes | questions/s | tokens/s | generation | "
           "preprocessing | image decode (worker s) |", "|---|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    lines.append(
        f"| {r['benchmark']} | {r['pass']}{' (compiles)' if r['pass'] == 1 else ''} | "
        f"{r['questions']} | {r['batches']} | {r['shapes']} | {r['questions_per_second']:.1f} | "
        f"{r['tokens_per_second']:.0f} | {r['generate_share']:.0%} | {r['preprocess_share']:.0%} | "
        f"{r['image_s']:.2f} |")
  return "\n".join(lines)


def main(argv=None) -> dict:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--pope", type=int, default=96, help="POPE questions")
  ap.add_argument("--mmbench_rows", type=int, default=24, help="MMBench rows (x4 rotations)")
  ap.add_argument("--batch_size", type=int, default=8)
  ap.add_argument("--max_new_tokens", type=int, default=4)
  ap.add_argument("--image_workers", type=int, default=min(4, os.cpu_count() or 1))
  ap.add_argument("--length_multiple", type=int, default=16, help="prompt padding (one compile each)")
  ap.add_argument("--repeats", type=int, default=2)
  ap.add_argument("--out", default="", help="also write the rows as JSON here")
  args = ap.parse_args(argv)

  import jax

  from llavamod_jax import cli

  cli.quiet_orbax()
  evaluate = _module(REPO / "launch" / "evaluate.py", "launch_evaluate")
  with tempfile.TemporaryDirectory() as tmp:
    root = Path(tmp)
    model = demo_student(root)
    images = photos()
    questions, image_root, labels = write_pope(root / "pope", args.pope, images)
    tsv = write_mmbench(root / "mmbench_dev.tsv", args.mmbench_rows, images)
    common = [f"--hf_dir={model}", f"--batch_size={args.batch_size}",
              f"--max_new_tokens={args.max_new_tokens}", f"--image_workers={args.image_workers}",
              f"--length_multiple={args.length_multiple}"]
    rows = run(evaluate, "pope", [f"--questions={questions}", f"--image_root={image_root}",
                                  f"--annotations={labels}", *common], args.repeats, root)
    rows += run(evaluate, "mmbench", [f"--questions={tsv}", *common], args.repeats, root)

  machine = (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
             f"jax {jax.__version__} on {jax.devices()[0].platform}")
  settings = (f"batch {args.batch_size}, {args.max_new_tokens} new tokens per answer, "
              f"{args.image_workers} image workers, prompts padded to x{args.length_multiple}")
  print(f"\n{machine}; {settings}\n\n{table(rows)}")
  result = {"machine": machine, "settings": settings, "rows": rows}
  if args.out:
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
  return result


if __name__ == "__main__":
  main()
