"""benchmarks.scienceqa: LLaVA's CQM-A questions, eval_science_qa.py's reading, IMG accuracy."""

import json

import pytest

from llavamod_jax import benchmarks
from llavamod_jax.benchmarks import scienceqa

OPTION_LETTER = "\nAnswer with the option's letter from the given choices directly."

# pid -> problems.json fields used here, plus the model's answer
PROBLEMS = {
    "4": dict(choices=["cat", "dog"], answer=1, image="image.png", hint="", subject="natural science",
              grade="grade3", split="test", said="The answer is B."),
    "7": dict(choices=["red", "blue", "green"], answer=0, image="image.png", hint="A photo.",
              subject="social science", grade="grade8", split="test", said="B. dog"),
    "9": dict(choices=["yes", "no"], answer=0, image=None, hint="Read.", subject="language science",
              grade="grade10", split="test", said="A"),
    "12": dict(choices=["one", "two", "three"], answer=2, image="image.png", hint="",
               subject="natural science", grade="grade5", split="test", said="I don't know"),
    "15": dict(choices=["x", "y"], answer=1, image=None, hint="", subject="natural science",
               grade="grade2", split="test", said="The answer is B"),  # no character after B
    "18": dict(choices=["p", "q"], answer=0, image="image.png", hint="", subject="social science",
               grade="grade12", split="test", said="C"),  # no option C
    "30": dict(choices=["a", "b"], answer=0, image=None, hint="", subject="natural science",
               grade="grade1", split="train", said="A"),  # not a test problem
}


def _human_turn(pid, p):
  choices = " ".join(f"({'ABCDE'[i]}) {c}" for i, c in enumerate(p["choices"]))
  text = f"Context: {p['hint'] or 'N/A'}\nQuestion: Question {pid}?\nOptions: {choices}"
  return text + "\n<image>" if p["image"] else text


def _write(tmp_path):
  problems = {pid: {k: v for k, v in p.items() if k != "said"} | {"question": f"Question {pid}?"}
              for pid, p in PROBLEMS.items()}
  (tmp_path / "problems.json").write_text(json.dumps(problems))
  (tmp_path / "pid_splits.json").write_text(json.dumps(
      {"train": ["30"], "test": [pid for pid, p in PROBLEMS.items() if p["split"] == "test"]}))
  records = []
  for pid, p in PROBLEMS.items():
    if p["split"] != "test":
      continue
    r = {"id": pid, "conversations": [
        {"from": "human", "value": _human_turn(pid, p)},
        {"from": "gpt", "value": f"The answer is {'ABCDE'[p['answer']]}."}]}
    if p["image"]:
      r["image"] = f"{pid}/image.png"
    records.append(r)
  (tmp_path / "llava_test_CQM-A.json").write_text(json.dumps(records, indent=2))
  images = tmp_path / "test"
  for pid, p in PROBLEMS.items():
    if p["image"]:
      (images / pid).mkdir(parents=True)
      (images / pid / "image.png").write_bytes(b"png")
  return tmp_path / "llava_test_CQM-A.json", images


def reference_letter(text):
  """eval_science_qa.py's reading, from its description."""
  if text in ("A", "B", "C", "D", "E"):
    return text
  if len(text) > 2 and text[0] in "ABCDE" and text[1] == "." and text[2] == " ":
    return text[0]
  hits = []
  start = text.find("The answer is ")
  while start != -1:
    letter_at = start + len("The answer is ")
    if letter_at + 1 < len(text) and text[letter_at].isupper() and text[letter_at].isalpha():
      hits.append(text[letter_at])
    start = text.find("The answer is ", start + 1)
  return hits[0] if len(hits) == 1 else None


@pytest.mark.parametrize("text, want", [
    ("The answer is B.", "B"), ("B. dog", "B"), ("I don't know", "FAILED"), ("A", "A"),
    ("The answer is B", "FAILED"), ("B.", "FAILED"), ("The answer is A. The answer is B.", "FAILED"),
    ("E", "E"), ("b", "FAILED"),
])
def test_parse_option(text, want):
  assert scienceqa.parse_option(text) == want
  assert (reference_letter(text) or "FAILED") == want


def test_read_questions(tmp_path):
  qfile, images = _write(tmp_path)
  (images / "18" / "image.png").unlink()
  questions, skipped = benchmarks.get("scienceqa").read_questions(qfile, images)
  assert skipped == {"missing_image": ["18"]}
  by_id = {q.question_id: q for q in questions}
  q = by_id["4"]
  assert q.prompt == ("Context: N/A\nQuestion: Question 4?\nOptions: (A) cat (B) dog" + OPTION_LETTER)
  assert q.answer_prompt == "<image>\n" + q.prompt  # what model_vqa_science.py writes
  assert q.image == str(images / "4" / "image.png") and q.max_new_tokens == 1024
  assert q.reference == "B" and q.metadata == {"has_image": True}
  assert by_id["9"].image is None and by_id["9"].answer_prompt == by_id["9"].prompt


def test_score_matches_the_reference(tmp_path):
  qfile, images = _write(tmp_path)
  answers = [benchmarks.Answer(pid, p["said"]) for pid, p in PROBLEMS.items()]
  answers += [benchmarks.Answer("4", "A"), benchmarks.Answer("999", "A")]  # a repeat, an unknown
  want_right = {pid: reference_letter(p["said"]) == "ABCDE"[p["answer"]]
                for pid, p in PROBLEMS.items() if p["split"] == "test"}
  assert want_right == {"4": True, "7": False, "9": True, "12": False, "15": False, "18": False}
  with_image = [r for pid, r in want_right.items() if PROBLEMS[pid]["image"]]
  groups = {"NAT": ["4", "12", "15"], "SOC": ["7", "18"], "LAN": ["9"], "TXT": ["7", "9"],
            "IMG": ["4", "7", "12", "18"], "NO": ["15"], "G1-6": ["4", "12", "15"],
            "G7-12": ["7", "9", "18"]}

  for annotations in ([tmp_path / "problems.json", tmp_path / "pid_splits.json"],
                      [tmp_path / "problems.json"]):  # the split from problems.json itself
    scores = scienceqa.score(None, answers, annotations)
    assert scores["n"] == 6
    assert scores["metrics"]["accuracy"] == pytest.approx(sum(with_image) / len(with_image))
    assert scores["metrics"]["n_img"] == 4
    assert scores["metrics"]["accuracy_all"] == pytest.approx(sum(want_right.values()) / 6)
    assert scores["metrics"]["groups"] == pytest.approx(
        {g: sum(want_right[p] for p in pids) / len(pids) for g, pids in groups.items()})
    assert scores["skipped"] == {"duplicate_answer": 1, "not_in_labels": 2}  # 30 is train, 999 none

  # without problems.json, the question file's own "The answer is X." is the truth
  questions, _ = scienceqa.read_questions(qfile, images)
  scores = scienceqa.score(questions, answers[:3], [])
  assert scores["metrics"]["accuracy"] == pytest.approx(1 / 2)
  assert scores["metrics"]["accuracy_all"] == pytest.approx(2 / 3)
  assert "groups" not in scores["metrics"]
  assert scores["skipped"] == {"unanswered": 3}


def test_annotations_must_be_scienceqa(tmp_path):
  bad = tmp_path / "TextVQA_0.5.1_val.json"
  bad.write_text(json.dumps({"data": []}))
  with pytest.raises(ValueError, match="problems.json"):
    scienceqa.score(None, [], [bad])
  with pytest.raises(ValueError, match="problems.json as annotations"):
    scienceqa.score(None, [], [])
