"""launch/evaluate.py --benchmark on hand-made MME, TextVQA, GQA and ScienceQA files (each in the
format LLaVA-1.5's evaluation files have) and a tiny random LLaVA exported as an HF directory.

The model answers nonsense; what is checked is the plumbing: the score file's shape, the answer file
LLaVA's scripts would write, the main metric recounted here in plain Python from the answer texts
and the annotation files, and --answers scoring the written file (and hand-edited copies) again.
"""

import importlib.util
import io
import json
from pathlib import Path

import pytest
from PIL import Image

import tiny_run
from llavamod_jax import export, models

REPO = Path(__file__).resolve().parents[2]
SUFFIX = "\nAnswer the question using a single word or phrase."
LETTER = "\nAnswer with the option's letter from the given choices directly."
ANSWER_KEYS = {"question_id", "prompt", "text", "answer_id", "model_id", "metadata"}
SCORE_KEYS = {"benchmark", "n", "skipped", "skipped_examples", "metrics", "model", "answers",
              "generation", "questions_per_second"}


def _script_at(path, name):
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


evaluate = _script_at(REPO / "launch" / "evaluate.py", "launch_evaluate_formats")


def _call(*flag_args):
  return evaluate.main(evaluate.parse(["prog", *flag_args]))


def _photo(path, name):
  """A scikit-image photo, small, written to `path` (format from its suffix)."""
  from skimage import data

  path.parent.mkdir(parents=True, exist_ok=True)
  buf = io.BytesIO()
  Image.fromarray(getattr(data, name)()).resize((48, 40)).save(
      buf, "PNG" if path.suffix == ".png" else "JPEG")
  path.write_bytes(buf.getvalue())


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
  """A tiny dense LLaVA with random weights, exported as an HF directory."""
  model = models.build(tiny_run.llava_config())
  out = tmp_path_factory.mktemp("model") / "tiny-llava"
  export.export_hf(model, tiny_run.random_params(model), tiny_run.tokenizer(), tiny_run.run_info(model),
                   out)
  return out


def _run(benchmark, questions, images, annotations, hf_dir, tmp_path):
  """Asks the model, checks the files every benchmark writes -> (scores, answers as written)."""
  out = tmp_path / f"{benchmark}.json"
  scores = _call(f"--benchmark={benchmark}", f"--questions={questions}", f"--image_root={images}",
                 *[f"--annotations={a}" for a in annotations], f"--hf_dir={hf_dir}",
                 f"--out={out}", "--batch_size=4", "--max_new_tokens=3")
  saved = json.loads(out.read_text())
  assert saved == json.loads(json.dumps(scores))
  assert SCORE_KEYS <= set(saved)
  assert (saved["benchmark"], saved["model"]) == (benchmark, str(hf_dir))
  path = tmp_path / f"{benchmark}.answers.jsonl"
  assert saved["answers"] == str(path)
  answers = [json.loads(line) for line in path.read_text().splitlines()]
  assert all(set(a) == ANSWER_KEYS for a in answers)
  assert {a["model_id"] for a in answers} == {"tiny-llava"}
  assert saved["generation"]["questions"] == len(answers)

  # The written file alone scores the same.
  again = _call(f"--benchmark={benchmark}", f"--answers={path}",
                *[f"--annotations={a}" for a in annotations], f"--out={tmp_path / 'again.json'}")
  assert (again["n"], again["metrics"]) == (saved["n"], saved["metrics"])
  return saved, answers


def _assert_close(got, want):
  """Nested dicts of numbers, equal up to float rounding."""
  assert set(got) == set(want)
  for k, v in want.items():
    if isinstance(v, dict):
      _assert_close(got[k], v)
    else:
      assert got[k] == pytest.approx(v), k


def _rescore(benchmark, answers, texts, annotations, tmp_path):
  """Scores of `answers` with their texts replaced by `texts` -> (scores, edited answers)."""
  edited = [dict(a, text=t) for a, t in zip(answers, texts, strict=True)]
  path = tmp_path / f"{benchmark}.edited.jsonl"
  path.write_text("".join(json.dumps(a) + "\n" for a in edited))
  scores = _call(f"--benchmark={benchmark}", f"--answers={path}",
                 *[f"--annotations={a}" for a in annotations], f"--out={tmp_path / 'edited.json'}")
  return scores, edited


