"""The run configuration: every field the trainer reads, with its default and what it means.

`configs/<stage>.py` start from `base()` and set their own values; a command-line override
(`--config.optimizer.lr=1e-4`) reaches any field here and an unknown key is an error.

Models come from one of (`student.init`, `teacher.init`):
  hf        an HF directory (`hf_dir`)
  offline   (teacher, mimic stage) no teacher in memory: its top-k logits, stored by
            launch/teacher_logits.py in `logits_dir`, are read with the data
  workdir   the latest checkpoint of a previous stage's workdir (`workdir`)
  compose   a new LLaVA from a vision-tower HF dir + an LLM HF dir + a fresh projector (the paper's
            student before the adaptor stage)
  scratch   a new LLaVA with random weights of the sizes in `scratch`; its vision tower comes from
            `vision_hf_dir` when one is given
  none      no teacher (stages without one)
Configs with a `demo` section (the embedded default) may also say `demo`: `llavamod_jax.demo.prepare`
turns that into the plain inputs above before training (launch/train.py calls it).
"""

from __future__ import annotations

import ast
import dataclasses

import ml_collections
from absl import flags
from ml_collections import config_flags

# Stage name -> the kind of step it trains with (train/steps.py).
STAGES = {"teacher": "sft", "adaptor": "sft", "mimic": "mimic", "preference": "preference"}
INITS = ("hf", "workdir", "compose", "scratch")
EXPERT_PARALLEL = ("auto", "all_to_all", "gspmd")
MOE_DISPATCH, MOE_IMPL = ("dropless", "capacity"), ("auto", "ragged", "blocked", "dense")
ROUTER_NOISE = ("none", "gumbel")


@dataclasses.dataclass(frozen=True)
class LossConfig:
  """The loss options of every step kind (`config.loss` holds the same fields)."""

  kl_weight: float = 1.0  # weight of KL(teacher || student) in the mimic loss
  ce_weight: float = 0.0  # next-token CE weight: the original's only_kd 0 (d2d), kd_lm 1 (d2s)
  aux_coef: float = 0.01  # MoE load-balancing loss coefficient, summed over MoE layers
  z_coef: float = 0.0  # router z-loss coefficient
  temperature: float = 1.0  # both distributions at this temperature
  # mimic: what "kl" is (losses.divergence): forward_kl | reverse_kl | skew_forward_kl |
  # skew_reverse_kl | jsd | soft_ce (the original's -sum p log q, for exact reproduction)
  objective: str = "forward_kl"
  skew_alpha: float = 0.1  # skew objectives: the mixture weight alpha (DistiLLM's 0.1)
  jsd_beta: float = 0.5  # jsd: the generalized JSD's beta (GKD)
  reverse_kl: bool = False  # the older spelling of objective="reverse_kl"
  # mimic, on-policy distillation (GKD; train/on_policy.py): the fraction of steps whose responses
  # the student samples itself (temperature 1), and at most this many tokens per sample
  on_policy_fraction: float = 0.0
  on_policy_max_new_tokens: int = 64
  shift_mask: bool = True  # False: the original's off-by-one distillation mask
  # > 0: KL / CE over sequence chunks of this many positions, no full logits; 0: full logits. Why
  # 128: docs/benchmark_notes.md, change 6; the paper recipes (paper_data) use 512.
  chunk_size: int = 128
  # with chunk_size > 0: the LM heads fused into the loss, the student's gradient computed in the
  # forward pass (losses.fused_*: no head runs twice); False: checkpointed chunks
  fused: bool = True
  vocab_size: int = 0  # distil over the first N logits; 0: the smaller of the two vocabularies
  beta: float = 0.1  # preference: the DPO beta
  loss_type: str = "sigmoid"  # preference: sigmoid (DPO) | kto_pair | ipo | hinge
  label_smoothing: float = 0.0  # preference: conservative DPO's label noise


class ListParser(flags.ArgumentParser):
  """Command-line values of list-valued keys: `--config.data.train_files=a.jsonl,b.jsonl`
  (comma-separated; numbers become numbers, anything else stays a string), or a Python list literal
  (`--config.data.weights='[1, 0.5]'`); an empty value is the empty list."""

  def parse(self, argument):
    if isinstance(argument, (list, tuple)):
      return list(argument)
    text = str(argument).strip()
    if text.startswith("["):
      try:
        value = ast.literal_eval(text)
      except (ValueError, SyntaxError) as e:
        raise ValueError(f"{text!r} is not a list literal: {e}") from None
      if not isinstance(value, list):
        raise ValueError(f"{text!r} is not a list")
      return value
    return [_scalar(part.strip()) for part in text.split(",")] if text else []

  def flag_type(self) -> str:
    return "list"


