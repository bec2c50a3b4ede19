"""TFDS ArrayRecord builder: records and image bytes round-trip without TensorFlow, and a pipeline
over the prepared dataset yields the batches of the JSON source."""

import importlib.util
import json
import os
import sys

import numpy as np
import pytest
from PIL import Image

import text_tokenizers
from llavamod_jax.data import pipeline, sources, tfds_builder
from llavamod_jax.data.sources import DataError, JsonSource, TfdsSource


def _corpus(root):
  (root / "img").mkdir()
  recs = []
  for i in range(7):
    r = {"id": f"r{i}", "conversations": [{"from": "human", "value": "<image>\nWhat is it?"},
                                          {"from": "gpt", "value": f"Shape number {i}."}]}
    if i % 3 == 2:
      r["conversations"][0]["value"] = "Say hi."
    else:
      Image.new("RGB", (10 + i, 8), (30 * i, 20, 90)).save(root / "img" / f"{i}.jpg", quality=90)
      r["image"] = f"img/{i}.jpg"
    recs.append(r)
  recs.append({"id": "gone", "image": "img/missing.jpg", "conversations": [
      {"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": "a"}]})
  recs.append({"id": "norole", "conversations": [{"from": "bot", "value": "q"}]})
  path = root / "data.jsonl"
  path.write_text("\n".join(json.dumps(r) for r in recs) + "\n")
  return str(path)


def test_round_trip_without_tensorflow(tmp_path):
  src = JsonSource(_corpus(tmp_path))
  pref = [{"id": "p0", "question": "Which?", "chosen": "Left.", "rejected": "Right."}]
  (tmp_path / "pref.jsonl").write_text(json.dumps(pref[0]) + "\n")
  path, counts = tfds_builder.prepare({"train": src, "pref": JsonSource(tmp_path / "pref.jsonl")},
                                      tmp_path / "tfds", name="demo")
  assert importlib.util.find_spec("tensorflow") is None or "tensorflow" not in sys.modules
  assert counts["train"] == {"written": 7, "missing_image": 1, "unknown_role": 1}
  assert path == os.path.join(str(tmp_path / "tfds"), "llava_records", "demo", "1.0.0")
  with open(os.path.join(path, "metadata.json")) as f:
    assert json.load(f)["skipped"]["train"] == {"missing_image": 1, "unknown_role": 1}

  by_dir = TfdsSource(path, "train")
  by_name = TfdsSource("llava_records/demo", "train", data_dir=tmp_path / "tfds")
  assert len(by_dir) == len(by_name) == 7
  for i in range(7):  # the source order is kept
    a, b = src[i], by_dir[i]
    assert (b.id, b.kind, b.messages, b.origin) == (a.id, a.kind, a.messages, a.origin)
    assert by_name[i] == b
    assert len(b.images) == len(a.images)
    for stored, file in zip(b.images, a.images):
      with open(file, "rb") as f:
        assert stored == f.read()  # the original encoded bytes, not a re-encoding
  p = TfdsSource(path, "pref")[0]
  assert (p.kind, p.chosen, p.rejected) == ("preference", "Left.", "Right.")
  assert TfdsSource(path, "pref", kind="conversation")[0].reason == "wrong_kind"


def test_pipeline_over_tfds_equals_pipeline_over_json(tmp_path):
  tok = text_tokenizers.trained_bpe()
  image_id = tok.convert_tokens_to_ids("<image>")
  src = JsonSource(_corpus(tmp_path))
  path, _ = tfds_builder.prepare({"train": src}, tmp_path / "tfds", name="demo")
  kept = [src[i] for i in range(len(src)) if isinstance(src[i], sources.Record)
          and all(os.path.exists(p) for p in src[i].images)]

  def batches(source):
    return list(pipeline.Pipeline(source, tok, views=[pipeline.View(3, image_id, image_size=8)],
                                  batch_size=2, max_length=96, shard_index=0, shard_count=1, seed=4))

  from_json, from_tfds = batches(kept), batches(TfdsSource(path))
  assert len(from_json) == len(from_tfds) == 3
  for a, b in zip(from_json, from_tfds):
    assert all(np.array_equal(a[k], b[k]) for k in a)


def test_strict_prepare_raises(tmp_path):
  src = JsonSource(_corpus(tmp_path))
  with pytest.raises(DataError, match="record 'gone'"):
    tfds_builder.prepare({"train": src}, tmp_path / "tfds", name="strict", strict=True)
