"""launch/evaluate.py --benchmark on hand-made POPE and MMBench files and a tiny random LLaVA (HF dir).

The model answers nonsense; what is checked is the plumbing: which questions are asked and skipped,
the answer file LLaVA's scripts would write, scores equal to a plain recount of that file, and
--answers scoring it again without a model.
"""

import base64
import importlib.util
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
from absl import app, flags
from PIL import Image

import tiny_run
from llavamod_jax import evaluation, export, models

REPO = Path(__file__).resolve().parents[2]
SUFFIX = "\nAnswer the question using a single word or phrase."
ANSWER_KEYS = {"question_id", "prompt", "text", "answer_id", "model_id", "metadata"}
POPE_KEYS = {"n", "accuracy", "precision", "recall", "f1", "yes_ratio"}


def _script_at(path, name):
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


evaluate = _script_at(REPO / "launch" / "evaluate.py", "launch_evaluate")


def _call(*flag_args):
  return evaluate.main(evaluate.parse(["prog", *flag_args]))


def _photo(name, fmt):
  """A scikit-image photo, small, as encoded bytes."""
  from skimage import data

  buf = io.BytesIO()
  Image.fromarray(getattr(data, name)()).resize((48, 40)).save(buf, fmt)
  return buf.getvalue()


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
  """A tiny dense LLaVA with random weights, exported as an HF directory."""
  model = models.build(tiny_run.llava_config())
  out = tmp_path_factory.mktemp("model") / "tiny-llava"
  export.export_hf(model, tiny_run.random_params(model), tiny_run.tokenizer(), tiny_run.run_info(model),
                   out)
  return out


# --- POPE --------------------------------------------------------------------------------------------

# (question_id, category, image, object, label); 5's image is missing and 6's is not an image.
POPE = [
    (1, "random", "astronaut.jpg", "person", "yes"),
    (2, "random", "coffee.png", "cup", "yes"),
    (3, "popular", "camera.png", "dog", "no"),  # a greyscale photo
    (4, "adversarial", "astronaut.jpg", "rocket", "no"),
    (5, "random", "missing.jpg", "cat", "no"),
    (6, "popular", "corrupt.jpg", "car", "yes"),
]


