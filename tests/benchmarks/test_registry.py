"""benchmarks.get and the question-file check: each reader refuses another benchmark's file."""

import json

import pytest

from llavamod_jax import benchmarks
from llavamod_jax.benchmarks import common

SUFFIX = "\nAnswer the question using a single word or phrase."
FILES = {
    "pope": ("llava_pope_test.jsonl", {"question_id": 1, "image": "COCO_val2014_000000000001.jpg",
                                       "text": "Is there a dog in the image?" + SUFFIX,
                                       "category": "adversarial"}),
    "mme": ("llava_mme.jsonl", {"question_id": "code_reasoning/0020.png",
                                "image": "code_reasoning/0020.png", "text": "Print 3?" + SUFFIX,
                                "category": "code_reasoning"}),
    "textvqa": ("llava_textvqa_val_v051_ocr.jsonl", {"question_id": "003a8ae2ef43b901",
                                                     "image": "003a8ae2ef43b901.jpg",
                                                     "text": "What brand?" + SUFFIX}),
    "gqa": ("llava_gqa_testdev_balanced.jsonl", {"question_id": "201307251", "image": "n161313.jpg",
                                                 "text": "Is it blue?" + SUFFIX}),
}


def _write_all(tmp_path):
  paths = {}
  for name, (filename, record) in FILES.items():
    paths[name] = tmp_path / filename
    paths[name].write_text(json.dumps(record) + "\n")
  paths["scienceqa"] = tmp_path / "llava_test_CQM-A.json"
  paths["scienceqa"].write_text(json.dumps([{"id": "4", "conversations": [
      {"from": "human", "value": "Question: q?\nOptions: (A) a (B) b"},
      {"from": "gpt", "value": "The answer is A."}]}]))
  paths["mmbench"] = tmp_path / "mmbench_dev_20230712.tsv"
  paths["mmbench"].write_text("index\tquestion\thint\tA\tB\tanswer\timage\n"
                              "0\tq?\tnan\tx\ty\tA\taW1n\n")
  return paths


def test_get():
  assert benchmarks.NAMES == ("pope", "mme", "textvqa", "gqa", "scienceqa", "mmbench")
  for name in benchmarks.NAMES:
    bench = benchmarks.get(name)
    assert bench.NAME == name and callable(bench.read_questions) and callable(bench.score)
  assert [benchmarks.get(n).MAX_NEW_TOKENS for n in benchmarks.NAMES] == [128] * 4 + [1024] * 2
  with pytest.raises(ValueError, match="pope, mme, textvqa, gqa, scienceqa, mmbench"):
    benchmarks.get("vqav2")


def test_each_reader_takes_its_own_file_and_no_other(tmp_path):
  paths = _write_all(tmp_path)
  for name, path in paths.items():
    assert common.sniff(path) == name
    questions, _ = benchmarks.get(name).read_questions(path, image_root="", annotations=())
    # no image file to find: text-only, or inside the TSV (a question in each of its 2 rotations)
    assert len(questions) == {"scienceqa": 1, "mmbench": 2}.get(name, 0)
    for other, other_path in paths.items():
      if other != name:
        with pytest.raises(ValueError, match=f"{other_path}: this is not a {name} question file"):
          benchmarks.get(name).read_questions(other_path)


def test_files_that_are_no_question_file(tmp_path):
  labels = tmp_path / "coco_pope_random.json"
  labels.write_text(json.dumps({"question_id": 1, "image": "x.jpg", "text": "q", "label": "yes"}))
  with pytest.raises(ValueError, match="looks like pope labels"):
    benchmarks.get("pope").read_questions(labels)
  annotations = tmp_path / "TextVQA_0.5.1_val.json"
  annotations.write_text(json.dumps({"data": [{"question_id": 1}]}, indent=1))
  with pytest.raises(ValueError, match="JSON object"):
    benchmarks.get("textvqa").read_questions(annotations)
  with pytest.raises(ValueError, match="no such file"):
    benchmarks.get("gqa").read_questions(tmp_path / "missing.jsonl")
