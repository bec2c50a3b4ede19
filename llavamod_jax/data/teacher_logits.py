"""Stored teacher logits: the teacher's top-k per distilled position, read with the data.

`launch/teacher_logits.py` runs the teacher once over a stage's data and writes, for every record, at
each position whose next-token distribution is distilled (`losses.distill_mask`, in order), the k
largest of the teacher's logits as log-probabilities at the run's temperature, their token ids, and
the log-sum-exp of all its logits / T. The mimic stage then trains with no teacher in memory
(`teacher.init=offline`): `Pipeline(..., teacher_logits=Reader(dir))` looks each record up and
`_Collate` places the values at the student's distilled positions.

DIR may be a gs:// URI (a multi-host run needs a directory every host sees): parts are written to a
local file first and copied whole, and read back with array_record's own GCS reader.

Layout of DIR:
  meta.json                          the settings every entry was made with (`SETTINGS`), the teacher
                                     it came from, and when done, the counts and bytes per token
  part-00003-p000.array_record       one entry per record of part 3 that process 0 computed
  part-00003-p000.json               that part's index {key: position} and its counts; written last,
                                     so a part with its index is complete (a kill loses one part)
Entry: a JSON header line {"key", "n", "k", "dtype"} then the raw arrays logprobs [n, k] (dtype),
ids [n, k] int32, logsumexp [n] float32.

Key: "<record id>#<digest>", the digest a hash of the record's text tokens and which of them are
trained (image tokens left out, so every view of a record has the same key). An entry is found only
for the same text as the teacher read, under the same template and max_length: a changed record is
not silently given another record's logits, it is skipped and counted (`teacher_logits_missing`,
`teacher_logits_mismatch`).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import threading
from typing import Any

import numpy as np

from llavamod_jax import fileutil
from llavamod_jax.data.templates import IGNORE

META = "meta.json"
# What an entry's values depend on besides the teacher and the record: training must match these.
SETTINGS = ("top_k", "vocab_size", "temperature", "shift_mask", "template", "max_length", "dtype")
DTYPES = ("float16", "float32")


class TeacherLogitsError(ValueError):
  pass


def record_key(record_id: str, input_ids: np.ndarray, labels: np.ndarray, image_token_id: int) -> str:
  keep = input_ids != image_token_id
  h = hashlib.sha1(np.ascontiguousarray(input_ids[keep], np.int32).tobytes())
  h.update(np.packbits(labels[keep] != IGNORE).tobytes())
  return f"{record_id}#{h.hexdigest()[:16]}"


def distilled_positions(labels: np.ndarray, shift_mask: bool) -> np.ndarray:
  """Positions of one row (unpadded labels [L]) whose distributions are distilled, in order: those
  predicting a trained token (shift_mask) or holding one (the original's off-by-one)."""
  trained = labels != IGNORE
  if shift_mask:
    trained = np.concatenate([trained[1:], [False]])
  return np.flatnonzero(trained)


def encode_entry(key: str, logprobs: np.ndarray, ids: np.ndarray, logsumexp: np.ndarray,
                 dtype: str) -> bytes:
  n, k = ids.shape
  header = json.dumps({"key": key, "n": n, "k": k, "dtype": dtype}).encode() + b"\n"
  return b"".join([header, np.ascontiguousarray(logprobs, dtype).tobytes(),
                   np.ascontiguousarray(ids, np.int32).tobytes(),
                   np.ascontiguousarray(logsumexp, np.float32).tobytes()])


def decode_entry(data: bytes) -> tuple[dict, np.ndarray, np.ndarray, np.ndarray]:
  cut = data.index(b"\n")
  head = json.loads(data[:cut])
  n, k, dt = head["n"], head["k"], np.dtype(head["dtype"])
  body = memoryview(data)[cut + 1:]
  a = n * k * dt.itemsize
  lp = np.frombuffer(body[:a], dt).reshape(n, k)
  ids = np.frombuffer(body[a:a + n * k * 4], np.int32).reshape(n, k)
  lse = np.frombuffer(body[a + n * k * 4:], np.float32)
  if lse.size != n:
    raise TeacherLogitsError(f"entry {head['key']!r}: {len(data)} bytes do not hold n={n}, k={k}")
  return head, lp, ids, lse


def part_name(part: int, process: int) -> str:
  return f"part-{part:05d}-p{process:03d}"


def open_records(path: fileutil.AnyPath):
  """An ArrayRecord reader of `path` (local, or gs:// through array_record's own GCS reader)."""
  from array_record.python.array_record_module import ArrayRecordReader  # noqa: PLC0415

  return ArrayRecordReader(os.fspath(path))


class PartWriter:
  """Writes one part of one process: entries to `<name>.array_record`, then the index on close."""

  def __init__(self, directory: str | os.PathLike, name: str, dtype: str):
    from array_record.python.array_record_module import ArrayRecordWriter  # noqa: PLC0415

    self.dir, self.name, self.dtype = fileutil.path(directory), name, dtype
    if fileutil.is_remote(self.dir):  # written locally, copied whole on close
      fd, tmp = tempfile.mkstemp(suffix=".array_record")
      os.close(fd)
      self._tmp = fileutil.path(tmp)
    else:
      self._tmp = self.dir / f"{name}.array_record.tmp"
    self._writer = ArrayRecordWriter(os.fspath(self._tmp), "group_size:1")
    self.index: dict[str, int] = {}
    self.counts = {"records": 0, "tokens": 0, "bytes": 0, "duplicate_keys": 0}

  def write(self, key: str, logprobs, ids, logsumexp) -> None:
    data = encode_entry(key, logprobs, ids, logsumexp, self.dtype)
    if key in self.index:
      self.counts["duplicate_keys"] += 1  # the same record twice (same id, same text): one entry
      return
    self.index[key] = len(self.index)
    self._writer.write(data)
    self.counts["records"] += 1
    self.counts["tokens"] += int(ids.shape[0])
    self.counts["bytes"] += len(data)

  def close(self, extra: dict | None = None) -> None:
    self._writer.close()
    records = self.dir / f"{self.name}.array_record"
    text = json.dumps({"counts": {**self.counts, **(extra or {})}, "index": self.index})
    if fileutil.is_remote(self.dir):  # an object appears whole: no renames needed
      records.write_bytes(self._tmp.read_bytes())
      self._tmp.unlink()
      (self.dir / f"{self.name}.json").write_text(text)  # last: it marks the part complete
      return
    self._tmp.rename(records)
    index = self.dir / f"{self.name}.json"
    tmp = index.with_suffix(".json.tmp")
    tmp.write_text(text)
    tmp.rename(index)  # last: its presence marks the part complete


def read_meta(directory: str | os.PathLike) -> dict:
  path = fileutil.path(directory) / META
  if not path.is_file():
    raise TeacherLogitsError(f"{path}: not found; config.teacher.logits_dir must be a directory "
                             "written by launch/teacher_logits.py")
  try:
    return json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise TeacherLogitsError(f"{path}: not valid JSON ({e})") from None


def check_settings(meta: dict, expected: dict, where: str) -> None:
  """Each of `expected`'s settings must equal the stored one; the error names every difference."""
  diff = [f"{k}: stored {meta.get(k)!r}, this run {v!r}" for k, v in expected.items()
          if meta.get(k) != v]
  if diff:
    raise TeacherLogitsError(f"{where}: the stored teacher logits were made with other settings ("
                             + "; ".join(diff) + "); run launch/teacher_logits.py again with this "
                             "config, into a new directory")


class Reader:
  """Looks entries up by key across every completed part of a directory. Picklable (grain worker
  processes): the index and the ArrayRecord readers are opened lazily, per process and thread."""

  def __init__(self, directory: str | os.PathLike):
    self.dir = fileutil.path(directory)
    self.meta = read_meta(self.dir)
    self._index: dict[str, tuple[int, int]] | None = None
    self._files: list[fileutil.AnyPath] = []
    self._local = threading.local()
    self._lock = threading.Lock()

  def __getstate__(self):
    return {"dir": self.dir, "meta": self.meta}

  def __setstate__(self, state):
    self.dir, self.meta = state["dir"], state["meta"]
    self._index, self._files = None, []
    self._local, self._lock = threading.local(), threading.Lock()

  @property
  def top_k(self) -> int:
    return int(self.meta["top_k"])

  def _load_index(self) -> dict[str, tuple[int, int]]:
    with self._lock:
      if self._index is None:
        index, files = {}, []
        for part in sorted(self.dir.glob("part-*.json")):
          f = len(files)
          files.append(part.with_suffix(".array_record"))
          for key, pos in json.loads(part.read_text())["index"].items():
            index[key] = (f, pos)
        self._files, self._index = files, index
    return self._index

  def __len__(self) -> int:
    return len(self._load_index())

  def get(self, key: str):
    """(logprobs [n, k] float32, ids [n, k] int32, logsumexp [n] float32) or None."""
    where = self._load_index().get(key)
    if where is None:
      return None
    f, pos = where
    readers = getattr(self._local, "readers", None)
    if readers is None:
      readers = self._local.readers = {}
    if f not in readers:
      readers[f] = open_records(self._files[f])
    _, lp, ids, lse = decode_entry(readers[f].read([pos])[0])
    return lp.astype(np.float32), ids, lse


class Attach:
  """A pipeline map: an example gets its record's stored entry ("teacher_topk"), or becomes a skip
  marker when there is none for its key or its number of positions differs."""

  def __init__(self, reader: Reader, shift_mask: bool):
    self.reader, self.shift_mask = reader, shift_mask

  def __call__(self, item: dict) -> dict:
    if "skip" in item:
      return item
    got = self.reader.get(item["key"])
    if got is None:
      return {"skip": "teacher_logits_missing", "id": item["id"], "origin": item["origin"],
              "detail": f"no stored teacher logits for key {item['key']!r} in {self.reader.dir} "
                        "(a record the teacher did not read, or one whose text changed since)"}
    n = distilled_positions(item["views"][0]["labels"][0], self.shift_mask).size
    if got[0].shape[0] != n:
      return {"skip": "teacher_logits_mismatch", "id": item["id"], "origin": item["origin"],
              "detail": f"{got[0].shape[0]} stored positions, the record has {n} distilled ones"}
    return {**item, "teacher_topk": got}


def place(labels: np.ndarray, entry, shift_mask: bool, temperature: float, length: int, k: int):
  """One row's stored entry at its distilled positions: (logits [length, k] float32 as
  `losses.topk_kl` reads them, t = T * (logprob + lse), ids [length, k], lse [length]); zeros
  elsewhere."""
  lp, ids, lse = entry
  pos = distilled_positions(labels, shift_mask)
  logits = np.zeros((length, k), np.float32)
  out_ids = np.zeros((length, k), np.int32)
  out_lse = np.zeros((length,), np.float32)
  logits[pos] = temperature * (lp + lse[:, None])
  out_ids[pos], out_lse[pos] = ids, lse
  return logits, out_ids, out_lse


def summary(directory: str | os.PathLike) -> dict[str, Any]:
  """Counts over every completed part: records, positions (tokens), bytes, bytes per token."""
  totals: dict[str, Any] = {"parts": 0, "records": 0, "tokens": 0, "bytes": 0, "duplicate_keys": 0,
                            "skipped": {}}
  for part in sorted(fileutil.path(directory).glob("part-*.json")):
    counts = json.loads(part.read_text())["counts"]
    totals["parts"] += 1
    for key in ("records", "tokens", "bytes", "duplicate_keys"):
      totals[key] += counts.get(key, 0)
    for reason, n in counts.get("skipped", {}).items():
      totals["skipped"][reason] = totals["skipped"].get(reason, 0) + n
  totals["bytes_per_token"] = totals["bytes"] / max(totals["tokens"], 1)
  return totals
