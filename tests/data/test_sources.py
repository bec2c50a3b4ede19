"""Sources: LLaVA JSON / JSONL, preference formats, image roots, bad records, weighted mixtures."""

import json
import os

import numpy as np
import pytest
from jsonl_files import write_jsonl

from llavamod_jax.data import sources
from llavamod_jax.data.sources import Bad, DataError, JsonSource, Mixture, Record


def _conv(i, image="img/a.png", question="<image>\nWhat is it?", answer="A circle."):
  r = {"id": f"r{i}", "conversations": [{"from": "human", "value": question},
                                         {"from": "gpt", "value": answer}]}
  if image is not None:
    r["image"] = image
  return r


def test_jsonl_and_json_list_give_the_same_records(tmp_path):
  recs = [_conv(0), _conv(1, image=None, question="Hi?"),
          _conv(2, image=["/abs/x.png"], question="<image> x")]
  jl = JsonSource(write_jsonl(tmp_path / "a.jsonl", recs))
  (tmp_path / "b.json").write_text(json.dumps(recs, indent=2))
  js = JsonSource(tmp_path / "b.json")
  assert len(jl) == len(js) == 3
  for i in range(3):
    a, b = jl[i], js[i]
    assert isinstance(a, Record) and (a.id, a.messages, a.images) == (b.id, b.messages, b.images)
  assert jl[0].images == (os.path.join(str(tmp_path), "img/a.png"),)  # default root: the file's dir
  assert jl[1].images == () and jl[2].images == ("/abs/x.png",)
  assert jl[0].messages == (("user", "<image>\nWhat is it?"), ("assistant", "A circle."))
  assert jl[0].origin.endswith("a.jsonl:1") and js[2].origin.endswith("b.json[2]")


def test_image_root_blank_lines_and_roles(tmp_path):
  rec = {"id": 7, "image": ["p/1.png", "p/2.png"],
         "conversations": [{"role": "system", "content": "Be brief."},
                           {"role": "user", "content": "<image> and <image>: same?"},
                           {"role": "assistant", "content": "No."}]}
  path = tmp_path / "c.jsonl"
  path.write_text("\n\n" + json.dumps(rec) + "\n   \n")
  src = JsonSource(path, image_root="/data/imgs")
  assert len(src) == 1
  r = src[0]
  assert r.id == "7" and r.images == ("/data/imgs/p/1.png", "/data/imgs/p/2.png")
  assert r.messages[0] == ("system", "Be brief.") and r.origin.endswith("c.jsonl:3")


def test_preference_formats(tmp_path):
  rlaif = {"id": "p0", "image": "a.png", "question": "What is shown?", "chosen": "A cat.",
           "rejected": "A dog and a bird."}
  conv = [{"from": "human", "value": "<image>\nDescribe."}]
  mod = {"id": "p1", "image": "b.png",
         "chosen": conv + [{"from": "gpt", "value": "A red star."}],
         "rejected": conv + [{"from": "gpt", "value": "A blue star."}]}
  src = JsonSource(write_jsonl(tmp_path / "p.jsonl", [rlaif, mod]), image_root="/r")
  a, b = src[0], src[1]
  assert a.kind == b.kind == "preference"
  assert a.messages == (("user", "<image>\nWhat is shown?"),)  # placeholder added for RLAIF-V
  assert (a.chosen, a.rejected, a.images) == ("A cat.", "A dog and a bird.", ("/r/a.png",))
  assert b.messages == (("user", "<image>\nDescribe."),) and (b.chosen, b.rejected) == ("A red star.",
                                                                                         "A blue star.")
  only_conv = JsonSource(tmp_path / "p.jsonl", kind="conversation")
  assert isinstance(only_conv[0], Bad) and only_conv[0].reason == "wrong_kind"


