"""The synthetic shapes set: determinism, answers re-derived from the ground truth and the pixels, POPE
balance, preference pairs, split disjointness, and the manifest-based rebuild skip."""

import collections
import hashlib
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from llavamod_jax.data import image
from llavamod_jax.demo import synthetic

NUM_TRAIN, NUM_EVAL, SIZE = 48, 24, 64
COLOR = "|".join(synthetic.COLORS)
SHAPE = "|".join(synthetic.SHAPES)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
  out = tmp_path_factory.mktemp("shapes") / "set"
  manifest = synthetic.build(out, num_train=NUM_TRAIN, num_eval=NUM_EVAL, seed=3, image_size=SIZE)
  return out, manifest


def _read(out, name):
  with open(os.path.join(out, name)) as f:
    return [json.loads(line) for line in f]


def _tree(root):
  """{relative path: sha256} of every file under root."""
  out = {}
  for dirpath, _, files in os.walk(root):
    for name in files:
      path = os.path.join(dirpath, name)
      with open(path, "rb") as f:
        out[os.path.relpath(path, root)] = hashlib.sha256(f.read()).hexdigest()
  return out


def _scene_of(record):
  split, index = re.fullmatch(r"images/(\w+)/(\d+)\.png", record["image"]).groups()
  return synthetic.scene(split, int(index), seed=3, image_size=SIZE)


def _objects(text):
  return re.findall(rf"\b({COLOR}) ({SHAPE})\b", text)


def _expected_answer(sc, question):
  """The answer to one prompt, derived here from the scene description only."""
  present = [(o.color, o.shape) for o in sc.objects]
  q = question.removesuffix(synthetic.SHORT_ANSWER)
  if q == "Describe the image.":
    names = [f"{o.color} {o.shape}" for o in sorted(sc.objects, key=lambda o: o.x)]
    words = [("an " if n[0] in "aeiou" else "a ") + n for n in names]
    text = words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]
    return text[0].upper() + text[1:] + "."
  if m := re.fullmatch(rf"What color is the ({SHAPE})\?", q):
    matches = [c for c, s in present if s == m[1]]
    assert len(matches) == 1, (question, present)
    return matches[0]
  if q == "How many shapes are there?":
    return str(len(present))
  if m := re.fullmatch(rf"How many ({SHAPE})s are there\?", q):
    return str(sum(s == m[1] for _, s in present))
  if m := re.fullmatch(rf"Is the ({COLOR}) ({SHAPE}) on the left or the right\?", q):
    (o,) = [o for o in sc.objects if (o.color, o.shape) == (m[1], m[2])]
    assert o.x + o.radius <= SIZE / 2 or o.x - o.radius >= SIZE / 2, "object straddles the midline"
    return "left" if o.x < SIZE / 2 else "right"
  if m := re.fullmatch(rf"Is there an? ({COLOR}) ({SHAPE}) in the image\?", q):
    return "yes" if (m[1], m[2]) in present else "no"
  raise AssertionError(f"unexpected question {question!r}")


def test_layout_and_manifest(built):
  out, manifest = built
  assert synthetic.read_manifest(out) == manifest
  assert manifest["num_train"] == NUM_TRAIN and manifest["num_eval"] == NUM_EVAL
  for name, count in manifest["files"].items():
    assert len(_read(out, name)) == count, name
  assert len(os.listdir(out / "images" / "train")) == NUM_TRAIN
  assert len(os.listdir(out / "images" / "eval")) == NUM_EVAL
  assert not [p for p in os.listdir(out.parent) if ".tmp-" in p or ".old-" in p]


