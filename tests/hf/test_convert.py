"""hf.load / hf.save: every family and key spelling, sharding, dtypes on disk, and bad input."""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import tiny_hf
from llavamod_jax import hf

MODELS = {
    "llava-clip-qwen2": lambda: tiny_hf.llava("clip", "qwen2", seed=7),
    "llava-siglip-qwen2": lambda: tiny_hf.llava("siglip", "qwen2", seed=8),
    "llava-clip-llama-tied": lambda: tiny_hf.llava("clip", "llama", seed=9),
    "qwen2": lambda: tiny_hf.causal_lm("qwen2", seed=10),
    "llama-tied": lambda: tiny_hf.causal_lm("llama", seed=11),
}


def _inputs(model, rng, pad: bool):
  cfg = model.cfg
  if hasattr(cfg, "num_image_tokens"):
    n = cfg.num_image_tokens
    ids = rng.integers(0, 100, (2, n + 8))
    ids[:, 3:3 + n] = tiny_hf.IMAGE_TOKEN
    pix = rng.standard_normal((2, 28, 28, 3)).astype(np.float32)
  else:
    ids, pix = rng.integers(0, tiny_hf.VOCAB, (2, 10)), None
  mask = np.ones_like(ids)
  if pad:
    mask[1, -3:] = 0
  return ids, mask, pix


def _reload_logits(path, ids, mask, pix):
  import transformers
  cfg = json.loads((path / "config.json").read_text())
  cls = {"llava": transformers.LlavaForConditionalGeneration, "qwen2": transformers.Qwen2ForCausalLM,
         "llama": transformers.LlamaForCausalLM}[cfg["model_type"]]
  return tiny_hf.torch_logits(cls.from_pretrained(path).eval(), ids, mask, pixel_values=pix)


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("pad", [False, True], ids=["nopad", "pad"])
def test_import_and_export_parity(name, pad, tmp_path, torch):
  ref = MODELS[name]()
  model, params = hf.load(tiny_hf.save(ref, tmp_path / "src"))
  ids, mask, pix = _inputs(model, np.random.default_rng(0), pad)
  want = tiny_hf.torch_logits(ref, ids, mask, pixel_values=pix)
  got = np.asarray(model.apply({"params": params}, jnp.asarray(ids),
                               pixel_values=None if pix is None else jnp.asarray(pix),
                               attention_mask=jnp.asarray(mask)).logits)
  valid = mask.astype(bool)
  assert tiny_hf.rel_err(got[valid], want[valid]) < 1e-4
  out = hf.save(model, params, tmp_path / "export")
  again = _reload_logits(out, ids, mask, pix)
  assert tiny_hf.rel_err(again[valid], want[valid]) < 1e-5
  # Our own reload of the export is bitwise the same parameters.
  _, params2 = hf.load(out)
  assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), params, params2))


def _rewrite_keys(src, dst, rename):
  shutil.copytree(src, dst)
  tensors = load_file(src / "model.safetensors")
  (dst / "model.safetensors").unlink()
  save_file({rename(k): v for k, v in tensors.items()}, dst / "model.safetensors",
            metadata={"format": "pt"})
  return dst


def _in_memory_spelling(k):
  for old, new in [("language_model.model.", "model.language_model."),
                   ("language_model.lm_head.", "lm_head."), ("vision_tower.", "model.vision_tower."),
                   ("multi_modal_projector.", "model.multi_modal_projector.")]:
    if k.startswith(old):
      return new + k[len(old):]
  return k


def _hub_spelling(k):
  return "vision_tower.vision_model." + k[len("vision_tower."):] if k.startswith("vision_tower.") else k


@pytest.mark.parametrize("rename", [_in_memory_spelling, _hub_spelling], ids=["in_memory", "hub"])
def test_all_llava_key_spellings_load(rename, tmp_path, torch):
  ref = tiny_hf.llava("clip", "qwen2", seed=12)
  src = tiny_hf.save(ref, tmp_path / "default")
  _, want = hf.load(src)
  other = _rewrite_keys(src, tmp_path / "other", rename)
  assert any(k.startswith(("model.", "vision_tower.vision_model.")) for k in load_file(
      other / "model.safetensors"))
  _, got = hf.load(other)
  assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), want, got))


