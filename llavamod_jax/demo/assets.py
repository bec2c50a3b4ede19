"""The demo cache: the shapes set, a tokenizer trained on it, and the demo teacher, each built once.

`prepare(config)` makes what a config's `demo` section asks for and rewrites the config into plain
trainer inputs: `init="demo"` becomes a teacher HF directory (`hf`) and a scratch student that starts
from the teacher's tower; empty data files become the shapes set's; an empty tokenizer becomes the
demo tokenizer. The trainer then runs as on any other inputs and never imports this package.

Every cached artefact carries a stamp of what it was built from: the shapes version (its text and
answers) and DEMO_RECIPE, the version of how the teacher is built (bump it when `recipes.teacher()`,
the tower pretraining or the projector start change). An artefact without the current stamp is stale
and is rebuilt, so a cache from older code never serves an old teacher.

Several processes: the shapes set and the tokenizer are built by process 0 while the others wait,
then read (hosts that do not share the cache's filesystem build their own copy); the teacher is
trained by all processes together, since its training run is itself a multi-process run.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from llavamod_jax import checkpoint, distributed, hf, models
from llavamod_jax.data import templates
from llavamod_jax.demo import recipes, synthetic, tower
from llavamod_jax.train import build, loop
from llavamod_jax.train.config import STAGES

log = logging.getLogger(__name__)
DEMO_RECIPE = 3  # see the module docstring; history in this package's README
STAMP = "demo_stamp.json"
EOS = "<|endoftext|>"


def prepare(cfg):
  """Build the demo assets `cfg` needs and turn its `demo` inputs into plain ones (in place)."""
  d = cfg.demo
  teacher_demo = STAGES[cfg.stage] in ("mimic", "preference") and cfg.teacher.init == "demo"
  student_demo = cfg.student.init == "demo"
  need_files = not cfg.data.train_files
  need_tokenizer = teacher_demo or (student_demo and not cfg.data.tokenizer)

  def data():
    ensure_shapes(d)
    if need_tokenizer:
      ensure_tokenizer(d)

  if need_files or need_tokenizer:
    distributed.main_first("demo data", data)
  if teacher_demo:
    cfg.teacher.init, cfg.teacher.hf_dir = "hf", str(ensure_teacher(d).resolve())
  if need_files:
    root = shapes_dir(d)
    pref = cfg.stage == "preference"
    cfg.data.train_files = [str(root / ("preference_train.jsonl" if pref else d.shapes.file))]
    cfg.data.eval_files = [str(root / ("preference_eval.jsonl" if pref else "eval.jsonl"))]
    cfg.data.report_files = [str(root / "eval.jsonl")]  # the VQA / POPE questions
    cfg.data.image_root = str(root)
  if student_demo:
    cfg.student.init = "scratch"
    cfg.student.scratch.image_size = d.shapes.image_size
    teacher_dir = cfg.teacher.hf_dir if cfg.teacher.init == "hf" else None
    if cfg.teacher.init == "offline":  # stored logits: the teacher they were computed with
      teacher_dir = _stored_logits_teacher(cfg.teacher.logits_dir)
    if d.student_vision_from_teacher and teacher_dir:
      cfg.student.vision_hf_dir = teacher_dir  # as in the paper: the teacher's frozen tower
    if not cfg.data.tokenizer:
      cfg.data.tokenizer = str(Path(d.cache) / "tokenizer")
  return cfg


def _stored_logits_teacher(logits_dir: str) -> str | None:
  from llavamod_jax.data import teacher_logits  # noqa: PLC0415

  return teacher_logits.read_meta(logits_dir).get("teacher") if logits_dir else None


# ---------------------------------------------------------------------------------------------
# The cache and its stamps.
# ---------------------------------------------------------------------------------------------


def _stamp_value() -> dict:
  return {"shapes_version": synthetic.VERSION, "demo_recipe": DEMO_RECIPE}


def is_cached(path: Path, marker: str) -> bool:
  """Whether `path` holds a demo artefact (its `marker` file) with the current stamp."""
  try:
    stamp = json.loads((path / STAMP).read_text())
  except (FileNotFoundError, json.JSONDecodeError):
    stamp = None
  fresh = (path / marker).exists() and stamp == _stamp_value()
  if not fresh and path.exists():
    log.info("demo cache: %s is incomplete or was built by other code; rebuilding it", path)
  return fresh


def stamp(path: Path) -> None:
  (path / STAMP).write_text(json.dumps(_stamp_value()))


# ---------------------------------------------------------------------------------------------
# The shapes set and the tokenizer.
# ---------------------------------------------------------------------------------------------


def shapes_dir(d) -> Path:
  s = d.shapes
  return Path(d.cache) / f"shapes-{s.num_train}-{s.num_eval}-{s.image_size}"


def ensure_shapes(d) -> Path:
  s = d.shapes
  out = shapes_dir(d)
  synthetic.build(out, num_train=s.num_train, num_eval=s.num_eval, seed=0, image_size=s.image_size)
  return out


def ensure_tokenizer(d):
  """A byte-level BPE trained on the shapes text (a few hundred tokens; saved once in the cache)."""
  import transformers

  path = Path(d.cache) / "tokenizer"
  if is_cached(path, "tokenizer.json"):
    return transformers.AutoTokenizer.from_pretrained(path)
  import tokenizers
  from tokenizers import decoders, pre_tokenizers, trainers

  root = ensure_shapes(d)
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
      vocab_size=512, special_tokens=[EOS, templates.IMAGE_PLACEHOLDER], show_progress=False,
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  fast = transformers.PreTrainedTokenizerFast(
      tokenizer_object=tok, eos_token=EOS, pad_token=EOS,
      additional_special_tokens=[templates.IMAGE_PLACEHOLDER])
  fast.save_pretrained(path)
  stamp(path)
  return fast


# ---------------------------------------------------------------------------------------------
# The teacher.
# ---------------------------------------------------------------------------------------------


def ensure_teacher(d) -> Path:
  """The demo teacher's HF directory: trained once with `recipes.teacher()`, then cached.
  Collective: every process calls it (they train together); process 0 writes the HF directory."""
  out = Path(d.cache) / "teacher_hf"
  run = Path(d.cache) / "teacher_run"
  # Process 0 decides for all: a process that alone skipped the training would leave the others
  # waiting in its collectives.
  if distributed.main_value(int(is_cached(out, "config.json"))):
    return out
  if distributed.is_main() and run.exists() and not is_cached(run, "checkpoints"):
    shutil.rmtree(run)  # checkpoints of a stale teacher: training would resume from them
  distributed.barrier("demo teacher run")
  tcfg = recipes.teacher()
  tcfg.demo.cache, tcfg.demo.shapes = d.cache, d.shapes
  tcfg.total_steps = d.teacher_steps
  tcfg.checkpoint_every = max(1, d.teacher_steps // 2)
  tcfg.student.scratch.image_size = d.shapes.image_size
  if d.vision_steps:
    # A pretrained, frozen tower (as a real LLaVA's CLIP) and a fixed projector that passes its
    # standardised features on; the LM learns to read them (README.md of this package: why).
    tcfg.student.init, tcfg.student.hf_dir = "hf", str(teacher_init(d, tcfg))
    tcfg.trainable = "language_model/.*"
  log.info("demo teacher not cached: training it first (%d steps) in %s", tcfg.total_steps, run)
  if distributed.is_main():
    run.mkdir(parents=True, exist_ok=True)
    stamp(run)
  loop.run(prepare(tcfg), run)
  # Orbax reads are collective too: every process restores, process 0 writes.
  model, params = checkpoint.restore_model(run / "checkpoints")
  if distributed.is_main():
    hf.save(model, params, out, overwrite=True)
    ensure_tokenizer(d).save_pretrained(out)
    stamp(out)
  distributed.barrier("demo teacher")
  return out


def teacher_init(d, tcfg) -> Path:
  """An HF LLaVA to start the demo teacher from: a pretrained tower (tower.py), a fresh projector
  reading standardised features (`tower.projector_init`) and a fresh LM. Every process pretrains the
  same tower (it is small and seeded); process 0 writes."""
  out = Path(d.cache) / "teacher_init_hf"
  if distributed.main_value(int(is_cached(out, "config.json"))):
    return out
  tokenizer = ensure_tokenizer(d)
  tcfg.student.scratch.image_size = d.shapes.image_size
  model = models.build(build.scratch_config(tcfg.student, tokenizer))
  params = models.init_params(model, tcfg.seed)
  log.info("demo teacher: pretraining its vision tower (%d steps)", d.vision_steps)
  root = ensure_shapes(d)
  params["vision_tower"], _ = tower.pretrain(model.cfg, root, steps=d.vision_steps, seed=tcfg.seed)
  pixels, _ = tower.load_split(root, "train", model.cfg, limit=256)
  params["multi_modal_projector"] = tower.projector_init(
      model.cfg, params["multi_modal_projector"], params["vision_tower"], pixels)
  if distributed.is_main():
    hf.save(model, params, out, overwrite=True)
    tokenizer.save_pretrained(out)
    stamp(out)
  distributed.barrier("demo teacher init")
  return out
