"""Will a stage fit a slice? Compile its real train step ahead of time and read the memory.

    report = plan.plan(cfg, "v5p-8")        # or "local": the devices of this machine
    report["fits"], report["peak_bytes_per_chip"], report["hbm_bytes_per_chip"]

The stage's teacher and student are built from their config files alone (`build.abstract_model`: no
weights, no data), sharded with the run's mesh and rules over the slice's devices, and the step that
`launch/train.py` runs (`steps.make_train_step`, with the config's batch, sequence length,
accumulation, dtypes, remat and chunking) is lowered on ShapeDtypeStructs and compiled. For a TPU
slice the devices are compile-only ones from libtpu's topology description (`pip install -e
".[tpu]"`), so any machine can plan; the compiled program's memory analysis gives per-chip bytes.

Peak per chip: XLA's peak of the compiled SPMD program's buffers (one chip's share), where it
reports one (TPU), else arguments + outputs - aliased (donated) + temporaries.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import re
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from llavamod_jax import fileutil, models, sharding
from llavamod_jax.data import pipeline, teacher_logits
from llavamod_jax.train import build, flops, optim, steps
from llavamod_jax.train import config as config_lib
from llavamod_jax.train.config import STAGES, LossConfig, validate

GiB = 2**30


@dataclasses.dataclass(frozen=True)
class Slice:
  topology: str  # libtpu's topology name
  chip_config: str | None  # "megacore": one device per chip (v4, v5p have two TensorCores)
  hbm_bytes: int  # per chip


# Cloud TPU slice names -> libtpu topologies. HBM per chip: v4 32 GiB, v5e 16 GiB, v5p 95 GiB,
# v6e 32 GiB (Cloud TPU system architecture pages).
SLICES = {
    "v4-8": Slice("v4:2x2x1", "megacore", 32 * GiB),
    "v4-16": Slice("v4:2x2x2", "megacore", 32 * GiB),
    "v4-32": Slice("v4:2x2x4", "megacore", 32 * GiB),
    "v5p-8": Slice("v5:2x2x1", "megacore", 95 * GiB),
    "v5p-16": Slice("v5:2x2x2", "megacore", 95 * GiB),
    "v5p-32": Slice("v5:2x2x4", "megacore", 95 * GiB),
    "v5e-4": Slice("v5e:2x2", None, 16 * GiB),
    "v5e-8": Slice("v5e:2x4", None, 16 * GiB),
    "v5e-16": Slice("v5e:4x4", None, 16 * GiB),
    "v6e-4": Slice("v6e:2x2", None, 32 * GiB),
    "v6e-8": Slice("v6e:2x4", None, 32 * GiB),
}


class PlanError(ValueError):
  """Bad input: an unknown slice, or a config that cannot be planned."""


def devices_of(topology: str):
  """(devices, HBM bytes per chip or None) of a slice name, or of this machine for "local"."""
  if topology == "local":
    devices = jax.devices()
    stats = devices[0].memory_stats() or {}
    limit = stats.get("bytes_limit")
    if limit is None and devices[0].platform == "cpu":
      limit = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // len(devices)
    return devices, limit
  if topology not in SLICES:
    raise PlanError(f"--topology={topology!r}: expected 'local' or one of {sorted(SLICES)}")
  try:
    from jax.experimental import topologies
  except ImportError as e:  # pragma: no cover - jax ships it
    raise PlanError(f"jax.experimental.topologies is unavailable: {e}") from None
  s = SLICES[topology]
  os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")  # no metadata server off a TPU VM
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # compile-only: no chip to hold a lock on
  kw = {"chip_config_name": s.chip_config} if s.chip_config else {}
  try:
    desc = topologies.get_topology_desc(platform="tpu", topology_name=s.topology, **kw)
  except Exception as e:  # noqa: BLE001 - libtpu missing or refusing the name
    raise PlanError(f"--topology={topology}: libtpu cannot describe {s.topology} ({e}); "
                    "install it with `pip install -e \".[tpu]\"`") from None
  return desc.devices, s.hbm_bytes


def _placed(tree, shardings):
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      tree, shardings)


def abstract_params(model, mesh):
  """ShapeDtypeStructs of `model`'s parameters, each with its NamedSharding over `mesh`."""
  boxed = models.abstract_params(model)
  return _placed(nn.unbox(boxed), sharding.param_shardings(boxed, mesh))


