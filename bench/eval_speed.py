"""Throughput of `launch/evaluate.py --benchmark` (docs/evaluation.md): the embedded demo's student on
small synthetic benchmarks in the formats of all six (POPE, MME, TextVQA, GQA, ScienceQA, MMBench)
made of scikit-image photos.

    python bench/eval_speed.py [--pope=96] [--mme=N] [--textvqa=N] [--gqa=N] [--scienceqa=N]
                               [--mmbench_rows=24] [--batch_size=8] [--max_new_tokens=4]
                               [--image_workers=2] [--length_multiple=16] [--repeats=2]
                               [--out=FILE.json]

--mme, --textvqa, --gqa and --scienceqa count questions and default to a quarter of --pope each; 0
leaves a benchmark out (so --pope=3 alone times POPE and MMBench only).

The student is the one `configs/mimic.py` distils (the demo tokenizer; a scratch LLaVA of the
config's sizes with a 64-pixel CLIP tower, upcycled to 4 experts, top-2, on layers 0, 2, ...), with
random weights, exported as an HF directory. Weights change the speed only through when an answer
stops: random weights never stop early, so every answer runs to --max_new_tokens (a trained model
answers these in a token or two and EOS). The photos are stored at their own sizes (up to 1411 px),
as JPEG files (base64 JPEG inside the TSV for MMBench), so decoding costs what it costs on COCO-sized
images. Every fourth ScienceQA problem is text only, as about half of ScienceQA's test set is.

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


def write_mme(root: Path, n: int, images: list[tuple[str, bytes]]) -> list[str]:
  """llava_mme.jsonl (two yes/no questions per image, as MME asks), the images in per-subtask
  folders and eval_tool's <subtask>.txt ground truth, for `n` questions."""
  subtasks = ("existence", "count", "position", "color")
  questions, truth = [], {t: [] for t in subtasks}
  for i in range(n):
    subtask, (name, jpeg) = subtasks[i // 2 % 4], images[i // 2 % len(images)]
    image = f"{subtask}/{i // 2:09d}.jpg"
    (root / "images" / subtask).mkdir(parents=True, exist_ok=True)
    (root / "images" / image).write_bytes(jpeg)
    text = f"Is there a {OBJECTS[(3 * i) % len(OBJECTS)]} in photo {name}?"
    questions.append({"question_id": image, "image": image, "text": text + SUFFIX,
                      "category": subtask})
    truth[subtask].append(f"{i // 2:09d}.jpg\t{text} Please answer yes or no.\t"
                          f"{'Yes' if i % 2 == 0 else 'No'}\n")
  (root / "eval_tool").mkdir()
  for subtask, lines in truth.items():
    if lines:
      (root / "eval_tool" / f"{subtask}.txt").write_text("".join(lines))
  (root / "llava_mme.jsonl").write_text("".join(json.dumps(q) + "\n" for q in questions))
  return [f"--questions={root / 'llava_mme.jsonl'}", f"--image_root={root / 'images'}",
          f"--annotations={root / 'eval_tool'}"]


def write_textvqa(root: Path, n: int, images: list[tuple[str, bytes]]) -> list[str]:
  """llava_textvqa_val_v051_ocr.jsonl (OCR tokens in every other prompt), train_images/ named by
  16-hex image ids and TextVQA_0.5.1_val.json, for `n` questions."""
  (root / "train_images").mkdir(parents=True)
  questions, records = [], []
  for i in range(n):
    image_id = f"{i % len(images):016x}"
    (root / "train_images" / f"{image_id}.jpg").write_bytes(images[i % len(images)][1])
    question = f"what is written on object {i}?"
    ocr = f"\nReference OCR token: {OBJECTS[i % len(OBJECTS)].upper()}, {i}" if i % 2 else ""
    questions.append({"question_id": image_id, "image": f"{image_id}.jpg",
                      "text": question + ocr + SUFFIX})
    records.append({"question_id": 30000 + i, "image_id": image_id, "question": question,
                    "answers": [OBJECTS[(i + k // 4) % len(OBJECTS)] for k in range(10)]})
  (root / "llava_textvqa_val_v051_ocr.jsonl").write_text(
      "".join(json.dumps(q) + "\n" for q in questions))
  (root / "TextVQA_0.5.1_val.json").write_text(json.dumps({"data": records}))
  return [f"--questions={root / 'llava_textvqa_val_v051_ocr.jsonl'}",
          f"--image_root={root / 'train_images'}",
          f"--annotations={root / 'TextVQA_0.5.1_val.json'}"]


def write_gqa(root: Path, n: int, images: list[tuple[str, bytes]]) -> list[str]:
  """llava_gqa_testdev_balanced.jsonl, images/ and testdev_balanced_questions.json, `n` questions
  (every other one open, the rest yes/no)."""
  (root / "images").mkdir(parents=True)
  for name, jpeg in images:
    (root / "images" / f"{name}.jpg").write_bytes(jpeg)
  questions, truth = [], {}
  for i in range(n):
    name, obj = images[i % len(images)][0], OBJECTS[(5 * i) % len(OBJECTS)]
    text = f"What is next to the {obj}?" if i % 2 else f"Is there a {obj} in the picture?"
    questions.append({"question_id": str(200000 + i), "image": f"{name}.jpg",
                      "text": text + SUFFIX})
    truth[str(200000 + i)] = {
        "imageId": name, "question": text, "isBalanced": True,
        "answer": OBJECTS[i % len(OBJECTS)] if i % 2 else "yes",
        "types": {"structural": "query" if i % 2 else "verify"}}
  (root / "llava_gqa_testdev_balanced.jsonl").write_text(
      "".join(json.dumps(q) + "\n" for q in questions))
  (root / "testdev_balanced_questions.json").write_text(json.dumps(truth))
  return [f"--questions={root / 'llava_gqa_testdev_balanced.jsonl'}",
          f"--image_root={root / 'images'}",
          f"--annotations={root / 'testdev_balanced_questions.json'}"]


def write_scienceqa(root: Path, n: int, images: list[tuple[str, bytes]]) -> list[str]:
  """llava_test_CQM-A.json, test/<pid>/ images, problems.json and pid_splits.json, `n` problems of
  2 to 4 choices, every fourth one text only."""
  records, problems = [], {}
  for i in range(n):
    pid, has_image = str(i + 1), i % 4 != 3
    choices = [OBJECTS[(i + k * 3) % len(OBJECTS)] for k in range(2 + i % 3)]
    hint = HINTS[i % 3]
    options = " ".join(f"({'ABCDE'[k]}) {c}" for k, c in enumerate(choices))
    human = f"Context: {hint or 'N/A'}\nQuestion: Which object is shown?\nOptions: {options}"
    record = {"id": pid, "conversations": [
        {"from": "human", "value": human + ("\n<image>" if has_image else "")},
        {"from": "gpt", "value": f"The answer is {'ABCDE'[i % len(choices)]}."}]}
    if has_image:
      (root / "test" / pid).mkdir(parents=True)
      (root / "test" / pid / "image.jpg").write_bytes(images[i % len(images)][1])
      record["image"] = f"{pid}/image.jpg"
    records.append(record)
    problems[pid] = {"question": "Which object is shown?", "choices": choices,
                     "answer": i % len(choices), "hint": hint,
                     "image": "image.jpg" if has_image else None, "subject": "natural science",
                     "grade": f"grade{1 + i % 12}", "split": "test"}
  (root / "test").mkdir(parents=True, exist_ok=True)
  (root / "llava_test_CQM-A.json").write_text(json.dumps(records))
  (root / "problems.json").write_text(json.dumps(problems))
  (root / "pid_splits.json").write_text(json.dumps({"test": list(problems)}))
  return [f"--questions={root / 'llava_test_CQM-A.json'}", f"--image_root={root / 'test'}",
          f"--annotations={root / 'problems.json'}", f"--annotations={root / 'pid_splits.json'}"]


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
  for name in ("mme", "textvqa", "gqa", "scienceqa"):
    ap.add_argument(f"--{name}", type=int, default=None,
                    help=f"{name} questions (default: a quarter of --pope; 0: left out)")
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
    for name, write in (("mme", write_mme), ("textvqa", write_textvqa), ("gqa", write_gqa),
                        ("scienceqa", write_scienceqa)):
      n = args.pope // 4 if getattr(args, name) is None else getattr(args, name)
      if n > 0:
        rows += run(evaluate, name, [*write(root / name, n, images), *common], args.repeats, root)
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
