"""From a run config to the objects a stage trains with: tokenizer, models and parameters, data.

Reads files only (HF directories, workdirs, data files); builds nothing on disk. The embedded
default's assets are made before this runs (`llavamod_jax.demo.prepare`).
"""

from __future__ import annotations

import logging
from pathlib import Path

import jax
import jax.numpy as jnp

from llavamod_jax import checkpoint, fileutil, hf, models, moe
from llavamod_jax.data import pipeline, sources, teacher_logits, templates
from llavamod_jax.models import scan
from llavamod_jax.models.configs import LlavaConfig, TextConfig, VisionConfig

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# Tokenizer.
# ---------------------------------------------------------------------------------------------


def tokenizer_for(cfg):
  """`data.tokenizer`, else the student's: its HF dir, its workdir's copy, or its LLM's."""
  import transformers

  src = cfg.student
  path = cfg.data.tokenizer or {"hf": src.hf_dir, "workdir": fileutil.path(src.workdir) / "tokenizer",
                                "compose": src.llm_hf_dir}.get(src.init)
  if not path:
    raise ValueError(f"config.data.tokenizer: required when student.init={src.init!r}")
  with fileutil.local_dir(path) as local:  # a gs:// workdir's tokenizer is read from a local copy
    return transformers.AutoTokenizer.from_pretrained(local)


def image_token_id(tokenizer) -> int:
  """The id of `<image>`, added to the tokenizer as a special token when it lacks one."""
  if templates.IMAGE_PLACEHOLDER not in tokenizer.get_vocab():
    tokenizer.add_special_tokens({"additional_special_tokens": [templates.IMAGE_PLACEHOLDER]})
  return tokenizer.convert_tokens_to_ids(templates.IMAGE_PLACEHOLDER)


# ---------------------------------------------------------------------------------------------
# Models.
# ---------------------------------------------------------------------------------------------


def scratch_config(src, tokenizer) -> LlavaConfig:
  """The LLaVA config of `init=scratch`: a Qwen2 LM and a CLIP tower of `src.scratch`'s sizes."""
  s = src.scratch
  text = TextConfig(model_type="qwen2", vocab_size=len(tokenizer), hidden_size=s.hidden_size,
                    intermediate_size=s.intermediate_size, num_layers=s.num_layers,
                    num_heads=s.num_heads, num_kv_heads=s.num_kv_heads, rope_theta=s.rope_theta,
                    tie_word_embeddings=False, max_position_embeddings=s.max_position_embeddings,
                    initializer_range=s.initializer_range)
  vision = VisionConfig(hidden_size=s.vision_hidden_size, intermediate_size=4 * s.vision_hidden_size,
                        num_layers=s.vision_layers, num_heads=s.vision_heads, image_size=s.image_size,
                        patch_size=s.patch_size)
  return LlavaConfig(text=text, vision=vision, image_token_id=image_token_id(tokenizer),
                     vision_feature_layer=s.vision_feature_layer)


def _vision_tower(path: str):
  """(VisionConfig, params) of a CLIP/SigLIP directory, or of a LLaVA directory's tower."""
  model, params = hf.load(path)
  if isinstance(model.cfg, LlavaConfig):
    return model.cfg.vision, params["vision_tower"]
  if not isinstance(model.cfg, VisionConfig):
    raise ValueError(f"vision_hf_dir={path}: neither a CLIP/SigLIP vision model nor a LLaVA")
  return model.cfg, params


def _scratch(src, tokenizer, seed: int):
  llava = scratch_config(src, tokenizer)
  if not src.vision_hf_dir:
    model = models.build(llava)
    return model, models.init_params(model, seed)
  vision, vparams = _vision_tower(src.vision_hf_dir)
  model = models.build(llava.replace(vision=vision))
  params = models.init_params(model, seed)
  # A copy: train steps donate the student's buffers, which must not alias anything else.
  return model, {**params, "vision_tower": jax.tree.map(jnp.copy, vparams)}


