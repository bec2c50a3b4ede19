"""Checkpoints of the original code (LLaVA-MoD / MoE-LLaVA, LLaVA-1.5), written here from tiny
transformers models with their tensors renamed as the original modules name them: `hf.load` gives the
transformers model's logits."""

import json
import re

import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import tiny_hf
from llavamod_jax import hf


def _moe_llava(seed):
  import transformers

  tc = transformers.Qwen2MoeConfig(
      vocab_size=tiny_hf.VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6,
      rope_theta=10000.0, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=48,
      shared_expert_intermediate_size=0, norm_topk_prob=True, mlp_only_layers=[1],
      decoder_sparse_step=1, qkv_bias=True, tie_word_embeddings=False)
  cfg = transformers.LlavaConfig(vision_config=tiny_hf.vision_config("clip"), text_config=tc,
                                 image_token_index=tiny_hf.IMAGE_TOKEN,
                                 vision_feature_select_strategy="default")
  return tiny_hf.randomize(transformers.LlavaForConditionalGeneration(cfg), seed)


def _original_key(k, style):
  """transformers' saved LLaVA key -> the original code's ('mod': LLaVA-MoD, '1.5': LLaVA-1.5);
  None for tensors the original does not have."""
  if k.startswith("language_model.lm_head."):
    return "lm_head." + k[len("language_model.lm_head."):]
  if k.startswith("language_model.model."):
    k = "model." + k[len("language_model.model."):]
    if ".shared_expert" in k:
      return None
    k = re.sub(r"\.mlp\.gate\.weight$", ".mlp.deepspeed_moe.gate.wg.weight", k)
    return re.sub(r"\.mlp\.experts\.(\d+)\.", r".mlp.deepspeed_moe.experts.deepspeed_experts.\1.", k)
  if k.startswith("vision_tower."):  # LLaVA-1.5 saves no tower: it is read from the CLIP directory
    return None if style == "1.5" else "model.image_tower.image_tower.vision_model." + k[13:]
  m = re.match(r"multi_modal_projector\.linear_([12])\.(.*)", k)
  proj = "model.mm_projector.image_spatial_proj." if style == "mod" else "model.mm_projector."
  return f"{proj}{2 * int(m.group(1)) - 2}.{m.group(2)}"


def _write_original(ref, out, model_type, style, tower, moe=None, fmt="safetensors"):
  """`ref` (a transformers LLaVA) saved as the original code saves it, at `out` (`fmt` "bin":
  `torch.save` of the state dict, as pytorch_model.bin)."""
  import torch

  ref.save_pretrained(out / "_hf")
  tensors = load_file(out / "_hf" / "model.safetensors")
  renamed = {_original_key(k, style): v for k, v in tensors.items()}
  renamed.pop(None, None)
  if fmt == "bin":
    torch.save({k: torch.from_numpy(v.copy()) for k, v in renamed.items()},
               out / "pytorch_model.bin")
  else:
    save_file(renamed, out / "model.safetensors", metadata={"format": "pt"})
  text = ref.config.text_config.to_dict()
  for key in ("num_experts", "num_experts_per_tok", "moe_intermediate_size", "mlp_only_layers",
              "shared_expert_intermediate_size", "decoder_sparse_step", "norm_topk_prob",
              "output_router_logits", "router_aux_loss_coef"):
    text.pop(key, None)
  cfg = {**text, "model_type": model_type, "architectures": ["LlavaQwen2ForCausalLM"],
         "mm_vision_select_layer": ref.config.vision_feature_layer,
         "mm_vision_select_feature": "patch", "mm_hidden_size": 24,
         ("image_projector_type" if style == "mod" else "mm_projector_type"): "mlp2x_gelu",
         ("mm_image_tower" if style == "mod" else "mm_vision_tower"): tower,
         "image_aspect_ratio": "pad", "tokenizer_padding_side": "right"}
  if moe:
    cfg["moe"] = moe
  (out / "config.json").write_text(json.dumps(cfg))
  return out