def abstract_state(params, patterns, tx: optax.GradientTransformation, mesh) -> steps.TrainState:
  """The train state `steps.init_state` makes, abstract: optimizer moments sharded like their
  parameters, scalars (step, counts, rng) replicated."""
  replicated = sharding.replicated(mesh)
  trainable, frozen = optim.partition(params, patterns)
  opt_state = jax.eval_shape(tx.init, trainable)
  opt_state = optax.tree_map_params(
      tx, lambda s, p: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=p.sharding), opt_state,
      trainable, transform_non_params=lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype,
                                                                     sharding=replicated))
  rng = jax.eval_shape(lambda: jax.random.key(0))
  return steps.TrainState(
      step=jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated), params=trainable,
      frozen=frozen, opt_state=opt_state,
      rng=jax.ShapeDtypeStruct(rng.shape, rng.dtype, sharding=replicated))


def abstract_batch(cfg, student, teacher, mesh, top_k: int = 0) -> dict:
  """The global batch of one step as the data pipeline makes it (`pipeline.batch_shapes`), padded
  to data.max_length and sharded over (data, fsdp) as `sharding.batch_to_device` puts it; `top_k`:
  with the stored teacher logits (teacher.init=offline)."""
  mode = "preference" if cfg.stage == "preference" else "conversation"
  views = build.views(student, teacher, cfg.data.image_aspect)
  shapes = pipeline.batch_shapes(views, mode, cfg.data.batch_size, cfg.data.max_length,
                                 cfg.data.images_per_sample, top_k)
  rows = sharding.batch_sharding(mesh)
  return {k: jax.ShapeDtypeStruct(shape, dtype, sharding=rows) for k, (shape, dtype) in
          shapes.items()}


