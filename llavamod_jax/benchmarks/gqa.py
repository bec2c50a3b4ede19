"""GQA (testdev-balanced), as LLaVA-1.5 asks it and scores it (scripts/convert_gqa_for_eval.py, then
GQA's official eval/eval.py).

Questions: `llava_gqa_testdev_balanced.jsonl`, lines {"question_id", "image", "text"}; the text
ends in "\\nAnswer the question using a single word or phrase." and is asked as it is.
Annotations: GQA's `testdev_balanced_questions.json`, {question_id: {"imageId", "question",
"answer", "isBalanced", "types": {"structural", ...}, ...}}.

convert_gqa_for_eval.py turns an answer into a prediction with `text.rstrip(".").lower()`; eval.py
counts a question right when prediction == answer (plain string equality), over the questions marked
isBalanced. "binary" and "open" are eval.py's split of the same accuracy (open: structural type
"query").
"""

from __future__ import annotations

from llavamod_jax.benchmarks import common

NAME = "gqa"
QUESTION_FILE = "LLaVA's llava_gqa_testdev_balanced.jsonl (question_id, image, text per line)"
MAX_NEW_TOKENS = common.SHORT_MAX_NEW_TOKENS


def read_questions(path, image_root="", annotations=()):
  """-> (questions, skipped {reason: [ids]})."""
  del annotations
  common.check_question_file(path, NAME, QUESTION_FILE)
  skips = common.Skips()
  questions = []
  for r in common.read_jsonl(path, skips):
    if not common.complete(r, "image", "text"):
      skips.add("incomplete_record", r.get("question_id"))
      continue
    questions.append(common.Question(
        r["question_id"], common.image_path(image_root, r["image"]), r["text"],
        category=r.get("category", ""), max_new_tokens=MAX_NEW_TOKENS))
  return common.check_images(questions, skips), skips.ids


def prediction(text: str) -> str:
  """convert_gqa_for_eval.py's reading of an answer."""
  return text.rstrip(".").lower()


def read_annotations(paths) -> dict[str, dict]:
  table = {}
  for path in map(str, paths):
    data = common.read_json(path, "GQA's testdev_balanced_questions.json")
    first = next(iter(data.values()), None) if isinstance(data, dict) else None
    if not isinstance(first, dict) or "answer" not in first:
      raise ValueError(f"{path}: not GQA questions; expected testdev_balanced_questions.json "
                       "({question_id: {\"imageId\", \"question\", \"answer\", ...}})")
    table.update(data)
  if not table:
    raise ValueError("GQA needs testdev_balanced_questions.json as annotations")
  return table


def score(questions, answers, annotations) -> dict:
  truth = read_annotations(annotations)
  asked = None if questions is None else dict.fromkeys(common.key(q.question_id) for q in questions)
  skips = common.answer_skips(answers)
  right = {"binary": [], "open": []}
  scored = set()  # every answer handled: scored, or skipped for a reason of its own
  for a in common.first_answers(answers, skips):
    k = common.key(a.question_id)
    scored.add(k)
    if asked is not None and k not in asked:
      skips.add("not_in_questions", a.question_id)
      continue
    q = truth.get(k)
    if q is None:
      skips.add("not_in_labels", a.question_id)
      continue
    if not q.get("isBalanced", True):
      skips.add("not_balanced", a.question_id)
      continue
    kind = "open" if q.get("types", {}).get("structural") == "query" else "binary"
    right[kind].append(prediction(a.text) == q["answer"])
  balanced = (k for k, q in truth.items() if q.get("isBalanced", True))
  expected = balanced if asked is None else (
      k for k in asked if truth.get(k, {}).get("isBalanced", True))
  for k in expected:
    if k not in scored:
      skips.add("unanswered", k)
  flat = right["binary"] + right["open"]
  metrics = {"accuracy": common.ratio(sum(flat), len(flat))}
  if any("types" in q for q in truth.values()):
    metrics.update({kind: common.ratio(sum(r), len(r)) for kind, r in right.items()})
  return common.result(NAME, len(flat), skips, metrics)
