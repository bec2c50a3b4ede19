"""Orbax checkpoint helpers: bitwise round trips, step selection, extra items, clear errors."""

import json
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import traverse_util

import tiny_hf
from llavamod_jax import checkpoint, hf, models, sharding
from llavamod_jax.models import configs

TEXT = configs.TextConfig(vocab_size=64, hidden_size=16, intermediate_size=24, num_layers=2, num_heads=2,
                          num_kv_heads=1, max_position_embeddings=64)
LLAVA = configs.LlavaConfig(
    text=TEXT, image_token_id=60,
    vision=configs.VisionConfig(hidden_size=8, intermediate_size=12, num_layers=2, num_heads=2,
                                image_size=14, patch_size=7))


def _random_params(model, seed=0):
  """Random params of the model's shapes and dtypes (much faster than running its init)."""
  rng = np.random.default_rng(seed)
  abstract = nn.unbox(models.abstract_params(model))
  return jax.tree.map(lambda s: jnp.asarray(rng.standard_normal(s.shape), s.dtype), abstract)


def _flat(tree):
  return traverse_util.flatten_dict(tree, sep="/")


def _assert_bitwise(got, want):
  got, want = _flat(got), _flat(want)
  assert got.keys() == want.keys()
  for path, w in want.items():
    g = got[path]
    assert g.dtype == w.dtype and np.array_equal(np.asarray(g), np.asarray(w)), path


@pytest.mark.parametrize("text", [
    TEXT.replace(param_dtype="bfloat16"),
    TEXT.replace(num_experts=4, num_experts_per_tok=2, moe_layers=(0,)),  # an upcycled student
], ids=["dense-bf16", "moe-f32"])
def test_restore_model_is_bitwise(tmp_path, text):
  cfg = LLAVA.replace(text=text)
  model = models.build(cfg)
  params = _random_params(model, seed=1)
  step_dir = checkpoint.save_model(tmp_path / "ckpt", model, params, step=7)
  assert step_dir.name == "7" and (step_dir / checkpoint.PARAMS).is_dir()
  assert not list((tmp_path / "ckpt").glob("*tmp*"))  # the save was finalized before returning

  restored_model, restored = checkpoint.restore_model(tmp_path / "ckpt")
  assert restored_model.cfg == cfg
  _assert_bitwise(restored, params)
  leaf = jax.tree.leaves(restored)[0]
  assert leaf.sharding.device_set == {jax.local_devices()[0]}


def test_latest_step_by_default_and_any_step_on_request(tmp_path):
  model = models.build(TEXT)
  first, second = _random_params(model, seed=0), _random_params(model, seed=1)
  checkpoint.save_model(tmp_path, model, first, step=1)
  checkpoint.save_model(tmp_path, model, second, step=5)
  _assert_bitwise(checkpoint.restore_model(tmp_path)[1], second)
  _assert_bitwise(checkpoint.restore_model(tmp_path, step=1)[1], first)
  assert checkpoint.restore_config(tmp_path, step=1) == TEXT


def test_restore_onto_a_mesh(tmp_path):
  model = models.build(TEXT)
  params = _random_params(model)
  checkpoint.save_model(tmp_path, model, params)
  mesh = jax.make_mesh((1, 1, 1, 1), ("data", "fsdp", "expert", "tensor"))
  _, restored = checkpoint.restore_model(tmp_path, mesh=mesh)
  want = sharding.param_shardings(models.abstract_params(model), mesh)
  got = jax.tree.map(lambda x: x.sharding, restored)
  assert jax.tree.structure(got) == jax.tree.structure(want)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    assert g.is_equivalent_to(w, 2)
  _assert_bitwise(restored, params)


def test_extra_items_ride_along(tmp_path):
  """How the training loop extends a step: more named items beside params and model_config."""
  model = models.build(TEXT)
  params = _random_params(model)
  with checkpoint.manager(tmp_path, item_handlers={"train_state": ocp.JsonCheckpointHandler()}) as mngr:
    checkpoint.save_items(mngr, 3, {
        checkpoint.PARAMS: ocp.args.StandardSave(params),
        checkpoint.MODEL_CONFIG: ocp.args.JsonSave(configs.to_dict(TEXT)),
        "train_state": ocp.args.JsonSave({"step": 3, "seed": 11}),
    })
    got = checkpoint.restore_items(mngr, 3, {"train_state": ocp.args.JsonRestore()})
  assert got == {"train_state": {"step": 3, "seed": 11}}
  _assert_bitwise(checkpoint.restore_model(tmp_path)[1], params)


