"""A checkpoint step damaged the ways disks and syncs damage them (tests of train/resume.py)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np


def array_files(step_dir: Path) -> list[Path]:
  """The files holding the params' bytes (OCDBT data files), not the manifests."""
  files = [p for p in (step_dir / "params").rglob("*") if p.is_file() and p.parent.name == "d"]
  assert files, sorted(p.name for p in (step_dir / "params").rglob("*"))
  return files


def overwrite(step_dir: Path) -> None:
  """Every array file rewritten with random bytes of the same length (a bad sync)."""
  rng = np.random.default_rng(0)
  for f in array_files(step_dir):
    f.write_bytes(rng.integers(0, 256, f.stat().st_size, dtype=np.uint8).tobytes())


def truncate(step_dir: Path) -> None:
  """Every array file cut to half its length (a copy or a disk that stopped short)."""
  for f in array_files(step_dir):
    os.truncate(f, f.stat().st_size // 2)


def delete_item(step_dir: Path) -> None:
  """The optimizer state's directory gone."""
  shutil.rmtree(step_dir / "opt_state")


DAMAGE = {"overwrite": overwrite, "truncate": truncate, "delete_item": delete_item}