def _parity(model, params, ref, seed):
  rng = np.random.default_rng(seed)
  n = model.cfg.num_image_tokens
  ids = rng.integers(0, 100, (2, n + 8))
  ids[:, 3:3 + n] = tiny_hf.IMAGE_TOKEN
  pix = rng.standard_normal((2, 28, 28, 3)).astype(np.float32)
  want = tiny_hf.torch_logits(ref, ids, pixel_values=pix)
  ours = np.where(ids == tiny_hf.IMAGE_TOKEN, model.cfg.image_token_id, ids)
  got = np.asarray(model.apply({"params": params}, jnp.asarray(ours), pixel_values=jnp.asarray(pix))
                   .logits)
  assert tiny_hf.rel_err(got, want) < 1e-4


def _clip_dir(ref, path):
  ref.model.vision_tower.save_pretrained(path)
  return path


@pytest.mark.parametrize("model_type, family, fmt", [
    ("llava_qwen2", "qwen2", "safetensors"), ("llava_qwen2", "qwen2", "bin"),
    ("llava_qwen1_5", "qwen2", "safetensors"), ("llava_llama", "llama", "safetensors"),
    ("llava_mistral", "llama", "bin")])
def test_llava_mod_dense_checkpoints(model_type, family, fmt, tmp_path, torch):
  ref = tiny_hf.llava("clip", family, seed=31)
  tower = _clip_dir(ref, tmp_path / "clip")  # the config names a local tower directory
  src = _write_original(ref, tmp_path / "mod", model_type, "mod", str(tower), fmt=fmt)
  if model_type == "llava_mistral":  # a LLaMA-shaped Mistral: no sliding window
    cfg = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**cfg, "sliding_window": None}))
  model, params = hf.load(src)
  assert model.cfg.image_token_id == tiny_hf.VOCAB and model.cfg.text.model_type == family
  _parity(model, params, ref, 0)


def test_moe_llava_mod_checkpoint_without_deepspeed(tmp_path, torch):
  """DeepSpeed's expert and gate tensors; the experts differ, so a wrong expert order fails. The
  original's capacity factors are kept as options; dispatch stays dropless and deterministic."""
  ref = _moe_llava(seed=32)
  moe = {"moe_enable": True, "moe_mode": "sparse", "moe_layers_idx": [0], "ep_size": 1,
         "num_experts": [4], "top_k_experts": 2, "capacity_factor": 1.5,
         "eval_capacity_factor": 2.0, "min_capacity": 0, "use_residual": False,
         "router_aux_loss_coef": 0.01}
  src = _write_original(ref, tmp_path / "moe", "moe_llava_qwen2", "mod",
                        "openai/clip-vit-large-patch14-336", moe)
  # A hub id is read as the published CLIP-L/14-336; this tiny tower is not it, and says so.
  assert hf.load_config(src).vision.hidden_size == 1024
  with pytest.raises(ValueError, match=r"model.image_tower.image_tower.vision_model.* has shape"):
    hf.load(src)
  (src / "config.json").write_text((src / "config.json").read_text().replace(
      "openai/clip-vit-large-patch14-336", str(_clip_dir(ref, tmp_path / "clip"))))
  model, params = hf.load(src)
  text = model.cfg.text
  assert (text.num_experts, text.num_experts_per_tok, text.moe_layers) == (4, 2, (0,))
  assert (text.capacity_factor, text.eval_capacity_factor, text.min_capacity) == (1.5, 2.0, 0)
  assert text.moe_dispatch == "dropless" and text.router_noise == "none"
  _parity(model, params, ref, 1)

  tensors = load_file(src / "model.safetensors")
  del tensors["model.layers.0.mlp.deepspeed_moe.experts.deepspeed_experts.2.up_proj.weight"]
  save_file(tensors, src / "model.safetensors")
  with pytest.raises(ValueError, match=r"layers_0/mlp/experts/up_proj \(experts present: \[0, 1, 3\]"):
    hf.load(src)


