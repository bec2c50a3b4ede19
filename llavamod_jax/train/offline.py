"""The teacher run once over a stage's data, its top-k logits stored (launch/teacher_logits.py).

    stats = offline.run(cfg, "teacher_logits/", top_k=64)

Reads the stage config as `launch/train.py` does (teacher, student's view of the data, mesh, batch,
template, max_length, temperature, mask) and writes `data.teacher_logits`' layout: for every record
of `data.train_files` and `data.eval_files`, at each distilled position, the teacher's k largest
log-probabilities at the run's temperature, their ids and its log-sum-exp. The records are cut into
parts of `records_per_part`; a part is complete when its index exists, so a killed run restarts at
its first incomplete part. The teacher is sharded over the mesh like in training; with several
processes each one writes the rows it read (its own files) and all step together.
"""

from __future__ import annotations

import json
import logging
import math
import time

import jax
import jax.numpy as jnp
import numpy as np

from llavamod_jax import distributed, fileutil, losses, models, sharding
from llavamod_jax.data import pipeline, sources
from llavamod_jax.data import teacher_logits as store
from llavamod_jax.train import build
from llavamod_jax.train import config as config_lib
from llavamod_jax.train.config import STAGES

log = logging.getLogger(__name__)


class _Slice:
  """Records [start, stop) of a random-access source."""

  def __init__(self, source, start: int, stop: int):
    self.source, self.start, self.stop = source, start, stop

  def __len__(self) -> int:
    return self.stop - self.start

  def __getitem__(self, i: int):
    if not 0 <= i < len(self):
      raise IndexError(i)
    return self.source[self.start + i]


def _vocab(model) -> int:
  return getattr(model.cfg, "text", model.cfg).vocab_size


