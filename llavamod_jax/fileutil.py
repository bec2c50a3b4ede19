"""Writing a whole directory atomically: build it beside its destination, rename it into place."""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import Iterator


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