# --- MME ---------------------------------------------------------------------------------------------

# subtask -> image -> [(question, truth)] * 2; truth written in eval_tool's <subtask>.txt files.
MME = {
    "existence": {"000000001.jpg": [("Is there a cat in this image?", "Yes"),
                                    ("Is there a dog in this image?", "No")]},
    "count": {"000000002.png": [("Is there one cup in the image?", "Yes"),
                                ("Are there three cups in the image?", "No")]},
}


def _mme_files(root):
  images = root / "MME_Benchmark_release_version"
  _photo(images / "existence" / "000000001.jpg", "chelsea")
  _photo(images / "count" / "000000002.png", "coffee")
  lines = []
  for subtask, per_image in MME.items():
    for image, qas in per_image.items():
      lines += [{"question_id": f"{subtask}/{image}", "image": f"{subtask}/{image}",
                 "text": q + SUFFIX, "category": subtask} for q, _ in qas]
  questions = root / "llava_mme.jsonl"
  questions.write_text("".join(json.dumps(r) + "\n" for r in lines))
  truth = root / "eval_tool" / "Your_Results"
  truth.mkdir(parents=True)
  for subtask, per_image in MME.items():
    (truth / f"{subtask}.txt").write_text("".join(
        f"{image}\t{q} Please answer yes or no.\t{a}\n" for image, qas in per_image.items()
        for q, a in qas))
  return questions, images, [truth]


def _mme_recount(answers):
  """calculation.py's numbers, from the answer texts and MME above."""
  truth = {(s, image, q + SUFFIX): a.lower() for s, per_image in MME.items()
           for image, qas in per_image.items() for q, a in qas}

  def read(text):
    text = text.lower()
    if text in ("yes", "no"):
      return text
    return "yes" if "yes" in text[:4] else "no" if "no" in text[:4] else "other"

  out = {}
  for subtask, per_image in MME.items():
    right = {image: [read(a["text"]) == truth[subtask, image, a["prompt"]] for a in answers
                     if a["question_id"] == f"{subtask}/{image}"] for image in per_image}
    flat = [c for r in right.values() for c in r]
    acc = sum(flat) / len(flat)
    acc_plus = sum(all(r) for r in right.values()) / len(right)
    out[subtask] = {"acc": acc, "acc_plus": acc_plus, "score": 100 * (acc + acc_plus)}
  out["perception"] = out["existence"]["score"] + out["count"]["score"]
  out["cognition"] = 0
  return out


def test_mme_end_to_end(hf_dir, tmp_path):
  questions, images, truth = _mme_files(tmp_path)
  scores, answers = _run("mme", questions, images, truth, hf_dir, tmp_path)
  assert (scores["n"], scores["skipped"]) == (4, {})
  assert set(scores["metrics"]) == {"existence", "count", "perception", "cognition"}
  assert [a["question_id"] for a in answers] == [
      "existence/000000001.jpg", "existence/000000001.jpg", "count/000000002.png",
      "count/000000002.png"]
  assert answers[0]["prompt"] == "Is there a cat in this image?" + SUFFIX
  assert answers[2]["metadata"] == {"category": "count"}
  _assert_close(scores["metrics"], _mme_recount(answers))

  # Hand-written answers: existence both right (acc_plus 1), count one right, one "other".
  rescored, edited = _rescore("mme", answers, ["Yes, a cat.", "No", "yes", "There are none."],
                              truth, tmp_path)
  _assert_close(rescored["metrics"], _mme_recount(edited))
  assert rescored["metrics"]["existence"] == pytest.approx({"acc": 1, "acc_plus": 1, "score": 200})
  assert rescored["metrics"]["count"] == pytest.approx({"acc": 0.5, "acc_plus": 0, "score": 50})


# --- TextVQA -----------------------------------------------------------------------------------------

