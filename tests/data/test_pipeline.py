"""grain pipeline: batch layout, preference stacking, views, determinism, resume, shards, workers, and
the bad-input corpus (counted per reason, logged, strict mode, fuzzing)."""

import dataclasses
import json
import logging
import random

import grain
import numpy as np
import pytest
import text_tokenizers
from jsonl_files import write_jsonl
from PIL import Image

from llavamod_jax.data import image as image_lib
from llavamod_jax.data import pipeline, sources, templates
from llavamod_jax.data.pipeline import Pipeline, View
from llavamod_jax.data.sources import DataError, JsonSource
from llavamod_jax.data.templates import IGNORE

TEMPLATE = dataclasses.replace(templates.TEMPLATES["qwen"], system="Be brief.")
ANSWERS = ["A red circle.", "Two blue squares and a star.", "Yes.", "There are three shapes here."]


@pytest.fixture(scope="module")
def tok():
  return text_tokenizers.trained_bpe()


@pytest.fixture(scope="module")
def image_id(tok):
  return tok.convert_tokens_to_ids("<image>")


def _png(path, i, size=None):
  Image.new("RGB", size or (9 + i % 5, 7 + i % 3), (10 * i % 255, 40, 200 - i)).save(path)
  return str(path)


def _records(root, n, start=0):
  (root / "img").mkdir(exist_ok=True)
  recs = []
  for i in range(start, start + n):
    r = {"id": f"r{i}", "conversations": [{"from": "human", "value": "<image>\nWhat is in the image?"},
                                          {"from": "gpt", "value": ANSWERS[i % 4]}]}
    if i % 4 == 3:  # text-only
      r["conversations"][0]["value"] = "How many shapes?"
    else:
      _png(root / "img" / f"{i}.png", i)
      r["image"] = f"img/{i}.png"
    recs.append(r)
  return recs


@pytest.fixture
def corpus(tmp_path):
  return write_jsonl(tmp_path / "data.jsonl", _records(tmp_path, 22))


def _pipe(source, tok, image_id, **kw):
  args = dict(template=TEMPLATE, views=[View(4, image_id, image_size=8)], batch_size=4, max_length=48,
              shard_index=0, shard_count=1, seed=0, num_epochs=1)
  args.update(kw)
  return Pipeline(source if not isinstance(source, str) else JsonSource(source), tok, **args)


def _same(a, b):
  return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def _pixels(path, size=8, kind="clip"):
  return image_lib.preprocess(image_lib.load_image(path), kind=kind, size=size, aspect="pad")


def test_batch_layout(corpus, tok, image_id):
  src = JsonSource(corpus)
  batch = next(iter(_pipe(src, tok, image_id, shuffle=False, batch_size=8)))
  assert set(batch) == {"input_ids", "attention_mask", "labels", "pixel_values", "image_mask",
                        "example_mask"}
  assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (8, 48)
  assert batch["input_ids"].dtype == batch["labels"].dtype == batch["attention_mask"].dtype == np.int32
  assert batch["pixel_values"].shape == (8, 8, 8, 3) and batch["pixel_values"].dtype == np.float32
  assert batch["image_mask"].dtype == bool and batch["example_mask"].tolist() == [1] * 8
  enc = templates.Encoder(tok, TEMPLATE)
  for row in range(8):
    rec = src[row]
    e = enc.encode(rec.messages, image_token_id=image_id, num_image_tokens=4)
    n = e.input_ids.size
    np.testing.assert_array_equal(batch["input_ids"][row, :n], e.input_ids)
    np.testing.assert_array_equal(batch["labels"][row, :n], e.labels)
    assert (batch["labels"][row, n:] == IGNORE).all()
    assert (batch["input_ids"][row, n:] == tok.pad_token_id).all()
    np.testing.assert_array_equal(batch["attention_mask"][row], np.arange(48) < n)
    # Row r owns pixel slot r (images_per_sample=1): its image, or zeros for a text-only row.
    assert batch["image_mask"][row] == bool(rec.images)
    assert (batch["input_ids"][row] == image_id).sum() == 4 * len(rec.images)
    if rec.images:
      np.testing.assert_array_equal(batch["pixel_values"][row], _pixels(rec.images[0]))
    else:
      assert not batch["pixel_values"][row].any()
  assert batch["image_mask"].tolist() == [True, True, True, False] * 2