def test_in_memory_state_dict_spelling_matches_transformers_names(tmp_path, torch):
  """The in-memory spelling is exactly transformers' own state_dict names."""
  ref = tiny_hf.llava("siglip", "llama", seed=13)
  state = {k: v.numpy() for k, v in ref.state_dict().items()}
  d = tmp_path / "sd"
  d.mkdir()
  ref.config.save_pretrained(d)
  save_file(state, d / "model.safetensors", metadata={"format": "pt"})
  model, params = hf.load(d)
  ids, mask, pix = _inputs(model, np.random.default_rng(1), False)
  got = model.apply({"params": params}, jnp.asarray(ids), jnp.asarray(pix)).logits
  assert tiny_hf.rel_err(got, tiny_hf.torch_logits(ref, ids, pixel_values=pix)) < 1e-4


def test_sharded_checkpoints_both_ways(tmp_path, torch):
  import transformers
  ref = tiny_hf.llava("clip", "qwen2", seed=14)
  src = tiny_hf.save(ref, tmp_path / "src", max_shard_size="20KB")
  assert (src / "model.safetensors.index.json").exists()
  model, params = hf.load(src)
  out = hf.save(model, params, tmp_path / "out", max_shard_size=20_000)
  index = json.loads((out / "model.safetensors.index.json").read_text())
  assert len(set(index["weight_map"].values())) > 1
  assert not (out / "model.safetensors").exists()
  ids, mask, pix = _inputs(model, np.random.default_rng(2), False)
  back = transformers.LlavaForConditionalGeneration.from_pretrained(out).eval()
  assert tiny_hf.rel_err(tiny_hf.torch_logits(back, ids, pixel_values=pix),
                         tiny_hf.torch_logits(ref, ids, pixel_values=pix)) < 1e-6


@pytest.mark.parametrize("shards", [1, 3])
def test_pytorch_bin_checkpoints_load_without_torch(shards, tmp_path, torch):
  """`pytorch_model.bin`, or shards with `pytorch_model.bin.index.json`, written by `torch.save` of
  the model's state dict (as older transformers and the original LLaVA code save), load to the
  parameters of the same model's safetensors."""
  ref = tiny_hf.llava("clip", "qwen2", seed=21)
  _, want = hf.load(tiny_hf.save(ref, tmp_path / "st"))
  bins = tmp_path / "bin"
  ref.config.save_pretrained(bins)
  state = ref.state_dict()
  if shards == 1:
    torch.save(state, bins / "pytorch_model.bin")
  else:
    keys, weight_map = list(state), {}
    for i in range(shards):
      name = f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin"
      part = keys[i::shards]
      torch.save({k: state[k] for k in part}, bins / name)
      weight_map.update({k: name for k in part})
    (bins / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
  _, got = hf.load(bins)
  assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), got, want))


@pytest.mark.parametrize("disk_dtype", ["bfloat16", "float16"])
def test_half_precision_checkpoints(disk_dtype, tmp_path, torch):
  import transformers
  ref = tiny_hf.causal_lm("qwen2", seed=15).to(getattr(torch, disk_dtype))
  src = tiny_hf.save(ref, tmp_path / "src")
  _, params = hf.load(src)  # upcast to fp32 params
  want = ref.model.layers[0].mlp.up_proj.weight.detach().float().numpy().T
  np.testing.assert_array_equal(params["layers_0"]["mlp"]["up_proj"]["kernel"], want)
  model, params16 = hf.load(src, param_dtype=disk_dtype, dtype=disk_dtype)
  out = hf.save(model, params16, tmp_path / "out")
  assert json.loads((out / "config.json").read_text())["dtype"] == disk_dtype
  back = transformers.Qwen2ForCausalLM.from_pretrained(out, dtype=getattr(torch, disk_dtype))
  for (k, a), (_, b) in zip(sorted(ref.state_dict().items()), sorted(back.state_dict().items())):
    assert torch.equal(a, b), k


def test_save_to_bf16_from_fp32(tmp_path, torch):
  import transformers
  ref = tiny_hf.causal_lm("llama", seed=16)
  model, params = hf.load(tiny_hf.save(ref, tmp_path / "src"))
  out = hf.save(model, params, tmp_path / "out", dtype="bfloat16")
  back = transformers.LlamaForCausalLM.from_pretrained(out, dtype=torch.bfloat16)
  w = back.model.layers[1].self_attn.q_proj.weight
  assert w.dtype == torch.bfloat16
  assert torch.equal(w, ref.model.layers[1].self_attn.q_proj.weight.to(torch.bfloat16))