def _compose(src, tokenizer, seed: int):
  """A new LLaVA: a vision tower (HF dir), an LLM (HF dir) and a fresh projector."""
  import flax.linen as nn

  from llavamod_jax.models.llava import Projector

  vision, vparams = _vision_tower(src.vision_hf_dir)
  lmodel, lparams = hf.load(src.llm_hf_dir)
  if not isinstance(lmodel.cfg, TextConfig):
    raise ValueError(f"llm_hf_dir={src.llm_hf_dir}: not a causal language model")
  cfg = LlavaConfig(text=lmodel.cfg, vision=vision, image_token_id=image_token_id(tokenizer),
                    vision_feature_select_strategy="default" if vision.is_clip else "full")
  feats = jnp.zeros((1, cfg.num_image_tokens, cfg.vision.hidden_size))
  proj = nn.unbox(Projector(cfg).init(jax.random.key(seed), feats)["params"])
  return models.build(cfg), {"vision_tower": vparams, "multi_modal_projector": proj,
                             "language_model": lparams}


def _numerics(cfg, src):
  """Apply a source's dtype / remat / MoE options to a model config."""
  text_kw = dict(dtype=src.dtype, param_dtype=src.param_dtype, remat=src.remat,
                 remat_policy=src.remat_policy, scan_layers=src.scan_layers,
                 attention=src.attention)
  m = src.moe
  moe_kw = dict(moe_dispatch=m.dispatch, moe_impl=m.impl, capacity_factor=m.capacity_factor,
                eval_capacity_factor=m.eval_capacity_factor, min_capacity=m.min_capacity,
                router_noise=m.router_noise, moe_expert_parallel=m.expert_parallel)
  if isinstance(cfg, LlavaConfig):
    text = cfg.text.replace(**text_kw)
    text = text.replace(**moe_kw) if text.num_experts else text
    return cfg.replace(text=text, vision=cfg.vision.replace(**text_kw))
  cfg = cfg.replace(**text_kw)
  return cfg.replace(**moe_kw) if cfg.num_experts else cfg


def _upcycled(model_cfg, src):
  """The config after `src.upcycle` (a dense LM made MoE; an MoE one is kept) and its numerics."""
  up = src.upcycle
  text = model_cfg.text if isinstance(model_cfg, LlavaConfig) else model_cfg
  if up.num_experts and not text.num_experts:
    text = moe.moe_text_config(text, up.num_experts, up.top_k, up.layers)
    model_cfg = model_cfg.replace(text=text) if isinstance(model_cfg, LlavaConfig) else text
  return _numerics(model_cfg, src)


def abstract_model(src, cfg, *, role: str, tokenizer=None):
  """The module `load_model` returns, from config files alone: no weights, no data (planning).
  The tokenizer is read only by `init=scratch` (its vocabulary size)."""
  if src.init == "hf":
    model_cfg = hf.load_config(src.hf_dir, dtype=src.dtype, param_dtype=src.param_dtype,
                               vision_dir=src.vision_hf_dir or None)
  elif src.init == "workdir":
    model_cfg = checkpoint.restore_config(fileutil.path(src.workdir) / "checkpoints")
  elif src.init == "compose":
    vision = hf.load_config(src.vision_hf_dir)
    vision = vision.vision if isinstance(vision, LlavaConfig) else vision
    text = hf.load_config(src.llm_hf_dir)
    if not isinstance(text, TextConfig):
      raise ValueError(f"llm_hf_dir={src.llm_hf_dir}: not a causal language model")
    model_cfg = LlavaConfig(text=text, vision=vision, image_token_id=text.vocab_size - 1,
                            vision_feature_select_strategy="default" if vision.is_clip else "full")
  elif src.init == "scratch":
    model_cfg = scratch_config(src, tokenizer or tokenizer_for(cfg))
    if src.vision_hf_dir:
      vision = hf.load_config(src.vision_hf_dir)
      model_cfg = model_cfg.replace(
          vision=vision.vision if isinstance(vision, LlavaConfig) else vision)
  else:
    raise ValueError(f"config.{role}.init={src.init!r} is not supported for the {role}")
  return models.build(_upcycled(model_cfg, src))


