"""Distillation runs beyond the default: stored teacher logits (launch/teacher_logits.py, then the
mimic stage with no teacher in memory) and on-policy distillation."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

# The module fixture is computed once: every test of this file runs on one xdist worker
# (`--dist loadgroup`, pyproject.toml).
pytestmark = pytest.mark.xdist_group("distillation_runs")

REPO = Path(__file__).resolve().parents[2]


def _config(root, **overrides):
  """configs/mimic.py (the demo, dense-to-sparse, KL + CE + aux) at tiny size on a cache in `root`."""
  import importlib.util

  from llavamod_jax import demo as demo_lib

  spec = importlib.util.spec_from_file_location("mimic_config", REPO / "configs" / "mimic.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  cfg = module.get_config()
  cfg.demo.cache = str(root / "cache")
  cfg.demo.teacher_steps, cfg.demo.vision_steps = 4, 3
  cfg.demo.shapes.update({"num_train": 12, "num_eval": 4, "image_size": 32})
  if "baseline" in cfg.demo:
    cfg.demo.baseline = False
  cfg.total_steps, cfg.log_every, cfg.checkpoint_every, cfg.final_report = 3, 1, 2, False
  cfg.data.batch_size, cfg.data.max_length = 4, 96
  for key, value in overrides.items():
    section, _, field = key.rpartition(".")
    (cfg[section] if section else cfg)[field] = value
  return demo_lib.prepare(cfg)


def _metrics(workdir):
  return [json.loads(l) for l in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
  root = tmp_path_factory.mktemp("offline")
  _config(root)  # builds the demo cache once
  return root


def _store(cfg, out, **kw):
  from llavamod_jax.train import offline
  return offline.run(cfg, out, **kw)


@pytest.fixture(scope="module")
def online(root, tmp_path_factory):
  """The tiny mimic run with its teacher in memory (3 steps): the reference of the offline runs."""
  from llavamod_jax.train import loop

  work = tmp_path_factory.mktemp("online")
  loop.run(_config(root), work)
  return _metrics(work)


@pytest.mark.slow
def test_full_vocabulary_offline_run_logs_the_online_losses(root, online, tmp_path):
  """k = the vocabulary, float32: the offline run's loss, KL, CE and gradient norm at every step
  equal the online run's (the same gradients, or step 2 would differ). The chunked offline loss
  equals the unchunked one in tests/test_objectives.py."""
  from llavamod_jax.train import loop

  cfg = _config(root)
  summary = _store(cfg, tmp_path / "logits", top_k=_teacher_vocab(cfg), dtype="float32",
                   records_per_part=8)
  assert summary["records"] > 0 and not summary["skipped"]
  offline = _config(root, **{"teacher.init": "offline", "teacher.logits_dir": str(tmp_path / "logits")})
  loop.run(offline, tmp_path / "offline")
  rows = _metrics(tmp_path / "offline")
  assert [r["step"] for r in rows] == [1, 2, 3]
  for x, y in zip(online, rows):
    for key in ("loss", "kl", "ce", "aux", "grad_norm"):
      assert y[key] == pytest.approx(x[key], rel=2e-5, abs=1e-6), (x["step"], key)
  # The offline run records the teacher its logits came from (the final report scores against it).
  info = json.loads((tmp_path / "offline" / "run.json").read_text())
  assert info["teacher"] == cfg.teacher.hf_dir


def _teacher_vocab(cfg):
  from llavamod_jax import hf
  return hf.load_config(cfg.teacher.hf_dir).text.vocab_size


@pytest.mark.slow
def test_top_k_kl_is_a_lower_bound_and_its_gap_is_reported(root, online, tmp_path, capsys):
  """k = 16 in float16: the first step's KL lies below the full KL (the tail bucket merges tokens)
  and close to it; the gap is printed for the record."""
  from llavamod_jax.train import loop

  summary = _store(_config(root), tmp_path / "logits", top_k=16)
  # float16 log-probs and int32 ids per k, float32 log-sum-exp, a JSON header per record.
  assert 16 * 6 + 4 <= summary["bytes_per_token"] < 16 * 6 + 4 + 60
  offline = _config(root, total_steps=1, **{"teacher.init": "offline",
                                             "teacher.logits_dir": str(tmp_path / "logits")})
  loop.run(offline, tmp_path / "offline")  # step 1's KL is before any update: the schedule is moot
  full, top = online[0]["kl"], _metrics(tmp_path / "offline")[0]["kl"]
  with capsys.disabled():
    print(f"\nfirst-step KL: full vocabulary {full:.5f}, top-16 {top:.5f}, gap {full - top:.2e} "
          f"({(full - top) / full:.2%}), {summary['bytes_per_token']:.1f} bytes per position")
  assert top <= full + 1e-5
  assert top > 0.5 * full


@pytest.mark.slow
def test_a_killed_run_resumes_at_its_first_incomplete_part(root, tmp_path):
  cfg = _config(root)
  out = tmp_path / "logits"
  _store(cfg, out, top_k=8, records_per_part=8)
  parts = sorted(out.glob("part-*.json"))
  assert len(parts) >= 3
  before = {p.name: p.read_bytes() for p in out.glob("part-*")}
  stamps = {p.name: p.stat().st_mtime_ns for p in parts}
  # A kill during part 1: its index was never written, its records file is a partial .tmp.
  parts[1].unlink()
  (out / parts[1].with_suffix(".array_record").name).rename(
      out / (parts[1].with_suffix("").name + ".array_record.tmp"))
  _store(cfg, out, top_k=8, records_per_part=8)
  after = {p.name: p.read_bytes() for p in out.glob("part-*")}
  assert after == before  # the same entries, byte for byte
  assert parts[0].stat().st_mtime_ns == stamps[parts[0].name]  # complete parts are not redone
  assert parts[2].stat().st_mtime_ns == stamps[parts[2].name]
  from llavamod_jax.data import teacher_logits
  with pytest.raises(teacher_logits.TeacherLogitsError, match=r"top_k: stored 8, this run 4"):
    _store(cfg, out, top_k=4, records_per_part=8)


@pytest.mark.slow
def test_offline_training_resumes_exactly_and_names_what_it_skips(root, tmp_path):
  """Stopped at step 2 and restarted, the offline run logs the uninterrupted run's losses. A record
  without stored logits (one whose text changed) is skipped and counted; changed settings are an
  error naming each of them."""
  from llavamod_jax.data import pipeline, sources, teacher_logits
  from llavamod_jax.train import build, loop

  cfg = _config(root)
  _store(cfg, tmp_path / "logits", top_k=8)
  offline = lambda **kw: _config(root, **{"teacher.init": "offline",  # noqa: E731
                                          "teacher.logits_dir": str(tmp_path / "logits"), **kw})
  loop.run(offline(total_steps=4), tmp_path / "straight")  # checkpoints at steps 2 and 4
  shutil.copytree(tmp_path / "straight", tmp_path / "resumed")
  shutil.rmtree(tmp_path / "resumed" / "checkpoints" / "4")  # as if killed during step 3
  loop.run(offline(total_steps=4), tmp_path / "resumed")
  a, b = _metrics(tmp_path / "straight"), _metrics(tmp_path / "resumed")
  assert [r["step"] for r in b] == [1, 2, 3, 4]
  for x, y in zip(a, b):
    for key in ("loss", "kl", "ce", "grad_norm"):
      assert x[key] == y[key], (x["step"], key)

  lines = Path(cfg.data.train_files[0]).read_text().splitlines()
  changed = json.loads(lines[0])
  changed["conversations"][-1]["value"] += " (edited)"
  data = tmp_path / "changed.jsonl"
  data.write_text("\n".join([json.dumps(changed), *lines[1:]]) + "\n")
  c = offline()
  c.data.train_files = [str(data)]
  tokenizer = build.tokenizer_for(c)
  student = build.abstract_model(c.student, c, role="student", tokenizer=tokenizer)
  reader = build.stored_teacher_logits(c, student)
  pipe = pipeline.Pipeline(sources.from_files([str(data)], image_root=c.data.image_root),
                           tokenizer, views=build.views(student, None, "pad"), batch_size=4,
                           max_length=96, shuffle=False, num_epochs=1, teacher_logits=reader)
  it = iter(pipe)
  batches = list(it)
  assert it.stats()["skipped"] == {"teacher_logits_missing": 1}
  assert it.stats()["examples"] == len(lines) - 1
  assert batches[0]["teacher_topk_ids"].shape == (4, batches[0]["input_ids"].shape[1], 8)

  with pytest.raises(teacher_logits.TeacherLogitsError,
                     match=r"temperature: stored 1.0, this run 2.0; max_length: stored 96"):
    build.stored_teacher_logits(offline(**{"loss.temperature": 2.0, "data.max_length": 80}),
                                student)


@pytest.mark.slow
def test_the_command_line(root, tmp_path):
  """launch/teacher_logits.py on the demo config, then launch/train.py with the offline teacher;
  bad input is one line and exit code 1."""
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "TRANSFORMERS_VERBOSITY": "error"}
  tiny = [f"--config.demo.cache={root / 'cache'}", "--config.demo.teacher_steps=4",
          "--config.demo.vision_steps=3", "--config.demo.shapes.num_train=12",
          "--config.demo.shapes.num_eval=4", "--config.demo.shapes.image_size=32",
          "--config.data.batch_size=4", "--config.data.max_length=96"]
  out = tmp_path / "logits"
  p = subprocess.run([sys.executable, str(REPO / "launch" / "teacher_logits.py"),
                      f"--config={REPO / 'configs/mimic.py'}", f"--out={out}", "--top_k=8", *tiny],
                     cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
  assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
  assert "bytes per position" in p.stdout + p.stderr
  meta = json.loads((out / "meta.json").read_text())
  assert meta["top_k"] == 8 and meta["summary"]["records"] > 0
  extra = ["--config.demo.baseline=False"] if "baseline" in (REPO / "llavamod_jax/demo/recipes.py"
                                                              ).read_text() else []
  p = subprocess.run([sys.executable, str(REPO / "launch" / "train.py"),
                      f"--config={REPO / 'configs/mimic.py'}", f"--workdir={tmp_path / 'w'}", *tiny,
                      *extra, "--config.teacher.init=offline", f"--config.teacher.logits_dir={out}",
                      "--config.total_steps=2", "--config.log_every=1",
                      "--config.final_report=False"],
                     cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
  assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
  assert "stored top-8 logits" in p.stdout + p.stderr
  assert [r["step"] for r in _metrics(tmp_path / "w")] == [1, 2]
  p = subprocess.run([sys.executable, str(REPO / "launch" / "teacher_logits.py"),
                      f"--config={REPO / 'configs/mimic.py'}", f"--out={out}", "--top_k=4", *tiny],
                     cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
  assert p.returncode == 1
  assert p.stderr.strip().splitlines()[-1].startswith("error: --out=")
  assert "top_k: stored 8, this run 4" in p.stderr


@pytest.mark.slow
def test_on_policy_distillation_trains_on_the_students_samples_and_resumes_exactly(root, tmp_path):
  """loss.on_policy_fraction: the steps drawn train on the student's own samples (no CE on them),
  the others on the data; stopped and restarted, the run logs the uninterrupted run's losses."""
  from llavamod_jax.train import loop, on_policy

  kw = {"loss.on_policy_fraction": 0.5, "loss.on_policy_max_new_tokens": 8, "total_steps": 4}
  drawn = [on_policy.draw(_config(root).seed, s, 0.5) for s in range(4)]
  assert any(drawn) and not all(drawn)  # seed 0 mixes both kinds of step in 4 steps
  loop.run(_config(root, **kw), tmp_path / "straight")
  rows = _metrics(tmp_path / "straight")
  assert [r["on_policy"] for r in rows] == [float(d) for d in drawn]
  for r, d in zip(rows, drawn):
    assert np.isfinite(r["kl"]) and (r["ce"] == 0.0) == d  # every row sampled: no CE at all
  shutil.copytree(tmp_path / "straight", tmp_path / "resumed")
  shutil.rmtree(tmp_path / "resumed" / "checkpoints" / "4")
  loop.run(_config(root, **kw), tmp_path / "resumed")
  for x, y in zip(rows, _metrics(tmp_path / "resumed")):
    for key in ("loss", "kl", "ce", "grad_norm", "on_policy"):
      assert x[key] == y[key], (x["step"], key)


