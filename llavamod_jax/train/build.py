"""From a run config to the objects a stage trains with: tokenizer, models and parameters, data.

Side effects (building the synthetic set, training the demo tokenizer) happen here and in the loop,
never in the pure numeric code. In a multi-process run `prepare_demo_assets` builds the demo cache
first (process 0 writes, the others wait), so the `ensure_*` functions below then only read it.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp

from llavamod_jax import checkpoint, distributed, fileutil, hf, models, moe
from llavamod_jax.data import pipeline, sources, synthetic
from llavamod_jax.models.configs import LlavaConfig, TextConfig, VisionConfig
from llavamod_jax.train.config import STAGES

log = logging.getLogger(__name__)
IMAGE_TOKEN = "<image>"
SPECIALS = ["<|endoftext|>", IMAGE_TOKEN]


# ---------------------------------------------------------------------------------------------
# The embedded default's assets.
# ---------------------------------------------------------------------------------------------


def shapes_dir(cfg) -> Path:
  s = cfg.data.shapes
  return Path(cfg.demo_cache) / f"shapes-{s.num_train}-{s.num_eval}-{s.image_size}"


def prepare_demo_assets(cfg) -> None:
  """Build what `cfg` takes from the demo cache (`cfg.demo_cache`) before anything reads it. The
  shapes set and the demo tokenizer are built by process 0 while the others wait, then read (hosts
  that do not share the cache's filesystem build their own copy); the demo teacher is trained by all
  processes together, since its training run is itself a multi-process run."""
  teacher = STAGES[cfg.stage] in ("mimic", "preference") and cfg.teacher.init == "demo"
  tokenizer = teacher or (cfg.student.init == "demo" and not cfg.data.tokenizer)

  def data():
    ensure_shapes(cfg)
    if tokenizer:
      ensure_demo_tokenizer(cfg)

  if cfg.data.source == "shapes" or tokenizer:
    distributed.main_first("demo data", data)
  if teacher:
    ensure_demo_teacher(cfg)


def ensure_shapes(cfg) -> Path:
  s = cfg.data.shapes
  out = shapes_dir(cfg)
  synthetic.build(out, num_train=s.num_train, num_eval=s.num_eval, seed=0, image_size=s.image_size)
  return out


# The demo tokenizer and teacher are cached with a stamp of what they were built from: the shapes version
# (its text and answers) and DEMO_RECIPE, the version of how the demo teacher is built (bump it when
# recipes.teacher(), the tower pretraining or the projector start change). An artefact without the
# current stamp is stale and is rebuilt, so a cache from older code never keeps serving an old teacher.
DEMO_RECIPE = 3  # 2: per-patch tower pretraining, fixed standardising projector, LM-only training;
# 3: the LM and projector start at std 0.1 (initializer_range), 8 heads without grouped KV
_STAMP = "demo_stamp.json"


def _stamp_value() -> dict:
  return {"shapes_version": synthetic.VERSION, "demo_recipe": DEMO_RECIPE}


def _cached(path: Path, marker: str) -> bool:
  """Whether `path` holds a demo artefact (its `marker` file) with the current stamp."""
  try:
    stamp = json.loads((path / _STAMP).read_text())
  except (FileNotFoundError, json.JSONDecodeError):
    stamp = None
  fresh = (path / marker).exists() and stamp == _stamp_value()
  if not fresh and path.exists():
    log.info("demo cache: %s is incomplete or was built by other code; rebuilding it", path)
  return fresh


def _stamp(path: Path) -> None:
  (path / _STAMP).write_text(json.dumps(_stamp_value()))


def ensure_demo_tokenizer(cfg):
  """A byte-level BPE trained on the shapes text (a few hundred tokens; saved once in the cache)."""
  import transformers

  path = Path(cfg.demo_cache) / "tokenizer"
  if _cached(path, "tokenizer.json"):
    return transformers.AutoTokenizer.from_pretrained(path)
  import tokenizers
  from tokenizers import decoders, pre_tokenizers, trainers

  from llavamod_jax.data import templates

  root = ensure_shapes(cfg)
  texts = [templates.get("qwen").system, "USER: ASSISTANT:"]
  for name in ("train.jsonl", "preference_train.jsonl"):
    for line in (root / name).read_text().splitlines():
      rec = json.loads(line)
      texts += [t["value"] for t in rec.get("conversations", [])]
      texts += [rec[k] for k in ("question", "chosen", "rejected") if k in rec]
  tok = tokenizers.Tokenizer(tokenizers.models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  tok.train_from_iterator(texts, trainers.BpeTrainer(
      vocab_size=512, special_tokens=SPECIALS, show_progress=False,
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  fast = transformers.PreTrainedTokenizerFast(
      tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
      additional_special_tokens=[IMAGE_TOKEN])
  fast.save_pretrained(path)
  _stamp(path)
  return fast


def image_token_id(tokenizer) -> int:
  if IMAGE_TOKEN not in tokenizer.get_vocab():
    tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
  return tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)


def demo_llava(src, tokenizer, image_size: int) -> LlavaConfig:
  d = src.demo
  text = TextConfig(model_type="qwen2", vocab_size=len(tokenizer), hidden_size=d.hidden_size,
                    intermediate_size=d.intermediate_size, num_layers=d.num_layers,
                    num_heads=d.num_heads, num_kv_heads=d.num_kv_heads, rope_theta=10000.0,
                    tie_word_embeddings=False, max_position_embeddings=1024,
                    initializer_range=d.initializer_range)
  vision = VisionConfig(hidden_size=d.vision_hidden_size, intermediate_size=4 * d.vision_hidden_size,
                        num_layers=d.vision_layers, num_heads=d.vision_heads, image_size=image_size,
                        patch_size=d.patch_size)
  return LlavaConfig(text=text, vision=vision, image_token_id=image_token_id(tokenizer),
                     vision_feature_layer=d.vision_feature_layer)


# ---------------------------------------------------------------------------------------------
# Models.
# ---------------------------------------------------------------------------------------------


def _numerics(cfg, src):
  """Apply a source's dtype / remat / MoE options to a model config."""
  text_kw = dict(dtype=src.dtype, param_dtype=src.param_dtype, remat=src.remat)
  if isinstance(cfg, LlavaConfig):
    text = cfg.text.replace(**text_kw)
    if text.num_experts:
      text = text.replace(**_moe_options(src))
    return cfg.replace(text=text, vision=cfg.vision.replace(dtype=src.dtype,
                                                            param_dtype=src.param_dtype))
  cfg = cfg.replace(**text_kw)
  return cfg.replace(**_moe_options(src)) if cfg.num_experts else cfg


def _moe_options(src) -> dict:
  m = src.moe
  return dict(moe_dispatch=m.dispatch, moe_impl=m.impl, capacity_factor=m.capacity_factor,
              eval_capacity_factor=m.eval_capacity_factor, min_capacity=m.min_capacity,
              router_noise=m.router_noise, moe_expert_parallel=m.expert_parallel)


def _compose(src, tokenizer, seed: int, vision=None):
  """A new LLaVA: a vision tower (HF dir, or given), an LLM (HF dir) and a fresh projector."""
  import flax.linen as nn

  from llavamod_jax.models.llava import Projector

  if vision is None:
    vmodel, vparams = hf.load(src.vision_hf_dir)
    if not isinstance(vmodel.cfg, VisionConfig):
      raise ValueError(f"vision_hf_dir={src.vision_hf_dir}: not a CLIP/SigLIP vision model")
  else:
    vmodel, vparams = vision
  lmodel, lparams = hf.load(src.llm_hf_dir)
  if not isinstance(lmodel.cfg, TextConfig):
    raise ValueError(f"llm_hf_dir={src.llm_hf_dir}: not a causal language model")
  cfg = LlavaConfig(text=lmodel.cfg, vision=vmodel.cfg, image_token_id=image_token_id(tokenizer),
                    vision_feature_select_strategy="default" if vmodel.cfg.is_clip else "full")
  feats = jax.ShapeDtypeStruct((1, cfg.num_image_tokens, cfg.vision.hidden_size), "float32")
  proj = nn.unbox(Projector(cfg).init(jax.random.key(seed), jax.numpy.zeros(feats.shape))["params"])
  return models.build(cfg), {"vision_tower": vparams, "multi_modal_projector": proj,
                             "language_model": lparams}


def load_model(src, tokenizer, cfg, *, role: str, teacher=None):
  """(module, params) for `cfg.student` or `cfg.teacher` (role names it in errors and logs)."""
  if src.init == "hf":
    model, params = hf.load(src.hf_dir, dtype=src.dtype, param_dtype=src.param_dtype, remat=src.remat)
  elif src.init == "workdir":
    model, params = checkpoint.restore_model(fileutil.path(src.workdir) / "checkpoints")
  elif src.init == "compose":
    model, params = _compose(src, tokenizer, cfg.seed)
  elif src.init == "demo" and role == "teacher":
    model, params = hf.load(ensure_demo_teacher(cfg), dtype=src.dtype, param_dtype=src.param_dtype)
  elif src.init == "demo":
    llava = demo_llava(src, tokenizer, cfg.data.shapes.image_size)
    if teacher is not None and src.demo.share_vision_from_teacher:
      # As in the paper, the student starts from the teacher's (frozen) vision tower.
      tmodel, tparams = teacher
      llava = llava.replace(vision=tmodel.cfg.vision)
      model = models.build(llava)
      params = models.init_params(model, cfg.seed)
      # A copy: train steps donate the student's buffers, which must not be the teacher's.
      params = {**params, "vision_tower": jax.tree.map(jnp.copy, tparams["vision_tower"])}
    else:
      model = models.build(llava)
      params = models.init_params(model, cfg.seed)
  else:
    raise ValueError(f"config.{role}.init={src.init!r} is not supported for the {role}")
  up = src.upcycle
  text = model.cfg.text if isinstance(model.cfg, LlavaConfig) else model.cfg
  if up.num_experts and not text.num_experts:
    model, params = moe.upcycle(model, params, num_experts=up.num_experts, top_k=up.top_k,
                                layers=up.layers, seed=up.seed)
  model = models.build(_numerics(model.cfg, src))
  log.info("%s: %s, %s parameters", role, type(model).__name__,
           f"{sum(x.size for x in jax.tree.leaves(params)):,}")
  return model, params


def ensure_demo_teacher(cfg) -> Path:
  """The embedded default's teacher: trained once with configs/teacher.py's recipe, then cached.
  Collective: every process calls it (they train together); process 0 writes the HF directory."""
  out = Path(cfg.demo_cache) / "teacher_hf"
  run = Path(cfg.demo_cache) / "teacher_run"
  # Process 0 decides for all: a process that alone skipped the training would leave the others
  # waiting in its collectives.
  if distributed.main_value(int(_cached(out, "config.json"))):
    return out
  if distributed.is_main() and run.exists() and not _cached(run, "checkpoints"):
    shutil.rmtree(run)  # checkpoints of a stale teacher: training would resume from them
  distributed.barrier("demo teacher run")
  from llavamod_jax.train import loop
  from llavamod_jax.train import recipes

  tcfg = recipes.teacher()
  tcfg.demo_cache, tcfg.data.shapes = cfg.demo_cache, cfg.data.shapes
  tcfg.total_steps = cfg.demo_teacher_steps
  tcfg.checkpoint_every = max(1, cfg.demo_teacher_steps // 2)
  if cfg.demo_vision_steps:
    # A pretrained, frozen tower (as a real LLaVA's CLIP) and a fixed projector that passes its
    # standardised features on; the LM learns to read them. A projector trained along with the
    # from-scratch LM collapses: within 100 steps its outputs grow ~100x in one shared direction and
    # the image tokens no longer differ, so the LM answers from the question alone.
    tcfg.student.init, tcfg.student.hf_dir = "hf", str(_demo_teacher_init(cfg, tcfg))
    tcfg.trainable = "llm"
  log.info("demo teacher not cached: training it first (%d steps) in %s", tcfg.total_steps, run)
  if distributed.is_main():
    run.mkdir(parents=True, exist_ok=True)
    _stamp(run)
  loop.run(tcfg, run)
  # Orbax reads are collective too: every process restores, process 0 writes.
  model, params = checkpoint.restore_model(run / "checkpoints")
  if distributed.is_main():
    hf.save(model, params, out, overwrite=True)
    ensure_demo_tokenizer(cfg).save_pretrained(out)
    _stamp(out)
  distributed.barrier("demo teacher")
  return out


def _demo_teacher_init(cfg, tcfg) -> Path:
  """An HF LLaVA to start the demo teacher from: a pretrained tower (train/tower.py), a fresh projector
  reading standardised features (`tower.projector_init`) and a fresh LM. Every process pretrains the
  same tower (it is small and seeded); process 0 writes."""
  from llavamod_jax.train import tower

  out = Path(cfg.demo_cache) / "teacher_init_hf"
  if distributed.main_value(int(_cached(out, "config.json"))):
    return out
  tokenizer = ensure_demo_tokenizer(cfg)
  model = models.build(demo_llava(tcfg.student, tokenizer, cfg.data.shapes.image_size))
  params = models.init_params(model, cfg.seed)
  log.info("demo teacher: pretraining its vision tower (%d steps)", cfg.demo_vision_steps)
  root = ensure_shapes(cfg)
  params["vision_tower"], _ = tower.pretrain(model.cfg, root, steps=cfg.demo_vision_steps,
                                             seed=cfg.seed)
  pixels, _ = tower.load_split(root, "train", model.cfg, limit=256)
  params["multi_modal_projector"] = tower.projector_init(
      model.cfg, params["multi_modal_projector"], params["vision_tower"], pixels)
  if distributed.is_main():
    hf.save(model, params, out, overwrite=True)
    tokenizer.save_pretrained(out)
    _stamp(out)
  distributed.barrier("demo teacher init")
  return out


def tokenizer_for(cfg):
  import transformers

  if cfg.data.tokenizer:
    return transformers.AutoTokenizer.from_pretrained(cfg.data.tokenizer)
  src = cfg.student
  if src.init == "demo":
    return ensure_demo_tokenizer(cfg)
  path = {"hf": src.hf_dir, "workdir": fileutil.path(src.workdir) / "tokenizer",
          "compose": src.llm_hf_dir}[src.init]
  with fileutil.local_dir(path) as local:  # a gs:// workdir's tokenizer is read from a local copy
    return transformers.AutoTokenizer.from_pretrained(local)


# ---------------------------------------------------------------------------------------------
# Data.
# ---------------------------------------------------------------------------------------------


def view(model, prefix: str = "", aspect: str = "pad") -> pipeline.View:
  cfg = model.cfg
  return pipeline.View(num_image_tokens=cfg.num_image_tokens, image_token_id=cfg.image_token_id,
                       image_kind="clip" if cfg.vision.is_clip else "siglip",
                       image_size=cfg.vision.image_size, image_aspect=aspect, prefix=prefix)


def views(student, teacher, aspect: str) -> list[pipeline.View]:
  out = [view(student, aspect=aspect)]
  if teacher is not None and isinstance(teacher.cfg, LlavaConfig) and view(teacher, aspect=aspect) != \
      out[0]:
    out.append(view(teacher, "teacher_", aspect))
  return out


def train_files(cfg) -> tuple[list[str], str]:
  if cfg.data.source == "files":
    return list(cfg.data.train_files), cfg.data.image_root or None
  root = ensure_shapes(cfg)
  name = "preference_train.jsonl" if cfg.stage == "preference" else cfg.data.shapes.file
  return [str(root / name)], str(root)


def eval_files(cfg) -> tuple[list[str], str]:
  if cfg.data.source == "files":
    return list(cfg.data.eval_files), cfg.data.image_root or None
  root = ensure_shapes(cfg)
  name = "preference_eval.jsonl" if cfg.stage == "preference" else "eval.jsonl"
  return [str(root / name)], str(root)


def data_pipeline(cfg, tokenizer, student, teacher, files, image_root, *, seed: int, shuffle: bool,
                  num_epochs) -> pipeline.Pipeline:
  kind = "preference" if cfg.stage == "preference" else "conversation"
  source = sources.from_files(files, list(cfg.data.weights) or None, image_root=image_root, kind=kind,
                              seed=seed)
  return pipeline.Pipeline(
      source, tokenizer, views=views(student, teacher, cfg.data.image_aspect),
      batch_size=cfg.data.batch_size, max_length=cfg.data.max_length, template=cfg.data.template,
      mode=kind, images_per_sample=cfg.data.images_per_sample, shuffle=shuffle, seed=seed,
      num_epochs=num_epochs, worker_count=cfg.data.worker_count)

