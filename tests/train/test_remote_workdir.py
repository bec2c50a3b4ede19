"""A gs:// workdir: every file the loop, the report and the readers write or read goes through epath.

`etils.epath.testing.mock_epath` maps gs://bucket/... onto a local folder, so these tests see what a
run on a pod slice leaves in its bucket. Orbax's array writes go through tensorstore, which this mock
does not reach: checkpoints are saved to the mapped folder directly, and `checkpoint.restore_model`
is pointed there.
"""

import json
import logging
import os
from pathlib import Path

import jax
import numpy as np
import pytest
from etils.epath import gpath
from etils.epath import testing as epath_testing

import tiny_run
from llavamod_jax import checkpoint, fileutil, workdir
from llavamod_jax.train import config as config_lib
from llavamod_jax.train import build, loop, metrics, report

RUN = "gs://bucket/run"


@pytest.fixture
def gcs(tmp_path, monkeypatch):
  """gs://... -> tmp_path/gcs/... for every epath call; the test runs in an empty directory."""
  root = tmp_path / "gcs"
  root.mkdir(exist_ok=True)

  def local(p):
    s = os.fspath(p)
    return str(root / s[len("gs://"):]) if s.startswith("gs://") else s

  def remote(p):
    s = os.fspath(p)
    return "gs://" + os.path.relpath(s, root) if s.startswith(str(root)) else s

  def mapped(original, path, *args, **kwargs):
    return original(local(path), *(local(a) for a in args), **kwargs)

  def open_(original, path, mode):  # a bucket has no directories to create first
    if "w" in mode or "a" in mode:
      os.makedirs(os.path.dirname(local(path)), exist_ok=True)
    return original(local(path), mode)

  def glob(original, path):
    return [remote(p) for p in original(local(path))]

  def walk(original, top, **kwargs):
    for dirpath, dirs, files in original(local(top), **kwargs):
      yield remote(dirpath), dirs, files

  names = ("copy", "exists", "isdir", "listdir", "makedirs", "mkdir", "remove", "rename", "replace",
           "rmtree", "stat")
  cwd = tmp_path / "cwd"
  cwd.mkdir()
  monkeypatch.chdir(cwd)
  monkeypatch.setattr(gpath, "_is_tf_installed", lambda: False)  # tf's gfile would bypass the mock
  with epath_testing.mock_epath(open=open_, glob=glob, walk=walk, **{n: mapped for n in names}):
    yield root
  assert not os.listdir(cwd), "a gs:// path became a local one"  # no ./gs:/bucket/...


class _EventWriter:
  """Stands in for tensorboard's EventFileWriter: records its logdir and events."""

  def __init__(self, logdir, fail_on=None):
    if fail_on == "init":
      raise ImportError("Please install gcsfs to access Google Storage")
    self.logdir, self.events, self.fail_on = logdir, [], fail_on

  def add_event(self, event):
    if self.fail_on == "write":
      raise OSError("write failed")
    self.events.append(event)

  def flush(self):
    pass

  def close(self):
    pass


def _event_writer(monkeypatch, fail_on=None):
  from tensorboard.summary.writer import event_file_writer
  made = []

  def make(logdir):
    made.append(_EventWriter(logdir, fail_on))
    return made[-1]

  monkeypatch.setattr(event_file_writer, "EventFileWriter", make)
  return made


def _steps(path: Path) -> list[int]:
  return [json.loads(l)["step"] for l in path.read_text().splitlines()]


