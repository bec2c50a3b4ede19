"""benchmarks.textvqa: LLaVA's TextVQA questions, EvalAI's normalisation, the VQA accuracy."""

import json

import pytest

from llavamod_jax import benchmarks
from llavamod_jax.benchmarks import textvqa

SUFFIX = "\nAnswer the question using a single word or phrase."
IMAGE_1, IMAGE_2 = "0a1b2c3d4e5f6a7b", "ffffffffffffffff"

# TextVQA records: (question_id, image_id, question, 10 human answers, OCR tokens, model answer)
RECORDS = [
    (100, IMAGE_1, "What is the brand of this camera?", ["dakota"] * 7 + ["dakota digital"] * 3,
     ["DAKOTA", "DIGITAL"], "Dakota."),
    (101, IMAGE_1, "How many people are there?", ["2"] * 2 + ["two"] + ["3"] * 7, [], "Two"),
    (102, IMAGE_2, "What does it say?", ["it's"] + ["its"] * 9, ["its"], "it's"),
    (103, IMAGE_2, "What is on the sign?", ["the dog", "dog"] + ["cat"] * 4 + ["bird"] * 4, [],
     "the dog."),
    (104, IMAGE_2, "What number is shown?", ["1000"] * 3 + ["1,000"] * 3 + ["one thousand"] * 4,
     ["1,000"], "1,000"),
    (105, IMAGE_2, "Which way does the arrow point?", ["left"] * 5 + ["right"] * 5, [], "Right!"),
]
# The answers after EvalAI's normalisation, worked out by hand from its rules.
NORMALIZED = {
    "Dakota.": "dakota", "dakota digital": "dakota digital", "Two": "2", "two": "2", "3": "3",
    "it's": "it 's", "its": "its", "the dog.": "dog", "the dog": "dog", "cat": "cat",
    "bird": "bird", "1,000": "1000", "1000": "1000", "one thousand": "1 thousand",
    "Right!": "right", "left": "left", "right": "right", "dakota": "dakota", "2": "2", "dog": "dog",
}


def _text(question, ocr):
  ocr_line = f"\nReference OCR token: {', '.join(ocr)}" if ocr else ""
  return question + ocr_line + SUFFIX