def _scalar(text: str):
  try:
    value = ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text
  return value if isinstance(value, (int, float)) and not isinstance(value, bool) else text


# Every config file imports this module before its overrides are parsed: list keys take CLI values.
config_flags.register_flag_parser_for_type(list, ListParser())


class ConfigError(ValueError):
  """A run config the user must fix (the message names the key); launch scripts print it alone."""


def model_source(init: str = "scratch") -> ml_collections.ConfigDict:
  """Where the student's or the teacher's model comes from, and how it computes."""
  return ml_collections.ConfigDict({
      "init": init,  # hf | workdir | compose | scratch (| none: no teacher); see the docstring
      "hf_dir": "",  # init=hf: an HF LLaVA (or causal LM) directory
      "workdir": "",  # init=workdir: a training workdir (its latest checkpoint), local or gs://
      # compose, scratch: the vision tower (CLIP/SigLIP dir, or a LLaVA's); hf: the image tower of
      # an original LLaVA-MoD / LLaVA-1.5 checkpoint whose config names it by hub id
      "vision_hf_dir": "",
      "llm_hf_dir": "",  # compose: the language model's HF directory
      "dtype": "float32",  # compute dtype (bfloat16 on accelerators)
      "param_dtype": "float32",  # parameter (and optimizer state) dtype
      "remat": False,  # recompute each decoder layer in the backward pass (less activation memory)
      # what remat keeps: none (remat off) | full (nothing) | save_dots | save_dots_no_batch |
      # save_qkv_proj | save_out_proj | save_dot_except_mlp (models/layers.py)
      "remat_policy": "full",
      "scan_layers": False,  # LM and vision layers as one nn.scan: compile time independent of depth
      "attention": "auto",  # auto | xla (einsum) | cudnn (GPU flash) | splash (TPU Pallas kernel)
      # Sparse upcycling of the LLM (num_experts 0: keep it dense). layers: sparse (0, 2, 4, ...) |
      # first_half | second_half | all | a comma-separated list of indices.
      "upcycle": {"num_experts": 0, "top_k": 2, "layers": "sparse", "seed": 0},
      "moe": {
          "dispatch": "dropless",  # dropless | capacity (the original's DeepSpeed gate)
          "impl": "auto",  # dropless kernel: auto | ragged | blocked | dense
          "capacity_factor": 1.5,  # capacity dispatch, training
          "eval_capacity_factor": 2.0,  # capacity dispatch, evaluation
          "min_capacity": 0,  # capacity dispatch: at least this many slots per expert
          "router_noise": "none",  # none | gumbel (the original's, on the 2nd choice, even at eval)
          "expert_parallel": "auto",  # auto | all_to_all (shard_map) | gspmd (XLA places it)
      },
      # init=scratch: the sizes of a new LLaVA (Qwen2 LM, CLIP tower).
      "scratch": {
          "hidden_size": 128, "intermediate_size": 256, "num_layers": 4, "num_heads": 4,
          "num_kv_heads": 2, "rope_theta": 10000.0, "max_position_embeddings": 1024,
          "initializer_range": 0.02,  # init std of the LM and projector (HF's default)
          "vision_hidden_size": 96, "vision_layers": 3, "vision_heads": 4, "patch_size": 8,
          "image_size": 64, "vision_feature_layer": -1,
      },
  })


