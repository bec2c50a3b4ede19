"""The training loop of every stage: devices -> restart check -> models -> data -> step -> restore ->
train -> report.

Reads top to bottom: build what the config names, place it on the mesh, restore the newest checkpoint
of the workdir that restores, if there is one (params, optimizer state, step, rng and the data
iterator, so the run continues on exactly the batches it would have seen; a changed config or a
damaged checkpoint is handled by train/resume.py), then step, log, evaluate and checkpoint. Side
effects live here: files, logging, signals.

WORKDIR layout: checkpoints/<step>/ (checkpoint.py), tokenizer/, run.json (what readers need:
template, image settings), config.json, metrics.jsonl, tensorboard/, loss_curves.png. WORKDIR may be
a gs:// URI (fileutil.path): every file here is written whole, since an object store cannot append.

Several processes (jax.distributed started by launch/train.py): every process runs this same loop on
its own rows of each global batch (data.pipeline) and meets the others in the jitted step and in
orbax's saves; process 0 alone writes the workdir's other files. Whatever one process decides must
be decided by all (a SIGTERM is agreed on at logging steps).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import signal
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from llavamod_jax import checkpoint, distributed, fileutil, sharding
from llavamod_jax import workdir as workdir_lib
from llavamod_jax.data import pipeline
from llavamod_jax.train import build, metrics, on_policy, optim, resume, steps
from llavamod_jax.train import config as config_lib
from llavamod_jax.train.config import STAGES, LossConfig, validate

log = logging.getLogger(__name__)


class NonFiniteLoss(RuntimeError):
  pass


def run(cfg, workdir) -> dict[str, float]:
  """Train `cfg` in `workdir` (resuming from its latest checkpoint); returns the last metrics."""
  validate(cfg)
  config_lib.check_files(cfg)
  workdir = fileutil.path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  kind = STAGES[cfg.stage]

  # ------------------------------------------------------------------------------------------
  # Devices: the mesh (a per-device batch makes the global batch from it).
  # ------------------------------------------------------------------------------------------
  mesh = sharding.make_mesh(cfg.mesh)
  config_lib.resolve_batch(cfg, mesh)

  # Orbax's manager runs background threads: closed on every way out, or they outlive the error.
  with checkpoint.manager(workdir / "checkpoints", max_to_keep=cfg.keep_checkpoints) as mngr:
    # ----------------------------------------------------------------------------------------
    # Restart: the workdir's run goes on only with the data it was trained on (train/resume.py).
    # ----------------------------------------------------------------------------------------
    changes = []
    previous = resume.previous_config(workdir) if mngr.latest_step() is not None else None
    if previous is not None:
      changes = resume.config_changes(previous, cfg)
      resume.check_data(workdir, changes)

    # ----------------------------------------------------------------------------------------
    # Models: the tokenizer, the teacher (mimic, preference), the student.
    # ----------------------------------------------------------------------------------------
    tokenizer = build.tokenizer_for(cfg)
    teacher, teacher_params, stored = None, None, None
    if kind in ("mimic", "preference") and cfg.teacher.init != "offline":
      teacher, teacher_params = build.load_model(cfg.teacher, tokenizer, cfg, role="teacher")
    student, params = build.load_model(cfg.student, tokenizer, cfg, role="student")
    if cfg.teacher.init == "offline":  # no teacher in memory: its top-k logits come with the data
      stored = build.stored_teacher_logits(cfg, student)
      log.info("teacher: stored top-%d logits of %d records in %s", stored.top_k, len(stored),
               cfg.teacher.logits_dir)
    params = sharding.place(student, params, mesh)  # every parameter split by its logical axes
    if teacher is not None:
      teacher_params = sharding.place(teacher, teacher_params, mesh)

    # ----------------------------------------------------------------------------------------
    # Data: an endless, checkpointable iterator over this process's rows of every global batch.
    # ----------------------------------------------------------------------------------------
    data = build.data_pipeline(cfg, tokenizer, student, teacher, cfg.data.train_files,
                               seed=cfg.seed, shuffle=cfg.data.shuffle, num_epochs=None,
                               weights=cfg.data.weights, stored=stored)
    data_iter = iter(data)

    # ----------------------------------------------------------------------------------------
    # Optimizer, state, steps.
    # ----------------------------------------------------------------------------------------
    tx, schedule = optim.from_config(cfg.optimizer, cfg.total_steps)
    patterns = optim.trainable_patterns(cfg.trainable)
    state = sharding.replicate_unplaced(steps.init_state(params, patterns, tx, cfg.seed), mesh)
    del params
    loss_cfg = LossConfig(**cfg.loss.to_dict())
    if stored is not None:  # the student's logits cut to the vocabulary the top-k was taken over
      loss_cfg = dataclasses.replace(loss_cfg, vocab_size=stored.meta["vocab_size"])
    train_step = steps.make_train_step(kind, student, teacher, tx, loss_cfg,
                                       grad_accum_steps=cfg.optimizer.grad_accum_steps,
                                       schedule=schedule)
    sample = on_policy_sampler(cfg, tokenizer, student, teacher)
    evaluate = (held_out_evaluation(cfg, tokenizer, student, teacher, mesh, stored, loss_cfg)
                if cfg.eval_every else None)

    # ----------------------------------------------------------------------------------------
    # Restore: the newest checkpoint of the workdir that restores (damaged ones are set aside).
    # ----------------------------------------------------------------------------------------
    restored = resume.restore_newest(
        mngr, lambda step: restore(mngr, step, state, patterns, data_iter), workdir=workdir,
        expected={checkpoint.PARAMS: state.full_params(), checkpoint.OPT_STATE: state.opt_state},
        changes=changes, model_cfg=student.cfg)
    start, writer = 0, metrics.MetricWriter(workdir)
    if restored is not None:
      start, state = restored
      state = sharding.replicate_unplaced(state, mesh)
      writer.truncate_after(start)
      log.info("resumed from %s/checkpoints/%d", workdir, start)
    write_run_info(workdir, cfg, student, tokenizer)

    # ----------------------------------------------------------------------------------------
    # Train: step, log, evaluate, save.
    # ----------------------------------------------------------------------------------------
    n_trainable = sum(x.size for x in jax.tree.leaves(state.params))
    log.info("stage %s (%s step): %d steps from %d, %s trainable parameters, batch %d, workdir %s",
             cfg.stage, kind, cfg.total_steps, start, f"{n_trainable:,}", cfg.data.batch_size,
             workdir)
    last, pending, skipped = {}, [], 0
    t0, tokens = time.time(), 0
    step = start
    with _preemption() as preempted, contextlib.closing(writer):
      while step < cfg.total_steps:
        batch = next(data_iter)
        if sample is not None:
          batch = sample(step, state, batch)
        tokens += int(batch["attention_mask"].sum())
        state, step_metrics = train_step(state, sharding.batch_to_device(batch, mesh),
                                         teacher_params)
        step += 1
        pending.append(step_metrics)
        if int(step_metrics["skipped"]):
          skipped += 1
          msg = f"step {step}: non-finite loss or gradient (loss {float(step_metrics['loss'])})"
          if cfg.nan_policy == "stop":
            raise NonFiniteLoss(msg + "; stopping (nan_policy='stop'); the last checkpoint is intact")
          log.warning("%s; update skipped (nan_policy='skip', %d so far)", msg, skipped)

        final = step == cfg.total_steps
        logging_step = step % cfg.log_every == 0 or final
        scalars = {}
        if logging_step:
          last = _summary(cfg, step, pending, tokens, time.time() - t0, skipped)
          scalars.update(last)
          pending, tokens, t0 = [], 0, time.time()
        if evaluate is not None and (step % cfg.eval_every == 0 or final):
          e0 = time.time()
          scalars.update(evaluate(state.full_params(), teacher_params))
          t0 += time.time() - e0  # throughput counts training only
        if scalars:
          writer.write(step, scalars)

        stopping = preempted(logging_step)
        if step % cfg.checkpoint_every == 0 or final or stopping:
          save(mngr, step, student, state, data_iter)
        if stopping:
          log.warning("SIGTERM: saved checkpoint %d, exiting", step)
          break

  # ------------------------------------------------------------------------------------------
  # Report.
  # ------------------------------------------------------------------------------------------
  log.info("data: %s", pipeline.summary(data_iter.stats()))
  if step >= cfg.total_steps:
    metrics.plot_losses(workdir)
  return last


# ---------------------------------------------------------------------------------------------
# The loop's parts.
# ---------------------------------------------------------------------------------------------


def _summary(cfg, step: int, pending: list, tokens: int, elapsed: float, skipped: int) -> dict:
  """The logged metrics of the steps since the last logging step (their means), and the log line."""
  host = jax.device_get(pending)
  out = {k: float(np.mean([m[k] for m in host])) for k in host[-1]}
  out["tokens_per_sec"] = distributed.total(tokens) / max(elapsed, 1e-9)
  out["skipped_total"] = skipped
  eta = elapsed / len(pending) * (cfg.total_steps - step)
  shown = " ".join(f"{k} {out[k]:.4g}" for k in metrics.LOSS_NAMES if k in out)
  log.info("step %d/%d | %s | lr %.2e | %.0f tok/s | ETA %s", step, cfg.total_steps, shown,
           out.get("learning_rate", 0.0), out["tokens_per_sec"],
           time.strftime("%H:%M:%S", time.gmtime(eta)))
  return out


@contextlib.contextmanager
def _preemption():
  """SIGTERM (preemption): finish the current step, save, exit. Yields `preempted(logging_step)`.
  With several processes the signal may reach only some of them, and all must stop at the same
  step (the save is collective): they agree at each logging step, where the host waits anyway."""
  got = {"signal": None}
  previous = signal.signal(signal.SIGTERM, lambda signum, frame: got.update(signal=signum))
  agreed = {"stop": False}

  def preempted(logging_step: bool) -> bool:
    if jax.process_count() == 1:
      agreed["stop"] = got["signal"] is not None
    elif logging_step:
      agreed["stop"] = distributed.any_process(got["signal"] is not None)
    return agreed["stop"]

  try:
    yield preempted
  finally:
    signal.signal(signal.SIGTERM, previous)


def on_policy_sampler(cfg, tokenizer, student, teacher):
  """`sample(step, state, batch) -> batch` for on-policy distillation (train/on_policy.py), or None
  when loss.on_policy_fraction is 0."""
  fraction = cfg.loss.on_policy_fraction
  if not fraction:
    return None
  if len(build.views(student, teacher, cfg.data.image_aspect)) > 1:
    raise ValueError("config.loss.on_policy_fraction: the student's samples are scored by the teacher "
                     "on the same tokens, so both must read images as the same number of tokens")
  if jax.process_count() > 1:
    raise ValueError("config.loss.on_policy_fraction: on-policy sampling runs in single-process "
                     f"runs only (this run has {jax.process_count()} processes)")
  pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

  def sample(step: int, state: steps.TrainState, batch: dict) -> dict:
    if not on_policy.draw(cfg.seed, step, fraction):
      return on_policy.off_policy(batch)
    return on_policy.sampled_batch(
        student, state.full_params(), batch, rng=jax.random.fold_in(jax.random.key(cfg.seed), step),
        eos_token_id=tokenizer.eos_token_id, pad_token_id=pad,
        max_new_tokens=cfg.loss.on_policy_max_new_tokens)

  return sample


def held_out_evaluation(cfg, tokenizer, student, teacher, mesh, stored=None, loss_cfg=None):
  """`evaluate(params, teacher_params) -> {"eval/<metric>": mean}` over the first
  `cfg.eval_batches` batches of `data.eval_files` (0: one pass; the same batches every time), with
  the stage's loss at train=False: the held-out loss, KL, CE, preference terms, MoE statistics."""
  kind = STAGES[cfg.stage]
  pipe = build.data_pipeline(cfg, tokenizer, student, teacher, cfg.data.eval_files, seed=cfg.seed,
                             shuffle=False, num_epochs=None,  # endless: every process gets n
                             stored=stored)
  n = cfg.eval_batches or math.ceil(pipe.records_per_epoch / cfg.data.batch_size)
  noise = getattr(student.cfg, "text", student.cfg).router_noise == "gumbel"
  eval_step = steps.make_eval_step(kind, student, teacher,
                                   loss_cfg or LossConfig(**cfg.loss.to_dict()),
                                   rng=jax.random.key(cfg.seed) if noise else None)

  def evaluate(params, teacher_params) -> dict[str, float]:
    it = iter(pipe)
    got = [eval_step(params, sharding.batch_to_device(next(it), mesh), teacher_params)
           for _ in range(n)]
    host = jax.device_get(got)
    out = {f"eval/{k}": float(np.mean([m[k] for m in host])) for k in host[0]}
    log.info("held-out (%d batches) | %s", n, " ".join(
        f"{k} {out[k]:.4g}" for k in (f"eval/{m}" for m in metrics.LOSS_NAMES) if k in out))
    return out

  return evaluate


