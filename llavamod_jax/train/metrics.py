"""What a run reports while it trains: metrics.jsonl, TensorBoard scalars, and the loss plot.

Process 0 writes; the other processes' writers do nothing. A remote workdir (gs://) has no append, so
the writer keeps the file's lines and rewrites it whole at every logged step.
"""

from __future__ import annotations

import io
import json
import logging
import time

import jax

from llavamod_jax import fileutil

log = logging.getLogger(__name__)
LOSS_NAMES = ("loss", "kl", "ce", "aux", "preference")  # shown in the log line and plotted


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
  names = [k for k in LOSS_NAMES if any(k in r for r in rows)]
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
