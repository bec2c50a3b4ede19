"""grain pipelines: records -> (images decoded, template encoded) -> fixed-shape numpy batches.

    pipe = pipeline.Pipeline(source, tokenizer, views=[pipeline.View(576, image_token_id)],
                             batch_size=8, max_length=2048, seed=0, num_epochs=None)
    it = iter(pipe)                  # a grain DatasetIterator
    batch = next(it)                 # dict of numpy arrays
    state = it.get_state()           # JSON-able; it.set_state(state) resumes on the same batches
    it.stats()                       # records / examples / batches / truncated / skipped per reason

Order of work: one global record order (the whole source shuffled by `seed`, reshuffled every
epoch, epochs back to back) -> this process's rows of it -> per record, in reader threads and
optional worker processes: parse checks, template encoding, image loading and preprocessing -> in
the consuming process: skip accounting, batching, padding. Records are never filtered before the
workers, so the batches do not depend on the number of workers or threads.

Processes: `batch_size` is the global batch. The global order is cut into blocks of batch_size
records, and process p of P reads only rows [p*b, (p+1)*b) of every block (b = batch_size / P), so
its local batches are b rows and stacking the P local batches in process order gives exactly the
batch one process would make: the data a run sees does not depend on how many hosts it runs on.
(A skipped record is replaced by the next record of the same process's rows, so with bad records
in the data the batches of different process counts differ from that point on; the final partial
block of a finite pipeline may leave some processes a batch short.)

Batch (conversation mode; `B` = batch_size / shard_count rows, `K` = images_per_sample, `L` =
max_length or a bucket):
  input_ids      [B, L] int32   right-padded with the tokenizer's pad id
  attention_mask [B, L] int32   1 on real tokens
  labels         [B, L] int32   input_ids where trained, -100 elsewhere (shift happens in the loss)
  pixel_values   [B*K, H, W, 3] float32; row r owns slots [r*K, (r+1)*K): its j-th `<image>` run
                 takes slot r*K + j; unused slots are zeros
  image_mask     [B*K] bool     True on the slots holding a real image
  example_mask   [B] int32      1 on real examples (0 only on rows padding a final partial batch)
Images stay with their rows, so a batch can be split or sharded along rows (devices, processes,
micro-batches) with pixel_values split the same way. A text-only sample has no image tokens, and its
zero slots are never consumed. The model must therefore fill image tokens row by row: the k-th image
token of row r takes feature row (r*K*N + k) of the [B*K*N, hidden] image features (N = image tokens
per image); this equals transformers' batch-wide in-order scatter whenever every row holds K images.
Preference mode stacks chosen and rejected: rows [0, B) are prompt + chosen, rows [B, 2B) prompt +
rejected (same prompt, same images, duplicated into both rows' slots), so input_ids etc. are [2B, L]
and pixel_values [2*B*K, H, W, 3]; labels cover only the response. (With several processes each one
stacks its own rows so; `sharding.batch_to_device` regroups the global batch into all chosen rows,
then all rejected rows.)
Views: teacher and student may expand `<image>` to different token counts and preprocess images
differently. Each `View` adds its own keys (prefixed by `View.prefix`, e.g. "teacher_"). The view
with the fewest image tokens gets length L; a view with n more tokens per image gets L + K*n, and
every view holds exactly the same text tokens (truncation is decided once), so the trained tokens of
all views are the same sequence.
Bad records (see `sources.REASONS`) are skipped, counted per reason in `stats()`, and logged with
their id and `file:line`; `strict=True` raises `sources.DataError` at the first one instead.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
from typing import Any, Sequence

import grain
import numpy as np

from llavamod_jax import fileutil
from llavamod_jax.data import sources as sources_lib
from llavamod_jax.data import teacher_logits as teacher_logits_lib
from llavamod_jax.data import templates

log = logging.getLogger(__name__)
MODES = ("conversation", "preference")


@dataclasses.dataclass(frozen=True)
class View:
  """How one model sees a sample: `<image>` -> `num_image_tokens` x `image_token_id`, and images
  preprocessed by `data.image.preprocess(kind=image_kind, size=image_size, aspect=image_aspect)`."""

  num_image_tokens: int
  image_token_id: int
  image_kind: str = "clip"
  image_size: int = 336
  image_aspect: str = "pad"
  prefix: str = ""


def _skip(reason: str, record_id: str, origin: str, detail: str) -> dict:
  return {"skip": reason, "id": record_id, "origin": origin, "detail": detail}


class _ImageSkip(Exception):

  def __init__(self, reason: str, detail: str):
    super().__init__(detail)
    self.reason, self.detail = reason, detail


class _Prepare:
  """Record -> example (token ids, labels and pixels per view) or a skip marker. Runs in reader
  threads / worker processes, so it must pickle and hold no mutable state."""

  def __init__(self, encoder: templates.Encoder, views: Sequence[View], mode: str, max_length: int,
               images_per_sample: int):
    self.encoder, self.views, self.mode = encoder, tuple(views), mode
    self.max_length, self.images_per_sample = max_length, images_per_sample
    self.ref = min(range(len(self.views)), key=lambda v: self.views[v].num_image_tokens)

  def _encode(self, record: sources_lib.Record, view: View, max_length: int):
    kwargs = dict(image_token_id=view.image_token_id, num_image_tokens=view.num_image_tokens,
                  max_length=max_length, num_images=len(record.images))
    if self.mode == "preference":
      return self.encoder.encode_preference(record.messages, record.chosen, record.rejected, **kwargs)
    return (self.encoder.encode(record.messages, **kwargs),)

  def _pixels(self, record: sources_lib.Record, num_images: int) -> list[np.ndarray]:
    """[images, H, W, 3] per view; raises _ImageSkip."""
    from llavamod_jax.data import image as image_lib  # noqa: PLC0415 (keeps this module light)

    loaded = []
    for src in record.images[:num_images]:
      try:
        loaded.append(image_lib.load_image(src))
      except image_lib.ImageError as e:
        # Asked only after a failure: on a bucket every question is a request.
        if isinstance(src, str) and not fileutil.path(src).is_file():
          raise _ImageSkip("missing_image", f"image file {src!r} does not exist") from e
        raise _ImageSkip("corrupt_image", str(e)) from e
    out, cache = [], {}
    for view in self.views:
      key = (view.image_kind, view.image_size, view.image_aspect)
      if key not in cache:
        pixels = [image_lib.preprocess(im, kind=view.image_kind, size=view.image_size,
                                       aspect=view.image_aspect) for im in loaded]
        cache[key] = (np.stack(pixels) if pixels
                      else np.zeros((0, view.image_size, view.image_size, 3), np.float32))
      out.append(cache[key])
    return out

  def __call__(self, item: sources_lib.Record | sources_lib.Bad) -> dict:
    if isinstance(item, sources_lib.Bad):
      return _skip(item.reason, item.id, item.origin, item.detail)
    record = item
    if record.kind != ("preference" if self.mode == "preference" else "conversation"):
      return _skip("wrong_kind", record.id, record.origin,
                   f"a {record.kind} record in a {self.mode} pipeline")
    if len(record.images) > self.images_per_sample:
      return _skip("too_many_images", record.id, record.origin, f"{len(record.images)} images, the "
                   f"pipeline takes at most images_per_sample={self.images_per_sample}")
    try:
      ref_view = self.views[self.ref]
      ref = self._encode(record, ref_view, self.max_length)
      encoded = []
      for view in self.views:
        extra = view.num_image_tokens - ref_view.num_image_tokens
        # The same text as the reference view: its kept length plus this view's extra image tokens.
        encoded.append(ref if view is ref_view else tuple(
            self._encode(record, view, r.input_ids.size + r.num_images * extra)[k]
            for k, r in enumerate(ref)))
    except templates.TemplateError as e:
      return _skip(e.reason, record.id, record.origin, str(e))
    try:
      pixels = self._pixels(record, ref[0].num_images)
    except _ImageSkip as e:
      return _skip(e.reason, record.id, record.origin, e.detail)
    first = encoded[0][0]  # the key of views[0]'s text: the same in every view (teacher_logits)
    key = teacher_logits_lib.record_key(record.id, first.input_ids, first.labels,
                                        self.views[0].image_token_id)
    return {"id": record.id, "origin": record.origin, "key": key,
            "truncated": any(r.truncated for r in ref),
            "views": [{"input_ids": [e.input_ids for e in enc], "labels": [e.labels for e in enc],
                       "pixel_values": px} for enc, px in zip(encoded, pixels)]}


def batch_shapes(views: Sequence[View], mode: str, batch_size: int, length: int,
                 images_per_sample: int = 1,
                 top_k: int = 0) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
  """(shape, dtype) of every array of a batch of `batch_size` examples padded to `length` tokens in
  the view with the fewest image tokens (example_mask aside): what `_Collate` makes. `top_k` > 0:
  with stored teacher logits at views[0]'s positions (`teacher_topk_*`, `teacher_logsumexp`)."""
  rows = (2 if mode == "preference" else 1) * batch_size
  k, fewest = images_per_sample, min(v.num_image_tokens for v in views)
  out = {}
  for view in views:
    seq = length + k * max(0, view.num_image_tokens - fewest)
    size, p = view.image_size, view.prefix
    out.update({f"{p}input_ids": ((rows, seq), np.int32),
                f"{p}attention_mask": ((rows, seq), np.int32), f"{p}labels": ((rows, seq), np.int32),
                f"{p}pixel_values": ((rows * k, size, size, 3), np.float32),
                f"{p}image_mask": ((rows * k,), np.bool_)})
  if top_k:
    seq = out[f"{views[0].prefix}input_ids"][0][1]
    out.update({"teacher_topk_logits": ((rows, seq, top_k), np.float32),
                "teacher_topk_ids": ((rows, seq, top_k), np.int32),
                "teacher_logsumexp": ((rows, seq), np.float32)})
  return out


