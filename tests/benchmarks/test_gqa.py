"""benchmarks.gqa: LLaVA's GQA questions; convert_gqa_for_eval.py + eval.py's exact match."""

import json

import pytest

from llavamod_jax import benchmarks
from llavamod_jax.benchmarks import gqa

SUFFIX = "\nAnswer the question using a single word or phrase."

# question_id -> (answer, structural type, model answer)
QUESTIONS = {
    "201307251": ("yes", "verify", "Yes."),
    "201640614": ("left", "query", "Left..."),
    "202218649": ("table", "query", "The table"),  # no normalisation beyond "." and case
    "20968013": ("no", "logical", "NO"),
    "05451384": ("blue", "query", "blue "),  # a trailing space stays
    "19435270": ("man", "query", "man."),
}


def _write(tmp_path):
  truth = {qid: {"imageId": f"n{i}", "question": f"Question {i}?", "answer": answer,
                 "isBalanced": True, "types": {"structural": kind, "semantic": "rel"}}
           for i, (qid, (answer, kind, _)) in enumerate(QUESTIONS.items())}
  truth["999"] = {"imageId": "n9", "question": "Unbalanced?", "answer": "yes", "isBalanced": False,
                  "types": {"structural": "verify"}}
  (tmp_path / "testdev_balanced_questions.json").write_text(json.dumps(truth))
  lines = [{"question_id": qid, "image": f"n{i}.jpg", "text": f"Question {i}?" + SUFFIX}
           for i, qid in enumerate(QUESTIONS)]
  (tmp_path / "llava_gqa_testdev_balanced.jsonl").write_text(
      "".join(json.dumps(x) + "\n" for x in lines))
  images = tmp_path / "images"
  images.mkdir()
  for i in range(len(QUESTIONS)):
    (images / f"n{i}.jpg").write_bytes(b"jpg")
  return (tmp_path / "llava_gqa_testdev_balanced.jsonl", images,
          tmp_path / "testdev_balanced_questions.json")


def reference_prediction(text):
  while text.endswith("."):
    text = text[:-1]
  return text.lower()


def test_read_questions(tmp_path):
  qfile, images, _ = _write(tmp_path)
  questions, skipped = gqa.read_questions(qfile, images)
  assert skipped == {}
  assert [q.question_id for q in questions] == list(QUESTIONS)
  assert questions[0].prompt == "Question 0?" + SUFFIX and questions[0].max_new_tokens == 128


def test_score_matches_the_reference(tmp_path):
  qfile, images, annotations = _write(tmp_path)
  path = tmp_path / "answers.jsonl"
  with open(path, "w") as f:
    for qid, (_, _, text) in QUESTIONS.items():
      f.write(json.dumps({"question_id": qid, "prompt": "", "text": text}) + "\n")
    f.write(json.dumps({"question_id": "123", "prompt": "", "text": "yes"}) + "\n")  # unknown
    f.write(json.dumps({"question_id": "999", "prompt": "", "text": "yes"}) + "\n")  # unbalanced
    f.write(json.dumps({"question_id": "201307251", "prompt": "", "text": "no"}) + "\n")  # again
    f.write('{"question_id": "20968013", "text": 3}\n')  # text not a string
  answers = benchmarks.read_answers(path)
  scores = gqa.score(None, answers, [annotations])

  right = {qid: reference_prediction(text) == answer for qid, (answer, _, text) in QUESTIONS.items()}
  assert list(right.values()) == [True, True, False, True, False, True]
  open_q = [right[q] for q, (_, kind, _) in QUESTIONS.items() if kind == "query"]
  binary = [right[q] for q, (_, kind, _) in QUESTIONS.items() if kind != "query"]
  assert scores["metrics"] == pytest.approx({
      "accuracy": sum(right.values()) / len(right), "open": sum(open_q) / len(open_q),
      "binary": sum(binary) / len(binary)})
  assert scores["n"] == 6
  assert scores["skipped"] == {"unreadable_answer_line": 1, "duplicate_answer": 1,
                               "not_in_labels": 1, "not_balanced": 1}
  # the same with the question file; a question without an answer is named
  questions, _ = gqa.read_questions(qfile, images)
  answers = benchmarks.Answers([a for a in answers if a.question_id != "19435270"])
  scores = gqa.score(questions, answers, [annotations])
  assert scores["skipped"]["unanswered"] == 1 and scores["skipped"]["not_in_questions"] == 2
  assert scores["skipped_examples"]["unanswered"] == ["19435270"]
