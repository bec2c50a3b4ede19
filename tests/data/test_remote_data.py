"""Data on gs://: data files, image roots, images and prepared TFDS datasets read in the bucket.

`mock_bucket` maps gs://bucket/... onto tmp_path/gcs/bucket/... for every etils.epath call; each test
writes the same corpus there and to a local folder, and the bucket must read as the local copy does.
array_record reads gs:// shards with its own GCS client, which the mock cannot reach: the TFDS test
maps the shard paths at array_record's reader, after checking they are the gs:// ones.
"""

import dataclasses
import json
import os

import numpy as np
import pytest
import text_tokenizers
from jsonl_files import write_jsonl
from mock_bucket import mock_bucket
from PIL import Image

from llavamod_jax import evaluation, fileutil
from llavamod_jax.data import image as image_lib
from llavamod_jax.data import pipeline, sources, templates, tfds_builder
from llavamod_jax.data.sources import DataError, JsonSource, Record, TfdsSource

DATA = "gs://bucket/data"
TEMPLATE = dataclasses.replace(templates.TEMPLATES["qwen"], system="Be brief.")


@pytest.fixture
def gcs(tmp_path, monkeypatch):
  """The folder gs:// maps to; the test runs in an empty directory that must stay empty."""
  root = tmp_path / "gcs"
  root.mkdir()
  cwd = tmp_path / "cwd"
  cwd.mkdir()
  monkeypatch.chdir(cwd)
  with mock_bucket(root, monkeypatch):
    yield root
  assert not os.listdir(cwd), "a gs:// path became a local one"  # no ./gs:/bucket/...


def _records(outside: str) -> list[dict]:
  recs = []
  for i in range(6):
    r = {"id": f"r{i}", "conversations": [{"from": "human", "value": "<image>\nWhat is it?"},
                                          {"from": "gpt", "value": f"Shape number {i}."}]}
    if i == 3:  # text-only
      r["conversations"][0]["value"] = "Say hi."
    else:
      r["image"] = f"img/{i}.png"
    recs.append(r)
  recs[4]["image"] = outside  # an absolute local path stays as it is
  recs.append({"id": "gone", "image": "img/missing.png", "conversations": [
      {"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": "a"}]})
  return recs


def _corpus(folder, outside: str) -> None:
  """train.jsonl, train.json (the same records) and their images under `folder`."""
  (folder / "img").mkdir(parents=True)
  for i in range(6):
    Image.new("RGB", (9 + i, 7 + i % 3), (40 * i, 60, 200 - 10 * i)).save(folder / "img" / f"{i}.png")
  recs = _records(outside)
  write_jsonl(folder / "train.jsonl", recs)
  (folder / "train.json").write_text(json.dumps(recs, indent=1))


@pytest.fixture
def both(tmp_path, gcs):
  """(the local data folder as a string, the gs:// one): the same corpus in each."""
  outside = tmp_path / "outside.png"
  Image.new("RGB", (12, 10), (5, 150, 70)).save(outside)
  local = tmp_path / "local/data"
  _corpus(local, str(outside))
  _corpus(gcs / "bucket/data", str(outside))
  return str(local), DATA


def _as_remote(text: str, local: str) -> str:
  return text.replace(local, DATA)


@pytest.mark.parametrize("name", ["train.jsonl", "train.json"])
def test_bucket_file_reads_as_the_local_one(both, name):
  local, remote = both
  here, there = JsonSource(f"{local}/{name}"), JsonSource(f"{remote}/{name}")
  assert there.image_root == remote  # the gs:// file's directory, not made local
  assert len(here) == len(there) == 7
  for i in range(len(here)):
    a, b = here[i], there[i]
    assert isinstance(a, Record) and isinstance(b, Record)
    assert (b.id, b.kind, b.messages) == (a.id, a.kind, a.messages)
    assert b.origin == _as_remote(a.origin, local) and b.origin.startswith(f"{remote}/{name}")
    assert b.images == tuple(_as_remote(p, local) for p in a.images)
  assert there[0].images == (f"{remote}/img/0.png",)
  assert there[4].images == here[4].images and not there[4].images[0].startswith("gs://")
  for a, b in zip(here[0].images + here[5].images, there[0].images + there[5].images):
    np.testing.assert_array_equal(np.asarray(image_lib.load_image(b)),
                                  np.asarray(image_lib.load_image(a)))