class _Collate:
  """Examples -> one fixed-shape batch (see the module docstring)."""

  def __init__(self, views: Sequence[View], mode: str, batch_size: int, max_length: int,
               images_per_sample: int, pad_id: int, length_buckets: Sequence[int] | None,
               topk: tuple[int, bool, float] | None = None):
    self.views, self.mode, self.batch_size = tuple(views), mode, batch_size
    self.topk = topk  # (k, shift_mask, temperature) with stored teacher logits
    self.images_per_sample, self.pad_id, self.max_length = images_per_sample, pad_id, max_length
    self.buckets = sorted({int(b) for b in (length_buckets or ()) if b < max_length} | {max_length})

  def __call__(self, examples: Sequence[dict]) -> dict[str, np.ndarray]:
    b, k = self.batch_size, self.images_per_sample
    rows_per_example = 2 if self.mode == "preference" else 1
    ref = min(range(len(self.views)), key=lambda v: self.views[v].num_image_tokens)
    longest = max(ids.size for ex in examples for ids in ex["views"][ref]["input_ids"])
    length = next(bucket for bucket in self.buckets if bucket >= longest)
    batch = {"example_mask": np.zeros((b,), np.int32)}
    batch["example_mask"][:len(examples)] = 1
    shapes = batch_shapes(self.views, self.mode, b, length, k, self.topk[0] if self.topk else 0)
    for v, view in enumerate(self.views):
      p = view.prefix
      ids = np.full(shapes[f"{p}input_ids"][0], self.pad_id, np.int32)
      mask = np.zeros(*shapes[f"{p}attention_mask"])
      labels = np.full(shapes[f"{p}labels"][0], templates.IGNORE, np.int32)
      pixels = np.zeros(*shapes[f"{p}pixel_values"])
      image_mask = np.zeros(*shapes[f"{p}image_mask"])
      for part in range(rows_per_example):  # chosen rows first, then rejected rows
        for i, ex in enumerate(examples):
          row = part * b + i
          x = ex["views"][v]
          n = x["input_ids"][part].size
          ids[row, :n], mask[row, :n], labels[row, :n] = x["input_ids"][part], 1, x["labels"][part]
          px = x["pixel_values"]
          pixels[row * k:row * k + len(px)] = px  # row r owns slots [r*K, (r+1)*K)
          image_mask[row * k:row * k + len(px)] = True
      batch.update({f"{p}input_ids": ids, f"{p}attention_mask": mask, f"{p}labels": labels,
                    f"{p}pixel_values": pixels, f"{p}image_mask": image_mask})
    if self.topk:  # at views[0]'s distilled positions (conversation rows only)
      top_k, shift, temperature = self.topk
      seq = batch[f"{self.views[0].prefix}input_ids"].shape[1]
      arrays = [np.zeros(*shapes[name]) for name in
                ("teacher_topk_logits", "teacher_topk_ids", "teacher_logsumexp")]
      for i, ex in enumerate(examples):
        for out, x in zip(arrays, teacher_logits_lib.place(ex["views"][0]["labels"][0],
                                                           ex["teacher_topk"], shift, temperature,
                                                           seq, top_k)):
          out[i] = x
      batch.update(zip(("teacher_topk_logits", "teacher_topk_ids", "teacher_logsumexp"), arrays))
    return batch