def plan(cfg, topology: str = "local", *, hbm_bytes: int | None = None, tokenizer=None,
         compare_attention: bool = False) -> dict:
  """Compile the stage's train step for `topology` and report its per-chip memory (see the module
  docstring) against `hbm_bytes` per chip (default: the slice's HBM). Raises PlanError on bad
  input.

  `compare_attention`: compile the step a second time with attention='xla' (the einsum that holds
  the [q, k] scores) for teacher and student, and report under "attention" what the configured
  kernels save in temporaries per chip."""
  cfg = copy.deepcopy(cfg)  # resolve_batch sets the global batch: the caller's config stays as given
  xla_cfg = None
  if compare_attention:
    xla_cfg = copy.deepcopy(cfg)
    for role in ("student", "teacher"):
      if role in xla_cfg:
        xla_cfg[role].attention = "xla"
  try:
    validate(cfg, data=False)
  except ValueError as e:
    raise PlanError(str(e)) from None
  kind = STAGES[cfg.stage]
  devices, hbm = devices_of(topology)
  hbm = hbm_bytes if hbm_bytes is not None else hbm
  teacher, offline = None, cfg.teacher.init == "offline"
  if kind in ("mimic", "preference") and not offline:
    teacher = build.abstract_model(cfg.teacher, cfg, role="teacher", tokenizer=tokenizer)
  student = build.abstract_model(cfg.student, cfg, role="student", tokenizer=tokenizer)
  loss_cfg, top_k = LossConfig(**cfg.loss.to_dict()), 0
  if offline:  # no teacher in memory; its stored top-k comes with the batch
    top_k, vocab = cfg.teacher.top_k, loss_cfg.vocab_size
    stored = cfg.teacher.logits_dir and fileutil.path(cfg.teacher.logits_dir) / teacher_logits.META
    if stored and stored.exists():
      meta = teacher_logits.read_meta(cfg.teacher.logits_dir)
      top_k, vocab = meta["top_k"], meta["vocab_size"]
    loss_cfg = dataclasses.replace(loss_cfg, vocab_size=vocab)
  try:
    mesh = sharding.make_mesh(cfg.mesh, devices)
    config_lib.resolve_batch(cfg, mesh)  # a per-device batch becomes this slice's global batch
  except ValueError as e:
    raise PlanError(f"{e} (--topology={topology})") from None

  tx, schedule = optim.from_config(cfg.optimizer, cfg.total_steps)
  patterns = optim.trainable_patterns(cfg.trainable)
  sparams = abstract_params(student, mesh)
  state = abstract_state(sparams, patterns, tx, mesh)
  tparams = abstract_params(teacher, mesh) if teacher is not None else None
  batch = abstract_batch(cfg, student, teacher, mesh, top_k)
  step = steps.make_train_step(kind, student, teacher, tx, loss_cfg,
                               grad_accum_steps=cfg.optimizer.grad_accum_steps, schedule=schedule)
  per_chip = lambda tree: sum(_shard_bytes(x) for x in jax.tree.leaves(tree))  # noqa: E731
  t0 = time.time()
  try:
    compiled = step.lower(state, batch, tparams).compile()
  except jax.errors.JaxRuntimeError as e:
    # The TPU compiler refuses a program whose temporaries exceed HBM; its message has their size.
    compiled, temp = None, _refused_temporaries(str(e))
    if temp is None:
      raise
  seconds = time.time() - t0

  if compiled is not None:
    mem = compiled.memory_analysis()
    argument, output = mem.argument_size_in_bytes, mem.output_size_in_bytes
    alias, temp = mem.alias_size_in_bytes, mem.temp_size_in_bytes
    live = argument + output - alias
    # TPU executables report their buffer assignment's peak (temporaries then read 0); others don't.
    peak = max(getattr(mem, "peak_memory_in_bytes", 0) or 0, live + temp)
    temp = peak - live
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  else:  # arguments from their shardings; outputs (the new state) alias them
    argument = per_chip((state, batch, tparams))
    output = alias = per_chip(state)
    peak, cost = argument + temp, None
  chips = len(devices)
  tokens = cfg.data.batch_size * (2 if cfg.stage == "preference" else 1) * cfg.data.max_length
  report = {
      "fits": bool(compiled is not None and (hbm is None or peak <= hbm)),
      "refused_by_compiler": compiled is None,  # temporaries over HBM: the peak is a lower bound
      "peak_bytes_per_chip": int(peak),
      "hbm_bytes_per_chip": int(hbm) if hbm is not None else None,
      "compile_seconds": round(seconds, 2),
      "tokens_per_step": int(tokens),
      "topology": topology,
      "num_chips": chips,
      "mesh": dict(mesh.shape),
      "device_kind": devices[0].device_kind,
      "bytes_per_chip": {
          "trainable_params": per_chip(state.params),
          "frozen_params": per_chip(state.frozen),
          "optimizer_state": per_chip(state.opt_state),
          "teacher_params": per_chip(tparams),
          "batch": per_chip(batch),
          "arguments": int(argument), "outputs": int(output), "aliased": int(alias),
          "temporaries": int(temp),
      },
      "parameters": {"student": _count(sparams), "student_trainable": _count(state.params),
                     "teacher": _count(tparams)},
      # Analytic model FLOPs of the step (train/flops.py), split evenly over the chips; XLA's count
      # sees a scanned layer once and remat's recomputation, so it is kept only for reference.
      "flops_per_chip": step_flops(cfg, kind, student, teacher, patterns) / chips,
      "xla_flops_per_chip": float(cost.get("flops", math.nan)) if cost else math.nan,
      "stage": cfg.stage,
      "batch_size": cfg.data.batch_size,
      "max_length": cfg.data.max_length,
      "grad_accum_steps": cfg.optimizer.grad_accum_steps,
      "teacher": f"stored top-{top_k} logits" if offline else "in memory",
      "attention": {role: attention_impl(cfg[role].attention, devices[0].platform,
                                         cfg[role].dtype)
                    for role in ("student", "teacher") if role == "student" or teacher is not None},
  }
  if xla_cfg is not None:
    einsum = plan(xla_cfg, topology, hbm_bytes=hbm_bytes, tokenizer=tokenizer)
    report["attention"].update(
        xla_peak_bytes_per_chip=einsum["peak_bytes_per_chip"],
        xla_temporaries_bytes_per_chip=einsum["bytes_per_chip"]["temporaries"],
        xla_refused_by_compiler=einsum["refused_by_compiler"],
        saved_bytes_per_chip=einsum["peak_bytes_per_chip"] - report["peak_bytes_per_chip"])
  return report


def attention_impl(key: str, platform: str, dtype: str) -> str:
  """What `attention=key` runs for the 2,048-token training self-attention on `platform`
  (models/attention.resolve; head dims the paper's models have)."""
  if key != "auto":
    return key
  if platform == "gpu" and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16):
    return "cudnn"
  return "splash" if platform == "tpu" else "xla"