@pytest.mark.slow
def test_two_processes_store_what_one_stores(root, tmp_path):
  """launch/teacher_logits.py over two processes on loopback (2 CPU devices each), each writing the
  rows it read, against one process with 4 devices: the same entries under the same keys."""
  import socket

  from llavamod_jax.data import teacher_logits

  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  tiny = [f"--config={REPO / 'configs/mimic.py'}", f"--config.demo.cache={root / 'cache'}",
          "--config.demo.teacher_steps=4", "--config.demo.vision_steps=3",
          "--config.demo.shapes.num_train=12", "--config.demo.shapes.num_eval=4",
          "--config.demo.shapes.image_size=32", "--config.data.batch_size=4",
          "--config.data.max_length=96", "--top_k=8", "--records_per_part=16"]

  def launch(argvs, devices):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "TRANSFORMERS_VERBOSITY": "error",
           "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
    procs = [subprocess.Popen([sys.executable, str(REPO / "launch" / "teacher_logits.py"), *a],
                              cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for a in argvs]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n---\n".join(o[-2000:] for o in outs)

  launch([[*tiny, f"--out={tmp_path / 'two'}", f"--coordinator_address=127.0.0.1:{port}",
           "--num_processes=2", f"--process_id={i}"] for i in range(2)], devices=2)
  launch([[*tiny, f"--out={tmp_path / 'one'}"]], devices=4)
  assert {p.name[-9:] for p in (tmp_path / "two").glob("part-*.json")} == {"p000.json", "p001.json"}
  one, two = teacher_logits.Reader(tmp_path / "one"), teacher_logits.Reader(tmp_path / "two")
  keys = set(one._load_index())
  assert keys == set(two._load_index()) and len(keys) > 8
  for key in sorted(keys):
    for a, b in zip(one.get(key), two.get(key)):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5, err_msg=key)