class BatchIterator(grain.DatasetIterator):
  """Skip accounting and batching on top of the grain example iterator. Its state (a JSON-able dict)
  holds the example iterator's state and the counters, so a restored iterator continues with the same
  batches and the same statistics."""

  def __init__(self, parent: grain.DatasetIterator, collate: _Collate, drop_remainder: bool,
               strict: bool, log_first: int, max_skips_in_a_row: int):
    super().__init__(parent)
    self._collate, self._drop_remainder = collate, drop_remainder
    self._strict, self._log_first = strict, log_first
    self._max_skips = max_skips_in_a_row
    self._counts = _new_counts()
    self._done = False
    self.last_keys: list[str] = []  # the keys of the last batch's examples, in row order

  def _account(self, item: dict) -> bool:
    """Counts `item`; True when it is a usable example."""
    c = self._counts
    c["records"] += 1
    if "skip" in item:
      reason = item["skip"]
      c["skipped"][reason] = c["skipped"].get(reason, 0) + 1
      message = f"{item['origin']}: record {item['id']!r}: {reason}: {item['detail']}"
      if self._strict:
        raise sources_lib.DataError(f"strict data mode: {message}")
      level = logging.WARNING if c["skipped"][reason] <= self._log_first else logging.DEBUG
      log.log(level, "skipped %s", message)
      return False
    c["examples"] += 1
    if item["truncated"]:
      c["truncated"] += 1
      level = logging.WARNING if c["truncated"] <= self._log_first else logging.DEBUG
      log.log(level, "%s: record %r truncated to max_length=%d", item["origin"], item["id"],
              self._collate.max_length)
    return True

  def __next__(self) -> dict[str, np.ndarray]:
    examples, exhausted_now, skips = [], False, 0
    while not self._done and len(examples) < self._collate.batch_size:
      try:
        item = next(self._parent)
      except StopIteration:
        self._done = exhausted_now = True
        break
      if self._account(item):
        examples.append(item)
        skips = 0
      else:
        skips += 1
        if skips > self._max_skips:  # a pipeline that repeats forever would spin here silently
          raise sources_lib.DataError(
              f"{skips} records in a row were skipped (more than one pass over the data) and no "
              f"example was left: {summary(self._counts)}; see the warnings above for why (e.g. "
              f"max_length={self._collate.max_length} too short for the template and image tokens)")
    batch = None
    if examples and (len(examples) == self._collate.batch_size or not self._drop_remainder):
      self._counts["batches"] += 1
      batch = self._collate(examples)
      self.last_keys = [ex["key"] for ex in examples]
    else:
      self._counts["dropped_remainder"] += len(examples)
    if exhausted_now:
      log.info("data pipeline exhausted: %s", summary(self._counts))
    if batch is None:
      raise StopIteration
    return batch

  def stats(self) -> dict[str, Any]:
    """This process's counters: records seen, examples batched, batches, truncated examples,
    skipped records per reason, examples of a dropped final partial batch."""
    return {**self._counts, "skipped": dict(self._counts["skipped"])}

  def get_state(self) -> dict[str, Any]:
    return {"examples": self._parent.get_state(), "counts": self.stats(), "done": self._done}

  def set_state(self, state: dict[str, Any]) -> None:
    self._parent.set_state(state["examples"])
    self._counts = {**_new_counts(), **state["counts"], "skipped": dict(state["counts"]["skipped"])}
    self._done = bool(state["done"])


