"""MME, as LLaVA-1.5 asks it and MME's eval_tool/calculation.py scores it.

Questions: `llava_mme.jsonl`, lines {"question_id": "<subtask>/<image file>", "image", "text",
"category"}; LLaVA replaced MME's " Please answer yes or no." with "\\nAnswer the question using a
single word or phrase." in the text, which is asked as it is. Ground truth, given as annotations, in
any of MME's own layouts:
- the release folder `MME_Benchmark_release_version/` (one folder per subtask; per image a .txt of
  "question<TAB>answer" lines, in `questions_answers_YN/` for subtasks with an `images/` folder), or
  one subtask folder of it;
- eval_tool's per-subtask files `<subtask>.txt` ("image<TAB>question<TAB>answer[<TAB>prediction]"
  lines, as in eval_tool/Your_Results/), or a folder of them.
LLaVA's convert_answer_to_mme.py finds an answer's truth by (subtask, image, question), restoring
" Please answer yes or no." in place of LLaVA's suffix; we match on the question with both suffixes
removed and white space collapsed, which also covers the double-space variant it retries.

calculation.py: an answer (lower-cased) is "yes" or "no" when it is exactly that, else "yes" when its
first four characters contain "yes", else "no" when they contain "no", else "other" (always wrong).
Per subtask acc = right / questions and acc_plus = images with both questions right / images, both in
[0, 1]; score = 100 * (acc + acc_plus); perception and cognition sum their subtasks' scores.
calculation.py pairs lines two by two; we group by image, and an image with one of its questions
unanswered is left out of acc_plus (counted as "image_incomplete") while its answered one still counts
in acc.
"""

from __future__ import annotations

import os
from collections import defaultdict

from llavamod_jax.benchmarks import common

NAME = "mme"
QUESTION_FILE = "LLaVA's llava_mme.jsonl (question_id \"<subtask>/<image>\", image, text per line)"
MAX_NEW_TOKENS = common.SHORT_MAX_NEW_TOKENS
PERCEPTION = common.MME_PERCEPTION
COGNITION = common.MME_COGNITION
SUBTASKS = PERCEPTION + COGNITION
_MME_SUFFIX = "Please answer yes or no."


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
    subtask = r.get("category") or str(r["question_id"]).split("/")[0]
    if subtask not in SUBTASKS:
      skips.add("unknown_subtask", r["question_id"])
      continue
    questions.append(common.Question(
        r["question_id"], common.image_path(image_root, r["image"]), r["text"], category=subtask,
        max_new_tokens=MAX_NEW_TOKENS, metadata={"category": subtask}))
  return common.check_images(questions, skips), skips.ids


def yes_no(text: str) -> str:
  """calculation.py's reading: "yes", "no" or "other"."""
  text = text.lower()
  if text in ("yes", "no"):
    return text
  prefix = text[:4]
  return "yes" if "yes" in prefix else "no" if "no" in prefix else "other"


def _question(text: str) -> str:
  return " ".join(text.replace(common.SHORT_ANSWER, "").replace(_MME_SUFFIX, "").split())


def _stem(name: str) -> str:
  return os.path.splitext(os.path.basename(name))[0]


def _read_per_image(table, subtask: str, folder: str) -> None:
  qa = os.path.join(folder, "questions_answers_YN")
  qa = qa if os.path.isdir(os.path.join(folder, "images")) else folder
  for name in sorted(os.listdir(qa)):
    if not name.endswith(".txt"):
      continue
    path = os.path.join(qa, name)
    with open(path, encoding="utf-8") as f:
      for i, line in enumerate(f, 1):
        if not line.strip():
          continue
        fields = line.strip().split("\t")
        if len(fields) != 2:
          raise ValueError(f"{path}: line {i} is not MME's \"question<TAB>answer\"")
        table[subtask, _stem(name), _question(fields[0])] = fields[1]


def _read_per_subtask(table, path: str) -> None:
  subtask = _stem(path)
  if subtask not in SUBTASKS:
    raise ValueError(f"{path}: an MME ground-truth file is named <subtask>.txt, one of {SUBTASKS}")
  with open(path, encoding="utf-8") as f:
    for i, line in enumerate(f, 1):
      if not line.strip():
        continue
      fields = line.rstrip("\n").split("\t")
      if len(fields) < 3:
        raise ValueError(f"{path}: line {i} is not MME's \"image<TAB>question<TAB>answer\"")
      table[subtask, _stem(fields[0]), _question(fields[1])] = fields[2]