IMAGE_1, IMAGE_2 = "0a1b2c3d4e5f6a7b", "00c0ffee00c0ffee"
# (TextVQA question_id, image_id, question, OCR tokens, 10 human answers)
TEXTVQA = [
    (34602, IMAGE_1, "what brand is the camera?", ["NIKON", "F3"], ["nikon"] * 8 + ["canon"] * 2),
    (34603, IMAGE_1, "how many lenses are there?", [], ["2"] * 2 + ["two"] * 2 + ["3"] * 6),
    (34604, IMAGE_2, "what colour is the mug?", ["COFFEE"], ["white"] * 2 + ["blue"] * 8),
]


def _textvqa_files(root):
  images = root / "train_images"
  _photo(images / f"{IMAGE_1}.jpg", "camera")
  _photo(images / f"{IMAGE_2}.jpg", "coffee")
  questions = root / "llava_textvqa_val_v051_ocr.jsonl"
  questions.write_text("".join(json.dumps({
      "question_id": image, "image": f"{image}.jpg",
      "text": q + (f"\nReference OCR token: {', '.join(ocr)}" if ocr else "") + SUFFIX}) + "\n"
      for _, image, q, ocr, _ in TEXTVQA))
  labels = root / "TextVQA_0.5.1_val.json"
  labels.write_text(json.dumps({"dataset_name": "textvqa", "dataset_version": "0.5.1", "data": [
      {"question_id": qid, "image_id": image, "question": q, "answers": humans,
       "image_classes": [], "set_name": "val"} for qid, image, q, _, humans in TEXTVQA]}))
  return questions, images, [labels]


def _textvqa_recount(answers):
  """VQA accuracy with a normalisation that covers the hand-written answers below."""
  numbers = {"two": "2", "three": "3"}

  def norm(text):
    words = text.lower().strip().rstrip(".!").split()
    return " ".join(numbers.get(w, w) for w in words if w not in ("a", "an", "the"))

  by_question = {(image, q): humans for _, image, q, _, humans in TEXTVQA}
  scores = []
  for a in answers:
    humans = [norm(h) for h in by_question[a["question_id"], a["prompt"].split("\n")[0]]]
    pred = norm(a["text"])
    scores.append(sum(min(1, sum(h == pred for h in humans[:i] + humans[i + 1:]) / 3)
                      for i in range(10)) / 10)
  return sum(scores) / len(scores)


def test_textvqa_end_to_end(hf_dir, tmp_path):
  questions, images, labels = _textvqa_files(tmp_path)
  scores, answers = _run("textvqa", questions, images, labels, hf_dir, tmp_path)
  assert (scores["n"], scores["skipped"]) == (3, {})
  assert set(scores["metrics"]) == {"accuracy"}
  assert [a["question_id"] for a in answers] == [IMAGE_1, IMAGE_1, IMAGE_2]
  assert answers[0]["prompt"] == ("what brand is the camera?\nReference OCR token: NIKON, F3"
                                  + SUFFIX)
  assert answers[1]["prompt"] == "how many lenses are there?" + SUFFIX
  assert 0 <= scores["metrics"]["accuracy"] <= 1

  # "The Nikon." is 8 of 10 (every subset has >= 3 others: 1.0); "Two" and "2" are one answer,
  # 4 of 10 (leave one of them out: 3 others, 1.0; else 4 others, 1.0); "white" is 2 of 10 (leave
  # one out: 1/3, else 2/3 -> 0.6).
  for texts, want in ((["The Nikon.", "Two", "white"], (1 + 1 + 0.6) / 3),
                      (["nikon", "2", "blue"], 1.0),
                      (["canon", "three", "red"], (0.6 + 1 + 0) / 3)):
    rescored, edited = _rescore("textvqa", answers, texts, labels, tmp_path)
    assert rescored["n"] == 3
    assert rescored["metrics"]["accuracy"] == pytest.approx(_textvqa_recount(edited))
    assert rescored["metrics"]["accuracy"] == pytest.approx(want)


# --- GQA ---------------------------------------------------------------------------------------------

# (question_id, image, question, answer, structural type, isBalanced)
GQA = [
    ("201307251", "n161313", "Is the cat on the left?", "no", "verify", True),
    ("201640614", "n235859", "What animal is this?", "cat", "query", True),
    ("202225914", "n161313", "Which color is the cup?", "white", "query", True),
    ("20968379", "n235859", "Is it indoors?", "yes", "verify", False),
]