def test_rows_own_their_image_slots(tmp_path, tok, image_id):
  """images_per_sample=2: row r's j-th image sits in slot 2r + j, however many images rows have."""
  (tmp_path / "img").mkdir()
  recs = []
  for i, count in enumerate([2, 0, 1, 2]):
    paths = [_png(tmp_path / "img" / f"{i}_{j}.png", 3 * i + j) for j in range(count)]
    recs.append({"id": f"m{i}", "image": paths, "conversations": [
        {"from": "human", "value": "<image>" * count + "Same?"}, {"from": "gpt", "value": "Yes."}]})
  src = JsonSource(write_jsonl(tmp_path / "multi.jsonl", recs))
  batch = next(iter(_pipe(src, tok, image_id, images_per_sample=2, shuffle=False)))
  assert batch["pixel_values"].shape == (8, 8, 8, 3)
  assert batch["image_mask"].tolist() == [True, True, False, False, True, False, True, True]
  for row, rec in enumerate(recs):
    for j, path in enumerate(rec["image"]):
      np.testing.assert_array_equal(batch["pixel_values"][2 * row + j], _pixels(path))
    # The row-wise fill rule: the k-th image token of row r reads slot r*K + k // N.
    k = np.cumsum(batch["input_ids"][row] == image_id)[batch["input_ids"][row] == image_id] - 1
    assert set((2 * row + k // 4).tolist()) == {2 * row + j for j in range(len(rec["image"]))}


def test_preference_batches_stack_chosen_then_rejected(tmp_path, tok, image_id):
  recs = []
  for i in range(5):
    r = {"id": f"p{i}", "question": "What shape is it?", "chosen": "A star.",
         "rejected": "A purple hexagon with dots."}
    if i != 2:
      r["image"] = _png(tmp_path / f"{i}.png", i)
    recs.append(r)
  src = JsonSource(write_jsonl(tmp_path / "pref.jsonl", recs))
  pipe = _pipe(src, tok, image_id, mode="preference", shuffle=False, batch_size=3, max_length=64)
  batch = next(iter(pipe))
  assert batch["input_ids"].shape == (6, 64) and batch["pixel_values"].shape == (6, 8, 8, 3)
  assert batch["example_mask"].tolist() == [1, 1, 1]
  for i in range(3):
    c, r = batch["labels"][i], batch["labels"][3 + i]
    start = int(np.argmax(c != IGNORE))
    assert start == int(np.argmax(r != IGNORE))
    np.testing.assert_array_equal(batch["input_ids"][i, :start], batch["input_ids"][3 + i, :start])
    assert tok.decode(c[c != IGNORE]) == " A star.<|endoftext|>"
    assert tok.decode(r[r != IGNORE]) == " A purple hexagon with dots.<|endoftext|>"
  # Rows 0, 1 (chosen) and 3, 4 (rejected) hold images 0, 1; rows 2 and 5 are text-only.
  assert batch["image_mask"].tolist() == [True, True, False, True, True, False]
  for slot, i in [(0, 0), (1, 1), (3, 0), (4, 1)]:
    np.testing.assert_array_equal(batch["pixel_values"][slot], _pixels(tmp_path / f"{i}.png"))
  assert not batch["pixel_values"][[2, 5]].any()
  conv_pipe = _pipe(src, tok, image_id, shuffle=False)  # preference records in a conversation pipe
  assert list(conv_pipe) == [] and list(iter(conv_pipe)) == []


def test_views_share_text_and_trained_tokens(corpus, tok, image_id):
  views = [View(4, image_id, image_size=8),
           View(7, image_id, image_kind="siglip", image_size=10, prefix="teacher_")]
  it = iter(_pipe(corpus, tok, image_id, views=views, max_length=30, shuffle=False, batch_size=6))
  truncated_seen = 0
  for batch in it:
    assert batch["input_ids"].shape == (6, 30) and batch["teacher_input_ids"].shape == (6, 33)
    assert batch["teacher_pixel_values"].shape == (6, 10, 10, 3)
    np.testing.assert_array_equal(batch["image_mask"], batch["teacher_image_mask"])
    for row in range(6):
      s, t = batch["input_ids"][row], batch["teacher_input_ids"][row]
      assert (s == image_id).sum() * 7 == (t == image_id).sum() * 4
      s_text = s[(s != image_id) & (batch["attention_mask"][row] == 1)]
      t_text = t[(t != image_id) & (batch["teacher_attention_mask"][row] == 1)]
      np.testing.assert_array_equal(s_text, t_text)
      sl, tl = batch["labels"][row], batch["teacher_labels"][row]
      np.testing.assert_array_equal(sl[sl != IGNORE], tl[tl != IGNORE])
  truncated_seen = it.stats()["truncated"]
  assert truncated_seen > 0  # max_length=30 cuts some answers: the views still agree


@pytest.mark.parametrize("mode", ["conversation", "preference"])
def test_batch_shapes_are_the_batches_shapes(tmp_path, corpus, tok, image_id, mode):
  """pipeline.batch_shapes (what launch/plan.py compiles for) against real batches of two views."""
  views = [View(4, image_id, image_size=8),
           View(7, image_id, image_kind="siglip", image_size=10, prefix="teacher_")]
  src = corpus
  if mode == "preference":
    src = JsonSource(write_jsonl(tmp_path / "pref.jsonl", [
        {"id": f"p{i}", "image": _png(tmp_path / f"{i}.png", i), "question": "Shape?",
         "chosen": "A star.", "rejected": "A hexagon."} for i in range(4)]))
  batch = next(iter(_pipe(src, tok, image_id, views=views, max_length=40, shuffle=False,
                          batch_size=2, mode=mode, images_per_sample=2)))
  want = {k: (v.shape, v.dtype) for k, v in batch.items() if k != "example_mask"}
  assert pipeline.batch_shapes(views, mode, 2, 40, images_per_sample=2) == want


def test_length_buckets(corpus, tok, image_id):
  lengths = set()
  for batch in _pipe(corpus, tok, image_id, length_buckets=[24, 32], batch_size=2):
    longest = int(batch["attention_mask"].sum(1).max())
    length = batch["input_ids"].shape[1]
    assert length in (24, 32, 48) and longest <= length
    assert length == min(b for b in (24, 32, 48) if b >= longest)
    lengths.add(length)
  assert len(lengths) > 1


def _ids(pipe):
  return [ex["id"] for ex in pipe.examples if "skip" not in ex]


def test_determinism_seeds_and_epochs(corpus, tok, image_id):
  a = list(_pipe(corpus, tok, image_id, seed=1))
  b = list(_pipe(corpus, tok, image_id, seed=1))
  c = list(_pipe(corpus, tok, image_id, seed=2))
  assert len(a) == len(b) == 5 and all(_same(x, y) for x, y in zip(a, b))
  assert not all(_same(x, y) for x, y in zip(a, c))
  ids = _ids(_pipe(corpus, tok, image_id, seed=1, num_epochs=2))
  every = sorted(f"r{i}" for i in range(22))
  assert sorted(ids[:22]) == every and sorted(ids[22:]) == every and ids[:22] != ids[22:]
  assert _ids(_pipe(corpus, tok, image_id, shuffle=False)) == [f"r{i}" for i in range(22)]


@pytest.mark.parametrize("num_epochs", [2, None])
def test_resume_from_state(corpus, tok, image_id, num_epochs):
  pipe = _pipe(corpus, tok, image_id, num_epochs=num_epochs, batch_size=3)
  it = iter(pipe)
  for _ in range(4):
    next(it)
  state = json.loads(json.dumps(it.get_state()))  # what a checkpoint stores
  following = [next(it) for _ in range(6)]
  restored = iter(_pipe(corpus, tok, image_id, num_epochs=num_epochs, batch_size=3))
  restored.set_state(state)
  assert restored.stats() == state["counts"]
  again = [next(restored) for _ in range(6)]
  assert all(_same(x, y) for x, y in zip(following, again))
  assert restored.stats() == it.stats()


def test_orbax_checkpoint_round_trip(corpus, tok, image_id, tmp_path):
  import orbax.checkpoint as ocp

  from llavamod_jax import checkpoint

  handlers = {"data": grain.checkpoint.CheckpointHandler()}
  it = iter(_pipe(corpus, tok, image_id, num_epochs=None))
  for _ in range(3):
    next(it)
  mngr = checkpoint.manager(tmp_path / "ckpt", item_handlers=handlers)
  checkpoint.save_items(mngr, 3, {"data": grain.checkpoint.CheckpointSave(it)})
  expected = next(it)
  restored = iter(_pipe(corpus, tok, image_id, num_epochs=None))
  checkpoint.manager(tmp_path / "ckpt", item_handlers=handlers).restore(
      3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(restored)))
  assert _same(next(restored), expected)


def test_worker_processes_give_the_same_batches_and_resume(corpus, tok, image_id):
  reference = list(_pipe(corpus, tok, image_id, num_epochs=2, batch_size=3))
  it = iter(_pipe(corpus, tok, image_id, num_epochs=2, batch_size=3, worker_count=2))
  try:
    head = [next(it) for _ in range(4)]
    state = it.get_state()
    tail = list(it)
  finally:
    it.close()
  assert len(head) + len(tail) == len(reference) == 14
  assert all(_same(x, y) for x, y in zip(head + tail, reference))
  restored = iter(_pipe(corpus, tok, image_id, num_epochs=2, batch_size=3, worker_count=2))
  try:
    restored.set_state(state)
    again = list(restored)
  finally:
    restored.close()
  assert len(again) == len(tail) and all(_same(x, y) for x, y in zip(tail, again))


@pytest.mark.parametrize("shuffle", [False, True])
def test_process_shards_partition_the_data(corpus, tok, image_id, shuffle):
  # batch_size is the global batch: process k of 3 reads rows [2k, 2k+2) of every 6-record block of
  # the one global order (it used to read source[k::3] in its own shuffled order, which made the
  # batches depend on the process count; a global batch of 4 does not split over 3 processes).
  shards = [_ids(_pipe(corpus, tok, image_id, shard_index=k, shard_count=3, shuffle=shuffle,
                       batch_size=6)) for k in range(3)]
  assert [len(s) for s in shards] == [8, 8, 6]  # 3 blocks, then 4 records: rows of processes 0, 1
  assert sorted(sum(shards, [])) == sorted(f"r{i}" for i in range(22))  # union = all, disjoint
  one = _ids(_pipe(corpus, tok, image_id, shuffle=shuffle, batch_size=6))
  assert shards[1][:2] == one[2:4] and shards[2][2:4] == one[10:12]


@pytest.mark.parametrize("count", [2, 4])
def test_global_batches_do_not_depend_on_the_process_count(corpus, tok, image_id, count):
  """Stacking the processes' local batches in process order gives the one-process batch, across the
  epoch boundary (22 records) and after a resume."""
  kw = dict(num_epochs=None, batch_size=4)
  one = iter(_pipe(corpus, tok, image_id, **kw))
  local = [iter(_pipe(corpus, tok, image_id, shard_index=k, shard_count=count, **kw))
           for k in range(count)]
  for step in range(8):
    if step == 4:  # each process restores its own state, as from a checkpoint
      states = [json.loads(json.dumps(it.get_state())) for it in local]
      local = [iter(_pipe(corpus, tok, image_id, shard_index=k, shard_count=count, **kw))
               for k in range(count)]
      for it, state in zip(local, states):
        it.set_state(state)
    expected = next(one)
    parts = [next(it) for it in local]
    assert all(p["input_ids"].shape == (4 // count, 48) for p in parts)
    assert _same({k: np.concatenate([p[k] for p in parts]) for k in expected}, expected), step


def test_process_count_must_divide_the_batch(corpus, tok, image_id):
  with pytest.raises(ValueError, match=r"batch_size=4 .*config.data.batch_size.* shard_count=3"):
    _pipe(corpus, tok, image_id, shard_index=0, shard_count=3)
  with pytest.raises(ValueError, match="length_buckets"):
    _pipe(corpus, tok, image_id, shard_index=0, shard_count=2, length_buckets=[24])


def test_final_partial_batch(corpus, tok, image_id):
  it = iter(_pipe(corpus, tok, image_id, batch_size=8))
  assert len(list(it)) == 2 and it.stats()["dropped_remainder"] == 6
  batches = list(_pipe(corpus, tok, image_id, batch_size=8, drop_remainder=False))
  last = batches[-1]
  assert len(batches) == 3 and last["example_mask"].tolist() == [1] * 6 + [0] * 2
  assert last["input_ids"].shape == (8, 48) and not last["attention_mask"][6:].any()
  assert (last["labels"][6:] == IGNORE).all()


# --------------------------------------------------------------------------------------------------
# Bad input.
# --------------------------------------------------------------------------------------------------

def _bad_corpus(root):
  good = _records(root, 6)
  conv = lambda q, a: [{"from": "human", "value": q}, {"from": "gpt", "value": a}]  # noqa: E731
  (root / "img" / "corrupt.png").write_bytes(b"definitely not a png")
  valid = (root / "img" / "0.png").read_bytes()
  (root / "img" / "truncated.png").write_bytes(valid[:len(valid) // 2])
  with_image = conv("<image>\nq", "a")
  bad = [
      ("missing_image", {"id": "x1", "image": "img/nope.png", "conversations": with_image}),
      ("corrupt_image", {"id": "x2", "image": "img/corrupt.png", "conversations": with_image}),
      ("corrupt_image", {"id": "x3", "image": "img/truncated.png", "conversations": with_image}),
      ("unknown_role", {"id": "x4", "conversations": [{"from": "bot", "value": "q"}]}),
      ("no_assistant_turn", {"id": "x5", "conversations": [{"from": "human", "value": "q"}]}),
      ("empty_conversation", {"id": "x6", "conversations": []}),
      ("image_count_mismatch", {"id": "x7", "image": ["img/0.png", "img/1.png"],
                                "conversations": conv("<image>\nq", "a")}),
      ("too_many_images", {"id": "x8", "image": ["img/0.png", "img/1.png"],
                           "conversations": conv("<image><image>\nq", "a")}),
      ("wrong_kind", {"id": "x9", "question": "q", "chosen": "a", "rejected": "b"}),
      ("truncated_no_target", {"id": "x10", "conversations": conv("word " * 80, "a")}),
  ]
  records = good[:3] + [r for _, r in bad] + good[3:]
  path = write_jsonl(root / "bad.jsonl", records, extra_lines=['{"id": "x11", "conv'])
  expected = {}
  for reason, _ in bad + [("malformed_json", None)]:
    expected[reason] = expected.get(reason, 0) + 1
  return path, expected, [r["id"] for _, r in bad]


def test_bad_input_is_skipped_counted_and_logged(tmp_path, tok, image_id, caplog):
  path, expected, bad_ids = _bad_corpus(tmp_path)
  caplog.set_level(logging.WARNING, logger="llavamod_jax.data.pipeline")
  it = iter(_pipe(path, tok, image_id, batch_size=2, shuffle=False))
  batches = list(it)
  stats = it.stats()
  assert stats["skipped"] == expected
  assert stats["examples"] == 6 and len(batches) == 3
  assert stats["records"] == 6 + sum(expected.values())
  for rid in bad_ids:
    assert f"record '{rid}'" in caplog.text
  assert f"{path}:{len(bad_ids) + 7}" in caplog.text  # the malformed JSON line, by file:line
  assert "skipped(missing_image)=1" in pipeline.summary(stats)


def test_strict_mode_raises_at_the_first_bad_record(tmp_path, tok, image_id):
  path, _, _ = _bad_corpus(tmp_path)
  it = iter(_pipe(path, tok, image_id, batch_size=2, shuffle=False, strict=True))
  next(it)  # the three good records before the first bad one fill a batch
  with pytest.raises(DataError, match=rf"{path}:4: record 'x1': missing_image"):
    next(it)


def _corrupt(rng, record):
  r = json.loads(json.dumps(record))
  choice = rng.randrange(9)
  if choice == 0:
    return json.dumps(r)[:rng.randrange(1, 40)]  # a cut line
  if choice == 1:
    r["conversations"][rng.randrange(2)]["from"] = rng.choice(["bot", "", None, 3])
  elif choice == 2:
    del r["conversations"][rng.randrange(2)]
  elif choice == 3:
    r["conversations"][rng.randrange(2)]["value"] = rng.choice([None, 5, ["x"], {"a": 1}])
  elif choice == 4:
    r["image"] = rng.choice([7, [], [None], "img/missing.png", ["img/0.png", "img/1.png"]])
  elif choice == 5:
    r["conversations"][0]["value"] += "<image>"
  elif choice == 6:
    r["conversations"] = rng.choice([None, "text", {}, [1, 2]])
  elif choice == 7:
    r["conversations"].append({"from": "gpt", "value": "again"})
  else:
    r = rng.choice([[r], "record", 5, None])
  return json.dumps(r)


def test_a_pipeline_that_skips_everything_stops(corpus, tok, image_id):
  it = iter(_pipe(corpus, tok, image_id, num_epochs=None, max_length=6))  # no answer fits
  with pytest.raises(DataError, match=r"23 records in a row were skipped .*max_length=6"):
    next(it)


def test_fuzz_corrupted_records(tmp_path, tok, image_id):
  rng = random.Random(0)
  good = _records(tmp_path, 8)
  lines, intact = [], []
  for i in range(60):
    rec = good[i % 8]
    if rng.random() < 0.6:
      lines.append(_corrupt(rng, rec))
    else:
      lines.append(json.dumps(rec))
      intact.append(rec["id"])
  path = tmp_path / "fuzz.jsonl"
  path.write_text("\n".join(lines) + "\n")
  src = JsonSource(path)
  it = iter(_pipe(src, tok, image_id, batch_size=1, shuffle=False, max_length=64))
  batches = list(it)
  stats = it.stats()
  assert stats["records"] == 60 == stats["examples"] + sum(stats["skipped"].values())
  assert set(stats["skipped"]) <= set(sources.REASONS)
  assert stats["examples"] >= len(intact) and len(batches) == stats["examples"]
  kept = _ids(_pipe(src, tok, image_id, shuffle=False, max_length=64))
  assert set(intact) <= set(kept)  # every untouched record made it through