_UNITS = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def _refused_temporaries(message: str) -> int | None:
  """Bytes of temporaries in the TPU compiler's "Ran out of memory" refusal, else None."""
  m = re.search(r"memory required for HLO temporaries \(([\d.]+)([KMGT])\)", message)
  return int(float(m.group(1)) * _UNITS[m.group(2)]) if m else None


_PART_PATHS = {"ffn": "language_model/layers_0/mlp/gate_proj/kernel",
               "attn_proj": "language_model/layers_0/self_attn/q_proj/kernel",
               "head": "language_model/lm_head/kernel"}


def step_flops(cfg, kind: str, student, teacher, patterns) -> float:
  """Analytic FLOPs of one optimizer step: which LM weights get gradients is read off the trainable
  patterns (the unrolled paths they name)."""
  compiled = [re.compile(p) for p in patterns]
  parts = tuple(part for part, path in _PART_PATHS.items()
                if any(c.fullmatch(path) for c in compiled))
  rows = cfg.data.batch_size * (2 if kind == "preference" else 1)
  images = rows * cfg.data.images_per_sample
  return flops.step_flops(kind, student, teacher, rows, cfg.data.max_length, images, parts)


def _shard_bytes(x) -> int:
  shape = x.sharding.shard_shape(x.shape) if getattr(x, "sharding", None) is not None else x.shape
  return math.prod(shape) * x.dtype.itemsize  # PRNG key dtypes too (the state's rng)


def _count(tree) -> int:
  return sum(math.prod(x.shape) for x in jax.tree.leaves(tree)) if tree is not None else 0


def summary(report: dict) -> str:
  """The plan as a few readable lines."""
  b, gib = report["bytes_per_chip"], lambda n: f"{n / GiB:.2f} GiB"  # noqa: E731
  hbm = report["hbm_bytes_per_chip"]
  if hbm is None:
    verdict = "no memory limit known for these devices"
  elif report["fits"]:
    verdict = f"FITS: {gib(report['peak_bytes_per_chip'])} of {gib(hbm)} per chip " \
              f"({gib(hbm - report['peak_bytes_per_chip'])} to spare)"
  else:
    at_least = "at least " if report["refused_by_compiler"] else ""
    verdict = f"DOES NOT FIT: {at_least}{gib(report['peak_bytes_per_chip'])} per chip, " \
              f"{gib(report['peak_bytes_per_chip'] - hbm)} over the {gib(hbm)} of HBM"
    if report["refused_by_compiler"]:
      verdict += " (the TPU compiler refused the program)"
  p = report["parameters"]
  return "\n".join([
      f"stage {report['stage']} on {report['topology']} ({report['num_chips']} x "
      f"{report['device_kind']}, mesh {report['mesh']}): {verdict}",
      f"  per chip: student trainable {gib(b['trainable_params'])}, frozen "
      f"{gib(b['frozen_params'])}, optimizer state {gib(b['optimizer_state'])}, teacher "
      f"{gib(b['teacher_params'])}, batch {gib(b['batch'])}, temporaries {gib(b['temporaries'])}",
      f"  parameters: student {p['student']:,} ({p['student_trainable']:,} trainable), teacher "
      + (f"{p['teacher']:,}" if report.get("teacher", "in memory") == "in memory"
         else f"none in memory ({report['teacher']})"),
      f"  step: {report['tokens_per_step']:,} tokens (batch {report['batch_size']} x "
      f"{report['max_length']}, {report['grad_accum_steps']} micro-batches), "
      f"{report['flops_per_chip']:.3g} model FLOPs per chip; compiled in "
      f"{report['compile_seconds']:.1f} s",
  ] + _attention_line(report))


def _attention_line(report: dict) -> list[str]:
  a = report.get("attention", {})
  impls = ", ".join(f"{role} {a[role]}" for role in ("student", "teacher") if role in a)
  if "saved_bytes_per_chip" not in a:
    return [f"  attention: {impls}"] if impls else []
  at_least = "at least " if a["xla_refused_by_compiler"] else ""
  return [f"  attention: {impls}; with xla (the einsum) the peak would be {at_least}"
          f"{a['xla_peak_bytes_per_chip'] / GiB:.2f} GiB per chip: these kernels save "
          f"{at_least}{a['saved_bytes_per_chip'] / GiB:.2f} GiB"]