def _gqa_files(root):
  images = root / "images"
  _photo(images / "n161313.jpg", "chelsea")
  _photo(images / "n235859.jpg", "coffee")
  questions = root / "llava_gqa_testdev_balanced.jsonl"
  questions.write_text("".join(json.dumps(
      {"question_id": qid, "image": f"{image}.jpg", "text": q + SUFFIX}) + "\n"
      for qid, image, q, _, _, _ in GQA))
  labels = root / "testdev_balanced_questions.json"
  labels.write_text(json.dumps({qid: {
      "semantic": [], "entailed": [], "equivalent": [qid], "question": q, "imageId": image,
      "isBalanced": balanced, "groups": {"global": None, "local": "12-cat"}, "answer": answer,
      "semanticStr": "", "annotations": {}, "types": {"detailed": "", "semantic": "obj",
                                                      "structural": kind},
      "fullAnswer": answer} for qid, image, q, answer, kind, balanced in GQA}))
  return questions, images, [labels]


def _gqa_recount(answers):
  """eval.py's accuracy over the balanced questions, with convert_gqa_for_eval.py's reading."""
  truth = {qid: (answer, balanced) for qid, _, _, answer, _, balanced in GQA}
  right = [a["text"].rstrip(".").lower() == truth[a["question_id"]][0] for a in answers
           if truth[a["question_id"]][1]]
  return sum(right) / len(right)


def test_gqa_end_to_end(hf_dir, tmp_path):
  questions, images, labels = _gqa_files(tmp_path)
  scores, answers = _run("gqa", questions, images, labels, hf_dir, tmp_path)
  # All four are asked; the unbalanced one is not scored.
  assert [a["question_id"] for a in answers] == [r[0] for r in GQA]
  assert (scores["n"], scores["skipped"]) == (3, {"not_balanced": 1})
  assert set(scores["metrics"]) == {"accuracy", "binary", "open"}
  assert answers[1]["prompt"] == "What animal is this?" + SUFFIX
  assert scores["metrics"]["accuracy"] == pytest.approx(_gqa_recount(answers))

  # "No." and "Cat" read as right; "white cup" is not "white"; the unbalanced answer never counts.
  rescored, edited = _rescore("gqa", answers, ["No.", "Cat", "white cup", "yes"], labels, tmp_path)
  assert rescored["metrics"]["accuracy"] == pytest.approx(_gqa_recount(edited))
  assert rescored["metrics"] == pytest.approx({"accuracy": 2 / 3, "binary": 1, "open": 0.5})


def test_gqa_answered_unbalanced_question_is_skipped_once(tmp_path):
  questions, images, labels = _gqa_files(tmp_path)
  answers = tmp_path / "answers.jsonl"
  answers.write_text("".join(json.dumps({"question_id": qid, "prompt": q + SUFFIX, "text": answer})
                             + "\n" for qid, _, q, answer, _, _ in GQA))
  flags = [f"--annotations={labels[0]}", f"--answers={answers}", f"--out={tmp_path / 's.json'}"]
  alone = _call("--benchmark=gqa", *flags)
  with_questions = _call("--benchmark=gqa", *flags, f"--questions={questions}",
                         f"--image_root={images}")
  assert alone["skipped"] == {"not_balanced": 1}
  assert with_questions["skipped"] == alone["skipped"]


# --- ScienceQA ---------------------------------------------------------------------------------------

# pid -> problems.json record (image None: text only); pid "9" is in the train split.
SCIENCEQA = {
    "4": {"question": "Which animal is shown?", "choices": ["cat", "dog"], "answer": 0,
          "hint": "", "image": "image.png", "subject": "natural science", "grade": "grade2"},
    "7": {"question": "What is in the cup?", "choices": ["tea", "coffee", "milk"], "answer": 1,
          "hint": "Look closely.", "image": "image.png", "subject": "natural science",
          "grade": "grade8"},
    "11": {"question": "Which word is a noun?", "choices": ["run", "table"], "answer": 1,
           "hint": "", "image": None, "subject": "language science", "grade": "grade3"},
    "9": {"question": "Which is a mammal?", "choices": ["cow", "trout"], "answer": 0,
          "hint": "", "image": None, "subject": "natural science", "grade": "grade4"},
}
TEST = ["4", "7", "11"]