class _ProcessRows(grain.MapDataset):
  """Process `index` of `count` reads rows [index*rows, (index+1)*rows) of every block of
  rows*count records of `parent`: its j-th record is the parent's record
  (j // rows) * rows * count + index * rows + j % rows."""

  def __init__(self, parent: grain.MapDataset, rows: int, index: int, count: int):
    super().__init__(parent)
    self._rows, self._index, self._count = rows, index, count
    n = len(parent)
    if n >= sys.maxsize:  # repeated forever
      self._length = sys.maxsize
    else:
      blocks, rest = divmod(n, rows * count)
      self._length = blocks * rows + min(max(rest - index * rows, 0), rows)

  def __len__(self) -> int:
    return self._length

  def _parent_index(self, j: int) -> int:
    # Past the end, grain's convention: the next pass over the parent (as SliceMapDataset does).
    epoch, j = divmod(j, self._length) if self._length else (0, j)
    block, row = divmod(j, self._rows)
    first_of_block = block * self._rows * self._count + self._index * self._rows
    return epoch * len(self._parent) + first_of_block + row

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    return self._parent[self._parent_index(index)]

  def __str__(self) -> str:
    return f"ProcessRows(rows={self._rows}, index={self._index}, count={self._count})"


def _new_counts() -> dict[str, Any]:
  return {"records": 0, "examples": 0, "batches": 0, "truncated": 0, "dropped_remainder": 0,
          "skipped": {}}


