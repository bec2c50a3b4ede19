"""workdir: run.json round trips and errors; load_model from a workdir and from HF directories."""

import json
import shutil

import jax
import numpy as np
import pytest
import transformers

import tiny_run
from llavamod_jax import checkpoint, hf, models, workdir


def _info(**kw):
  base = dict(template="qwen", image=workdir.ImageSettings("clip", 28, "pad"), image_token_id=3,
              num_image_tokens=16, eos_token_id=0, pad_token_id=0, stage="mimic",
              teacher="/models/teacher", data=workdir.DataSettings(("/d/eval.jsonl",), "/d"))
  return workdir.RunInfo(**{**base, **kw})


def _assert_same_params(got, want):
  for (path, g), w in zip(jax.tree_util.tree_flatten_with_path(got)[0], jax.tree.leaves(want)):
    np.testing.assert_array_equal(np.asarray(g), np.asarray(w), err_msg=jax.tree_util.keystr(path))


# --- RunInfo -----------------------------------------------------------------------------------------

def test_run_json_round_trip_keeps_unknown_keys(tmp_path):
  info = _info(extra={"config": {"lr": 1e-4}})
  info.write(tmp_path)
  d = json.loads((tmp_path / "run.json").read_text())
  assert d["image"] == {"kind": "clip", "size": 28, "aspect": "pad"}
  assert d["data"] == {"eval_files": ["/d/eval.jsonl"], "image_root": "/d"}
  assert d["config"] == {"lr": 1e-4}
  assert workdir.read(tmp_path) == info
  assert workdir.RunInfo.from_json(info.to_json()) == info


def test_run_json_optional_keys_default():
  info = workdir.RunInfo.from_json(json.dumps({
      "template": "chatml", "image": {"kind": "siglip", "size": 32, "aspect": "square"},
      "image_token_id": 5, "num_image_tokens": 16, "eos_token_id": 2, "pad_token_id": 2}))
  assert (info.stage, info.teacher, info.data) == ("", None, workdir.DataSettings())


def test_missing_run_json_names_the_file(tmp_path):
  with pytest.raises(FileNotFoundError, match=str(tmp_path / "run.json")):
    workdir.read(tmp_path)


@pytest.mark.parametrize("text, message", [
    ("{not json", "invalid JSON"),
    ("[1, 2]", "expected a JSON object"),
    ('{"template": "qwen"}', r"missing key\(s\) \['image', 'image_token_id'"),
])
def test_invalid_run_json_names_the_file(tmp_path, text, message):
  (tmp_path / "run.json").write_text(text)
  with pytest.raises(ValueError, match=f"{tmp_path / 'run.json'}.*{message}"):
    workdir.read(tmp_path)


@pytest.mark.parametrize("change, message", [
    ({"image_token_id": "3"}, "'image_token_id' must be an integer"),
    ({"image": {"kind": "clip", "size": 28, "aspect": "pad", "mean": 1}}, "unknown field"),
    ({"image": {"kind": "vit", "size": 28, "aspect": "pad"}}, "kind must be clip|siglip"),
])
def test_bad_fields_are_named(change, message):
  d = {**json.loads(_info().to_json()), **change}
  with pytest.raises(ValueError, match=message):
    workdir.RunInfo.from_json(json.dumps(d), "x/run.json")


# --- load_model ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def dense():
  model = models.build(tiny_run.llava_config())
  return model, tiny_run.random_params(model)


def test_load_model_from_a_workdir(tmp_path, dense):
  model, params = dense
  info = tiny_run.make_workdir(tmp_path, model, params, step=3)
  other = jax.tree.map(lambda x: x + 1, params)
  checkpoint.save_model(tmp_path / "checkpoints", model, other, step=5)

  got_model, got_params, tok, got_info = workdir.load_model(tmp_path)
  assert got_model.cfg == model.cfg and got_info == info
  assert tok.get_vocab() == tiny_run.tokenizer().get_vocab()
  _assert_same_params(got_params, other)  # latest step
  _assert_same_params(workdir.load_model(tmp_path, step=3)[1], params)
  with pytest.raises(FileNotFoundError, match="no checkpoint at step 4"):
    workdir.load_model(tmp_path, step=4)


def test_run_json_that_contradicts_the_model_is_an_error(tmp_path, dense):
  model, params = dense
  tiny_run.make_workdir(tmp_path, model, params)
  info = workdir.read(tmp_path)
  workdir.RunInfo(**{**info.__dict__, "num_image_tokens": 9}).write(tmp_path)
  with pytest.raises(ValueError, match=r"run.json: .*\(3, 9, 28\), but the model has \(3, 16, 28\)"):
    workdir.load_model(tmp_path)


def test_workdir_without_tokenizer(tmp_path, dense):
  tiny_run.make_workdir(tmp_path, *dense)
  shutil.rmtree(tmp_path / "tokenizer")
  with pytest.raises(FileNotFoundError, match="no tokenizer directory"):
    workdir.load_model(tmp_path)


def test_neither_workdir_nor_hf_dir(tmp_path):
  with pytest.raises(FileNotFoundError, match="neither a training workdir"):
    workdir.load_model(tmp_path)


def _hf_dir(path, model, params, processor=None, sidecar=None):
  hf.save(model, params, path)
  tiny_run.tokenizer().save_pretrained(path)
  if processor is not None:
    processor.save_pretrained(path)
  if sidecar is not None:
    (path / workdir.SIDECAR).write_text(json.dumps(sidecar))
  return path


def test_hf_dir_info_is_inferred(tmp_path, dense):
  model, params = dense
  tok = tiny_run.tokenizer()
  proc = transformers.CLIPImageProcessorPil(size={"shortest_edge": 28},
                                            crop_size={"height": 28, "width": 28})
  path = _hf_dir(tmp_path / "hf", model, params, proc)
  got_model, got_params, got_tok, info = workdir.load_model(path)
  _assert_same_params(got_params, params)
  assert got_tok.get_vocab() == tok.get_vocab()
  assert info == workdir.RunInfo(
      template="qwen", image=workdir.ImageSettings("clip", 28, "pad"),
      image_token_id=tok.convert_tokens_to_ids("<image>"), num_image_tokens=16,
      eos_token_id=tok.convert_tokens_to_ids("<|endoftext|>"), pad_token_id=tok.pad_token_id)
  with pytest.raises(ValueError, match="has no steps"):
    workdir.load_model(path, step=1)

  # The image size is the processor's: one that does not fit the tower is an error.
  bad = transformers.CLIPImageProcessorPil(size={"shortest_edge": 14},
                                           crop_size={"height": 14, "width": 14})
  bad.save_pretrained(path)
  with pytest.raises(ValueError, match=r"but the model has \(3, 16, 28\)"):
    workdir.load_model(path)


def test_hf_dir_sidecar_and_siglip(tmp_path):
  model = models.build(tiny_run.llava_config("siglip"))
  params = tiny_run.random_params(model)
  tok = tiny_run.tokenizer()
  path = _hf_dir(tmp_path / "hf", model, params,
                 sidecar={"template": "chatml", "image": {"aspect": "square"}, "stage": "preference"})
  info = workdir.load_model(path)[3]
  assert info.template == "chatml" and info.stage == "preference"
  assert info.image == workdir.ImageSettings("siglip", 28, "square")  # size from the tower
  assert info.num_image_tokens == 16  # SigLIP "full": every patch
  assert info.eos_token_id == tok.convert_tokens_to_ids("<|im_end|>")  # chatml's end of answer