def base() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.stage = "mimic"  # teacher | adaptor | mimic | preference (STAGES)
  c.seed = 0  # parameter init of new parts, data order, router noise
  c.total_steps = 300  # optimizer steps
  c.log_every = 10  # metrics.jsonl / TensorBoard / log line every N steps
  c.checkpoint_every = 100  # save every N steps (and at the end, and on SIGTERM)
  c.keep_checkpoints = 2  # how many checkpoints the workdir keeps
  c.eval_every = 0  # held-out loss every N steps (0: never during training)
  c.eval_batches = 4  # batches of data.eval_files per held-out evaluation (0: one pass)
  c.nan_policy = "stop"  # stop | skip (a non-finite step never updates the state either way)
  c.final_report = True  # after training: generate answers on data.report_files, score them

  # Devices: sizes of the mesh axes; -1 takes the devices the others leave.
  c.mesh = {"data": -1, "fsdp": 1, "expert": 1, "tensor": 1}
  c.student = model_source("scratch")
  c.teacher = model_source("none")
  c.teacher.logits_dir = ""  # init=offline: a launch/teacher_logits.py output directory
  c.teacher.top_k = 64  # launch/teacher_logits.py: logits kept per position (plan.py plans with it)
  c.trainable = "dense_to_sparse"  # a stage of train.optim.STAGE_TRAINABLE, or a regex over paths

  c.data = ml_collections.ConfigDict({
      "train_files": [],  # LLaVA JSON / JSONL records; a mixture when several
      "weights": [],  # per-file rates: records of file i per pass = weight * its size (empty: 1)
      "eval_files": [],  # held-out records of the same kind, for eval_every
      "report_files": [],  # conversation records the final report scores (empty: eval_files)
      "image_root": "",  # relative image paths are joined to it ("": each file's directory)
      "tokenizer": "",  # "" -> the student's (HF dir, workdir or LLM dir)
      "template": "qwen",  # qwen (the original's) | chatml | plain
      "image_aspect": "pad",  # pad (to square, mean colour) | square | none
      "max_length": 128,  # tokens per row, image tokens included
      "batch_size": 16,  # global batch (rows; preference: pairs); 0: from per_device_batch_size
      # > 0 (with batch_size 0): rows per device per micro-batch, as the original's
      # per_device_train_batch_size; the global batch is this x the mesh's data x fsdp devices x
      # grad_accum_steps, so a recipe keeps whole rows per device on any slice (resolve_batch)
      "per_device_batch_size": 0,
      "images_per_sample": 1,  # image slots per row
      "worker_count": 0,  # grain worker processes
      "shuffle": True,  # shuffle train_files (seeded; reshuffled every epoch)
  })
  c.loss = ml_collections.ConfigDict(dataclasses.asdict(LossConfig()))  # fields: LossConfig
  c.optimizer = ml_collections.ConfigDict({
      "lr": 2e-5,  # peak learning rate (linear warmup, then cosine)
      "warmup_ratio": 0.03,  # linear warmup over this fraction of total_steps (the original's)
      "end_ratio": 0.0,  # final learning rate as a fraction of lr
      "weight_decay": 0.0,  # AdamW's decoupled weight decay
      "grad_clip_norm": 1.0,  # global-norm clipping (0: none, as the original's DeepSpeed config)
      "grad_accum_steps": 1,  # micro-batches per step; must divide data.batch_size
      "b1": 0.9, "b2": 0.999, "eps": 1e-8,  # AdamW's moment decays and epsilon
  })
  return c