@pytest.fixture(scope="module")
def pope_files(tmp_path_factory):
  root = tmp_path_factory.mktemp("pope")
  images = root / "val2014"
  images.mkdir()
  (images / "astronaut.jpg").write_bytes(_photo("astronaut", "JPEG"))
  (images / "coffee.png").write_bytes(_photo("coffee", "PNG"))
  (images / "camera.png").write_bytes(_photo("camera", "PNG"))
  (images / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a JPEG" * 8)
  questions = root / "llava_pope_test.jsonl"
  questions.write_text("".join(
      json.dumps({"question_id": i, "image": im, "text": f"Is there a {obj} in the image?" + SUFFIX,
                  "category": c}) + "\n" for i, c, im, obj, _ in POPE))
  labels = root / "coco"
  labels.mkdir()
  for category in ("random", "popular", "adversarial"):
    rows = [r for r in POPE if r[1] == category]
    (labels / f"coco_pope_{category}.json").write_text("".join(
        json.dumps({"question_id": j, "image": im, "text": f"Is there a {obj} in the image?",
                    "label": label}) + "\n" for j, (_, _, im, obj, label) in enumerate(rows, 1)))
  return questions, images, labels


def _pope_recount(answers):
  """POPE's numbers from answer texts and the labels, as eval_pope.py counts them."""
  label = {i: lab for i, _, _, _, lab in POPE}
  category = {i: c for i, c, _, _, _ in POPE}
  groups = {}
  for a in answers:
    words = a["text"].split(".")[0].replace(",", "").split(" ")
    pred = "no" if "no" in words or "No" in words or "not" in words else "yes"
    for g in (category[a["question_id"]], "overall"):
      groups.setdefault(g, []).append((pred, label[a["question_id"]]))
  out = {}
  for g, pairs in groups.items():
    tp = sum(p == t == "yes" for p, t in pairs)
    fp = sum(p == "yes" != t for p, t in pairs)
    tn = sum(p == t == "no" for p, t in pairs)
    fn = sum(p == "no" != t for p, t in pairs)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    out[g] = {"n": len(pairs), "accuracy": (tp + tn) / len(pairs), "precision": precision,
              "recall": recall,
              "f1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0,
              "yes_ratio": (tp + fp) / len(pairs)}
  return out


def _assert_recounted(metrics, answers):
  want = _pope_recount(answers)
  assert set(metrics) == set(want)
  for group, values in want.items():
    assert metrics[group] == pytest.approx(values), group


def test_pope_end_to_end_then_scored_again_from_the_answers(hf_dir, pope_files, tmp_path):
  questions, images, labels = pope_files
  scores = _call("--benchmark=pope", f"--questions={questions}", f"--image_root={images}",
                 f"--annotations={labels}", f"--hf_dir={hf_dir}", f"--out={tmp_path / 'pope.json'}",
                 "--batch_size=2", "--max_new_tokens=4")
  saved = json.loads((tmp_path / "pope.json").read_text())
  assert saved == json.loads(json.dumps(scores))
  assert {"benchmark", "n", "skipped", "skipped_examples", "metrics", "model", "seconds",
          "questions_per_second"} <= set(saved)
  assert (saved["benchmark"], saved["n"], saved["model"]) == ("pope", 4, str(hf_dir))
  assert saved["skipped"] == {"missing_image": 1, "unreadable_image": 1}
  assert saved["skipped_examples"] == {"missing_image": [5], "unreadable_image": [6]}
  assert set(saved["metrics"]) == {"random", "popular", "adversarial", "overall"}
  assert all(set(m) == POPE_KEYS for m in saved["metrics"].values())
  gen = saved["generation"]
  assert gen["questions"] == 4 and 2 <= gen["batches"] <= 3 and 1 <= gen["shapes"] <= gen["batches"]
  assert saved["questions_per_second"] > 0 and 0 < gen["generate_share"] <= 1

  # LLaVA's answer file, in question order, next to --out.
  path = tmp_path / "pope.answers.jsonl"
  assert saved["answers"] == str(path)
  answers = [json.loads(line) for line in path.read_text().splitlines()]
  assert [a["question_id"] for a in answers] == [1, 2, 3, 4]
  assert all(set(a) == ANSWER_KEYS for a in answers)
  assert answers[0]["prompt"] == "Is there a person in the image?" + SUFFIX
  assert {a["model_id"] for a in answers} == {"tiny-llava"}
  assert answers[2]["metadata"] == {"category": "popular", "image": "camera.png"}
  _assert_recounted(saved["metrics"], answers)

  # The same numbers from the answer file alone (our answers carry category and image); the
  # labels of the two questions never asked are unanswered now, an unreadable line is counted.
  damaged = tmp_path / "damaged.jsonl"
  damaged.write_text(path.read_text() + "{not json\n")
  again = _call("--benchmark=pope", f"--answers={damaged}", f"--annotations={labels}",
                f"--out={tmp_path / 'again.json'}")
  assert (again["n"], again["metrics"], again["model"]) == (4, saved["metrics"], None)
  assert again["skipped"] == {"unreadable_answer_line": 1, "unanswered": 2}
  assert "generation" not in again

  # A random model reads as "yes" throughout; answers that say no count as no.
  for a, text in zip(answers, ["No, there is not.", "Yes", "no", "There is not a rocket. Yes"]):
    a["text"] = text
  edited = tmp_path / "edited.jsonl"
  edited.write_text("".join(json.dumps(a) + "\n" for a in answers))
  rescored = _call("--benchmark=pope", f"--answers={edited}", f"--annotations={labels}",
                   f"--out={tmp_path / 'again.json'}")
  _assert_recounted(rescored["metrics"], answers)
  assert rescored["metrics"]["overall"]["yes_ratio"] == 0.25
  # With the question file, and no images at all: rescoring does not look at them, so the two
  # questions the run skipped (missing, corrupt image) are simply unanswered.
  with_questions = _call("--benchmark=pope", f"--answers={path}", f"--questions={questions}",
                         f"--image_root={tmp_path / 'no_images_here'}", f"--annotations={labels}",
                         f"--out={tmp_path / 'again.json'}")
  assert with_questions["metrics"] == saved["metrics"]
  assert with_questions["skipped"] == {"unanswered": 2}


# --- MMBench -----------------------------------------------------------------------------------------

def _mmbench_tsv(path):
  """Rows 0 (4 options) and 1 (2 options) with photos; row 2's image is not one; row 3 has none."""
  photo = base64.b64encode(_photo("chelsea", "JPEG")).decode()
  junk = base64.b64encode(b"GIF89a, then nothing").decode()
  rows = [
      ["0", "What animal is this?", "nan", "cat", "dog", "bird", "fish", "A", photo, "animals"],
      ["1", "Is it indoors?", "Look at the light.", "yes", "no", "nan", "nan", "B", "0", "scene"],
      ["2", "What colour?", "nan", "red", "blue", "nan", "nan", "A", junk, "color"],
      ["3", "How many?", "nan", "one", "two", "nan", "nan", "A", "", "count"],
  ]
  header = ["index", "question", "hint", "A", "B", "C", "D", "answer", "image", "category"]
  path.write_text("\n".join("\t".join(r) for r in [header] + rows) + "\n")
  return path


def test_mmbench_end_to_end_then_scored_again(hf_dir, tmp_path):
  tsv = _mmbench_tsv(tmp_path / "mmbench_dev.tsv")
  answers_out = tmp_path / "answers" / "mmbench.jsonl"
  scores = _call("--benchmark=mmbench", f"--questions={tsv}", f"--hf_dir={hf_dir}",
                 f"--answers_out={answers_out}", f"--out={tmp_path / 'mmbench.json'}",
                 "--batch_size=4", "--max_new_tokens=3")
  # Every rotation is asked: 4 + 2 rounds answered, row 2's two rounds skipped, row 3 never asked.
  assert (scores["benchmark"], scores["n"]) == ("mmbench", 6)
  assert scores["skipped"] == {"missing_image": 1, "unreadable_image": 2}
  assert scores["skipped_examples"]["unreadable_image"] == [2, 2]
  assert {"accuracy", "circular_accuracy"} <= set(scores["metrics"])
  assert scores["metrics"]["n_first_pass"] == 2 and scores["metrics"]["n_circular"] == 2
  answers = [json.loads(line) for line in answers_out.read_text().splitlines()]
  assert [(a["question_id"], a["round_id"]) for a in answers] == [
      (0, 0), (0, 1), (0, 2), (0, 3), (1, 0), (1, 1)]
  assert all(set(a) == ANSWER_KEYS | {"round_id", "options", "option_char"} for a in answers)
  assert answers[5]["prompt"] == "Look at the light.\nIs it indoors?\nA. no\nB. yes"
  assert answers[5]["options"] == ["no", "yes"] and answers[5]["option_char"] == ["B", "A"]

  again = _call("--benchmark=mmbench", f"--answers={answers_out}", f"--annotations={tsv}",
                f"--out={tmp_path / 'again.json'}")
  assert (again["n"], again["metrics"]) == (6, scores["metrics"])
  # The TSV as annotations knows rows 2 and 3, whose rounds were never answered.
  assert again["skipped"] == {"unanswered": 4}


# --- errors ------------------------------------------------------------------------------------------

def test_bad_input_is_a_one_line_usage_error(pope_files, tmp_path):
  questions, images, labels = pope_files
  out = f"--out={tmp_path / 's.json'}"
  with pytest.raises(app.UsageError, match=r"llava_pope_test.jsonl: this is not a mme question file "
                     r"\(it looks like pope\)"):
    _call("--benchmark=mme", f"--questions={questions}", "--hf_dir=/nowhere", out)
  with pytest.raises(app.UsageError, match="POPE needs its label files"):
    _call("--benchmark=pope", f"--questions={questions}", "--hf_dir=/nowhere", out)
  with pytest.raises(app.UsageError, match="--benchmark needs --questions, or --answers"):
    _call("--benchmark=pope", f"--annotations={labels}", out)
  with pytest.raises(app.UsageError, match="give no --workdir / --hf_dir"):
    _call("--benchmark=pope", f"--answers={questions}", "--hf_dir=/nowhere", out)
  with pytest.raises(app.UsageError, match="--questions, --annotations apply to --benchmark only"):
    _call(f"--questions={questions}", f"--annotations={labels}", "--hf_dir=/nowhere")
  with pytest.raises(app.UsageError, match="--data do not apply with --benchmark"):
    _call("--benchmark=pope", f"--questions={questions}", "--data=x.jsonl", out)
  with pytest.raises(flags.Error, match=r"one of <pope\|mme\|textvqa\|gqa\|scienceqa\|mmbench>"):
    _call("--benchmark=popee")

  # As a user runs it: exit status 1, the reason on one line, no traceback.
  proc = subprocess.run(
      [sys.executable, str(REPO / "launch" / "evaluate.py"), "--benchmark=gqa",
       f"--questions={questions}", f"--annotations={labels}", "--hf_dir=/nowhere", out],
      cwd=REPO, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 1 and "Traceback" not in proc.stderr
  assert proc.stderr.splitlines()[0] == (
      f"FATAL {questions}: this is not a gqa question file (it looks like pope); expected LLaVA's "
      "llava_gqa_testdev_balanced.jsonl (question_id, image, text per line)")


# --- batching ----------------------------------------------------------------------------------------

def test_length_batches_sort_and_never_mix_output_lengths_or_image_counts():
  keys = [(8, 1, 30), (8, 1, 10), (4, 1, 20), (8, 0, 5), (8, 1, 10), (8, 1, 25), (4, 1, 21)]
  assert evaluation.length_batches(keys, 2) == [[2, 6], [3], [1, 4], [5, 0]]
  assert evaluation.length_batches(keys, 8) == [[2, 6], [3], [1, 4, 5, 0]]
  assert evaluation.length_batches([], 4) == []


# --- bench/eval_speed.py -----------------------------------------------------------------------------

def test_eval_speed_bench_runs_the_demo_student(tmp_path):
  """The throughput benchmark at minuscule sizes: its MoE demo student goes through --hf_dir."""
  eval_speed = _script_at(REPO / "bench" / "eval_speed.py", "eval_speed")
  result = eval_speed.main(["--pope=3", "--mmbench_rows=1", "--repeats=1", "--batch_size=4",
                            "--max_new_tokens=2", f"--out={tmp_path / 'speed.json'}"])
  assert [(r["benchmark"], r["questions"]) for r in result["rows"]] == [("pope", 3), ("mmbench", 4)]
  assert all(r["questions_per_second"] > 0 and r["tokens"] > 0 for r in result["rows"])
  assert json.loads((tmp_path / "speed.json").read_text()) == json.loads(json.dumps(result))
