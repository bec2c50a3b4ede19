"""The embedded default's settings: the `demo` config section, its tiny models, the teacher's recipe.

`configs/<stage>.py` build their demo variants from `config(stage)`; `configs/teacher.py` is
`teacher()`. A config with a `demo` section is turned into plain trainer inputs by `demo.prepare`.
"""

from __future__ import annotations

import ml_collections

from llavamod_jax.train.config import base

DEMO_INITIAL_STD = 0.1  # init std of the tiny LMs and projectors (README.md of this package: why)


def section() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict({
      "cache": "workdirs/demo_cache",  # the shapes set, tokenizer and teacher are cached here
      "teacher_steps": 1600,  # training steps of the demo teacher when it is not cached yet
      "vision_steps": 600,  # the teacher's vision-tower pretraining steps (0: none; tower.py)
      "student_vision_from_teacher": True,  # the student starts from the teacher's frozen tower
      # After the run, also train its student with CE alone (`ce_alone`) in WORKDIR/baseline_ce,
      # reported beside it: what distillation adds (mimic only).
      "baseline": False,
      # The synthetic shapes set; `file` is the training file of conversation stages.
      "shapes": {"num_train": 4000, "num_eval": 200, "image_size": 64, "file": "train.jsonl"},
  })


def config(stage: str) -> ml_collections.ConfigDict:
  """`base()` for `stage` on the shapes set, with tiny scratch models where the stage builds one."""
  c = base()
  c.stage = stage
  c.demo = section()
  c.student.init = "demo"
  c.teacher.init = "demo" if stage in ("mimic", "preference") else "none"
  for src in (c.student, c.teacher):
    src.scratch.initializer_range = DEMO_INITIAL_STD
  return c


def ce_alone(cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A prepared mimic config's baseline: the same student (init, seed, upcycling, trainable
  parameters), data, steps and optimizer, trained with next-token CE alone and no teacher."""
  c = cfg.copy_and_resolve_references()
  c.stage = "adaptor"  # a stage of the sft step kind (train/config.py STAGES): CE + MoE aux loss
  c.teacher.init = "none"
  c.loss.on_policy_fraction = 0.0  # the student's own samples are distillation's (GKD)
  return c


def teacher() -> ml_collections.ConfigDict:
  """The demo teacher: a tiny LLaVA trained on shapes. As `demo.prepare` builds it (vision_steps > 0)
  it starts from a pretrained vision tower and a projector of standardised features, both kept
  fixed, and trains the language model from scratch; run on its own, everything trains."""
  c = config("teacher")
  c.trainable = "all"
  c.total_steps = 1600
  c.checkpoint_every = 800
  c.log_every = 25
  c.optimizer.lr = 2e-3
  c.optimizer.warmup_ratio = 0.05
  c.optimizer.weight_decay = 0.01
  # 8 heads of 16, no grouped KV: the LM learned POPE in 4 of 5 seeds (README.md of this package).
  c.student.scratch.num_heads = c.student.scratch.num_kv_heads = 8
  c.final_report = False
  return c
