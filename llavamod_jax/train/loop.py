"""The training loop of every stage: config -> data -> models -> step -> loop -> checkpoints.

Reads top to bottom: build what the config names, restore the latest checkpoint of the workdir if
there is one (params, optimizer state, step, rng and the data iterator, so the run continues on exactly
the batches it would have seen), then step, log and checkpoint. Side effects live here: files,
logging, signals.

WORKDIR layout: checkpoints/<step>/ (orbax), tokenizer/, run.json (what readers need: template,
image settings), config.json, metrics.jsonl, tensorboard/, loss_curves.png. WORKDIR may be a gs://
URI (fileutil.path): every file here is written whole, since an object store cannot append.

Several processes (jax.distributed started by launch/train.py): every process runs this same loop on
its own rows of each global batch (data.pipeline) and meets the others in the jitted step and in
orbax's saves; process 0 alone writes the workdir's other files. Whatever one process decides must
be decided by all (a SIGTERM is agreed on at logging steps, see `run`).
"""

from __future__ import annotations

import functools
import io
import json
import logging
import math
import signal
import time
from pathlib import Path

import grain
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from llavamod_jax import checkpoint, distributed, fileutil, models, sharding
from llavamod_jax import workdir as workdir_lib
from llavamod_jax.models import configs as model_configs
from llavamod_jax.train import build, optim, steps
from llavamod_jax.train.config import STAGES, validate

log = logging.getLogger(__name__)
OPT_STATE, TRAIN_STATE, DATA = checkpoint.OPT_STATE, checkpoint.TRAIN_STATE, checkpoint.DATA


class NonFiniteLoss(RuntimeError):
  pass


# ---------------------------------------------------------------------------------------------
# Devices.
# ---------------------------------------------------------------------------------------------


def make_mesh(cfg) -> Mesh:
  axes = ("data", "fsdp", "expert", "tensor")
  sizes = [int(cfg.mesh[a]) for a in axes]
  n = jax.device_count()
  fixed = math.prod(s for s in sizes if s != -1)
  if sizes.count(-1) > 1 or n % fixed:
    raise ValueError(f"config.mesh {dict(zip(axes, sizes))} does not fit {n} devices "
                     f"(at most one -1; the others must divide the device count)")
  sizes = [n // fixed if s == -1 else s for s in sizes]
  if math.prod(sizes) != n:
    raise ValueError(f"config.mesh {dict(zip(axes, sizes))} uses {math.prod(sizes)} devices, "
                     f"{n} are present")
  return Mesh(np.asarray(jax.devices()).reshape(sizes), axes)


def place(model, params, mesh: Mesh):
  shardings = sharding.param_shardings(models.abstract_params(model), mesh)
  return jax.tree.map(_put, params, shardings)


def _put(x, target: NamedSharding):
  if target.is_fully_addressable:
    return jax.device_put(x, target)
  # A multi-process mesh: an array on this process's devices cannot be sent to the others' (no
  # cross-host transfers on CPU); every process holds the same values, so each one places its own
  # shards from its host copy.
  if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):  # keys have no host form; their data does
    data = jax.device_put(np.asarray(jax.random.key_data(x)), target)
    return jax.random.wrap_key_data(data, impl=jax.random.key_impl(x))
  return jax.device_put(np.asarray(x), target)


def replicate_unplaced(tree, mesh: Mesh):
  """Leaves not on `mesh` (scalars made outside jit: the step, optimizer counts, the rng) ->
  replicated on it. The step returns them so; inputs placed the same way let the first step's
  compilation serve every later step (and several processes need global arrays anyway)."""
  replicated = NamedSharding(mesh, PartitionSpec())

  def put(x):
    placed = isinstance(getattr(x, "sharding", None), NamedSharding) and x.sharding.mesh == mesh
    return x if placed else _put(x, replicated)

  return jax.tree.map(put, tree)


def batch_to_device(batch: dict, mesh: Mesh) -> dict:
  """This process's numpy batch -> global arrays sharded along the batch axis over (data, fsdp).

  Process p's rows become block p of the global batch, which is the one-process batch (see
  data.pipeline). A preference batch (twice as many rows as examples: this process's chosen rows,
  then its rejected rows) is regrouped across processes into all chosen rows, then all rejected
  rows, the layout the preference step splits in half."""
  spec = NamedSharding(mesh, PartitionSpec(("data", "fsdp")))
  drop = {"example_mask"}
  pairs = (jax.process_count() > 1
           and batch["input_ids"].shape[0] == 2 * batch["example_mask"].shape[0])
  out = {}
  for k, v in batch.items():
    if k in drop:
      continue
    x = jax.make_array_from_process_local_data(spec, np.asarray(v))
    out[k] = _chosen_then_rejected(x, jax.process_count(), spec) if pairs else x
  return out