class Pipeline:
  """A deterministic, sharded, checkpointable batch pipeline over a random-access record source.

  source: `sources.JsonSource`, `Mixture`, `TfdsSource` or any sequence of `Record | Bad`.
  mode: "conversation" (instruction / caption data; every assistant turn trained) or "preference".
  batch_size: the global batch (all processes together); each process yields batch_size /
    shard_count rows (see "Processes" in the module docstring).
  num_epochs: None repeats forever (what multi-process training wants: every process then yields a
    batch at every step); a number stops after that many passes.
  shard_index / shard_count: this process and the number of processes; default
    `jax.process_index()` / `jax.process_count()`.
  worker_count: 0 runs in this process (with `read_threads` reader threads); > 0 uses grain worker
    processes (spawned: the source, tokenizer and template are pickled to each worker).
  length_buckets: pad each batch to the smallest bucket that fits its longest sequence (max_length is
    always a bucket); None pads to max_length. Each bucket is one more shape to compile.
  drop_remainder: drop a final partial batch (counted); False pads it with empty rows
    (example_mask 0).
  After construction, `records_per_epoch` is the number of records in one pass (all processes) and
  `examples` the grain IterDataset of this process's per-record results (examples and skip markers)
  that its batches are made of.
  teacher_logits: a `teacher_logits.Reader`; each example gets its record's stored teacher top-k
    (records without one are skipped and counted) and batches carry them at the distilled positions
    (`shift_mask`: as `losses.distill_mask`) as `losses.topk_kl` reads them at `temperature`.
  """

  def __init__(self, source: Any, tokenizer: Any, *, views: Sequence[View], batch_size: int,
               max_length: int, template: str | templates.Template = "qwen",
               mode: str = "conversation", images_per_sample: int = 1,
               length_buckets: Sequence[int] | None = None, shuffle: bool = True, seed: int = 0,
               num_epochs: int | None = 1, shard_index: int | None = None,
               shard_count: int | None = None, worker_count: int = 0, worker_buffer_size: int = 2,
               read_threads: int = 2, read_buffer_size: int = 16, drop_remainder: bool = True,
               strict: bool = False, log_first: int = 10,
               teacher_logits: teacher_logits_lib.Reader | None = None, shift_mask: bool = True,
               temperature: float = 1.0):
    if mode not in MODES:
      raise ValueError(f"mode {mode!r}: expected one of {MODES}")
    if not views:
      raise ValueError("at least one View is needed")
    prefixes = [v.prefix for v in views]
    if len(set(prefixes)) != len(prefixes):
      raise ValueError(f"views need distinct prefixes, got {prefixes}")
    if batch_size < 1 or max_length < 1 or images_per_sample < 0:
      raise ValueError(f"batch_size={batch_size}, max_length={max_length}, images_per_sample="
                       f"{images_per_sample}: expected positive sizes")
    if shard_index is None or shard_count is None:
      import jax  # noqa: PLC0415 (only for the process defaults)
      shard_index = jax.process_index() if shard_index is None else shard_index
      shard_count = jax.process_count() if shard_count is None else shard_count
    if not 0 <= shard_index < shard_count:
      raise ValueError(f"shard_index={shard_index} must lie in [0, shard_count={shard_count})")
    if shard_count > 1 and length_buckets:
      raise ValueError(f"length_buckets={list(length_buckets)} with shard_count={shard_count}: each "
                       "process would pick its own bucket, and the processes' batches must have one "
                       "shape; pad to max_length (length_buckets=None) in multi-process runs")
    if batch_size % shard_count:
      raise ValueError(f"batch_size={batch_size} (the global batch, config.data.batch_size) is not "
                       f"divisible by shard_count={shard_count} (the number of processes): every "
                       "process must read the same number of rows")
    self.source, self.mode = source, mode
    self.shard_index, self.shard_count = shard_index, shard_count
    self.worker_count, self.worker_buffer_size = worker_count, worker_buffer_size
    self.drop_remainder, self.strict, self.log_first = drop_remainder, strict, log_first
    encoder = templates.Encoder(tokenizer, template)
    pad_id = next((i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id) if i is not None), 0)
    rows = batch_size // shard_count
    if teacher_logits is not None and mode != "conversation":
      raise ValueError(f"stored teacher logits are for conversation data, not mode {mode!r}")
    topk = (teacher_logits.top_k, shift_mask, temperature) if teacher_logits is not None else None
    self._collate = _Collate(views, mode, rows, max_length, images_per_sample, pad_id,
                             length_buckets, topk)

    ds = grain.MapDataset.source(source)
    self.records_per_epoch = len(ds)
    if shuffle:
      ds = ds.shuffle(seed=seed)
    if num_epochs != 1:
      ds = ds.repeat(num_epochs)
    if shard_count > 1:  # after shuffle and repeat: the global order is the same for any count
      ds = _ProcessRows(ds, rows, shard_index, shard_count)
    ds = ds.map(_Prepare(encoder, views, mode, max_length, images_per_sample))
    if teacher_logits is not None:
      ds = ds.map(teacher_logits_lib.Attach(teacher_logits, shift_mask))
    ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=read_threads,
                                              prefetch_buffer_size=read_buffer_size))
    if worker_count > 0:
      _use_default_flags()
      ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count,
                                                      per_worker_buffer_size=worker_buffer_size))
    self.examples = ds

  def __iter__(self) -> BatchIterator:
    return BatchIterator(iter(self.examples), self._collate, self.drop_remainder, self.strict,
                         self.log_first, max_skips_in_a_row=max(self.records_per_epoch, 1))


def _use_default_flags():
  """grain's worker processes read absl flags (grain 0.2.18: its profiler flag) and fail when they are
  unparsed, as outside an `absl.app` (notebooks, pytest): use the defaults then."""
  from absl import flags  # noqa: PLC0415

  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def summary(counts: dict[str, Any]) -> str:
  """One line for logs: "records=…, examples=…, skipped(reason)=…"."""
  skipped = ", ".join(f"skipped({r})={n}" for r, n in sorted(counts["skipped"].items()))
  base = ", ".join(f"{k}={counts[k]}" for k in ("records", "examples", "batches", "truncated",
                                                "dropped_remainder"))
  return base + (", " + skipped if skipped else "")

