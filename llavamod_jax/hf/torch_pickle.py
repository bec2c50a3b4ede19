"""PyTorch `.bin` checkpoints (`torch.save` of a state dict) read with numpy only, no torch.

The format (PyTorch >= 1.6) is an uncompressed zip: `<name>/data.pkl` pickles the state dict, each
tensor as `torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)` whose storage is a
persistent id ('storage', <dtype>Storage, key, device, numel) naming the member `<name>/data/<key>`
that holds its raw little-endian bytes. The unpickler here knows only those globals (anything else
is refused by name: a pickle can run arbitrary code), and a tensor is a lazy view: its storage is
memory-mapped from the zip when the tensor is read, as `safetensors_io` reads safetensors.
"""

from __future__ import annotations

import collections
import os
import pickle
import struct
import zipfile
from pathlib import Path

import ml_dtypes
import numpy as np

STORAGES = {
    "FloatStorage": np.dtype("<f4"), "DoubleStorage": np.dtype("<f8"),
    "HalfStorage": np.dtype("<f2"), "BFloat16Storage": np.dtype(ml_dtypes.bfloat16),
    "LongStorage": np.dtype("<i8"), "IntStorage": np.dtype("<i4"), "ShortStorage": np.dtype("<i2"),
    "CharStorage": np.dtype("i1"), "ByteStorage": np.dtype("u1"), "BoolStorage": np.dtype("?"),
}
INDEX_NAME = "pytorch_model.bin.index.json"
SINGLE_NAME = "pytorch_model.bin"


class _Storage(collections.namedtuple("_Storage", "key dtype numel")):
  pass


class _Tensor(collections.namedtuple("_Tensor", "storage offset shape stride")):
  pass


def _rebuild_tensor(storage, offset, size, stride, *unused):
  return _Tensor(storage, int(offset), tuple(int(s) for s in size), tuple(int(s) for s in stride))


def _rebuild_parameter(data, *unused):
  return data


class _Unpickler(pickle.Unpickler):
  """Tensors and the containers a state dict is made of; every other global is refused."""

  GLOBALS = {("collections", "OrderedDict"): collections.OrderedDict,
             ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
             ("torch._utils", "_rebuild_parameter"): _rebuild_parameter}

  def __init__(self, data: bytes, where: str):
    import io  # noqa: PLC0415

    super().__init__(io.BytesIO(data))
    self.where = where

  def find_class(self, module, name):
    if (module, name) in self.GLOBALS:
      return self.GLOBALS[(module, name)]
    if module == "torch" and name in STORAGES:
      return name
    raise pickle.UnpicklingError(f"{self.where}: refusing pickle global {module}.{name}: not part of "
                                 "a tensor state dict (only tensors, storages and dicts are read)")

  def persistent_load(self, pid):
    if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
      raise pickle.UnpicklingError(f"{self.where}: unknown persistent id {pid!r}")
    _, kind, key, _, numel = pid
    if kind not in STORAGES:
      raise pickle.UnpicklingError(f"{self.where}: unsupported storage type {kind!r}")
    return _Storage(str(key), STORAGES[kind], int(numel))


class TorchFile:
  """One `torch.save` zip file of tensors: keys, shapes and dtypes eagerly, data lazily."""

  def __init__(self, path: str | os.PathLike):
    self.path = Path(path)
    if not zipfile.is_zipfile(self.path):
      raise ValueError(f"{self.path}: not a zip-format torch checkpoint (torch.save before PyTorch "
                       "1.6 used another format: load and save it again with a recent torch, or "
                       "convert it to safetensors)")
    with zipfile.ZipFile(self.path) as z:
      names = z.namelist()
      pkl = next((n for n in names if n.endswith("/data.pkl") or n == "data.pkl"), None)
      if pkl is None:
        raise ValueError(f"{self.path}: no data.pkl in the archive")
      root = pkl[:-len("data.pkl")]
      order = z.read(root + "byteorder").decode().strip() if root + "byteorder" in names else "little"
      if order != "little":
        raise ValueError(f"{self.path}: byte order {order!r}; only little-endian is supported")
      obj = _Unpickler(z.read(pkl), str(self.path)).load()
      self._members = {n[len(root) + len("data/"):]: z.getinfo(n) for n in names
                       if n.startswith(root + "data/")}
    if not isinstance(obj, dict):
      raise ValueError(f"{self.path}: holds a {type(obj).__name__}, expected a state dict")
    self._tensors = {k: v for k, v in obj.items() if isinstance(v, _Tensor)}
    self._offsets: dict[str, int] = {}

  def keys(self) -> list[str]:
    return list(self._tensors)

  def shape(self, key: str) -> tuple[int, ...]:
    return self._tensors[key].shape

  def dtype(self, key: str) -> np.dtype:
    return self._tensors[key].storage.dtype

  def _data_offset(self, key: str) -> int:
    """Where a storage member's bytes start in the file (zip members here are stored, not
    compressed: after the 30-byte local header, the name and the extra field)."""
    if key not in self._offsets:
      info = self._members.get(key)
      if info is None:
        raise ValueError(f"{self.path}: storage {key!r} is missing from the archive")
      if info.compress_type != zipfile.ZIP_STORED:
        raise ValueError(f"{self.path}: storage {key!r} is compressed; torch writes them stored")
      with open(self.path, "rb") as f:
        f.seek(info.header_offset)
        head = f.read(30)
      name_len, extra_len = struct.unpack("<HH", head[26:30])
      self._offsets[key] = info.header_offset + 30 + name_len + extra_len
    return self._offsets[key]

  def get(self, key: str) -> np.ndarray:
    """Tensor `key` as a read-only memory-mapped view (a copy when it is not contiguous)."""
    t = self._tensors[key]
    s = t.storage
    storage = np.memmap(self.path, dtype=s.dtype, mode="r", offset=self._data_offset(s.key),
                        shape=(s.numel,))
    if not t.shape:
      return storage[t.offset]
    end = t.offset + sum((n - 1) * st for n, st in zip(t.shape, t.stride)) + 1
    if min(t.shape) > 0 and end > s.numel:
      raise ValueError(f"{self.path}: tensor {key!r} {t.shape} reaches past its storage of {s.numel}")
    view = np.lib.stride_tricks.as_strided(
        storage[t.offset:], shape=t.shape, strides=[st * s.dtype.itemsize for st in t.stride],
        writeable=False)
    contiguous = all(st == int(np.prod(t.shape[i + 1:])) for i, st in enumerate(t.stride)
                     if t.shape[i] > 1)
    return view if contiguous else np.ascontiguousarray(view)