def _write(tmp_path):
  (tmp_path / "TextVQA_0.5.1_val.json").write_text(json.dumps({"dataset_name": "textvqa", "data": [
      {"question_id": qid, "image_id": image, "question": q, "answers": answers,
       "image_classes": [], "set_name": "val"}
      for qid, image, q, answers, _, _ in RECORDS]}))
  lines = [{"question_id": image, "image": f"{image}.jpg", "text": _text(q, ocr)}
           for _, image, q, _, ocr, _ in RECORDS]
  (tmp_path / "questions.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
  images = tmp_path / "train_images"
  images.mkdir()
  (images / f"{IMAGE_1}.jpg").write_bytes(b"jpg")
  return tmp_path / "questions.jsonl", images, tmp_path / "TextVQA_0.5.1_val.json"


def _answers(tmp_path, rows, bad_lines=()):
  path = tmp_path / "answers.jsonl"
  with open(path, "w") as f:
    for qid, prompt, text in rows:
      f.write(json.dumps({"question_id": qid, "prompt": prompt, "text": text, "answer_id": "a",
                          "model_id": "m", "metadata": {}}) + "\n")
    f.write("".join(line + "\n" for line in bad_lines))
  return benchmarks.read_answers(path)


def reference_accuracy(prediction, humans):
  """VQA accuracy on already normalised strings: each human left out in turn."""
  total = 0.0
  for left_out in range(len(humans)):
    others = humans[:left_out] + humans[left_out + 1:]
    total += min(1.0, others.count(prediction) / 3.0)
  return total / len(humans)


@pytest.mark.parametrize("text, want", [
    ("Two", "2"), ("it's", "it 's"), ("the dog.", "dog"), ("1,000", "1000"), ("3.5", "3.5"),
    ("e-mail", "e mail"), ("a-b -c", "ab c"), ("Dont", "don't"), ("12:30", "12:30"),
    ("Yes!", "yes"), ("(none)", "0"), ("U.S.A.", "usa"), ("an apple", "apple"), ("  TEN\n", "10"),
    ("what's up?", "what 's up"), ("whats", "what's"),
])
def test_normalize_by_hand(text, want):
  assert textvqa.normalize(text) == want


def test_normalized_table_above():
  for text, want in NORMALIZED.items():
    assert textvqa.normalize(text) == want, text


@pytest.mark.parametrize("prompt, want", [
    ("What is it?\nReference OCR token: A, B\nAnswer the question using a single word or phrase.",
     "what is it?"),
    ("Reference OCR token: A, B\nWhat is it?\nAnswer briefly.", "what is it?"),
    ("What is it?\nAnswer the question using a single word or phrase.", "what is it?"),
    ("OCR tokens: a, b. Question: What is it? Short answer:", "what is it?"),
    ("What is it?", None), ("a\nb\nc\nd", None),
])
def test_prompt_question(prompt, want):
  assert textvqa.prompt_question(prompt) == want


def test_read_questions(tmp_path):
  qfile, images, _ = _write(tmp_path)
  questions, skipped = textvqa.read_questions(qfile, images)
  assert [q.question_id for q in questions] == [IMAGE_1, IMAGE_1]
  assert skipped == {"missing_image": [IMAGE_2] * 4}
  assert questions[0].prompt == ("What is the brand of this camera?\nReference OCR token: DAKOTA, "
                                 "DIGITAL\nAnswer the question using a single word or phrase.")
  assert questions[0].image == str(images / f"{IMAGE_1}.jpg") and questions[0].max_new_tokens == 128


def test_score_matches_the_reference(tmp_path):
  qfile, _, annotations = _write(tmp_path)
  rows = [(image, _text(q, ocr), pred) for _, image, q, _, ocr, pred in RECORDS]
  answers = _answers(tmp_path, rows + [
      ("0000000000000000", "What is this?" + SUFFIX, "x"),  # no such question
      (IMAGE_1, "a\nb\nc\nd", "x"),  # a prompt eval_textvqa.py cannot read
      rows[0][:2] + ("Kodak",),  # the same question again
  ], bad_lines=["not json"])
  scores = benchmarks.get("textvqa").score(None, answers, [annotations])
  per_question = [reference_accuracy(NORMALIZED[pred], [NORMALIZED[h] for h in humans])
                  for _, _, _, humans, _, pred in RECORDS]
  assert per_question == pytest.approx([1.0, 0.9, 0.3, 0.6, 1.0, 1.0])
  assert scores["n"] == len(RECORDS)
  assert scores["metrics"] == {"accuracy": pytest.approx(sum(per_question) / len(per_question))}
  assert scores["skipped"] == {"unreadable_answer_line": 1, "duplicate_answer": 1,
                               "not_in_labels": 1, "unreadable_prompt": 1}


def test_partial_answers_and_textvqa_question_ids(tmp_path):
  qfile, images, annotations = _write(tmp_path)
  questions, _ = textvqa.read_questions(qfile, images)
  # TextVQA's own question ids also find their record; LLaVA's need the prompt
  answers = _answers(tmp_path, [(101, "", "2"), (IMAGE_1, "", "dakota")])
  scores = textvqa.score(None, answers, [annotations])
  assert scores["metrics"]["accuracy"] == pytest.approx(0.9)
  assert scores["skipped"] == {"unreadable_prompt": 1, "unanswered": 5}
  assert scores["skipped_examples"]["unanswered"] == [100, 102, 103, 104, 105]
  scores = textvqa.score(questions, _answers(tmp_path, [(IMAGE_1, "", "dakota")]), [annotations])
  assert scores["skipped"]["unreadable_prompt"] == 1  # two questions share the id: no guessing


def test_annotations_must_be_textvqa(tmp_path):
  other = tmp_path / "testdev_balanced_questions.json"
  other.write_text(json.dumps({"1": {"question": "q", "answer": "a"}}))
  with pytest.raises(ValueError, match="TextVQA_0.5.1_val.json"):
    textvqa.score(None, [], [other])