def _scienceqa_human(p):
  options = " ".join(f"({'ABCDE'[i]}) {c}" for i, c in enumerate(p["choices"]))
  text = f"Context: {p['hint'] or 'N/A'}\nQuestion: {p['question']}\nOptions: {options}"
  return text + "\n<image>" if p["image"] else text


def _scienceqa_files(root):
  images = root / "test"
  _photo(images / "4" / "image.png", "chelsea")
  _photo(images / "7" / "image.png", "coffee")
  records = []
  for pid in TEST:
    p = SCIENCEQA[pid]
    r = {"id": pid, "conversations": [
        {"from": "human", "value": _scienceqa_human(p)},
        {"from": "gpt", "value": f"The answer is {'ABCDE'[p['answer']]}."}]}
    if p["image"]:
      r["image"] = f"{pid}/image.png"
    records.append(r)
  questions = root / "llava_test_CQM-A.json"
  questions.write_text(json.dumps(records, indent=2))
  problems = root / "problems.json"
  problems.write_text(json.dumps({pid: dict(p, split="test" if pid in TEST else "train",
                                             task="closed choice", lecture="", solution="")
                                   for pid, p in SCIENCEQA.items()}))
  splits = root / "pid_splits.json"
  splits.write_text(json.dumps({"train": ["9"], "val": [], "test": TEST}))
  return questions, images, [problems, splits]


def _scienceqa_recount(answers):
  """eval_science_qa.py's accuracy over the problems with an image (IMG), and over all."""

  def letter(text):
    if text in ("A", "B", "C", "D", "E"):
      return text
    if len(text) > 2 and text[0] in "ABCDE" and text[1:3] == ". ":
      return text[0]
    hits = [text[i + 14] for i in range(len(text) - 15) if text.startswith("The answer is ", i)
            and "A" <= text[i + 14] <= "Z"]
    return hits[0] if len(hits) == 1 else None

  rows = [(letter(a["text"]) == "ABCDE"[SCIENCEQA[a["question_id"]]["answer"]],
           SCIENCEQA[a["question_id"]]["image"] is not None) for a in answers]
  with_image = [c for c, img in rows if img]
  return sum(with_image) / len(with_image), sum(c for c, _ in rows) / len(rows)


def test_scienceqa_end_to_end(hf_dir, tmp_path):
  questions, images, annotations = _scienceqa_files(tmp_path)
  scores, answers = _run("scienceqa", questions, images, annotations, hf_dir, tmp_path)
  assert (scores["n"], scores["skipped"]) == (3, {})
  assert {"accuracy", "n_img", "accuracy_all", "groups"} == set(scores["metrics"])
  assert scores["metrics"]["n_img"] == 2
  assert set(scores["metrics"]["groups"]) == {"NAT", "LAN", "TXT", "IMG", "NO", "G1-6", "G7-12"}
  assert [a["question_id"] for a in answers] == TEST
  # LLaVA writes "<image>\n" before the prompt of a problem with an image, none for text only.
  assert answers[0]["prompt"] == ("<image>\nContext: N/A\nQuestion: Which animal is shown?\n"
                                  "Options: (A) cat (B) dog" + LETTER)
  assert answers[2]["prompt"] == ("Context: N/A\nQuestion: Which word is a noun?\n"
                                  "Options: (A) run (B) table" + LETTER)
  accuracy, accuracy_all = _scienceqa_recount(answers)
  assert scores["metrics"]["accuracy"] == pytest.approx(accuracy)
  assert scores["metrics"]["accuracy_all"] == pytest.approx(accuracy_all)

  for texts, want in ((["A", "B. coffee", "The answer is B."], (1, 1)),
                      (["The answer is A.", "The answer is B", "B"], (0.5, 2 / 3)),
                      (["B", "C. milk", "A. run"], (0, 0))):
    rescored, edited = _rescore("scienceqa", answers, texts, annotations, tmp_path)
    assert (rescored["metrics"]["accuracy"], rescored["metrics"]["accuracy_all"]) == \
        pytest.approx(_scienceqa_recount(edited))
    assert (rescored["metrics"]["accuracy"], rescored["metrics"]["accuracy_all"]) == \
        pytest.approx(want)