def save(mngr, step: int, model, state: steps.TrainState, data_iter) -> None:
  meta = {"step": step, "optimizer_step": int(state.step),
          "rng": np.asarray(jax.random.key_data(state.rng)).tolist()}
  checkpoint.save_train_state(mngr, step, model.cfg, state.full_params(), state.opt_state, meta,
                              data_iter)


def restore(mngr, step: int, state: steps.TrainState, patterns, data_iter) -> steps.TrainState:
  params, opt_state, meta = checkpoint.restore_train_state(mngr, step, state.full_params(),
                                                           state.opt_state, data_iter)
  trainable, frozen = optim.partition(params, patterns)
  rng = jax.random.wrap_key_data(jnp.asarray(meta["rng"], jnp.uint32))
  return state.replace(step=jnp.int32(meta["optimizer_step"]), params=trainable, frozen=frozen,
                       opt_state=opt_state, rng=rng)


def write_run_info(workdir: fileutil.AnyPath, cfg, model, tokenizer) -> None:
  """run.json, tokenizer/ and config.json: what evaluate / chat / export read besides weights."""
  if jax.process_index() != 0:
    return
  files = cfg.data.report_files or cfg.data.eval_files
  files = tuple(fileutil.absolute(f) for f in files)  # readers may run from anywhere
  root = fileutil.absolute(cfg.data.image_root) if cfg.data.image_root else None
  fileutil.save_pretrained(tokenizer, workdir / "tokenizer")
  has_teacher = STAGES[cfg.stage] in ("mimic", "preference")
  workdir_lib.RunInfo(
      template=cfg.data.template, stage=cfg.stage,
      teacher=build.teacher_dir(cfg) if has_teacher else None,
      image=workdir_lib.ImageSettings("clip" if model.cfg.vision.is_clip else "siglip",
                                      model.cfg.vision.image_size, cfg.data.image_aspect),
      image_token_id=model.cfg.image_token_id, num_image_tokens=model.cfg.num_image_tokens,
      eos_token_id=tokenizer.eos_token_id,
      pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0,
      data=workdir_lib.DataSettings(files, root),
  ).write(workdir)
  (workdir / "config.json").write_text(cfg.to_json_best_effort(indent=2))
