"""The run configuration every stage shares; `configs/<stage>.py` files start from `base()`.

Everything `launch/train.py` reads is here, so a command-line override (`--config.optimizer.lr=1e-4`)
reaches it and an unknown key is an error. Models come from one of:
  "hf"       an HF directory (`hf_dir`)
  "workdir"  the latest checkpoint of a previous stage's workdir (`workdir`)
  "compose"  a new LLaVA from a vision-tower HF dir + an LLM HF dir + a fresh projector (the paper's
             student before the adaptor stage)
  "demo"     the embedded default: tiny models for the synthetic shapes set (sizes in `demo`)
"""

from __future__ import annotations

import ml_collections

STAGES = {"teacher": "sft", "adaptor": "sft", "mimic": "mimic", "preference": "preference"}
EXPERT_PARALLEL = ("auto", "all_to_all", "gspmd")


def model_source(init: str = "demo") -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict({
      "init": init,
      "hf_dir": "",
      "workdir": "",
      "vision_hf_dir": "",
      "llm_hf_dir": "",
      "dtype": "float32",
      "param_dtype": "float32",
      "remat": False,
      # Sparse upcycling of the LLM (num_experts 0: keep it dense).
      "upcycle": {"num_experts": 0, "top_k": 2, "layers": "sparse", "seed": 0},
      # expert_parallel: how dropless dispatch crosses the mesh's expert axis (models/moe_block.py):
      # auto | all_to_all (shard_map + all-to-all) | gspmd (XLA places it).
      "moe": {"dispatch": "dropless", "impl": "auto", "capacity_factor": 1.5,
              "eval_capacity_factor": 2.0, "min_capacity": 0, "router_noise": "none",
              "expert_parallel": "auto"},
      # Tiny models of the embedded default (init="demo"). Their init std is near 1/sqrt(hidden), not
      # HF's 0.02 (a large model's): at hidden 128, 0.02 leaves every attention score near 0 and the
      # demo teacher never learned, within 1,600 steps, to look up the object a question names (POPE
      # stayed at chance, even with the objects written out as text).
      "demo": {"hidden_size": 128, "intermediate_size": 256, "num_layers": 4, "num_heads": 4,
               "num_kv_heads": 2, "vision_hidden_size": 96, "vision_layers": 3, "vision_heads": 4,
               "patch_size": 8, "vision_feature_layer": -1, "share_vision_from_teacher": True,
               "initializer_range": 0.1},
  })


def base() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.stage = "mimic"
  c.seed = 0
  c.total_steps = 300
  c.log_every = 10
  c.checkpoint_every = 100
  c.keep_checkpoints = 2
  c.eval_every = 0  # 0: evaluate only at the end
  c.eval_batches = 4
  c.nan_policy = "stop"  # stop | skip (a non-finite step never updates the state either way)
  c.demo_cache = "workdirs/demo_cache"  # synthetic data, tokenizer and demo teacher live here
  c.demo_teacher_steps = 1600  # training steps of the demo teacher when it is not cached yet
  c.demo_vision_steps = 600  # demo teacher's vision-tower pretraining steps (0: none; train/tower.py)
  c.final_report = True  # evaluate student (and teacher) on held-out data at the end

  c.mesh = {"data": -1, "fsdp": 1, "expert": 1, "tensor": 1}
  c.student = model_source("demo")
  c.teacher = model_source("demo")
  c.trainable = "dense_to_sparse"  # a stage in train.optim.STAGE_TRAINABLE or a list of regexes

  c.data = ml_collections.ConfigDict({
      "source": "shapes",  # shapes (the synthetic set in demo_cache) | files
      "train_files": [],
      "weights": [],
      "eval_files": [],
      "image_root": "",
      "tokenizer": "",  # "" -> the student's HF dir (or the demo tokenizer)
      "template": "qwen",
      "image_aspect": "pad",
      "max_length": 128,
      "batch_size": 16,
      "images_per_sample": 1,
      "worker_count": 0,
      "shuffle": True,
      "shapes": {"num_train": 4000, "num_eval": 200, "image_size": 64, "file": "train.jsonl"},
  })
  c.loss = ml_collections.ConfigDict({
      "kl_weight": 1.0, "ce_weight": 0.0, "aux_coef": 0.01, "z_coef": 0.0, "temperature": 1.0,
      "reverse_kl": False, "shift_mask": True, "chunk_size": 0, "vocab_size": 0,
      "beta": 0.1, "loss_type": "sigmoid", "label_smoothing": 0.0,
  })
  c.optimizer = ml_collections.ConfigDict({
      "lr": 2e-5, "warmup_ratio": 0.03, "weight_decay": 0.0, "grad_clip_norm": 1.0,
      "grad_accum_steps": 1, "b1": 0.9, "b2": 0.999, "eps": 1e-8, "end_ratio": 0.0,
  })
  return c


def validate(c: ml_collections.ConfigDict) -> None:
  """Errors a user can act on, before anything is built."""
  def fail(key, msg):
    raise ValueError(f"config.{key}: {msg}")

  if c.stage not in STAGES:
    fail("stage", f"{c.stage!r} is not one of {sorted(STAGES)}")
  for key in ("total_steps", "log_every", "checkpoint_every"):
    if c[key] < 1:
      fail(key, f"must be >= 1, got {c[key]}")
  if c.nan_policy not in ("stop", "skip"):
    fail("nan_policy", f"{c.nan_policy!r}: expected 'stop' or 'skip'")
  for who in ("student", "teacher"):
    src = c[who]
    inits = ("hf", "workdir", "compose", "demo") + (("none",) if who == "teacher" else ())
    if src.init not in inits:
      fail(f"{who}.init", f"{src.init!r}: expected one of {inits}")
    needs = {"hf": ["hf_dir"], "workdir": ["workdir"], "compose": ["vision_hf_dir", "llm_hf_dir"]}
    for key in needs.get(src.init, []):
      if not src[key]:
        fail(f"{who}.{key}", f"required when {who}.init={src.init!r}")
    m = src.moe
    if m.expert_parallel not in EXPERT_PARALLEL:
      fail(f"{who}.moe.expert_parallel", f"{m.expert_parallel!r}: expected one of {EXPERT_PARALLEL}")
    if m.expert_parallel == "all_to_all" and (m.dispatch != "dropless" or m.impl == "dense"):
      fail(f"{who}.moe.expert_parallel", f"'all_to_all' needs {who}.moe.dispatch='dropless' and "
           f"{who}.moe.impl auto|ragged|blocked, got dispatch={m.dispatch!r}, impl={m.impl!r}")
  if STAGES[c.stage] in ("mimic", "preference") and c.teacher.init == "none":
    fail("teacher.init", f"stage {c.stage!r} needs a teacher")
  if c.data.source not in ("shapes", "files"):
    fail("data.source", f"{c.data.source!r}: expected 'shapes' or 'files'")
  if c.data.source == "files" and not c.data.train_files:
    fail("data.train_files", "required when data.source='files'")
  if c.data.batch_size % c.optimizer.grad_accum_steps:
    fail("optimizer.grad_accum_steps", f"{c.optimizer.grad_accum_steps} does not divide "
         f"data.batch_size={c.data.batch_size}")