def test_llava_15_checkpoint_reads_its_tower_from_the_clip_directory(tmp_path, torch):
  ref = tiny_hf.llava("clip", "llama", seed=33)
  src = _write_original(ref, tmp_path / "v15", "llava", "1.5", "openai/clip-vit-large-patch14-336")
  assert not any(k.startswith("model.vision_tower") for k in load_file(src / "model.safetensors"))
  with pytest.raises(ValueError, match="holds no image tower weights and its config names the tower "
                                       "'openai/clip-vit-large-patch14-336': give the tower's "
                                       "directory"):
    hf.load(src)
  model, params = hf.load(src, vision_dir=_clip_dir(ref, tmp_path / "clip"))
  assert model.cfg.text.model_type == "llama"
  _parity(model, params, ref, 2)


@pytest.mark.parametrize("model_type", ["llava_phi", "moe_llava_stablelm", "llava_gemma2"])
def test_unsupported_families_are_named(model_type, tmp_path):
  (tmp_path / "config.json").write_text(json.dumps({"model_type": model_type, "mm_image_tower": "x"}))
  with pytest.raises(ValueError, match=rf"model_type '{model_type}' of the original code is not "
                                       "supported"):
    hf.load_config(tmp_path)


def _word_tokenizer(path, words=40):
  """A word-level tokenizer of `words` tokens (no <image>), saved in the checkpoint directory."""
  import tokenizers
  import transformers

  vocab = {"<unk>": 0, "</s>": 1, **{f"w{i}": i + 2 for i in range(words - 2)}}
  tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
  transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>",
                                       eos_token="</s>").save_pretrained(path)


def _transformers_logits(out, ref, image_id, seed):
  import transformers

  back = transformers.LlavaForConditionalGeneration.from_pretrained(out).eval()
  rng = np.random.default_rng(seed)
  n = back.config.image_seq_length
  ids = rng.integers(0, 100, (2, n + 8))
  ids[:, 3:3 + n] = tiny_hf.IMAGE_TOKEN
  pix = rng.standard_normal((2, 28, 28, 3)).astype(np.float32)
  want = tiny_hf.torch_logits(ref, ids, pixel_values=pix)
  got = tiny_hf.torch_logits(back, np.where(ids == tiny_hf.IMAGE_TOKEN, image_id, ids),
                             pixel_values=pix)
  return back, got[..., :want.shape[-1]], want


def test_an_original_moe_student_converts_to_plain_transformers(tmp_path, torch):
  """launch/convert.py --from_original: a Qwen2-MoE LLaVA that transformers loads with no custom code
  or DeepSpeed, `<image>` added to the tokenizer (inside the embedding rows: no resize), the tower's
  image processor carried over; the same logits as the model it came from."""
  import transformers

  ref = _moe_llava(seed=34)
  clip = _clip_dir(ref, tmp_path / "clip")
  transformers.CLIPImageProcessor(size={"shortest_edge": 28}, crop_size=28).save_pretrained(clip)
  moe = {"moe_layers_idx": [0], "num_experts": [4], "top_k_experts": 2, "capacity_factor": 1.0,
         "eval_capacity_factor": 1.0, "min_capacity": 4, "use_residual": False}
  src = _write_original(ref, tmp_path / "moe", "moe_llava_qwen2", "mod", str(clip), moe)
  _word_tokenizer(src)
  out = hf.from_original(src, tmp_path / "out")
  cfg = json.loads((out / "config.json").read_text())
  assert cfg["model_type"] == "llava" and cfg["text_config"]["model_type"] == "qwen2_moe"
  assert "original_model_type" not in json.dumps(cfg)
  tok = transformers.AutoTokenizer.from_pretrained(out)
  assert tok.convert_tokens_to_ids("<image>") == cfg["image_token_index"] == 40
  assert cfg["text_config"]["vocab_size"] == tiny_hf.VOCAB
  assert (out / "preprocessor_config.json").exists()
  back, got, want = _transformers_logits(out, ref, 40, 3)
  assert type(back.model.language_model.layers[0].mlp).__name__ == "Qwen2MoeSparseMoeBlock"
  assert tiny_hf.rel_err(got, want) < 1e-4
  # Our own loader reads the converted directory as any transformers LLaVA (init=hf in a stage).
  model, _ = hf.load(out)
  assert model.cfg.image_token_id == 40 and model.cfg.text.num_experts == 4