def validate(c: ml_collections.ConfigDict, *, data: bool = True, demo: bool = False) -> None:
  """Errors a user can act on, before anything is built (`data=False`: planning, no data read;
  `demo=True`: a demo config before `demo.prepare` builds its inputs, init 'demo' allowed)."""
  def fail(key, msg):
    raise ConfigError(f"config.{key}: {msg}")

  # The choices of enumerated keys, from the modules that read them (imported here: the config
  # stays importable without jax work).
  from llavamod_jax.data import image, templates  # noqa: PLC0415
  from llavamod_jax.models import attention, configs, layers  # noqa: PLC0415
  DTYPES, REMAT_POLICIES = tuple(configs.DTYPES), tuple(layers.REMAT_POLICIES)
  ATTENTION, TEMPLATES, ASPECTS = attention.IMPLS, tuple(templates.TEMPLATES), image.ASPECTS

  if c.stage not in STAGES:
    fail("stage", f"{c.stage!r} is not one of {sorted(STAGES)}")
  for key in ("total_steps", "log_every", "checkpoint_every"):
    if c[key] < 1:
      fail(key, f"must be >= 1, got {c[key]}")
  for key in ("eval_every", "eval_batches"):
    if c[key] < 0:
      fail(key, f"must be >= 0, got {c[key]}")
  if c.nan_policy not in ("stop", "skip"):
    fail("nan_policy", f"{c.nan_policy!r}: expected 'stop' or 'skip'")
  for who in ("student", "teacher"):
    src = c[who]
    inits = INITS + (("none", "offline") if who == "teacher" else ()) + (("demo",) if demo else ())
    if src.init == "demo" and not demo:
      fail(f"{who}.init", "'demo' is resolved by llavamod_jax.demo.prepare(config) before training "
           "(launch/train.py does it for configs with a demo section)")
    if src.init not in inits:
      fail(f"{who}.init", f"{src.init!r}: expected one of {inits}")
    needs = {"hf": ["hf_dir"], "workdir": ["workdir"], "compose": ["vision_hf_dir", "llm_hf_dir"]}
    for key in needs.get(src.init, []):
      if not src[key]:
        fail(f"{who}.{key}", f"required when {who}.init={src.init!r}")
    m = src.moe
    for key, value, allowed in ((f"{who}.dtype", src.dtype, DTYPES),
                                (f"{who}.param_dtype", src.param_dtype, DTYPES),
                                (f"{who}.remat_policy", src.remat_policy, REMAT_POLICIES),
                                (f"{who}.attention", src.attention, ATTENTION),
                                (f"{who}.moe.dispatch", m.dispatch, MOE_DISPATCH),
                                (f"{who}.moe.impl", m.impl, MOE_IMPL),
                                (f"{who}.moe.router_noise", m.router_noise, ROUTER_NOISE),
                                (f"{who}.moe.expert_parallel", m.expert_parallel, EXPERT_PARALLEL)):
      if value not in allowed:
        fail(key, f"{value!r}: expected one of {allowed}")
    if m.expert_parallel == "all_to_all" and (m.dispatch != "dropless" or m.impl == "dense"):
      fail(f"{who}.moe.expert_parallel", f"'all_to_all' needs {who}.moe.dispatch='dropless' and "
           f"{who}.moe.impl auto|ragged|blocked, got dispatch={m.dispatch!r}, impl={m.impl!r}")
  for key, allowed in (("template", TEMPLATES), ("image_aspect", ASPECTS)):
    if c.data[key] not in allowed:
      fail(f"data.{key}", f"{c.data[key]!r}: expected one of {allowed}")
  if STAGES[c.stage] in ("mimic", "preference") and c.teacher.init == "none":
    fail("teacher.init", f"stage {c.stage!r} needs a teacher")
  if c.teacher.init == "offline":
    if STAGES[c.stage] != "mimic":
      fail("teacher.init", f"'offline' (stored teacher logits) is for the mimic stage, not {c.stage!r}")
    if data and not c.teacher.logits_dir:  # a plan needs only teacher.top_k
      fail("teacher.logits_dir", "required when teacher.init='offline' (launch/teacher_logits.py "
           "writes it)")
  if c.teacher.top_k < 1:
    fail("teacher.top_k", f"must be >= 1, got {c.teacher.top_k}")
  from llavamod_jax import losses  # noqa: PLC0415 (config stays importable without jax work)
  try:
    losses.objective_of(c.loss.objective, c.loss.reverse_kl)
  except ValueError as e:
    fail("loss.objective", str(e))
  if not 0.0 <= c.loss.on_policy_fraction <= 1.0 or c.loss.on_policy_max_new_tokens < 1:
    fail("loss.on_policy_fraction", f"on_policy_fraction={c.loss.on_policy_fraction} must lie in "
         f"[0, 1] and on_policy_max_new_tokens={c.loss.on_policy_max_new_tokens} be >= 1")
  if c.loss.on_policy_fraction > 0 and (STAGES[c.stage] != "mimic" or c.teacher.init == "offline"):
    fail("loss.on_policy_fraction", "on-policy distillation needs the mimic stage with a teacher in "
         f"memory to score the student's samples (stage {c.stage!r}, teacher.init "
         f"{c.teacher.init!r})")
  if not 0.0 <= c.loss.skew_alpha <= 1.0 or not 0.0 <= c.loss.jsd_beta <= 1.0:
    fail("loss.skew_alpha", f"skew_alpha={c.loss.skew_alpha}, jsd_beta={c.loss.jsd_beta}: both "
         "must lie in [0, 1]")
  if data and not c.data.train_files:
    fail("data.train_files", "no training data given")
  if data and c.data.weights and len(c.data.weights) != len(c.data.train_files):
      fail("data.weights", f"{len(c.data.weights)} weights for {len(c.data.train_files)} "
           "data.train_files: give one per file, or none")
  if data and c.eval_every and not c.data.eval_files:
    fail("data.eval_files", f"required when eval_every={c.eval_every}")
  if (c.data.batch_size > 0) == (c.data.per_device_batch_size > 0):
    fail("data.batch_size", f"{c.data.batch_size} with data.per_device_batch_size="
         f"{c.data.per_device_batch_size}: set exactly one of them (> 0), the other to 0")
  if c.optimizer.grad_accum_steps < 1:
    fail("optimizer.grad_accum_steps", f"must be >= 1, got {c.optimizer.grad_accum_steps}")
  if c.data.batch_size % c.optimizer.grad_accum_steps:
    fail("optimizer.grad_accum_steps", f"{c.optimizer.grad_accum_steps} does not divide "
         f"data.batch_size={c.data.batch_size}")


