"""benchmarks.pope: LLaVA's POPE files read, answers scored against an independent count."""

import json

import pytest

from llavamod_jax import benchmarks
from llavamod_jax.benchmarks import pope

SUFFIX = "\nAnswer the question using a single word or phrase."

# (category, image, object, label); question ids run over all categories as in llava_pope_test.jsonl,
# while each label file numbers its own lines from 1.
ROWS = [
    ("random", "COCO_val2014_000000000001.jpg", "dog", "yes"),
    ("random", "COCO_val2014_000000000001.jpg", "car", "no"),
    ("random", "COCO_val2014_000000000002.jpg", "cup", "yes"),
    ("random", "COCO_val2014_000000000002.jpg", "bus", "no"),
    ("popular", "COCO_val2014_000000000001.jpg", "dog", "yes"),
    ("popular", "COCO_val2014_000000000001.jpg", "person", "no"),
    ("popular", "COCO_val2014_000000000003.jpg", "kite", "yes"),
    ("adversarial", "COCO_val2014_000000000003.jpg", "kite", "yes"),
    ("adversarial", "COCO_val2014_000000000003.jpg", "chair", "no"),
]
ANSWERS = {
    1: "Yes.", 2: "No, there is not.", 3: "not sure", 4: "Yes, there is a bus",
    5: "Yes", 6: "There is no person. Yes", 7: "no", 8: "Yes, a kite.", 9: "Yes. There is not",
}


def _question(obj):
  return f"Is there a {obj} in the image?"


def _write(tmp_path, unlabelled=True):
  images = tmp_path / "val2014"
  images.mkdir()
  for _, image, _, _ in ROWS:
    (images / image).write_bytes(b"jpg")
  questions = [{"question_id": i, "image": image, "text": _question(obj) + SUFFIX, "category": c}
               for i, (c, image, obj, _) in enumerate(ROWS, 1)]
  if unlabelled:  # a question whose image and object no label file knows
    questions.append({"question_id": 10, "image": ROWS[0][1], "text": _question("zebra") + SUFFIX,
                      "category": "random"})
  qfile = tmp_path / "llava_pope_test.jsonl"
  qfile.write_text("".join(json.dumps(q) + "\n" for q in questions))
  labels = tmp_path / "coco"
  labels.mkdir()
  for category in ("random", "popular", "adversarial"):
    lines = [{"question_id": j, "image": image, "text": _question(obj), "label": label}
             for j, (image, obj, label) in
             enumerate([(r[1], r[2], r[3]) for r in ROWS if r[0] == category], 1)]
    (labels / f"coco_pope_{category}.json").write_text(
        "".join(json.dumps(x) + "\n" for x in lines))
  return qfile, images, labels


def _write_answers(path, answers, bad_lines=()):
  with open(path, "w") as f:
    for qid, text in answers:
      f.write(json.dumps({"question_id": qid, "prompt": "", "text": text, "answer_id": "x",
                          "model_id": "m", "metadata": {}}) + "\n")
    for line in bad_lines:
      f.write(line + "\n")
  return benchmarks.read_answers(path)


# --- the reference, from POPE's and eval_pope.py's definitions -------------------------------------


def reference_reading(text):
  sentence = text[:text.index(".")] if "." in text else text
  tokens = sentence.replace(",", "").split(" ")
  return "no" if any(t in ("no", "No", "not") for t in tokens) else "yes"


def reference_metrics(pairs):
  counts = {"TP": 0, "FP": 0, "TN": 0, "FN": 0}
  for pred, label in pairs:
    counts[("T" if pred == label else "F") + ("P" if pred == "yes" else "N")] += 1
  tp, fp, tn, fn = counts["TP"], counts["FP"], counts["TN"], counts["FN"]
  precision = tp / (tp + fp) if tp + fp else 0.0
  recall = tp / (tp + fn) if tp + fn else 0.0
  f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
  n = len(pairs)
  return {"n": n, "accuracy": (tp + tn) / n, "precision": precision, "recall": recall, "f1": f1,
          "yes_ratio": (tp + fp) / n}


@pytest.mark.parametrize("text, want", [
    ("No, there is not.", "no"), ("Yes.", "yes"), ("not sure", "no"), ("Yes", "yes"),
    ("There is no dog. Yes", "no"), ("Yes. There is not", "yes"), ("Nope", "yes"),
    ("no,", "no"), ("I cannot tell", "yes"), ("", "yes"), ("NO", "yes"),
])
def test_yes_no_reads_as_eval_pope(text, want):
  assert pope.yes_no(text) == want == reference_reading(text)


