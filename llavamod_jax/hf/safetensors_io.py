"""safetensors with numpy only: memory-mapped reading (tensor by tensor) and streamed writing.

The format is an 8-byte little-endian header length, a JSON header {name: {dtype, shape,
data_offsets}}, then raw little-endian bytes. Reading through np.memmap means a tensor's bytes are only
touched when (and where) it is sliced, so a loader can place one shard of a tensor on a device without
reading the rest; bfloat16 comes from ml_dtypes, as in JAX itself.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Iterable, Iterator

import ml_dtypes
import numpy as np

DTYPES = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn), "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype("<i8"), "I32": np.dtype("<i4"), "I16": np.dtype("<i2"), "I8": np.dtype("i1"),
    "U8": np.dtype("u1"), "BOOL": np.dtype("?"),
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


class SafetensorsFile:
  """One .safetensors file: header parsed eagerly, tensors mapped lazily."""

  def __init__(self, path: str | os.PathLike):
    self.path = Path(path)
    with open(self.path, "rb") as f:
      raw = f.read(8)
      if len(raw) != 8:
        raise ValueError(f"{self.path}: not a safetensors file (shorter than its 8-byte header length)")
      (n,) = struct.unpack("<Q", raw)
      if n > os.path.getsize(self.path) - 8:
        raise ValueError(f"{self.path}: corrupt safetensors header (claims {n} bytes)")
      try:
        header = json.loads(f.read(n))
      except json.JSONDecodeError as e:
        raise ValueError(f"{self.path}: corrupt safetensors header: {e}") from None
    self.metadata = header.pop("__metadata__", None) or {}
    self._header = header
    self._data_start = 8 + n
    self._mmap = None

  def keys(self) -> list[str]:
    return list(self._header)

  def shape(self, key: str) -> tuple[int, ...]:
    return tuple(self._header[key]["shape"])

  def dtype(self, key: str) -> np.dtype:
    name = self._header[key]["dtype"]
    if name not in DTYPES:
      raise ValueError(f"{self.path}: tensor {key!r} has unsupported dtype {name}")
    return DTYPES[name]

  def get(self, key: str) -> np.ndarray:
    """A read-only, memory-mapped view of tensor `key`."""
    if self._mmap is None:
      self._mmap = np.memmap(self.path, dtype=np.uint8, mode="r")
    info = self._header[key]
    begin, end = info["data_offsets"]
    dtype, shape = self.dtype(key), tuple(info["shape"])
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if end - begin != expected:
      raise ValueError(f"{self.path}: tensor {key!r} spans {end - begin} bytes, "
                       f"expected {expected} for {dtype} {shape}")
    buf = self._mmap[self._data_start + begin:self._data_start + end]
    return buf.view(dtype).reshape(shape)


class Checkpoint:
  """All weight files of a Hugging Face model directory: safetensors (single file or sharded with an
  index), else PyTorch `pytorch_model*.bin` (read without torch: `torch_pickle`)."""

  def __init__(self, directory: str | os.PathLike):
    from llavamod_jax.hf import torch_pickle  # noqa: PLC0415

    self.directory = Path(directory)
    for index_name, single_name, reader in ((INDEX_NAME, SINGLE_NAME, SafetensorsFile),
                                            (torch_pickle.INDEX_NAME, torch_pickle.SINGLE_NAME,
                                             torch_pickle.TorchFile)):
      index, single = self.directory / index_name, self.directory / single_name
      if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = {name: reader(self.directory / name) for name in sorted(set(weight_map.values()))}
        self._where = {}
        for key, name in weight_map.items():
          if key not in files[name].keys():
            raise ValueError(f"{index}: lists {key!r} in {name}, which does not contain it")
          self._where[key] = files[name]
        return
      if single.exists():
        f = reader(single)
        self._where = {k: f for k in f.keys()}
        return
    raise FileNotFoundError(f"{self.directory}: no {SINGLE_NAME}, {INDEX_NAME}, "
                            f"{torch_pickle.SINGLE_NAME} or {torch_pickle.INDEX_NAME}")

  def keys(self) -> list[str]:
    return list(self._where)

  def shape(self, key: str) -> tuple[int, ...]:
    return self._where[key].shape(key)

  def dtype(self, key: str) -> np.dtype:
    return self._where[key].dtype(key)

  def get(self, key: str) -> np.ndarray:
    return self._where[key].get(key)


def write_file(path: str | os.PathLike, tensors: Iterable[tuple[str, np.ndarray]],
               metadata: dict[str, str] | None = None) -> None:
  """Write (name, array) pairs to one safetensors file; arrays are consumed one at a time."""
  tensors = list(tensors)
  header, offset = {}, 0
  for name, arr in tensors:
    dt = np.dtype(arr.dtype)
    if dt not in DTYPE_NAMES:
      raise ValueError(f"tensor {name!r}: dtype {dt} cannot be stored in safetensors")
    nbytes = arr.size * dt.itemsize
    header[name] = {"dtype": DTYPE_NAMES[dt], "shape": list(arr.shape),
                    "data_offsets": [offset, offset + nbytes]}
    offset += nbytes
  header["__metadata__"] = dict(metadata or {"format": "pt"})
  raw = json.dumps(header, separators=(",", ":")).encode()
  raw += b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned
  with open(path, "wb") as f:
    f.write(struct.pack("<Q", len(raw)))
    f.write(raw)
    for _, arr in tensors:
      f.write(np.ascontiguousarray(arr).astype(arr.dtype.newbyteorder("<"), copy=False).tobytes())


def plan_shards(sizes: Iterator[tuple[str, int]], max_shard_bytes: int) -> list[list[str]]:
  """Group tensor names, in order, into shards of at most `max_shard_bytes` (a bigger tensor alone)."""
  shards, current, used = [], [], 0
  for name, nbytes in sizes:
    if current and used + nbytes > max_shard_bytes:
      shards.append(current)
      current, used = [], 0
    current.append(name)
    used += nbytes
  if current:
    shards.append(current)
  return shards
