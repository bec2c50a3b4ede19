"""What every benchmark module shares: the Question record, skip bookkeeping, the score dict,
reading files with errors that name the file, and telling one benchmark's file from another's.
"""

from __future__ import annotations

import contextlib
import contextvars

import dataclasses
import json
import os
import re
from typing import Any, Iterable

# The suffixes LLaVA-1.5 puts after a question (docs/Evaluation.md of LLaVA; model_vqa_science.py and
# model_vqa_mmbench.py add the second one under --single-pred-prompt).
SHORT_ANSWER = "Answer the question using a single word or phrase."
OPTION_LETTER = "Answer with the option's letter from the given choices directly."

# model_vqa_loader.py's default --max_new_tokens (no v1_5 eval script overrides it);
# model_vqa_science.py and model_vqa_mmbench.py hard-code 1024.
SHORT_MAX_NEW_TOKENS = 128
LONG_MAX_NEW_TOKENS = 1024

EXAMPLES = 5  # ids named per skip reason in a score dict

POPE_CATEGORIES = ("adversarial", "popular", "random")
MME_PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene",
                  "landmark", "artwork", "OCR")
MME_COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation",
                 "code_reasoning")


@dataclasses.dataclass(frozen=True)
class Question:
  """One question to ask a model.

  `prompt` is the text the model is asked (LLaVA's suffix included; the image token is the caller's
  to place). `answer_prompt` is what LLaVA writes in its answer file's "prompt" field for this
  question, so that our answer files read like LLaVA's (empty: same as `prompt`). `metadata` is
  JSON-safe and travels into the answer; `reference` is the ground truth when the question file
  carries one (MMBench's answer letter, ScienceQA's) and never goes into an answer file.
  """
  question_id: Any  # as in the file (int or str)
  image: str | bytes | None  # a path under image_root, encoded image bytes, or None (text only)
  prompt: str
  category: str = ""
  max_new_tokens: int = SHORT_MAX_NEW_TOKENS
  metadata: dict = dataclasses.field(default_factory=dict)
  answer_prompt: str = ""
  reference: Any = None


def key(question_id) -> str:
  """Ids compare as strings: a question file's "12" and an answers file's 12 are one question."""
  return str(question_id)


class Skips:
  """Records left out, by reason, in the order they were met."""

  def __init__(self):
    self.ids: dict[str, list] = {}

  def add(self, reason: str, record_id) -> None:
    self.ids.setdefault(reason, []).append(record_id)

  def counts(self) -> dict[str, int]:
    return {reason: len(ids) for reason, ids in self.ids.items()}

  def examples(self, k: int = EXAMPLES) -> dict[str, list]:
    return {reason: ids[:k] for reason, ids in self.ids.items()}


def result(name: str, n: int, skips: Skips, metrics: dict) -> dict:
  """The score dict every benchmark returns (DESIGN.md: `launch/evaluate.py --out`)."""
  return {"benchmark": name, "n": n, "skipped": skips.counts(),
          "skipped_examples": skips.examples(), "metrics": metrics}


def ratio(num: float, den: float) -> float:
  return num / den if den else 0.0


def answer_skips(answers) -> Skips:
  """A Skips that starts with the unreadable lines `read_answers` counted."""
  skips = Skips()
  for line in getattr(answers, "unreadable", ()):
    skips.add("unreadable_answer_line", line)
  return skips


def first_answers(answers, skips: Skips, key_fn=lambda a: key(a.question_id)) -> list:
  """Answers with the repeats of a key dropped (the first one counts), repeats counted."""
  seen, out = set(), []
  for a in answers:
    k = key_fn(a)
    if k in seen:
      skips.add("duplicate_answer", a.question_id)
      continue
    seen.add(k)
    out.append(a)
  return out


def complete(record: dict, *text_fields: str) -> bool:
  """A question record with an id and the named fields as strings."""
  return "question_id" in record and all(isinstance(record.get(f), str) for f in text_fields)


def image_path(image_root: str | os.PathLike, image: str) -> str:
  return os.path.join(image_root, image) if image_root else image


_CHECK_IMAGES = contextvars.ContextVar("llavamod_jax_benchmarks_check_images", default=True)