def test_errors_name_the_directory(tmp_path):
  model = models.build(TEXT)
  params = _random_params(model)
  with pytest.raises(FileNotFoundError, match="nowhere: checkpoint directory does not exist"):
    checkpoint.restore_model(tmp_path / "nowhere")
  (tmp_path / "empty").mkdir()
  with pytest.raises(FileNotFoundError, match=r"empty: no checkpoint steps"):
    checkpoint.restore_model(tmp_path / "empty")

  ckpt = tmp_path / "ckpt"
  checkpoint.save_model(ckpt, model, params, step=2)
  with pytest.raises(FileExistsError, match=r"ckpt: step 2 already exists"):
    checkpoint.save_model(ckpt, model, params, step=2)
  with pytest.raises(FileNotFoundError, match=r"no checkpoint at step 4 \(steps: \[2\]\)"):
    checkpoint.restore_model(ckpt, step=4)
  with checkpoint.manager(ckpt) as mngr:
    with pytest.raises(FileNotFoundError, match=r"ckpt/2: checkpoint has no item\(s\) \['opt_state'\]"):
      checkpoint.restore_items(mngr, 2, {"opt_state": ocp.args.StandardRestore()})
  with pytest.raises(ValueError, match="step_prefix"):
    checkpoint.manager(ckpt, step_prefix="step")
  shutil.rmtree(ckpt / "2" / checkpoint.PARAMS)
  with pytest.raises(FileNotFoundError, match=r"ckpt/2: checkpoint has no 'params' item"):
    checkpoint.restore_model(ckpt)


def test_params_that_do_not_fit_the_stored_config_are_rejected(tmp_path):
  bigger = models.build(TEXT.replace(intermediate_size=32))
  with checkpoint.manager(tmp_path) as mngr:
    checkpoint.save_items(mngr, 0, {
        checkpoint.PARAMS: ocp.args.StandardSave(_random_params(bigger)),
        checkpoint.MODEL_CONFIG: ocp.args.JsonSave(configs.to_dict(TEXT)),
    })
  with pytest.raises(ValueError, match=r"gate_proj/kernel: shape \(16, 32\), model expects \(16, 24\)"):
    checkpoint.restore_model(tmp_path)


def test_save_rejects_params_of_another_model(tmp_path):
  other = _random_params(models.build(TEXT.replace(num_layers=3)))
  with pytest.raises(ValueError, match=r"unexpected parameter: layers_2/"):
    checkpoint.save_model(tmp_path / "ckpt", models.build(TEXT), other)
  assert not (tmp_path / "ckpt").exists()


def test_an_interrupted_save_is_not_a_step(tmp_path):
  model = models.build(TEXT)
  params = _random_params(model)
  checkpoint.save_model(tmp_path, model, params, step=1)
  (tmp_path / "2.orbax-checkpoint-tmp-1234" / checkpoint.PARAMS).mkdir(parents=True)  # a crash mid-save
  _assert_bitwise(checkpoint.restore_model(tmp_path)[1], params)


def test_text_only_qwen2_hf_round_trip(tmp_path, torch):
  import transformers

  ref = tiny_hf.causal_lm("qwen2", seed=4)
  model, params = hf.load(tiny_hf.save(ref, tmp_path / "hf"))
  checkpoint.save_model(tmp_path / "ckpt", model, params)
  restored_model, restored = checkpoint.restore_model(tmp_path / "ckpt")
  assert isinstance(restored_model, models.DecoderLM) and restored_model.cfg == model.cfg
  _assert_bitwise(restored, params)

  hf.save(restored_model, restored, tmp_path / "out")
  back = transformers.Qwen2ForCausalLM.from_pretrained(tmp_path / "out").eval()
  ids = np.random.default_rng(0).integers(0, tiny_hf.VOCAB, (2, 12))
  assert tiny_hf.rel_err(tiny_hf.torch_logits(back, ids), tiny_hf.torch_logits(ref, ids)) <= 1e-5
  ours = restored_model.apply({"params": restored}, jnp.asarray(ids)).logits
  assert tiny_hf.rel_err(ours, tiny_hf.torch_logits(ref, ids)) < 1e-4
  assert json.loads((tmp_path / "out" / "config.json").read_text())["model_type"] == "qwen2"