def test_tokenizer_and_processor_files_are_carried(tmp_path, torch):
  ref = tiny_hf.llava("clip", "qwen2", seed=17)
  src = tiny_hf.save(ref, tmp_path / "src")
  (src / "tokenizer_config.json").write_text('{"model_max_length": 64}')
  (src / "preprocessor_config.json").write_text('{"crop_size": 28}')
  (src / "notes.txt").write_text("not carried")
  model, params = hf.load(src)
  out = hf.save(model, params, tmp_path / "out")
  assert (out / "tokenizer_config.json").read_text() == '{"model_max_length": 64}'
  assert (out / "preprocessor_config.json").exists() and not (out / "notes.txt").exists()


def test_load_onto_shardings(tmp_path, torch):
  from jax.sharding import Mesh
  ref = tiny_hf.causal_lm("qwen2", seed=18)
  mesh = Mesh(np.array(jax.devices()[:1]).reshape(1, 1, 1, 1), ("data", "fsdp", "expert", "tensor"))
  _, params = hf.load(tiny_hf.save(ref, tmp_path / "src"), mesh=mesh)
  leaf = params["layers_0"]["mlp"]["gate_proj"]["kernel"]
  assert leaf.sharding.mesh.axis_names == ("data", "fsdp", "expert", "tensor")
  assert leaf.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")


# ------------------------------------------------------------------------------------------------
# Bad input.
# ------------------------------------------------------------------------------------------------


@pytest.fixture
def good(tmp_path, torch):
  return tiny_hf.save(tiny_hf.causal_lm("qwen2", seed=19), tmp_path / "good")


def test_unknown_model_type(good):
  cfg = json.loads((good / "config.json").read_text())
  cfg["model_type"] = "gpt_neox"
  (good / "config.json").write_text(json.dumps(cfg))
  with pytest.raises(ValueError, match=r"config.json: model_type 'gpt_neox'.*not supported"):
    hf.load(good)


def test_missing_tensor(good, tmp_path):
  bad = _rewrite_keys(good, tmp_path / "bad", lambda k: k)
  t = load_file(bad / "model.safetensors")
  del t["model.layers.1.mlp.up_proj.weight"]
  save_file(t, bad / "model.safetensors", metadata={"format": "pt"})
  with pytest.raises(ValueError, match="missing tensor for parameter: layers_1/mlp/up_proj/kernel"):
    hf.load(bad)


def test_unexpected_tensor(good, tmp_path):
  bad = _rewrite_keys(good, tmp_path / "bad", lambda k: k)
  t = load_file(bad / "model.safetensors")
  t["model.layers.7.mlp.up_proj.weight"] = t["model.layers.1.mlp.up_proj.weight"]
  t["model.extra_thing"] = np.zeros(3, np.float32)
  save_file(t, bad / "model.safetensors", metadata={"format": "pt"})
  with pytest.raises(ValueError) as e:
    hf.load(bad)
  assert "unexpected tensor: model.layers.7.mlp.up_proj.weight" in str(e.value)
  assert "unexpected tensor: model.extra_thing" in str(e.value)


def test_wrong_shape_names_tensor_and_both_shapes(good):
  cfg = json.loads((good / "config.json").read_text())
  cfg["intermediate_size"] = 50
  (good / "config.json").write_text(json.dumps(cfg))
  with pytest.raises(ValueError, match=r"tensor 'model.layers.0.mlp.gate_proj.weight' has shape "
                                       r"\(48, 32\).*expected \(32, 50\)"):
    hf.load(good)


def test_no_config_or_no_weights(good, tmp_path):
  with pytest.raises(FileNotFoundError, match="no config.json"):
    hf.load(tmp_path)
  (good / "model.safetensors").unlink()
  with pytest.raises(FileNotFoundError, match="no model.safetensors, .*pytorch_model.bin"):
    hf.load(good)


def test_save_fails_cleanly(good, tmp_path):
  model, params = hf.load(good)
  target = tmp_path / "out"
  broken = jax.tree.map(lambda x: x, params)
  del broken["layers_1"]["mlp"]
  with pytest.raises(ValueError, match="missing"):
    hf.save(model, broken, target)
  assert not target.exists()
  assert not [p for p in tmp_path.iterdir() if "partial" in p.name]
  hf.save(model, params, target)
  with pytest.raises(FileExistsError, match="not empty"):
    hf.save(model, params, target)
  hf.save(model, params, target, overwrite=True)