@pytest.mark.slow
def test_stored_logits_in_a_bucket(root, tmp_path, monkeypatch):
  """--out=gs://...: parts are written locally and copied whole, the index last; the bucket reads
  back what a local directory holds (array_record's own GCS reader is mapped onto the mock)."""
  from mock_bucket import mock_bucket

  from llavamod_jax.data import teacher_logits

  cfg = _config(root)
  _store(cfg, tmp_path / "local", top_k=8, records_per_part=16)
  gcs = tmp_path / "gcs"
  gcs.mkdir()
  opened = []
  real_open = teacher_logits.open_records

  def mapped(path):
    if not str(path).startswith("gs://"):
      return real_open(path)
    opened.append(str(path))
    return real_open(str(gcs / str(path)[len("gs://"):]))

  monkeypatch.setattr(teacher_logits, "open_records", mapped)
  with mock_bucket(gcs, monkeypatch):
    _store(_config(root), "gs://bucket/logits", top_k=8, records_per_part=16)
    assert not list((gcs / "bucket" / "logits").glob("*.tmp"))
    local = teacher_logits.Reader(tmp_path / "local")
    remote = teacher_logits.Reader("gs://bucket/logits")
    keys = sorted(local._load_index())
    assert keys == sorted(remote._load_index())
    for key in keys:
      for a, b in zip(local.get(key), remote.get(key)):
        np.testing.assert_array_equal(a, b)
  assert opened and all(p.startswith("gs://bucket/logits/part-") for p in opened)
  assert (json.loads((gcs / "bucket/logits/meta.json").read_text())["summary"]
          == json.loads((tmp_path / "local/meta.json").read_text())["summary"])