def test_read_questions(tmp_path):
  qfile, images, labels = _write(tmp_path)
  (images / ROWS[2][1]).unlink()  # its two questions lose their image
  questions, skipped = benchmarks.get("pope").read_questions(qfile, images, annotations=[labels])
  assert skipped == {"missing_image": [3, 4]}
  assert [q.question_id for q in questions] == [1, 2, 5, 6, 7, 8, 9, 10]
  q = questions[0]
  assert q.prompt == "Is there a dog in the image?" + SUFFIX  # the file's text, suffix included
  assert q.image == str(images / ROWS[0][1]) and q.category == "random"
  assert q.max_new_tokens == 128
  assert q.metadata == {"category": "random", "image": ROWS[0][1]}
  # Scoring an answer file reads the questions without their images.
  with benchmarks.images_unchecked():
    kept, skipped = benchmarks.get("pope").read_questions(qfile, images, annotations=[labels])
  assert skipped == {} and [q.question_id for q in kept] == [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]
  again, skipped = benchmarks.get("pope").read_questions(qfile, images, annotations=[labels])
  assert skipped == {"missing_image": [3, 4]}  # checked again outside it


def test_score_matches_the_reference(tmp_path):
  qfile, images, labels = _write(tmp_path)
  questions, _ = pope.read_questions(qfile, images)
  answers = _write_answers(
      tmp_path / "answers.jsonl",
      # 10: no label, 11: no such question, 1: answered again
      list(ANSWERS.items()) + [(10, "no"), (11, "yes"), (1, "No")],
      bad_lines=["{not json", '{"text": "yes"}'])
  scores = pope.score(questions, answers, [labels])

  by_category = {}
  for qid, (category, _, _, label) in enumerate(ROWS, 1):
    by_category.setdefault(category, []).append((reference_reading(ANSWERS[qid]), label))
  want = {c: reference_metrics(p) for c, p in by_category.items()}
  want["overall"] = reference_metrics([p for c in by_category for p in by_category[c]])
  assert scores["benchmark"] == "pope" and scores["n"] == 9
  assert set(scores["metrics"]) == set(want)
  for name in want:
    assert scores["metrics"][name] == pytest.approx(want[name]), name
  assert scores["skipped"] == {"unreadable_answer_line": 2, "duplicate_answer": 1,
                               "not_in_labels": 1, "not_in_questions": 1}
  assert scores["skipped_examples"]["not_in_labels"] == [10]
  assert scores["skipped_examples"]["not_in_questions"] == [11]
  assert scores["skipped_examples"]["unreadable_answer_line"] == ["line 13", "line 14"]


def test_label_files_one_by_one_and_partial_answers(tmp_path):
  qfile, images, labels = _write(tmp_path, unlabelled=False)
  questions, _ = pope.read_questions(qfile, images)
  answers = _write_answers(tmp_path / "a.jsonl", [(2, ANSWERS[2]), (1, ANSWERS[1]), (5, "yes")])
  scores = pope.score(questions, answers, [labels / "coco_pope_random.json"])
  assert set(scores["metrics"]) == {"random", "overall"}
  assert scores["metrics"]["random"] == pytest.approx(
      reference_metrics([("yes", "yes"), ("no", "no")]))
  assert scores["skipped"] == {"not_in_labels": 1, "unanswered": 6}  # popular has no label file here


def test_our_answers_score_without_the_question_file(tmp_path):
  qfile, images, labels = _write(tmp_path, unlabelled=False)
  questions, _ = pope.read_questions(qfile, images)
  answers = [benchmarks.answer_for(q, ANSWERS[q.question_id], "m") for q in questions]
  benchmarks.write_answers(tmp_path / "ours.jsonl", answers)
  ours = benchmarks.read_answers(tmp_path / "ours.jsonl")
  assert pope.score(None, ours, [labels]) == pope.score(questions, ours, [labels])
  # LLaVA's answer files carry neither category nor image: they need the question file
  llava = _write_answers(tmp_path / "llava.jsonl", list(ANSWERS.items()))
  scores = pope.score(None, llava, [labels])
  assert scores["n"] == 0 and scores["skipped"]["no_category_or_image"] == 9


def test_labels_must_be_pope_label_files(tmp_path):
  bad = tmp_path / "labels.json"
  bad.write_text(json.dumps({"question_id": 1, "label": "yes"}) + "\n")
  with pytest.raises(ValueError, match="coco_pope_<category>.json"):
    pope.read_labels([bad])
  with pytest.raises(ValueError, match="label files"):
    pope.read_labels([tmp_path])


def test_bad_question_lines_are_counted(tmp_path):
  qfile, images, _ = _write(tmp_path, unlabelled=False)
  with open(qfile, "a") as f:
    f.write("{broken\n" + json.dumps({"question_id": 99, "text": "q", "category": "random"}) + "\n")
  questions, skipped = pope.read_questions(qfile, images)
  assert len(questions) == len(ROWS)
  assert skipped == {"unreadable_line": ["line 10"], "incomplete_record": [99]}
