"""benchmarks.answers: LLaVA answer files written and read back; bad lines counted, not fatal."""

import json

from llavamod_jax import benchmarks
from llavamod_jax.benchmarks import common


def test_round_trip_in_llava_shape(tmp_path):
  q = common.Question(17, "img.jpg", "Is there a dog?", metadata={"category": "random"})
  answers = [benchmarks.answer_for(q, "Yes", model_id="student"),
             benchmarks.Answer("a/b.png", "no", prompt="p", answer_id="x", model_id="m",
                               metadata={}, extra={"round_id": 2})]
  benchmarks.write_answers(tmp_path / "a.jsonl", answers)
  lines = [json.loads(line) for line in (tmp_path / "a.jsonl").read_text().splitlines()]
  assert list(lines[0]) == ["question_id", "prompt", "text", "answer_id", "model_id", "metadata"]
  assert lines[0]["question_id"] == 17 and lines[0]["prompt"] == "Is there a dog?"
  assert lines[0]["metadata"] == {"category": "random"} and len(lines[0]["answer_id"]) == 22
  assert lines[1]["round_id"] == 2
  read = benchmarks.read_answers(tmp_path / "a.jsonl")
  assert read == answers and read.unreadable == []
  assert read[1].get("round_id") == 2 and read[0].get("category") == "random"


def test_unreadable_lines_are_counted(tmp_path):
  path = tmp_path / "a.jsonl"
  path.write_text("\n".join([
      json.dumps({"question_id": 1, "text": "yes", "extra": [1]}),  # extra keys are fine
      "{broken",
      json.dumps({"text": "no"}),  # no question_id
      json.dumps({"question_id": 2, "text": None}),
      json.dumps([1, 2]),
      "",
      json.dumps({"question_id": 3, "text": "no", "prompt": 5, "metadata": "x"}),
  ]) + "\n")
  read = benchmarks.read_answers(path)
  assert [(a.question_id, a.text, a.prompt, a.metadata) for a in read] == [
      (1, "yes", "", {}), (3, "no", "", {})]
  assert read[0].extra == {"extra": [1]}
  assert read.unreadable == ["line 2", "line 3", "line 4", "line 5"]