BAD_RECORDS = [
    ("unknown_role", {"id": "b1", "conversations": [{"from": "robot", "value": "hi"},
                                                    {"from": "gpt", "value": "x"}]}),
    ("no_assistant_turn", {"id": "b2", "conversations": [{"from": "human", "value": "hi"}]}),
    ("empty_conversation", {"id": "b3", "conversations": []}),
    ("image_count_mismatch", {"id": "b4", "image": ["a.png", "b.png"], "conversations": [
        {"from": "human", "value": "<image>\ncompare"}, {"from": "gpt", "value": "same"}]}),
    ("image_count_mismatch", {"id": "b5", "image": "a.png", "conversations": [
        {"from": "human", "value": "no placeholder"}, {"from": "gpt", "value": "ok"}]}),
    ("image_in_response", {"id": "b6", "conversations": [
        {"from": "human", "value": "hi"}, {"from": "gpt", "value": "<image>"}]}),
    ("bad_turn_order", {"id": "b7", "conversations": [
        {"from": "gpt", "value": "hello"}, {"from": "human", "value": "hi"},
        {"from": "gpt", "value": "x"}]}),
    ("bad_turn_order", {"id": "b8", "conversations": [
        {"from": "human", "value": "q"}, {"from": "gpt", "value": "a"},
        {"from": "human", "value": "q2"}]}),
    ("malformed_record", {"id": "b9", "conversations": [{"from": "human", "value": 3},
                                                        {"from": "gpt", "value": "x"}]}),
    ("malformed_record", {"id": "b10", "image": 5, "conversations": [
        {"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}),
    ("malformed_record", {"id": "b11", "text": "no conversation"}),
    ("empty_response", {"id": "b12", "question": "q", "chosen": " ", "rejected": "r"}),
    ("preference_prompt_mismatch", {
        "id": "b13", "chosen": [{"from": "human", "value": "q1"}, {"from": "gpt", "value": "a"}],
        "rejected": [{"from": "human", "value": "q2"}, {"from": "gpt", "value": "b"}]}),
]


def test_bad_records_are_returned_not_raised(tmp_path):
  path = write_jsonl(tmp_path / "bad.jsonl", [r for _, r in BAD_RECORDS],
                      extra_lines=['{"id": "b14", "conversations": [', "[1, 2]"])
  src = JsonSource(path)
  got = [src[i] for i in range(len(src))]
  assert all(isinstance(b, Bad) for b in got)
  assert [b.reason for b in got] == [r for r, _ in BAD_RECORDS] + ["malformed_json"] * 2
  assert [b.id for b in got[:len(BAD_RECORDS)]] == [r["id"] for _, r in BAD_RECORDS]
  assert got[len(BAD_RECORDS)].origin == f"{path}:{len(BAD_RECORDS) + 1}"  # file:line for bad JSON
  assert "robot" in got[0].detail and "b1" in got[0].message() and path in got[0].message()
  assert sources.summarize(got)["malformed_json"] == 2


def test_file_level_errors_raise(tmp_path):
  with pytest.raises(DataError, match="does not exist"):
    JsonSource(tmp_path / "nope.json")
  (tmp_path / "broken.json").write_text('[{"id": 1}, ')
  with pytest.raises(DataError, match="broken.json"):
    JsonSource(tmp_path / "broken.json")
  with pytest.raises(IndexError):
    JsonSource(write_jsonl(tmp_path / "one.jsonl", [_conv(0)]))[1]


def test_mixture_weights_are_per_record_rates(tmp_path):
  a = JsonSource(write_jsonl(tmp_path / "a.jsonl",
                              [_conv(i, image=None, question="q") for i in range(10)]))
  b = JsonSource(write_jsonl(tmp_path / "b.jsonl", [_conv(100 + i, image=None, question="q")
                                                      for i in range(6)]))
  mix = Mixture([a, b], weights=[0.5, 2.0], seed=3)
  assert len(mix) == 5 + 12 and mix.counts() == [5, 12]
  ids = [mix[i].id for i in range(len(mix))]
  assert len(set(ids[:5])) == 5 and set(ids[:5]) <= {f"r{i}" for i in range(10)}
  assert sorted(ids[5:]) == sorted([f"r{100 + i}" for i in range(6)] * 2)
  again = Mixture([a, b], weights=[0.5, 2.0], seed=3)
  assert [again[i].id for i in range(len(again))] == ids  # deterministic
  other = [Mixture([a, b], weights=[0.5, 2.0], seed=s)[i].id for s in range(4, 8) for i in range(5)]
  assert len(set(other)) > 5  # the fractional subset depends on the seed
  concat = sources.from_files([tmp_path / "a.jsonl", tmp_path / "b.jsonl"])
  assert [concat[i].id for i in range(len(concat))] == [f"r{i}" for i in range(10)] + [
      f"r{100 + i}" for i in range(6)]
  with pytest.raises(ValueError, match="weights"):
    Mixture([a, b], weights=[1.0])
  assert isinstance(sources.from_files(tmp_path / "a.jsonl"), JsonSource)
  np.testing.assert_array_equal(Mixture([a], [0.0]).counts(), [0])


def test_record_json_round_trip():
  r = Record("x", "preference", (("user", "<image>\nq"),), (b"\x89PNG",), "c", "r", "f.jsonl:3")
  assert Record.from_json(r.to_json(), r.images) == r
