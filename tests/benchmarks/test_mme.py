"""benchmarks.mme: LLaVA's MME questions, MME's ground-truth layouts, calculation.py's scores."""

import json

import pytest

from llavamod_jax import benchmarks
from llavamod_jax.benchmarks import mme

SUFFIX = "\nAnswer the question using a single word or phrase."
YES_NO = " Please answer yes or no."

# subtask -> image -> [(question, truth), (question, truth)]; celebrity keeps its images in images/
TRUTH = {
    "existence": {
        "000000001.jpg": [("Is there a dog in this image?", "Yes"),
                          ("Is there a cat in this image?", "No")],
        "000000002.jpg": [("Is there a car in this image?", "Yes"),
                          ("Is there a bus in this image?", "No")],
    },
    "celebrity": {
        "tt0001.jpg": [("Is the actor inside the red box Tom Hanks?", "Yes"),
                       ("Is the actor inside the red box Tom Cruise?", "No")],
    },
    "code_reasoning": {
        "0020.png": [("Will the code print 3?", "Yes"), ("Will the code print 4?", "No")],
    },
}
ANSWERS = {  # (subtask, image, question index) -> answer text
    ("existence", "000000001.jpg", 0): "Yes, there is a dog.",
    ("existence", "000000001.jpg", 1): "no",
    ("existence", "000000002.jpg", 0): "yes",
    ("existence", "000000002.jpg", 1): "There is no bus.",  # "ther" reads as other
    ("celebrity", "tt0001.jpg", 0): "YES",
    ("celebrity", "tt0001.jpg", 1): "Not him",  # "not " holds "no"
    ("code_reasoning", "0020.png", 0): "I don't know",
    ("code_reasoning", "0020.png", 1): "No.",
}


def _image_path(subtask, image):
  return f"{subtask}/images/{image}" if subtask == "celebrity" else f"{subtask}/{image}"


def _write_release(root):
  """MME_Benchmark_release_version: per-image "question<TAB>answer" files."""
  for subtask, images in TRUTH.items():
    for image, qas in images.items():
      folder = root / subtask
      (folder / ("images" if subtask == "celebrity" else "")).mkdir(parents=True, exist_ok=True)
      (root / _image_path(subtask, image)).write_bytes(b"img")
      qa = folder / "questions_answers_YN" if subtask == "celebrity" else folder
      qa.mkdir(exist_ok=True)
      stem = image.rsplit(".", 1)[0]
      (qa / f"{stem}.txt").write_text("".join(f"{q}{YES_NO}\t{a}\n" for q, a in qas))
  return root


def _write_eval_tool(folder):
  """eval_tool/Your_Results style: <subtask>.txt with "image<TAB>question<TAB>answer" lines."""
  folder.mkdir()
  for subtask, images in TRUTH.items():
    (folder / f"{subtask}.txt").write_text("".join(
        f"{image}\t{q}{YES_NO}\t{a}\n" for image, qas in images.items() for q, a in qas))
  return folder


def _write_questions(path):
  lines = [{"question_id": f"{subtask}/{image}", "image": _image_path(subtask, image),
            "text": q + SUFFIX, "category": subtask}
           for subtask, images in TRUTH.items() for image, qas in images.items() for q, _ in qas]
  path.write_text("".join(json.dumps(x) + "\n" for x in lines))
  return path


def _write_answers(path, answers, bad_lines=()):
  with open(path, "w") as f:
    for qid, prompt, text in answers:
      f.write(json.dumps({"question_id": qid, "prompt": prompt, "text": text, "answer_id": "",
                          "model_id": "m", "metadata": {}}) + "\n")
    f.write("".join(line + "\n" for line in bad_lines))
  return benchmarks.read_answers(path)


def _llava_answers():
  return [(f"{s}/{image}", TRUTH[s][image][i][0] + SUFFIX, text)
          for (s, image, i), text in ANSWERS.items()]


# --- the reference, from MME's calculation.py definition -----------------------------------------


def reference_label(answer):
  answer = answer.lower()
  if answer == "yes" or answer == "no":
    return answer
  head = answer[0:4]
  if "yes" in head:
    return "yes"
  if "no" in head:
    return "no"
  return "other"


def reference_scores(answers):
  out = {}
  for subtask, images in TRUTH.items():
    right, both = 0, 0
    for image, qas in images.items():
      ok = [reference_label(answers[subtask, image, i]) == qas[i][1].lower() for i in range(2)]
      right += sum(ok)
      both += all(ok)
    acc, acc_plus = right / (2 * len(images)), both / len(images)
    out[subtask] = {"acc": acc, "acc_plus": acc_plus, "score": 100 * acc + 100 * acc_plus}
  out["perception"] = out["existence"]["score"] + out["celebrity"]["score"]
  out["cognition"] = out["code_reasoning"]["score"]
  return out