def check_files(c: ml_collections.ConfigDict) -> None:
  """Every file and directory the config names exists (local or gs://): a mistyped path fails
  before anything is loaded, naming the key (and the position in its list)."""
  from llavamod_jax import fileutil  # noqa: PLC0415

  def missing(p: str) -> bool:
    return not fileutil.path(p).exists()

  for key in ("train_files", "eval_files", "report_files"):
    for i, f in enumerate(c.data[key]):
      if missing(f):
        raise ConfigError(f"config.data.{key}: [{i}] {f!r}: no such file")
  for key in ("image_root", "tokenizer"):
    if c.data[key] and missing(c.data[key]):
      raise ConfigError(f"config.data.{key}: {c.data[key]!r}: no such directory")
  for who in ("student", "teacher"):
    src = c[who]
    keys = {"hf": ["hf_dir"], "workdir": ["workdir"], "compose": ["vision_hf_dir", "llm_hf_dir"],
            "scratch": ["vision_hf_dir"]}.get(src.init, [])
    if src.init == "hf":
      keys.append("vision_hf_dir")  # an original checkpoint's image tower, when given
    if src.init == "offline":
      keys = ["logits_dir"]
    for key in keys:
      if src[key] and missing(src[key]):
        what = {"workdir": " (a previous stage's training workdir; train that stage first or "
                "point the key at its workdir)", "logits_dir": " (launch/teacher_logits.py "
                "writes it)"}.get(key, "")
        raise ConfigError(f"config.{who}.{key}: {src[key]!r}: no such directory{what}")


def resolve_batch(c: ml_collections.ConfigDict, mesh) -> int:
  """Set `data.batch_size` from `data.per_device_batch_size` on `mesh` (when that is the one set)
  and return the global batch; either way each micro-batch must split into whole rows over the
  devices that split the batch (data x fsdp)."""
  devices = mesh.shape["data"] * mesh.shape["fsdp"]
  accum = c.optimizer.grad_accum_steps
  if c.data.per_device_batch_size > 0:
    c.data.batch_size = c.data.per_device_batch_size * devices * accum
  micro = c.data.batch_size // accum
  if micro % devices:
    raise ConfigError(
        f"config.data.batch_size={c.data.batch_size} / optimizer.grad_accum_steps={accum} = {micro} "
        f"rows per micro-batch do not split over the {devices} devices of the mesh's data x fsdp "
        f"axes; set data.per_device_batch_size instead (then batch_size=0)")
  return c.data.batch_size


def paper_data(c: ml_collections.ConfigDict, files: list[str], image_root: str, *, batch: int,
               accum: int, lr: float) -> None:
  """The original scripts' training setting at paper scale: 2,048 tokens, per-device batch x
  devices x accumulation (the original's per_device_train_batch_size, on every GPU), bf16 compute and a bf16 frozen teacher, no clipping, chunked KL."""
  c.data.train_files = files
  c.data.image_root = image_root
  c.data.max_length = 2048
  c.data.batch_size = 0
  c.data.per_device_batch_size = batch  # x the slice's batch devices x accum: the global batch
  c.data.worker_count = 8
  c.optimizer.grad_accum_steps = accum
  c.optimizer.lr = lr
  c.optimizer.grad_clip_norm = 0.0  # the original's DeepSpeed config applies no clipping
  c.student.dtype = c.teacher.dtype = "bfloat16"
  c.teacher.param_dtype = "bfloat16"  # frozen: bf16 weights, as the original loads it; the student
  # keeps fp32 parameters (and Adam moments) under bf16 compute
  c.loss.chunk_size = 512
  # Compile once per repeating layer group, not per layer (models/scan.py), and keep no activations
  # of the student's layers for the backward pass: 25.1 -> 11.6 GiB per v5p chip for d2s
  # (docs/scale.md). The teacher runs forward only: remat would change nothing there.
  c.student.scan_layers = c.teacher.scan_layers = True
  c.student.remat = True
  c.total_steps = 10000
  c.log_every = 10
  c.checkpoint_every = 500