def load_model(src, tokenizer, cfg, *, role: str):
  """(module, params) for `cfg.student` or `cfg.teacher` (role names it in errors and logs)."""
  if src.init == "hf":
    # vision_hf_dir: an original-code checkpoint's image tower (hf/original.py)
    model, params = hf.load(src.hf_dir, dtype=src.dtype, param_dtype=src.param_dtype, remat=src.remat,
                            vision_dir=src.vision_hf_dir or None)
  elif src.init == "workdir":
    model, params = checkpoint.restore_model(fileutil.path(src.workdir) / "checkpoints")
  elif src.init == "compose":
    model, params = _compose(src, tokenizer, cfg.seed)
  elif src.init == "scratch":
    model, params = _scratch(src, tokenizer, cfg.seed)
  else:
    raise ValueError(f"config.{role}.init={src.init!r} is not supported for the {role}")
  up = src.upcycle
  text = model.cfg.text if isinstance(model.cfg, LlavaConfig) else model.cfg
  if up.num_experts and not text.num_experts:
    model, params = moe.upcycle(model, params, num_experts=up.num_experts, top_k=up.top_k,
                                layers=up.layers, seed=up.seed)
  model = models.build(_upcycled(model.cfg, src))
  params = scan.relayout(params, model.cfg)  # stacked for scan_layers, whatever was read
  log.info("%s: %s, %s parameters", role, type(model).__name__,
           f"{sum(x.size for x in jax.tree.leaves(params)):,}")
  return model, params


def teacher_dir(cfg) -> str | None:
  """Where the teacher can be read back from (run.json: the final report and evaluate read it); for
  stored logits, the teacher they were computed with."""
  src = cfg.teacher
  if src.init == "offline":
    return teacher_logits.read_meta(src.logits_dir).get("teacher")
  if src.init == "hf":
    return str(Path(src.hf_dir).resolve())
  if src.init == "workdir":
    return src.workdir if fileutil.is_remote(src.workdir) else str(Path(src.workdir).resolve())
  return None


# ---------------------------------------------------------------------------------------------
# Data.
# ---------------------------------------------------------------------------------------------


def view(model, prefix: str = "", aspect: str = "pad") -> pipeline.View:
  cfg = model.cfg
  return pipeline.View(num_image_tokens=cfg.num_image_tokens, image_token_id=cfg.image_token_id,
                       image_kind="clip" if cfg.vision.is_clip else "siglip",
                       image_size=cfg.vision.image_size, image_aspect=aspect, prefix=prefix)


def views(student, teacher, aspect: str) -> list[pipeline.View]:
  """The student's view, and the teacher's (prefix "teacher_") when it reads images differently."""
  out = [view(student, aspect=aspect)]
  if teacher is not None and isinstance(teacher.cfg, LlavaConfig) and \
      view(teacher, aspect=aspect) != out[0]:
    out.append(view(teacher, "teacher_", aspect))
  return out


def stored_teacher_logits(cfg, student) -> teacher_logits.Reader:
  """The reader of `teacher.logits_dir`, checked against this run: the same temperature, mask,
  template and max_length, and a vocabulary the student's logits cover."""
  reader = teacher_logits.Reader(cfg.teacher.logits_dir)
  meta = reader.meta
  teacher_logits.check_settings(meta, {
      "temperature": cfg.loss.temperature, "shift_mask": cfg.loss.shift_mask,
      "template": cfg.data.template, "max_length": cfg.data.max_length},
      f"config.teacher.logits_dir={cfg.teacher.logits_dir}")
  vocab = student.cfg.text.vocab_size if hasattr(student.cfg, "text") else student.cfg.vocab_size
  if meta["vocab_size"] > vocab or cfg.loss.vocab_size not in (0, meta["vocab_size"]):
    raise teacher_logits.TeacherLogitsError(
        f"config.teacher.logits_dir={cfg.teacher.logits_dir}: its top-k is over {meta['vocab_size']} "
        f"tokens; the student has {vocab} and config.loss.vocab_size={cfg.loss.vocab_size}")
  return reader


def data_pipeline(cfg, tokenizer, student, teacher, files, *, seed: int, shuffle: bool,
                  num_epochs, weights=None, stored: teacher_logits.Reader | None = None,
                  ) -> pipeline.Pipeline:
  """The stage's batches of `files`; `stored`: with the stored teacher logits of each record."""
  kind = "preference" if cfg.stage == "preference" else "conversation"
  source = sources.from_files(list(files), list(weights) if weights else None,
                              image_root=cfg.data.image_root or None, kind=kind, seed=seed)
  return pipeline.Pipeline(
      source, tokenizer, views=views(student, teacher, cfg.data.image_aspect),
      batch_size=cfg.data.batch_size, max_length=cfg.data.max_length, template=cfg.data.template,
      mode=kind, images_per_sample=cfg.data.images_per_sample, shuffle=shuffle, seed=seed,
      num_epochs=num_epochs, worker_count=cfg.data.worker_count, teacher_logits=stored,
      shift_mask=cfg.loss.shift_mask, temperature=cfg.loss.temperature)