def pair_order(processes: int, rows: int) -> np.ndarray:
  """Global row order that turns per-process blocks [chosen_p (rows), rejected_p (rows)], p = 0..P-1,
  into [chosen_0 .. chosen_P-1, rejected_0 .. rejected_P-1]."""
  return np.arange(processes * 2 * rows).reshape(processes, 2, rows).transpose(1, 0, 2).reshape(-1)


@functools.partial(jax.jit, static_argnames=("processes", "sharding"))
def _chosen_then_rejected(x, processes: int, sharding):
  # Leading axis: rows, or image slots (K per row, owned in row order): both split the same way.
  order = pair_order(processes, x.shape[0] // (2 * processes))
  return jax.lax.with_sharding_constraint(x[order], sharding)


# ---------------------------------------------------------------------------------------------
# Metrics.
# ---------------------------------------------------------------------------------------------


class MetricWriter:
  """metrics.jsonl (one object per logged step) + TensorBoard scalars; process 0 writes.

  A remote workdir (gs://) has no append: the writer keeps the file's lines and rewrites it whole at
  every logged step. TensorBoard writes there only if its file system support reaches the store
  (gcsfs, or TensorFlow's gfile); if not, there are no event files, with a warning."""

  def __init__(self, workdir: fileutil.AnyPath):
    self.enabled = jax.process_index() == 0
    self.path = workdir / "metrics.jsonl"
    self._lines = None  # remote: the file's lines, rewritten whole
    self._tb = None
    if not self.enabled:
      return
    if fileutil.is_remote(workdir):
      self._lines = self.path.read_text().splitlines(keepends=True) if self.path.exists() else []
    try:
      from tensorboard.summary.writer.event_file_writer import EventFileWriter
    except ImportError:
      log.warning("tensorboard is not installed: no event files (metrics.jsonl is written)")
      return
    try:
      self._tb = EventFileWriter(str(workdir / "tensorboard"))
    except Exception as e:  # noqa: BLE001 - e.g. gs:// without gcsfs: train on, without event files
      self._tb_failed(e)

  def _tb_failed(self, e: Exception) -> None:
    log.warning("tensorboard cannot write to %s (%s: %s): no event files from now on "
                "(metrics.jsonl is written)", self.path.parent / "tensorboard", type(e).__name__, e)
    self._tb = None

  def write(self, step: int, scalars: dict[str, float]) -> None:
    if not self.enabled:
      return
    line = json.dumps({"step": step, **scalars}) + "\n"
    if self._lines is None:
      with open(self.path, "a") as f:
        f.write(line)
    else:
      self._lines.append(line)
      self.path.write_text("".join(self._lines))
    if self._tb is not None:
      from tensorboard.compat.proto import event_pb2, summary_pb2
      values = [summary_pb2.Summary.Value(tag=k, simple_value=float(v)) for k, v in scalars.items()]
      try:
        self._tb.add_event(event_pb2.Event(wall_time=time.time(), step=step,
                                           summary=summary_pb2.Summary(value=values)))
        self._tb.flush()
      except Exception as e:  # noqa: BLE001 - the async writer reports a failed write here
        self._tb_failed(e)

  def truncate_after(self, step: int) -> None:
    """A resumed run rewrites the steps after its checkpoint: drop the stale lines."""
    if self.enabled and self.path.exists():
      keep = [l + "\n" for l in self.path.read_text().splitlines() if json.loads(l)["step"] <= step]
      self.path.write_text("".join(keep))
      if self._lines is not None:
        self._lines = keep

  def close(self):
    if self._tb is not None:
      try:
        self._tb.close()
      except Exception as e:  # noqa: BLE001
        self._tb_failed(e)


def plot_losses(workdir: fileutil.AnyPath) -> fileutil.AnyPath | None:
  path = workdir / "metrics.jsonl"
  if jax.process_index() != 0 or not path.exists():
    return None
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  rows = [json.loads(l) for l in path.read_text().splitlines()]
  names = [k for k in ("loss", "kl", "ce", "aux", "preference") if any(k in r for r in rows)]
  fig, axes = plt.subplots(1, len(names), figsize=(4 * len(names), 3), squeeze=False)
  for ax, name in zip(axes[0], names):
    pts = [(r["step"], r[name]) for r in rows if name in r]
    ax.plot(*zip(*pts))
    ax.set_title(name)
    ax.set_xlabel("step")
  fig.tight_layout()
  png = io.BytesIO()  # matplotlib writes local files only; bytes go anywhere
  fig.savefig(png, format="png", dpi=80)
  plt.close(fig)
  out = workdir / "loss_curves.png"
  out.write_bytes(png.getvalue())
  return out


# ---------------------------------------------------------------------------------------------
# Checkpoints.
# ---------------------------------------------------------------------------------------------


def _manager(workdir: fileutil.AnyPath, cfg) -> ocp.CheckpointManager:
  return checkpoint.manager(workdir / "checkpoints", max_to_keep=cfg.keep_checkpoints)


def _save(mngr, step: int, model, state: steps.TrainState, data_iter) -> None:
  if step in mngr.all_steps():
    return
  mngr.save(step, args=ocp.args.Composite(**{
      checkpoint.PARAMS: ocp.args.StandardSave(state.full_params()),
      checkpoint.MODEL_CONFIG: ocp.args.JsonSave(model_configs.to_dict(model.cfg)),
      OPT_STATE: ocp.args.StandardSave(state.opt_state),
      TRAIN_STATE: ocp.args.JsonSave({"step": step, "optimizer_step": int(state.step),
                                      "rng": np.asarray(jax.random.key_data(state.rng)).tolist()}),
      DATA: grain.checkpoint.CheckpointSave(data_iter),
  }), force=True)


def _restore(mngr, step: int, state: steps.TrainState, patterns, data_iter) -> steps.TrainState:
  abstract = lambda tree: jax.tree.map(  # noqa: E731
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)
  got = checkpoint.restore_items(mngr, step, {
      checkpoint.PARAMS: ocp.args.StandardRestore(abstract(state.full_params())),
      OPT_STATE: ocp.args.StandardRestore(abstract(state.opt_state)),
      TRAIN_STATE: ocp.args.JsonRestore(),
      DATA: grain.checkpoint.CheckpointRestore(data_iter),
  })
  trainable, frozen = optim.partition(got[checkpoint.PARAMS], patterns)
  meta = got[TRAIN_STATE]
  rng = jax.random.wrap_key_data(jnp.asarray(meta["rng"], jnp.uint32))
  return state.replace(step=jnp.int32(meta["optimizer_step"]), params=trainable, frozen=frozen,
                       opt_state=got[OPT_STATE], rng=rng)


# ---------------------------------------------------------------------------------------------
# The run.
# ---------------------------------------------------------------------------------------------


def _write_run_info(workdir: fileutil.AnyPath, cfg, model, tokenizer,
                    teacher_dir: str | None) -> None:
  """run.json, tokenizer/ and config.json: what evaluate / chat / export read besides weights."""
  if jax.process_index() != 0:
    return
  files, root = build.eval_files(cfg)
  files = tuple(str(Path(f).resolve()) for f in files)  # readers may run from anywhere
  root = str(Path(root).resolve()) if root else None
  fileutil.save_pretrained(tokenizer, workdir / "tokenizer")
  workdir_lib.RunInfo(
      template=cfg.data.template, stage=cfg.stage, teacher=teacher_dir,
      image=workdir_lib.ImageSettings("clip" if model.cfg.vision.is_clip else "siglip",
                                      model.cfg.vision.image_size, cfg.data.image_aspect),
      image_token_id=model.cfg.image_token_id, num_image_tokens=model.cfg.num_image_tokens,
      eos_token_id=tokenizer.eos_token_id,
      pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0,
      data=workdir_lib.DataSettings(files, root),
  ).write(workdir)
  (workdir / "config.json").write_text(cfg.to_json_best_effort(indent=2))


def _teacher_dir(cfg) -> str | None:
  src = cfg.teacher
  if src.init == "hf":
    return str(Path(src.hf_dir).resolve())
  if src.init == "workdir":
    return src.workdir if fileutil.is_remote(src.workdir) else str(Path(src.workdir).resolve())
  if src.init == "demo":
    return str(build.ensure_demo_teacher(cfg).resolve())
  return None


def run(cfg, workdir) -> dict[str, float]:
  """Train `cfg` in `workdir` (resuming from its latest checkpoint); returns the last metrics."""
  validate(cfg)
  workdir = fileutil.path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  kind = STAGES[cfg.stage]
  build.prepare_demo_assets(cfg)

  # Config -> tokenizer, models.
  tokenizer = build.tokenizer_for(cfg)
  teacher = None
  if kind in ("mimic", "preference"):
    teacher = build.load_model(cfg.teacher, tokenizer, cfg, role="teacher")
  student, params = build.load_model(cfg.student, tokenizer, cfg, role="student", teacher=teacher)
  _write_run_info(workdir, cfg, student, tokenizer, _teacher_dir(cfg) if teacher else None)

  # Devices.
  mesh = make_mesh(cfg)
  params = place(student, params, mesh)
  teacher_model, teacher_params = (None, None) if teacher is None else (
      teacher[0], place(teacher[0], teacher[1], mesh))

  # Data.
  files, root = build.train_files(cfg)
  data = build.data_pipeline(cfg, tokenizer, student, teacher_model, files, root, seed=cfg.seed,
                             shuffle=cfg.data.shuffle, num_epochs=None)
  data_iter = iter(data)

  # Optimizer, state, step.
  o = cfg.optimizer
  tx, schedule = optim.adamw(o.lr, cfg.total_steps, warmup_ratio=o.warmup_ratio,
                             weight_decay=o.weight_decay, b1=o.b1, b2=o.b2, eps=o.eps,
                             grad_clip_norm=o.grad_clip_norm, end_ratio=o.end_ratio)
  patterns = optim.trainable_patterns(cfg.trainable if isinstance(cfg.trainable, str)
                                      else list(cfg.trainable))
  state = replicate_unplaced(steps.init_state(params, patterns, tx, cfg.seed), mesh)
  del params
  loss_cfg = steps.LossConfig(**cfg.loss.to_dict())
  train_step = steps.make_train_step(kind, student, teacher_model, tx, loss_cfg,
                                     grad_accum_steps=o.grad_accum_steps, schedule=schedule)

  # Checkpoint: resume if the workdir has one.
  mngr = _manager(workdir, cfg)
  writer = MetricWriter(workdir)
  start = 0
  if mngr.latest_step() is not None:
    start = mngr.latest_step()
    state = replicate_unplaced(_restore(mngr, start, state, patterns, data_iter), mesh)
    writer.truncate_after(start)
    log.info("resumed from %s/checkpoints/%d", workdir, start)

  # SIGTERM (preemption): finish the current step, save, exit. With several processes the signal may
  # reach only some of them, and all must stop at the same step (the save is collective): they agree
  # at each logging step, where the host waits for the devices anyway.
  stop = {"signal": None}
  multi = jax.process_count() > 1
  previous = signal.signal(signal.SIGTERM, lambda signum, frame: stop.update(signal=signum))

  n_trainable = sum(x.size for x in jax.tree.leaves(state.params))
  log.info("stage %s (%s step): %d steps from %d, %s trainable parameters, batch %d, workdir %s",
           cfg.stage, kind, cfg.total_steps, start, f"{n_trainable:,}", cfg.data.batch_size, workdir)
  last, pending, skipped, stopping = {}, [], 0, False
  t0, tokens, timed_steps = time.time(), 0, 0
  step = start
  try:
    while step < cfg.total_steps:
      batch = next(data_iter)
      tokens += int(batch["attention_mask"].sum())
      state, metrics = train_step(state, batch_to_device(batch, mesh), teacher_params)
      step += 1
      pending.append(metrics)
      if int(metrics["skipped"]):
        skipped += 1
        msg = f"step {step}: non-finite loss or gradient (loss {float(metrics['loss'])})"
        if cfg.nan_policy == "stop":
          raise NonFiniteLoss(msg + "; stopping (nan_policy='stop'); the last checkpoint is intact")
        log.warning("%s; update skipped (nan_policy='skip', %d so far)", msg, skipped)
      logging_step = step % cfg.log_every == 0 or step == cfg.total_steps
      if logging_step:
        host = jax.device_get(pending)
        last = {k: float(np.mean([m[k] for m in host])) for k in host[-1]}
        elapsed = time.time() - t0
        timed_steps += len(pending)
        last["tokens_per_sec"] = distributed.total(tokens) / max(elapsed, 1e-9)
        last["skipped_total"] = skipped
        writer.write(step, last)
        eta = elapsed / timed_steps * (cfg.total_steps - step)
        shown = " ".join(f"{k} {last[k]:.4g}" for k in ("loss", "kl", "ce", "aux", "preference")
                         if k in last)
        log.info("step %d/%d | %s | lr %.2e | %.0f tok/s | ETA %s", step, cfg.total_steps, shown,
                 last.get("learning_rate", 0.0), last["tokens_per_sec"],
                 time.strftime("%H:%M:%S", time.gmtime(eta)))
        pending, tokens, t0, timed_steps = [], 0, time.time(), 0
      if not multi:
        stopping = stop["signal"] is not None
      elif logging_step:
        stopping = distributed.any_process(stop["signal"] is not None)
      if step % cfg.checkpoint_every == 0 or step == cfg.total_steps or stopping:
        _save(mngr, step, student, state, data_iter)
      if stopping:
        log.warning("signal %s: saved checkpoint %d, exiting", stop["signal"] or "(another process)",
                    step)
        break
  finally:
    mngr.wait_until_finished()
    mngr.close()
    writer.close()
    signal.signal(signal.SIGTERM, previous)
  log.info("data: %s", _data_summary(data_iter))
  if step >= cfg.total_steps:
    plot_losses(workdir)
  return last


def _data_summary(it) -> str:
  from llavamod_jax.data import pipeline
  return pipeline.summary(it.stats())