def test_metric_writer_rewrites_metrics_jsonl_and_truncates(gcs, monkeypatch):
  made = _event_writer(monkeypatch)
  run = fileutil.path(RUN)
  run.mkdir(parents=True, exist_ok=True)
  writer = metrics.MetricWriter(run)
  for step in (1, 2, 3):
    writer.write(step, {"loss": 1.0 / step})
  writer.close()
  assert _steps(gcs / "bucket/run/metrics.jsonl") == [1, 2, 3]
  assert made[0].logdir == f"{RUN}/tensorboard" and len(made[0].events) == 3

  resumed = metrics.MetricWriter(run)  # a restart from the checkpoint of step 2
  resumed.truncate_after(2)
  assert _steps(gcs / "bucket/run/metrics.jsonl") == [1, 2]
  resumed.write(3, {"loss": 0.5})
  resumed.write(4, {"loss": 0.25})
  assert _steps(gcs / "bucket/run/metrics.jsonl") == [1, 2, 3, 4]

  out = metrics.plot_losses(run)
  assert str(out) == f"{RUN}/loss_curves.png"
  assert (gcs / "bucket/run/loss_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("fail_on", ["init", "write"])
def test_tensorboard_failure_warns_once_and_training_goes_on(gcs, monkeypatch, caplog, fail_on):
  _event_writer(monkeypatch, fail_on)
  with caplog.at_level(logging.WARNING, logger=metrics.log.name):
    writer = metrics.MetricWriter(fileutil.path(RUN))
    for step in (1, 2):
      writer.write(step, {"loss": 1.0})
    writer.close()
  warned = [r for r in caplog.records if "tensorboard cannot write" in r.getMessage()]
  assert len(warned) == 1 and f"{RUN}/tensorboard" in warned[0].getMessage()
  assert _steps(gcs / "bucket/run/metrics.jsonl") == [1, 2]


def test_tensorboard_without_gcs_support_warns(gcs, caplog):
  pytest.importorskip("tensorboard")
  try:
    import gcsfs  # noqa: F401
    pytest.skip("gcsfs is installed: tensorboard would reach for a real bucket")
  except ImportError:
    pass
  with caplog.at_level(logging.WARNING, logger=metrics.log.name):
    writer = metrics.MetricWriter(fileutil.path(RUN))
    writer.write(1, {"loss": 1.0})
    writer.close()
  assert any("tensorboard cannot write" in r.getMessage() for r in caplog.records)
  assert _steps(gcs / "bucket/run/metrics.jsonl") == [1]


def test_local_metric_writer_appends_as_before(tmp_path, monkeypatch):
  _event_writer(monkeypatch)
  (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 1.0}) + "\n")
  writer = metrics.MetricWriter(fileutil.path(str(tmp_path)))
  assert isinstance(writer.path, Path)  # local paths stay pathlib's
  writer.write(2, {"loss": 0.5})
  assert _steps(tmp_path / "metrics.jsonl") == [1, 2]


@pytest.fixture
def student_checkpoint(tmp_path):
  """gs://bucket/run/checkpoints/5, written before the mock starts (orbax's writes do not survive
  it: tensorstore's file driver sees one file system, the mocked epath another)."""
  model, params = tiny_run.student()
  checkpoint.save_model(tmp_path / "gcs/bucket/run/checkpoints", model, params, step=5)
  return model, params


def test_run_info_tokenizer_and_model_round_trip(student_checkpoint, gcs, monkeypatch):
  model, params = student_checkpoint
  tokenizer = tiny_run.tokenizer()
  cfg = config_lib.base()
  cfg.data.eval_files = [str(gcs / "data/eval.jsonl")]

  run = fileutil.path(RUN)
  run.mkdir(parents=True, exist_ok=True)
  loop.write_run_info(run, cfg, model, tokenizer)
  assert (gcs / "bucket/run/tokenizer/tokenizer.json").is_file()
  assert json.loads((gcs / "bucket/run/config.json").read_text())["stage"] == "mimic"
  info = workdir.read(RUN)
  assert info.data.eval_files == (str(gcs / "data/eval.jsonl"),)
  assert (info.image_token_id, info.num_image_tokens) == (model.cfg.image_token_id,
                                                          model.cfg.num_image_tokens)
  assert workdir.is_workdir(RUN) and not workdir.is_workdir("gs://bucket/nothing")

  # Orbax's array reads go through tensorstore, not epath: read the folder the bucket maps to.
  restore = checkpoint.restore_model
  monkeypatch.setattr(checkpoint, "restore_model", lambda ckpt_dir, step=None: restore(
      gcs / str(ckpt_dir).removeprefix("gs://"), step))
  got_model, got_params, got_tokenizer, got_info = workdir.load_model(RUN)
  assert got_info == info and got_model.cfg == model.cfg
  assert got_tokenizer.get_vocab() == tokenizer.get_vocab()
  for g, w in zip(jax.tree.leaves(got_params), jax.tree.leaves(params)):
    np.testing.assert_array_equal(np.asarray(g), np.asarray(w))

  # The report reads the workdir back and writes report.json beside it.
  monkeypatch.setattr(report.evaluation, "read_records", lambda files, image_root, limit: [])
  monkeypatch.setattr(report, "_quality", lambda *args: {"params": {"activated": 1, "total": 2}})
  got = report.final_report(cfg, RUN)
  assert got == {"student": {"params": {"activated": 1, "total": 2}}}
  assert json.loads((gcs / "bucket/run/report.json").read_text()) == got


def test_teacher_workdir_uri_is_kept():
  cfg = config_lib.base()
  cfg.teacher.init, cfg.teacher.workdir = "workdir", "gs://bucket/teacher"
  assert build.teacher_dir(cfg) == "gs://bucket/teacher"


def test_remote_hf_directory_is_refused_by_name(gcs):
  with pytest.raises(FileNotFoundError, match="gs://bucket/hf: not a training workdir"):
    workdir.load_model("gs://bucket/hf")
