"""POPE (object hallucination), as LLaVA-1.5 asks and scores it (llava/eval/eval_pope.py).

Questions: `llava_pope_test.jsonl`, lines {"question_id", "image", "text", "category"}; the text
already ends in "\\nAnswer the question using a single word or phrase." and is asked as it is.
Labels: POPE's `coco_pope_{adversarial,popular,random}.json` (JSON lines {"question_id", "image",
"text", "label"}), given as files or as the folder that holds them; the category comes from the
file name, as in eval_pope.py. LLaVA-1.5 used POPE at commit e3e3926, whose random file has 2910
questions.

eval_pope.py pairs the i-th answer of a category with the i-th line of its label file. We pair each
answer with the label line of the same image and question instead, which gives the same pairs on a
complete, ordered answer file and the right ones on a partial or reordered one. The image and the
category come from the question file, or from the answer's metadata where our answer files carry them.

An answer reads as "no" when the words of its text before the first "." (commas removed, split on
single spaces) include "No", "no" or "not", and as "yes" otherwise. "yes" is the positive class;
precision, recall and F1 are 0 where undefined (eval_pope.py divides by zero there). The LLaVA-1.5
paper's POPE number is the mean of the three categories' F1 (LLaVA issue #626).
"""

from __future__ import annotations

import os
import re

from llavamod_jax.benchmarks import common

NAME = "pope"
QUESTION_FILE = "LLaVA's llava_pope_test.jsonl (question_id, image, text, category per line)"
MAX_NEW_TOKENS = common.SHORT_MAX_NEW_TOKENS
CATEGORIES = common.POPE_CATEGORIES
_LABEL_FILE = re.compile(r"coco_pope_(\w+)\.json")


def read_questions(path, image_root="", annotations=()):
  """-> (questions, skipped {reason: [ids]})."""
  del annotations  # the labels are for scoring
  common.check_question_file(path, NAME, QUESTION_FILE)
  skips = common.Skips()
  questions = []
  for r in common.read_jsonl(path, skips):
    if not common.complete(r, "image", "text", "category"):
      skips.add("incomplete_record", r.get("question_id"))
      continue
    questions.append(common.Question(
        r["question_id"], common.image_path(image_root, r["image"]), r["text"],
        category=r["category"], max_new_tokens=MAX_NEW_TOKENS,
        metadata={"category": r["category"], "image": r["image"]}))
  return common.check_images(questions, skips), skips.ids


def yes_no(text: str) -> str:
  """eval_pope.py's reading of an answer."""
  first = text.split(".")[0]
  words = first.replace(",", "").split(" ")
  return "no" if {"No", "no", "not"} & set(words) else "yes"


def _question_key(image: str, text: str) -> tuple[str, str]:
  text = text.replace(common.SHORT_ANSWER, "")
  return os.path.basename(image), " ".join(text.split())


def read_labels(paths) -> dict[str, dict[tuple[str, str], tuple]]:
  """{category: {(image, question): (label, label file question_id)}} from coco_pope_*.json files."""
  files = common.expand(paths, _LABEL_FILE.pattern)
  if not files:
    raise ValueError("POPE needs its label files coco_pope_{adversarial,popular,random}.json "
                     "(or their folder) as annotations")
  labels = {}
  for path in files:
    m = _LABEL_FILE.fullmatch(os.path.basename(path))
    if m is None:
      raise ValueError(f"{path}: a POPE label file is named coco_pope_<category>.json")
    table = labels.setdefault(m.group(1), {})
    for i, r in enumerate(common.read_jsonl(path), 1):
      if r.get("label") not in ("yes", "no") or not {"image", "text"} <= set(r):
        raise ValueError(f"{path}: line {i} is not a POPE label (image, text, label yes/no)")
      table[_question_key(r["image"], r["text"])] = (r["label"], r.get("question_id", i))
  return labels


def metrics(pairs) -> dict:
  """{"n", "accuracy", "precision", "recall", "f1", "yes_ratio"} of (prediction, label) pairs."""
  tp = sum(p == "yes" and t == "yes" for p, t in pairs)
  fp = sum(p == "yes" and t == "no" for p, t in pairs)
  tn = sum(p == "no" and t == "no" for p, t in pairs)
  n = len(pairs)
  precision, recall = common.ratio(tp, tp + fp), common.ratio(tp, sum(t == "yes" for _, t in pairs))
  return {"n": n, "accuracy": common.ratio(tp + tn, n), "precision": precision, "recall": recall,
          "f1": common.ratio(2 * precision * recall, precision + recall),
          "yes_ratio": common.ratio(tp + fp, n)}


def score(questions, answers, annotations) -> dict:
  labels = read_labels(annotations)
  by_id = None if questions is None else {common.key(q.question_id): q for q in questions}
  skips = common.answer_skips(answers)
  pairs: dict[str, list] = {}
  matched = set()
  for a in common.first_answers(answers, skips):
    if by_id is not None:
      q = by_id.get(common.key(a.question_id))
      if q is None:
        skips.add("not_in_questions", a.question_id)
        continue
      category, image, text = q.category, q.metadata.get("image", q.image), q.prompt
    else:
      category, image, text = a.metadata.get("category"), a.metadata.get("image"), a.prompt
      if not category or not image:
        skips.add("no_category_or_image", a.question_id)  # LLaVA's answers need the question file
        continue
    qkey = _question_key(image, text)
    if qkey not in labels.get(category, {}):
      skips.add("not_in_labels", a.question_id)
      continue
    matched.add((category, qkey))
    pairs.setdefault(category, []).append((yes_no(a.text), labels[category][qkey][0]))
  if by_id is not None:
    answered = {common.key(a.question_id) for a in answers}
    for k, q in by_id.items():
      if k not in answered:
        skips.add("unanswered", q.question_id)
  else:
    for category, table in labels.items():
      for qkey, (_, label_id) in table.items():
        if (category, qkey) not in matched:
          skips.add("unanswered", f"{category}/{label_id}")
  out = {c: metrics(pairs[c]) for c in sorted(pairs)}
  everything = [p for c in pairs for p in pairs[c]]
  out["overall"] = metrics(everything)
  return common.result(NAME, len(everything), skips, out)