@pytest.mark.parametrize("text, want", [
    ("Yes, there is.", "yes"), ("yes", "yes"), ("No", "no"), ("garbage", "other"),
    ("Not at all", "no"), ("none", "no"), ("The answer is yes", "other"), ("", "other"),
    (" yes", "yes"), ("Noo", "no"),
])
def test_yes_no_reads_as_calculation_py(text, want):
  assert mme.yes_no(text) == want == reference_label(text)


def test_read_questions(tmp_path):
  root = _write_release(tmp_path / "MME_Benchmark_release_version")
  (root / "existence" / "000000002.jpg").unlink()
  questions, skipped = mme.read_questions(_write_questions(tmp_path / "llava_mme.jsonl"), root)
  assert skipped == {"missing_image": ["existence/000000002.jpg"] * 2}
  assert len(questions) == 6
  q = questions[2]
  assert q.question_id == "celebrity/tt0001.jpg" and q.category == "celebrity"
  assert q.image == str(root / "celebrity/images/tt0001.jpg")
  assert q.prompt == "Is the actor inside the red box Tom Hanks?" + SUFFIX and q.max_new_tokens == 128


@pytest.mark.parametrize("layout", ["release", "eval_tool", "eval_tool_files"])
def test_score_matches_the_reference(tmp_path, layout):
  if layout == "release":
    annotations = [_write_release(tmp_path / "MME_Benchmark_release_version")]
  else:
    folder = _write_eval_tool(tmp_path / "Your_Results")
    annotations = [folder] if layout == "eval_tool" else sorted(folder.iterdir())
  answers = _write_answers(tmp_path / "answers.jsonl", _llava_answers() + [
      ("existence/000000003.jpg", "Is there a cow in this image?" + SUFFIX, "yes"),  # no such truth
  ], bad_lines=["]"])
  scores = mme.score(None, answers, annotations)
  want = reference_scores(ANSWERS)
  assert scores["metrics"].keys() == want.keys()
  for name in want:
    assert scores["metrics"][name] == pytest.approx(want[name]), name
  assert scores["n"] == 8
  assert scores["skipped"] == {"unreadable_answer_line": 1, "not_in_labels": 1}


def test_a_half_answered_image_leaves_acc_plus(tmp_path):
  root = _write_release(tmp_path / "MME")
  answers = _write_answers(tmp_path / "a.jsonl", [
      ("existence/000000001.jpg", "Is there a dog in this image?" + SUFFIX, "Yes"),
      ("existence/000000002.jpg", "Is there a car in this image?" + SUFFIX, "Yes"),
      ("existence/000000002.jpg", "Is there a bus in this image?" + SUFFIX, "No"),
      # MME's own wording of the question also finds its truth
      ("code_reasoning/0020.png", "Will the code print 3?" + YES_NO, "No"),
  ])
  scores = mme.score(None, answers, [root])
  assert scores["metrics"]["existence"] == pytest.approx({"acc": 1.0, "acc_plus": 1.0, "score": 200})
  assert scores["metrics"]["code_reasoning"]["acc"] == 0.0
  assert scores["skipped"]["image_incomplete"] == 2  # existence/000000001, code_reasoning/0020
  assert scores["metrics"]["cognition"] == 0.0 and "celebrity" not in scores["metrics"]


def test_with_the_question_file(tmp_path):
  root = _write_release(tmp_path / "MME")
  questions, _ = mme.read_questions(_write_questions(tmp_path / "q.jsonl"), root)
  answers = _write_answers(tmp_path / "a.jsonl", _llava_answers() + [
      ("existence/000000009.jpg", "Is there a cow in this image?" + SUFFIX, "yes"),
      ("celebrity/tt0001.jpg", "", "yes"),  # two questions share this id: the prompt must tell
      ("existence/000000001.jpg", "Is there a dog in this image?" + SUFFIX, "no"),
  ])
  scores = mme.score(questions, answers, [root])
  want = reference_scores(ANSWERS)
  for name in want:
    assert scores["metrics"][name] == pytest.approx(want[name]), name
  assert scores["skipped"] == {"not_in_questions": 1, "no_prompt": 1, "duplicate_answer": 1}


def test_bad_ground_truth(tmp_path):
  with pytest.raises(ValueError, match="<subtask>.txt"):
    bad = tmp_path / "colour.txt"
    bad.write_text("a.jpg\tIs it red?\tYes\n")
    mme.read_ground_truth([bad])
  empty = tmp_path / "empty"
  empty.mkdir()
  with pytest.raises(ValueError, match="neither MME subtask folders"):
    mme.read_ground_truth([empty])