@pytest.mark.parametrize("name", ["captions_train.jsonl", "train.jsonl", "eval.jsonl", "pope_eval.jsonl"])
def test_conversation_records_are_llava_format_and_correct(built, name):
  out, _ = built
  recs = _read(out, name)
  assert len({r["id"] for r in recs}) == len(recs)
  for r in recs:
    assert os.path.isfile(out / r["image"])
    turns = r["conversations"]
    assert turns and [t["from"] for t in turns] == ["human", "gpt"] * (len(turns) // 2)
    assert turns[0]["value"].startswith("<image>\n")
    assert sum(t["value"].count("<image>") for t in turns) == 1
    sc = _scene_of(r)
    for human, gpt in zip(turns[::2], turns[1::2]):
      question = human["value"].removeprefix("<image>\n")
      assert gpt["value"] == _expected_answer(sc, question), (r["id"], question)


def test_tasks_present(built):
  out, _ = built
  for name, n in (("eval.jsonl", NUM_EVAL), ("train.jsonl", NUM_TRAIN)):
    recs = _read(out, name)
    tasks = collections.Counter(r["task"] for r in recs)
    assert set(tasks) == {"caption", "color", "count", "position", "pope"}
    assert tasks["caption"] == tasks["count"] == n and tasks["pope"] == 2 * n
    # one question per record: no question can be answered from another one's text
    assert all(len(r["conversations"]) == 2 for r in recs)


def test_pixels_match_the_scene(built):
  out, _ = built
  for split, count in (("train", NUM_TRAIN), ("eval", NUM_EVAL)):
    for i in range(count):
      sc = synthetic.scene(split, i, seed=3, image_size=SIZE)
      px = np.asarray(image.load_image(out / sc.image))
      assert px.shape == (SIZE, SIZE, 3) and px.dtype == np.uint8
      assert tuple(px[0, 0]) == sc.background  # objects keep a pixel away from the border
      for o in sc.objects:
        assert tuple(px[int(o.y), int(o.x)]) == synthetic.COLORS[o.color], (sc.image, o)
      colours = {tuple(c) for c in px.reshape(-1, 3)} - {sc.background}
      assert colours == {synthetic.COLORS[o.color] for o in sc.objects}


def test_pope_balance_and_adversarial_negatives(built):
  out, _ = built
  pope = _read(out, "pope_eval.jsonl")
  for category in ("random", "adversarial"):
    answers = [r["conversations"][1]["value"] for r in pope if r["category"] == category]
    assert len(answers) == 2 * NUM_EVAL and answers.count("yes") == answers.count("no")
  for r in pope:
    if r["category"] == "adversarial" and r["conversations"][1]["value"] == "no":
      (asked,) = _objects(r["conversations"][0]["value"])
      present = {(o.color, o.shape) for o in _scene_of(r).objects}
      assert asked not in present
      assert any(asked[0] == c or asked[1] == s for c, s in present)
  evals = [r["conversations"][1]["value"] for r in _read(out, "eval.jsonl") if r["task"] == "pope"]
  assert evals.count("yes") == evals.count("no") == NUM_EVAL


@pytest.mark.parametrize("split", ["train", "eval"])
def test_preference_pairs(built, split):
  out, _ = built
  prefs = _read(out, f"preference_{split}.jsonl")
  kinds = collections.Counter()
  for p in prefs:
    assert set(p) >= {"id", "image", "question", "chosen", "rejected"}
    assert "<image>" not in p["question"] and p["chosen"] != p["rejected"]
    sc = _scene_of(p)
    present = {(o.color, o.shape) for o in sc.objects}
    assert p["chosen"] == _expected_answer(sc, p["question"])
    if p["task"] == "caption":
      assert set(_objects(p["rejected"])) - present, p  # names something that is not there
    else:
      shape = re.search(rf"the ({SHAPE})\?", p["question"])[1]
      assert p["rejected"] in synthetic.COLORS and (p["rejected"], shape) not in present
    kinds[p["hallucination"]] += 1
  assert sum(p["task"] == "caption" for p in prefs) == (NUM_TRAIN if split == "train" else NUM_EVAL)
  if split == "train":
    assert set(kinds) == {"add", "color", "shape"}


def test_train_and_eval_are_disjoint(built):
  out, _ = built
  tree = _tree(out / "images")
  train = {h for p, h in tree.items() if p.startswith("train")}
  evals = {h for p, h in tree.items() if p.startswith("eval")}
  assert len(train) == NUM_TRAIN and len(evals) == NUM_EVAL and not train & evals
  ids = {r["id"] for r in _read(out, "train.jsonl")}
  assert not ids & {r["id"] for r in _read(out, "eval.jsonl")}


def test_determinism_and_independence_from_counts(built, tmp_path):
  out, _ = built
  again = synthetic.build(tmp_path / "again", num_train=NUM_TRAIN, num_eval=NUM_EVAL, seed=3,
                          image_size=SIZE)
  assert again == synthetic.read_manifest(out)
  assert _tree(tmp_path / "again") == _tree(out)
  # Sample i does not depend on how many samples are built.
  synthetic.build(tmp_path / "small", num_train=5, num_eval=2, seed=3, image_size=SIZE)
  small, full = _tree(tmp_path / "small" / "images"), _tree(out / "images")
  assert small and all(full[p] == h for p, h in small.items())
  small_train = _read(tmp_path / "small", "train.jsonl")  # records are written in image order
  assert small_train == _read(out, "train.jsonl")[:len(small_train)]
  # Another seed gives other images.
  other = synthetic.build(tmp_path / "other", num_train=5, num_eval=0, seed=4, image_size=SIZE)
  assert other["seed"] == 4
  assert _tree(tmp_path / "other" / "images") != small


def test_rebuild_skip_replace_and_refuse(tmp_path):
  out = tmp_path / "set"
  first = synthetic.build(out, num_train=4, num_eval=2)
  sentinel = out / "sentinel"
  sentinel.write_text("kept while the parameters match")
  assert synthetic.build(out, num_train=4, num_eval=2) == first
  assert sentinel.exists()
  second = synthetic.build(out, num_train=6, num_eval=2)  # other parameters: replaced
  assert second["num_train"] == 6 and not sentinel.exists()
  assert len(_read(out, "captions_train.jsonl")) == 6

  foreign = tmp_path / "mine"
  foreign.mkdir()
  (foreign / "notes.txt").write_text("not a shapes build")
  with pytest.raises(FileExistsError, match="mine"):
    synthetic.build(foreign, num_train=2, num_eval=1)
  synthetic.build(foreign, num_train=2, num_eval=1, overwrite=True)
  assert not (foreign / "notes.txt").exists()
  (tmp_path / "empty").mkdir()
  synthetic.build(tmp_path / "empty", num_train=1, num_eval=1)
  assert sorted(os.listdir(tmp_path)) == ["empty", "mine", "set"]  # no temporary folders left


def test_bad_arguments():
  with pytest.raises(ValueError, match="split"):
    synthetic.scene("test", 0)
  with pytest.raises(ValueError, match="image_size"):
    synthetic.build("/nonexistent/never", image_size=8)


def test_images_feed_the_preprocessor(built):
  out, _ = built
  px = image.preprocess(image.load_image(out / "images/eval/000000.png"), kind="siglip", size=56)
  assert px.shape == (56, 56, 3) and np.isfinite(px).all()


def test_command_line(tmp_path):
  out = tmp_path / "cli"
  repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(synthetic.__file__))))
  env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [repo, os.environ.get("PYTHONPATH")]))}
  subprocess.run([sys.executable, "-m", "llavamod_jax.demo.synthetic", f"--out={out}", "--num_train=3",
                  "--num_eval=2", "--image_size=48"], check=True, capture_output=True, env=env)
  manifest = synthetic.read_manifest(out)
  assert manifest["image_size"] == 48 and manifest["files"]["captions_train.jsonl"] == 3
