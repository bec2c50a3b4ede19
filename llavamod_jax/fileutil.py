"""Files on local disk or in an object store (gs://), and directories written atomically.

A workdir may be a URI (`gs://bucket/run`: multi-host runs on TPU pod slices need one that every
host sees). `path()` keeps a local path a `pathlib.Path`, as it always was, and makes a URI an
`etils.epath.Path` (pathlib would turn gs://b/x into the local gs:/b/x). Both have the methods a
workdir needs (read/write text and bytes, mkdir, exists, iterdir); what an object store lacks
(appending; libraries that write local files only) is handled where it is used, with the helpers
here.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator, Union

from etils import epath

AnyPath = Union[Path, epath.Path]


def is_remote(path: str | os.PathLike) -> bool:
  return "://" in str(path)


def path(p: str | os.PathLike) -> AnyPath:
  """`p` as a `pathlib.Path` when local, as an `epath.Path` when it is a URI (gs://...)."""
  return epath.Path(p) if is_remote(p) else Path(p)


def is_absolute(p: str | os.PathLike) -> bool:
  """A URI or an absolute local path: what a relative path (of an image, say) is never joined to."""
  return is_remote(p) or os.path.isabs(p)


def absolute(p: str | os.PathLike) -> str:
  """`p` made absolute against the working directory when local (as `os.path.abspath`); a URI as it
  is (a bucket has no working directory, and epath's `resolve()` would turn gs://b/x into a local
  path under the working directory)."""
  return os.fspath(p) if is_remote(p) else os.path.abspath(p)


def open_file(p: str | os.PathLike, mode: str = "r"):
  """`open(p, mode)` for a local path, epath's `open` for a URI: both files read, seek and iterate
  lines, so readers of random-access offsets work on either without copying the file."""
  return epath.Path(p).open(mode) if is_remote(p) else open(p, mode)


def copy_tree(src: AnyPath, dst: AnyPath) -> None:
  """Copy the files under `src` into `dst` (either may be remote), replacing same-named files."""
  dst.mkdir(parents=True, exist_ok=True)
  for child in src.iterdir():
    if child.is_dir():
      copy_tree(child, dst / child.name)
    else:  # bytes, not backend copies: those cannot always cross from local disk to a bucket
      (dst / child.name).write_bytes(child.read_bytes())


def save_pretrained(obj, out: str | os.PathLike) -> None:
  """`obj.save_pretrained(out)` (a tokenizer, a processor); transformers writes local files only,
  so a remote `out` gets the files of a local temporary directory."""
  if not is_remote(out):
    obj.save_pretrained(out)
    return
  with tempfile.TemporaryDirectory() as tmp:
    obj.save_pretrained(tmp)
    copy_tree(Path(tmp), epath.Path(out))


@contextlib.contextmanager
def local_dir(p: str | os.PathLike) -> Iterator[Path]:
  """`p` itself when local; else a local temporary copy of it (for readers of local directories
  only, such as `AutoTokenizer.from_pretrained`), removed on exit."""
  if not is_remote(p):
    yield Path(p)
    return
  with tempfile.TemporaryDirectory() as tmp:
    copy_tree(epath.Path(p), Path(tmp))
    yield Path(tmp)


@contextlib.contextmanager
def atomic_directory(out_dir: str | os.PathLike, tag: str = "partial") -> Iterator[Path]:
  """Yield an empty temporary directory next to `out_dir`; on success it replaces `out_dir`, on any
  error it is removed, so readers never see a half-written directory."""
  out = Path(out_dir)
  out.parent.mkdir(parents=True, exist_ok=True)
  tmp = out.parent / f".{out.name}.{tag}-{os.getpid()}"
  shutil.rmtree(tmp, ignore_errors=True)
  tmp.mkdir()
  try:
    yield tmp
    if out.exists():
      shutil.rmtree(out)
    os.replace(tmp, out)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