def test_an_original_llava_15_without_tokenizer_grows_its_embeddings(tmp_path, torch):
  ref = tiny_hf.llava("clip", "llama", seed=35)
  src = _write_original(ref, tmp_path / "v15", "llava", "1.5", "openai/clip-vit-large-patch14-336")
  out = hf.from_original(src, tmp_path / "out", vision_dir=_clip_dir(ref, tmp_path / "clip"))
  cfg = json.loads((out / "config.json").read_text())
  assert cfg["image_token_index"] == tiny_hf.VOCAB and cfg["text_config"]["vocab_size"] == 192
  _, got, want = _transformers_logits(out, ref, tiny_hf.VOCAB, 4)
  assert tiny_hf.rel_err(got, want) < 1e-4


def test_an_original_checkpoint_serves_as_a_stage_teacher(tmp_path, torch):
  """`teacher.init=hf` on the original directory (its tower given as `vision_hf_dir`): the model a
  stage builds, from config files alone and with weights, is `hf.load`'s."""
  import jax

  from llavamod_jax.train import build, config

  ref = tiny_hf.llava("clip", "llama", seed=36)
  src = _write_original(ref, tmp_path / "v15", "llava", "1.5", "openai/clip-vit-large-patch14-336")
  clip = _clip_dir(ref, tmp_path / "clip")
  cfg = config.base()
  cfg.teacher.init, cfg.teacher.hf_dir, cfg.teacher.vision_hf_dir = "hf", str(src), str(clip)
  abstract = build.abstract_model(cfg.teacher, cfg, role="teacher")
  model, params = build.load_model(cfg.teacher, None, cfg, role="teacher")
  _, want = hf.load(src, vision_dir=clip)
  assert abstract.cfg == model.cfg and model.cfg.vision.hidden_size == 24
  assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), params, want))
  _parity(model, params, ref, 5)


def test_the_convert_command(tmp_path, torch):
  import os
  import subprocess
  import sys
  from pathlib import Path

  repo = Path(__file__).resolve().parents[2]
  ref = tiny_hf.llava("clip", "qwen2", seed=37)
  src = _write_original(ref, tmp_path / "mod", "llava_qwen2", "mod", "openai/clip-vit-large-patch14")
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "TRANSFORMERS_VERBOSITY": "error"}
  run = lambda *a: subprocess.run([sys.executable, str(repo / "launch" / "convert.py"), *a],  # noqa
                                  env=env, capture_output=True, text=True, timeout=240)
  p = run(f"--from_original={src}", f"--out_hf_dir={tmp_path / 'out'}",
          f"--vision_dir={_clip_dir(ref, tmp_path / 'clip')}")
  assert p.returncode == 0, p.stderr[-2000:]
  _, got, want = _transformers_logits(tmp_path / "out", ref, tiny_hf.VOCAB, 6)
  assert tiny_hf.rel_err(got, want) < 1e-4
  p = run(f"--from_original={src}", f"--out_hf_dir={tmp_path / 'out2'}")  # tiny tower, CLIP-L named
  assert p.returncode == 1 and "has shape" in p.stderr and "Traceback" not in p.stderr


def test_a_mistral_with_a_sliding_window_is_refused(tmp_path):
  cfg = tiny_hf.text_config("llama").to_dict()
  cfg.update(model_type="llava_mistral", sliding_window=4096, mm_image_tower="x",
             image_projector_type="mlp2x_gelu")
  (tmp_path / "config.json").write_text(json.dumps(cfg))
  with pytest.raises(NotImplementedError, match="Mistral with a sliding window"):
    hf.load_config(tmp_path)