def topk_fn(teacher, prefix: str, *, top_k: int, vocab: int, temperature: float, shift_mask: bool,
            chunk_size: int):
  """(params, batch) -> (logprobs [B, S, k] f32, ids [B, S, k] i32, logsumexp [B, S] f32) at each
  row's distilled positions moved to its front, in order (row r's first n_r entries; zeros after).
  The LM head runs `chunk_size` positions at a time and not at all on chunks without a distilled
  position."""

  def fn(params, batch):
    out, _ = models.forward(teacher, params, batch, prefix, logits=False)
    labels = batch.get(prefix + "labels", batch["labels"])
    mask = losses.distill_mask(labels, shift_mask)
    hidden, live = losses.trained_first(mask, out.hidden_states, mask)
    b, s = live.shape
    size = min(chunk_size, s)
    n = -(-s // size)

    def chunks(x):  # [B, S, ...] -> [C, B, size, ...], zero-padded at the end
      x = jnp.pad(x, [(0, 0), (0, n * size - s)] + [(0, 0)] * (x.ndim - 2))
      return jnp.moveaxis(x.reshape(b, n, size, *x.shape[2:]), 1, 0)

    hc, lc = chunks(hidden), chunks(live)

    def compute(h):
      logits = teacher.apply({"params": params}, h, method=teacher.logits)
      z = logits[..., :vocab].astype(jnp.float32) / temperature
      lse = jax.nn.logsumexp(z, axis=-1)
      values, ids = jax.lax.top_k(z, top_k)
      return values - lse[..., None], ids.astype(jnp.int32), lse

    def zeros(h):
      return (jnp.zeros(h.shape[:2] + (top_k,), jnp.float32),
              jnp.zeros(h.shape[:2] + (top_k,), jnp.int32), jnp.zeros(h.shape[:2], jnp.float32))

    lp, ids, lse = jax.lax.map(lambda x: jax.lax.cond(jnp.any(x[1]), compute, zeros, x[0]),
                               (hc, lc))
    unchunk = lambda x: jnp.moveaxis(x, 0, 1).reshape(b, -1, *x.shape[3:])[:, :s]  # noqa: E731
    return unchunk(lp), unchunk(ids), unchunk(lse)

  return fn


def _local_rows(x) -> np.ndarray:
  """This process's rows of a batch-sharded global array, in order."""
  shards = {s.index[0].start or 0: s.data for s in x.addressable_shards}
  return np.concatenate([np.asarray(shards[k]) for k in sorted(shards)])


def settings(cfg, top_k: int, vocab: int, dtype: str) -> dict:
  return {"top_k": top_k, "vocab_size": vocab, "temperature": cfg.loss.temperature,
          "shift_mask": cfg.loss.shift_mask, "template": cfg.data.template,
          "max_length": cfg.data.max_length, "dtype": dtype}


def run(cfg, out_dir, *, top_k: int | None = None, dtype: str = "float16",
        records_per_part: int = 4096, chunk_size: int = 256) -> dict:
  """Store the teacher's top-k over the stage's data in `out_dir` (resuming there); returns the
  summary written to meta.json."""
  config_lib.validate(cfg)
  if STAGES[cfg.stage] != "mimic":
    raise ValueError(f"config.stage={cfg.stage!r}: stored teacher logits are for the mimic stage")
  if cfg.teacher.init in ("none", "offline"):
    raise ValueError(f"config.teacher.init={cfg.teacher.init!r}: the teacher must be a model to "
                     "run (hf, workdir, compose or scratch)")
  if dtype not in store.DTYPES:
    raise ValueError(f"dtype {dtype!r}: expected one of {store.DTYPES}")
  top_k = top_k or cfg.teacher.top_k
  out = fileutil.path(out_dir)
  out.mkdir(parents=True, exist_ok=True)

  tokenizer = build.tokenizer_for(cfg)
  teacher, tparams = build.load_model(cfg.teacher, tokenizer, cfg, role="teacher")
  # The student's view decides the text of every row (as in training); its weights are not read.
  student = build.abstract_model(cfg.student, cfg, role="student", tokenizer=tokenizer)
  vocab = cfg.loss.vocab_size or min(_vocab(student), _vocab(teacher))
  if not 1 <= top_k <= vocab:
    raise ValueError(f"--top_k={top_k}: expected 1 .. {vocab} (the distilled vocabulary)")
  files = list(dict.fromkeys([*cfg.data.train_files, *cfg.data.eval_files]))
  source = sources.from_files(files, image_root=cfg.data.image_root or None, kind="conversation")
  want = {**settings(cfg, top_k, vocab, dtype), "files": [fileutil.absolute(f) for f in files]}
  meta_path = out / store.META
  if meta_path.exists():
    store.check_settings(store.read_meta(out), want, f"--out={out}")
  elif jax.process_index() == 0:
    meta_path.write_text(json.dumps({**want, "teacher": build.teacher_dir(cfg),
                                     "records_total": len(source)}, indent=2))

  mesh = sharding.make_mesh(cfg.mesh)
  config_lib.resolve_batch(cfg, mesh)
  tparams = sharding.place(teacher, tparams, mesh)
  views = build.views(student, teacher, cfg.data.image_aspect)
  prefix = views[-1].prefix  # the teacher's own view ("teacher_") when it differs
  rows = sharding.batch_sharding(mesh)
  fn = sharding.on_argument_mesh(jax.jit(
      topk_fn(teacher, prefix, top_k=top_k, vocab=vocab, temperature=cfg.loss.temperature,
              shift_mask=cfg.loss.shift_mask, chunk_size=chunk_size),
      out_shardings=(rows, rows, rows)))

  batch = cfg.data.batch_size
  local_rows = batch // jax.process_count()
  empty = {k: np.zeros(shape, dtype) for k, (shape, dtype) in pipeline.batch_shapes(
      views, "conversation", local_rows, cfg.data.max_length, cfg.data.images_per_sample).items()}
  empty["example_mask"] = np.zeros((local_rows,), np.int32)
  per_part = max(1, math.ceil(records_per_part / batch)) * batch
  total = len(source)
  parts = math.ceil(total / per_part)
  proc = jax.process_index()
  t0, done_records, last_log = time.time(), 0, 0.0
  log.info("teacher logits: %d records of %s in %d parts, top-%d over %d tokens (%s), batch %d -> %s",
           total, files, parts, top_k, vocab, dtype, batch, out)
  for part in range(parts):
    start, stop = part * per_part, min(total, (part + 1) * per_part)
    name = store.part_name(part, proc)
    if not distributed.any_process(not (out / f"{name}.json").exists()):
      continue  # complete on every process
    pipe = pipeline.Pipeline(
        _Slice(source, start, stop), tokenizer, views=views, batch_size=batch,
        max_length=cfg.data.max_length, template=cfg.data.template, shuffle=False, num_epochs=1,
        drop_remainder=False, worker_count=cfg.data.worker_count)
    it, writer = iter(pipe), store.PartWriter(out, name, dtype)
    while True:
      try:
        local = next(it)
      except StopIteration:
        local = None
      if not distributed.any_process(local is not None):
        break
      if local is None:  # another process still has rows: step with an empty batch
        local, it.last_keys = empty, []
      lp, ids, lse = (_local_rows(x) for x in fn(tparams, sharding.batch_to_device(local, mesh)))
      labels = local.get(prefix + "labels", local["labels"])
      for i, key in enumerate(it.last_keys):
        n = store.distilled_positions(labels[i], cfg.loss.shift_mask).size
        writer.write(key, lp[i, :n], ids[i, :n], lse[i, :n])
      done_records += len(it.last_keys)
      now = time.time()
      if now - last_log > 30:
        last_log = now
        _progress(start + it.stats()["records"], total, done_records, now - t0)
    stats = it.stats()
    writer.close({"skipped": stats["skipped"], "truncated": stats["truncated"]})
    _progress(stop, total, done_records, time.time() - t0)

  distributed.barrier("teacher logits")
  summary = store.summary(out)
  if jax.process_index() == 0:
    meta = store.read_meta(out)
    meta_path.write_text(json.dumps({**meta, "summary": summary}, indent=2))
  log.info("teacher logits: %d records, %d positions, %.1f bytes per position (%.2f per position "
           "per k), skipped %s -> %s", summary["records"], summary["tokens"],
           summary["bytes_per_token"], summary["bytes_per_token"] / top_k, summary["skipped"], out)
  return summary


def _progress(position: int, total: int, records: int, elapsed: float) -> None:
  rate = records / max(elapsed, 1e-9)
  eta = (total - position) / max(rate * jax.process_count(), 1e-9)
  log.info("teacher logits: %d/%d records (%.1f%%), %.1f records/s, ETA %s", position, total,
           100 * position / max(total, 1), rate * jax.process_count(),
           time.strftime("%H:%M:%S", time.gmtime(eta)))
