"""ScienceQA (test), as LLaVA-1.5 asks it (llava/eval/model_vqa_science.py --single-pred-prompt) and
scores it (llava/eval/eval_science_qa.py).

Questions: `llava_test_CQM-A.json`, a JSON list of {"id", "image" (absent for text-only problems),
"conversations": [{"from": "human", "value": "Context: ...\\nQuestion: ...\\nOptions: (A) ... (B) ...
[\\n<image>]"}, {"from": "gpt", "value": "The answer is A."}]}. The prompt is the human turn with
"<image>" removed and stripped, then "\\nAnswer with the option's letter from the given choices
directly."; LLaVA writes "<image>\\n" before it in its answer file when the problem has an image.
Annotations: ScienceQA's `problems.json` ({pid: {"choices", "answer" (index), "image", "subject",
"hint", "grade", "split", ...}}) and optionally `pid_splits.json`; without them the question file's
own "The answer is X." is the truth.

Reading an answer (eval_science_qa.py): the text itself when it is one of A-E; its first character
when followed by ". "; else the single capital letter of "The answer is X" followed by any character
(the pattern's "." matches anything, so "The answer is B" at the very end fails); anything else is a
failure (wrong). A letter beyond the problem's choices is wrong.

metrics["accuracy"] is over the problems with an image: the IMG column ("SQA-IMG") that LLaVA-1.5 and
LLaVA-MoD report. "accuracy_all" is over every scored test problem (eval_science_qa.py's "Accuracy",
which counts a problem with no answer as wrong; we count it as "unanswered" instead), and, with
problems.json, "groups" gives ScienceQA's own columns: NAT, SOC, LAN (subject), TXT, IMG, NO
(context), G1-6, G7-12 (grade).
"""

from __future__ import annotations

import re

from llavamod_jax.benchmarks import common

NAME = "scienceqa"
QUESTION_FILE = "LLaVA's llava_test_CQM-A.json (a JSON list of {id, image, conversations})"
MAX_NEW_TOKENS = common.LONG_MAX_NEW_TOKENS
LETTERS = ("A", "B", "C", "D", "E")
_SAYS = re.compile(r"The answer is ([A-Z]).")
_SUBJECTS = {"natural science": "NAT", "social science": "SOC", "language science": "LAN"}


def read_questions(path, image_root="", annotations=()):
  """-> (questions, skipped {reason: [ids]})."""
  del annotations
  common.check_question_file(path, NAME, QUESTION_FILE)
  skips = common.Skips()
  questions = []
  for i, r in enumerate(common.read_json(path, QUESTION_FILE)):
    turns = r.get("conversations") if isinstance(r, dict) else None
    values = [t.get("value") for t in turns if isinstance(t, dict)] if isinstance(turns, list) else []
    if not values or "id" not in r or not all(isinstance(v, str) for v in values):
      skips.add("incomplete_record", r.get("id", f"record {i}") if values else f"record {i}")
      continue
    text = values[0].replace("<image>", "").strip() + "\n" + common.OPTION_LETTER
    has_image = "image" in r
    reference = parse_option(values[1]) if len(values) > 1 else None
    questions.append(common.Question(
        r["id"], common.image_path(image_root, r["image"]) if has_image else None, text,
        max_new_tokens=MAX_NEW_TOKENS, metadata={"has_image": has_image},
        answer_prompt="<image>\n" + text if has_image else text,
        reference=None if reference == "FAILED" else reference))
  return common.check_images(questions, skips), skips.ids


def parse_option(text: str) -> str:
  """eval_science_qa.py's reading of an answer: a letter, or "FAILED"."""
  if text in LETTERS:
    return text
  if len(text) >= 3 and text[0] in LETTERS and text[1:3] == ". ":
    return text[0]
  found = _SAYS.findall(text)
  return found[0] if len(found) == 1 else "FAILED"


def _group_names(problem: dict) -> list[str]:
  names = [_SUBJECTS.get(problem.get("subject"), "")]
  has_text, has_image = bool(problem.get("hint")), problem.get("image") is not None
  names += ["TXT"] * has_text + ["IMG"] * has_image + ["NO"] * (not has_text and not has_image)
  grade = problem.get("grade", "")
  if grade.startswith("grade") and grade[5:].isdigit():
    names.append("G1-6" if int(grade[5:]) <= 6 else "G7-12")
  return [n for n in names if n]


def read_annotations(paths, split: str = "test"):
  """-> {pid: problem} of the split, from problems.json (+ pid_splits.json when given)."""
  problems, pids = None, None
  for path in map(str, paths):
    data = common.read_json(path, "ScienceQA's problems.json or pid_splits.json")
    if isinstance(data, dict) and isinstance(data.get(split), list):
      pids = [str(p) for p in data[split]]
    elif isinstance(data, dict) and all(isinstance(v, dict) and "choices" in v and "answer" in v
                                        for v in list(data.values())[:10]):
      problems = {str(k): v for k, v in data.items()}
    else:
      raise ValueError(f"{path}: neither ScienceQA's problems.json ({{pid: {{choices, answer, "
                       f"...}}}}) nor pid_splits.json (with a {split!r} list)")
  if problems is None:
    if pids is not None:
      raise ValueError("ScienceQA: pid_splits.json was given without problems.json")
    return None
  if pids is None:
    pids = [p for p, v in problems.items() if v.get("split", split) == split]
  return {p: problems[p] for p in pids if p in problems}


def score(questions, answers, annotations, split: str = "test") -> dict:
  problems = read_annotations(annotations, split)
  by_id = None if questions is None else {common.key(q.question_id): q for q in questions}
  if problems is None:
    if by_id is None:
      raise ValueError("ScienceQA needs problems.json as annotations, or the question file")
    truth = {k: (q.reference, q.image is not None, None) for k, q in by_id.items()
             if q.reference is not None}
  else:
    truth = {k: (LETTERS[p["answer"]] if p["answer"] < min(len(p["choices"]), len(LETTERS)) else None,
                 p.get("image") is not None, p) for k, p in problems.items()}
  skips = common.answer_skips(answers)
  rows = []  # (correct, has_image, problem or None)
  scored = set()
  for a in common.first_answers(answers, skips):
    k = common.key(a.question_id)
    if by_id is not None and k not in by_id:
      skips.add("not_in_questions", a.question_id)
      continue
    if k not in truth:
      skips.add("not_in_labels", a.question_id)
      continue
    scored.add(k)
    answer, has_image, problem = truth[k]
    rows.append((parse_option(a.text) == answer, has_image, problem))
  for k in (by_id if by_id is not None else truth):
    if k not in scored and k in truth:
      skips.add("unanswered", k)

  with_image = [c for c, img, _ in rows if img]
  metrics = {"accuracy": common.ratio(sum(with_image), len(with_image)), "n_img": len(with_image),
             "accuracy_all": common.ratio(sum(c for c, _, _ in rows), len(rows))}
  if problems is not None:
    groups: dict[str, list] = {}
    for c, _, problem in rows:
      for name in _group_names(problem):
        groups.setdefault(name, []).append(c)
    metrics["groups"] = {name: common.ratio(sum(groups[name]), len(groups[name]))
                         for name in ("NAT", "SOC", "LAN", "TXT", "IMG", "NO", "G1-6", "G7-12")
                         if name in groups}
  return common.result(NAME, len(rows), skips, metrics)