def test_relative_images_join_a_bucket_image_root(both):
  local, remote = both
  cases = [JsonSource(f"{remote}/train.jsonl", image_root="gs://bucket/images"),
           JsonSource(f"{local}/train.jsonl", image_root="gs://bucket/images")]
  for src in cases:
    assert src[0].images == ("gs://bucket/images/img/0.png",)
    assert src[4].images == JsonSource(f"{local}/train.jsonl")[4].images  # absolute: kept
  rec = {"id": "uri", "image": "gs://other/x.png", "conversations": [
      {"from": "human", "value": "<image>"}, {"from": "gpt", "value": "a"}]}
  assert sources.parse(rec, "o", "gs://bucket/images").images == ("gs://other/x.png",)


def test_missing_and_corrupt_bucket_files_are_named(both, gcs):
  with pytest.raises(DataError, match=r"data file 'gs://bucket/data/nope.jsonl' does not exist"):
    JsonSource(f"{DATA}/nope.jsonl")
  with pytest.raises(DataError, match=r"evaluation file 'gs://bucket/data/nope.jsonl' does not"):
    evaluation.read_records(f"{DATA}/nope.jsonl")
  with pytest.raises(image_lib.ImageError, match=r"image file 'gs://bucket/data/img/9.png' does "
                     r"not exist") as missing:
    image_lib.load_image(f"{DATA}/img/9.png")
  assert (missing.value.reason, missing.value.source) == ("missing", f"{DATA}/img/9.png")
  (gcs / "bucket/data/img/bad.png").write_bytes(b"\x89PNG not really")
  with pytest.raises(image_lib.ImageError, match=r"gs://bucket/data/img/bad.png") as corrupt:
    image_lib.load_image(f"{DATA}/img/bad.png")
  assert corrupt.value.reason == "corrupt"


@pytest.fixture(scope="module")
def tok():
  return text_tokenizers.trained_bpe()


def _batches(path, tok):
  view = pipeline.View(4, tok.convert_tokens_to_ids("<image>"), image_size=8)
  pipe = pipeline.Pipeline(JsonSource(path), tok, views=[view], batch_size=2, max_length=48,
                           template=TEMPLATE, shard_index=0, shard_count=1, seed=0, num_epochs=1)
  it = iter(pipe)
  return list(it), it.stats()


def test_pipeline_batches_from_the_bucket_equal_the_local_ones(both, tok):
  (here, here_stats), (there, there_stats) = (_batches(f"{d}/train.jsonl", tok) for d in both)
  assert there_stats == here_stats and there_stats["skipped"] == {"missing_image": 1}
  assert len(there) == len(here) == 3
  for a, b in zip(here, there):
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
  assert there[0]["image_mask"].any()


def test_evaluation_records_from_the_bucket(both):
  local, remote = both
  here = evaluation.read_records(f"{local}/train.jsonl", limit=3)
  there = evaluation.read_records(f"{remote}/train.jsonl", limit=3)
  assert [r.images for r in there] == [tuple(_as_remote(p, local) for p in r.images) for r in here]
  assert there[0].images == (f"{remote}/img/0.png",) and there[0].origin == f"{remote}/train.jsonl:1"


@pytest.fixture
def shard_reads(gcs, monkeypatch):
  """The paths array_record opens; gs:// ones are read from the folder the bucket maps to (its own
  GCS client would reach for the network)."""
  from array_record.python import array_record_data_source as ards
  opened, create = [], ards._create_reader

  def reader(filename, *args, **kwargs):
    opened.append(os.fspath(filename))
    local = os.fspath(filename).replace("gs://", f"{gcs}/", 1)
    return create(local, *args, **kwargs)

  monkeypatch.setattr(ards, "_create_reader", reader)
  return opened


def test_tfds_dataset_prepared_into_and_read_from_the_bucket(both, gcs, shard_reads):
  _, remote = both
  src = JsonSource(f"{remote}/train.jsonl")
  path, counts = tfds_builder.prepare({"train": src}, "gs://bucket/tfds", name="demo")
  assert path == "gs://bucket/tfds/llava_records/demo/1.0.0"
  assert counts["train"] == {"written": 6, "missing_image": 1}
  assert (gcs / "bucket/tfds/llava_records/demo/1.0.0/dataset_info.json").is_file()
  assert tfds_builder.prepare({"train": src}, "gs://bucket/tfds", name="demo") == (
      path, {"train": {}})  # prepared already: reused as it is

  by_dir = TfdsSource(path, "train")
  by_name = TfdsSource("llava_records/demo", "train", data_dir="gs://bucket/tfds")
  assert len(by_dir) == len(by_name) == 6
  for i in range(6):
    a, b = src[i], by_dir[i]
    assert (b.id, b.messages, b.origin) == (a.id, a.messages, a.origin)
    assert b.images == tuple(fileutil.path(p).read_bytes() for p in a.images)
    assert by_name[i] == b
  assert shard_reads and all(p.startswith(f"{path}/") for p in shard_reads)