def read_ground_truth(paths) -> dict[tuple[str, str, str], str]:
  """{(subtask, image stem, question): "yes" | "no"} from any of MME's layouts (module docstring)."""
  table: dict = {}
  for path in map(os.fspath, paths):
    if os.path.isdir(path):
      names = os.listdir(path)
      folders = [n for n in names if n in SUBTASKS and os.path.isdir(os.path.join(path, n))]
      files = [n for n in names if n.endswith(".txt") and _stem(n) in SUBTASKS]
      if folders:
        for n in sorted(folders):
          _read_per_image(table, n, os.path.join(path, n))
      elif files:
        for n in sorted(files):
          _read_per_subtask(table, os.path.join(path, n))
      elif os.path.basename(os.path.normpath(path)) in SUBTASKS:
        _read_per_image(table, os.path.basename(os.path.normpath(path)), path)
      else:
        raise ValueError(f"{path}: holds neither MME subtask folders nor <subtask>.txt files")
    elif os.path.isfile(path):
      _read_per_subtask(table, path)
    else:
      raise ValueError(f"{path}: no such MME ground-truth file or folder")
  if not table:
    raise ValueError("MME needs its ground truth as annotations: MME_Benchmark_release_version/ "
                     "or eval_tool's <subtask>.txt files")
  for k, v in table.items():
    if v.lower() not in ("yes", "no"):
      raise ValueError(f"MME ground truth for {k} is {v!r}; MME's answers are yes or no")
    table[k] = v.lower()
  return table


def score(questions, answers, annotations) -> dict:
  truth = read_ground_truth(annotations)
  asked = None
  if questions is not None:  # LLaVA's question ids name the image: two questions share one
    asked = defaultdict(list)
    for q in questions:
      asked[common.key(q.question_id)].append(q)
  skips = common.answer_skips(answers)
  per_image_truth = defaultdict(int)
  for subtask, stem, _ in truth:
    per_image_truth[subtask, stem] += 1
  right = defaultdict(list)  # (subtask, stem) -> [correct, ...]
  answered = set()
  for a in common.first_answers(answers, skips, lambda a: (common.key(a.question_id), a.prompt)):
    subtask, prompt = str(a.question_id).split("/")[0], a.prompt
    if asked is not None:
      same_image = asked.get(common.key(a.question_id))
      if not same_image:
        skips.add("not_in_questions", a.question_id)
        continue
      subtask = same_image[0].category
      if not prompt and len(same_image) == 1:
        prompt = same_image[0].prompt
    k = (subtask, _stem(str(a.question_id)), _question(prompt))
    if not k[2]:
      skips.add("no_prompt", a.question_id)
      continue
    if k not in truth:
      skips.add("not_in_labels", a.question_id)
      continue
    if k in answered:
      skips.add("duplicate_answer", a.question_id)
      continue
    answered.add(k)
    right[subtask, k[1]].append(yes_no(a.text) == truth[k])
  for k in truth:
    if k not in answered:
      skips.add("unanswered", f"{k[0]}/{k[1]}: {k[2]}")

  metrics = {}
  for subtask in SUBTASKS:
    images = {stem: r for (t, stem), r in right.items() if t == subtask}
    if not images:
      continue
    flat = [c for r in images.values() for c in r]
    complete = {s: r for s, r in images.items() if len(r) == per_image_truth[subtask, s]}
    for s in images.keys() - complete.keys():
      skips.add("image_incomplete", f"{subtask}/{s}")
    acc = common.ratio(sum(flat), len(flat))
    acc_plus = common.ratio(sum(all(r) for r in complete.values()), len(complete))
    metrics[subtask] = {"acc": acc, "acc_plus": acc_plus, "score": 100 * (acc + acc_plus)}
  metrics["perception"] = sum(metrics[t]["score"] for t in PERCEPTION if t in metrics)
  metrics["cognition"] = sum(metrics[t]["score"] for t in COGNITION if t in metrics)
  n = sum(len(r) for r in right.values())
  return common.result(NAME, n, skips, metrics)