@contextlib.contextmanager
def images_unchecked():
  """Within it, `read_questions` keeps questions whose image file is absent: scoring an answer
  file needs the questions, not the images (`launch/evaluate.py --answers`)."""
  token = _CHECK_IMAGES.set(False)
  try:
    yield
  finally:
    _CHECK_IMAGES.reset(token)


def check_images(questions: Iterable[Question], skips: Skips) -> list[Question]:
  """Questions whose image file exists (or that need none); the rest counted as missing_image
  (all kept inside `images_unchecked`)."""
  if not _CHECK_IMAGES.get():
    return list(questions)
  out = []
  for q in questions:
    if isinstance(q.image, str) and not os.path.isfile(q.image):
      skips.add("missing_image", q.question_id)
    else:
      out.append(q)
  return out


# ---------------------------------------------------------------------------------------------------
# Files.


def read_jsonl(path, skips: Skips | None = None) -> list[dict]:
  """JSON objects one per line; a line that is not one is counted in `skips` (or raises without)."""
  out = []
  with open(path, encoding="utf-8") as f:
    for i, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        record = json.loads(line)
      except json.JSONDecodeError as e:
        record = e
      if not isinstance(record, dict):
        if skips is None:
          raise ValueError(f"{path}: line {i} is not a JSON object")
        skips.add("unreadable_line", f"line {i}")
        continue
      out.append(record)
  return out


def read_json(path, what: str):
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ValueError(f"{path}: not a JSON file ({e}); expected {what}") from None


def expand(paths: Iterable, pattern: str) -> list[str]:
  """Files given one by one or as folders; a folder contributes its files whose names match."""
  out = []
  for p in paths:
    p = os.fspath(p)
    if os.path.isdir(p):
      out += sorted(os.path.join(p, n) for n in os.listdir(p) if re.fullmatch(pattern, n))
    else:
      out.append(p)
  return out


# ---------------------------------------------------------------------------------------------------
# Which benchmark a question file belongs to.

_HEX_IMAGE = re.compile(r"[0-9a-f]{16}")


def _kind_of_record(r: dict) -> str:
  if "conversations" in r:
    return "scienceqa"
  if "label" in r and "question_id" in r:
    return "pope labels (coco_pope_*.json)"
  if r.get("category") in POPE_CATEGORIES:
    return "pope"
  qid = r.get("question_id")
  if isinstance(qid, str) and "/" in qid and qid.split("/")[0] in MME_PERCEPTION + MME_COGNITION:
    return "mme"
  if r.get("category") in MME_PERCEPTION + MME_COGNITION:
    return "mme"
  if not {"question_id", "image", "text"} <= set(r):
    return "unknown"
  if _HEX_IMAGE.fullmatch(os.path.splitext(os.path.basename(str(r["image"])))[0]):
    return "textvqa"
  return "gqa"


def sniff(path) -> str:
  """The benchmark a question file looks like: pope | mme | textvqa | gqa | scienceqa | mmbench, or a
  few words on what else it is."""
  try:
    with open(path, encoding="utf-8") as f:
      head = f.read(4096)
  except UnicodeDecodeError:
    return "not a text file"
  head = head.lstrip("\ufeff")
  first = head.split("\n", 1)[0]
  if "\t" in first:
    columns = first.split("\t")
    if {"index", "question", "A", "B"} <= set(columns):
      return "mmbench"
    return "a tab-separated file without MMBench's columns (index, question, A, B, ...)"
  stripped = head.lstrip()
  if stripped.startswith("["):
    data = read_json(path, "a JSON list")
    if data and isinstance(data[0], dict):
      return _kind_of_record(data[0])
    return "a JSON list of something other than question records"
  if stripped.startswith("{"):
    try:
      record = json.loads(first)
    except json.JSONDecodeError:
      return "a JSON object (an annotation file?), not one question per line"
    return _kind_of_record(record)
  return "neither JSON, JSON lines nor a TSV"


def check_question_file(path, name: str, expected: str) -> None:
  """Raises a ValueError naming the file when it is not `name`'s question file."""
  if not os.path.isfile(path):
    raise ValueError(f"{path}: no such file; expected {expected}")
  kind = sniff(path)
  if kind != name:
    raise ValueError(f"{path}: this is not a {name} question file (it looks like {kind}); "
                     f"expected {expected}")
