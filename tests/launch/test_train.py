"""launch/train.py: every stage at tiny size, exact resume after SIGKILL, config errors, NaN guard."""

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from llavamod_jax.demo import assets

# The module fixture is computed once: every test of this file runs on one xdist worker
# (`--dist loadgroup`, pyproject.toml).
pytestmark = pytest.mark.xdist_group("train")

REPO = Path(__file__).resolve().parents[2]
TINY = [  # a few steps of tiny models on a small synthetic set
    "--config.total_steps=8", "--config.log_every=1", "--config.checkpoint_every=3",
    "--config.demo.teacher_steps=4", "--config.demo.vision_steps=3",
    "--config.demo.shapes.num_train=48",
    "--config.demo.shapes.num_eval=8", "--config.data.batch_size=4", "--config.final_report=False",
    "--config.data.max_length=96", "--config.demo.shapes.image_size=32",
    "--config.demo.baseline=False",  # the demo fixture's run alone trains the CE-alone student
]


def _train(args, cwd, timeout=240, check=True):
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "TRANSFORMERS_VERBOSITY": "error"}
  p = subprocess.run([sys.executable, str(REPO / "launch" / "train.py"), *args], cwd=cwd, env=env,
                     capture_output=True, text=True, timeout=timeout)
  if check and p.returncode:
    raise AssertionError(f"train.py failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
  return p


def _metrics(workdir):
  return [json.loads(l) for l in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
  """The demo chain in one cache: mimic (training the tiny teacher first), then preference."""
  root = tmp_path_factory.mktemp("demo")
  cache = f"--config.demo.cache={root / 'cache'}"
  _train([f"--config={REPO / 'configs/mimic.py'}", f"--workdir={root / 'mimic'}", cache, *TINY,
          "--config.demo.baseline=True"], root)
  return root, cache


@pytest.mark.slow
def test_mimic_stage_runs_and_writes_its_workdir(demo):
  root, _ = demo
  work = root / "mimic"
  rows = _metrics(work)
  assert [r["step"] for r in rows] == list(range(1, 9))
  for key in ("loss", "kl", "ce", "aux", "learning_rate", "grad_norm", "tokens_per_sec",
              "moe/max_expert_load"):
    assert all(np.isfinite(r[key]) for r in rows), key
  assert sorted(p.name for p in (work / "checkpoints").iterdir()) == ["6", "8"]  # keep 2
  info = json.loads((work / "run.json").read_text())
  assert info["stage"] == "mimic" and info["num_image_tokens"] == 16
  assert (work / "tokenizer" / "tokenizer.json").exists() and (work / "loss_curves.png").exists()
  assert list((work / "tensorboard").iterdir())
  assert (root / "cache" / "teacher_hf" / "config.json").exists()  # the demo teacher, cached
  for art, marker in (("teacher_hf", "config.json"), ("tokenizer", "tokenizer.json")):
    assert assets.is_cached(root / "cache" / art, marker)  # stamped: shapes version and recipe


@pytest.mark.slow
def test_ce_alone_baseline_is_the_same_student_without_a_teacher(demo):
  """WORKDIR/baseline_ce: the distilled run's student, data, steps and optimizer with CE alone.
  d2s distils with KL + CE (weight 1), so both runs' first step computes the same CE and aux loss
  on the same batch from the same parameters; they part from the first update with a learning rate
  above 0 (the second: ceil(0.03 x 8) = 1 warmup step at rate 0, as HF Trainer's)."""
  root, _ = demo
  work, base = root / "mimic", root / "mimic" / "baseline_ce"
  distilled, alone = _metrics(work), _metrics(base)
  assert [r["step"] for r in alone] == list(range(1, 9))
  assert not any("kl" in r for r in alone) and all(np.isfinite(r["ce"]) for r in alone)
  assert json.loads((base / "run.json").read_text())["teacher"] is None
  cfg, base_cfg = (json.loads((w / "config.json").read_text()) for w in (work, base))
  assert base_cfg["teacher"]["init"] == "none" and cfg["loss"]["ce_weight"] == 1.0
  for key in ("seed", "total_steps", "trainable", "student", "optimizer", "data"):
    assert base_cfg[key] == cfg[key], key
  for key in ("ce", "aux", "moe/max_expert_load"):
    assert alone[0][key] == pytest.approx(distilled[0][key], rel=1e-5), key
  assert alone[0]["learning_rate"] == 0.0 and alone[1]["learning_rate"] > 0.0
  assert alone[2]["ce"] != pytest.approx(distilled[2]["ce"], rel=1e-5)


@pytest.mark.slow
def test_ce_alone_baseline_resumes_and_is_reported(demo):
  """With its last checkpoint gone, a restart trains the baseline's last steps again (the distilled
  run is complete) and logs what it logged before; the report then scores it beside the others."""
  root, cache = demo
  work, base = root / "mimic", root / "mimic" / "baseline_ce"
  before = _metrics(base)
  shutil.rmtree(base / "checkpoints" / "8")
  p = _train([f"--config={REPO / 'configs/mimic.py'}", f"--workdir={work}", cache, *TINY,
              "--config.demo.baseline=True", "--config.final_report=True"], root)
  assert f"resumed from {base}/checkpoints/6" in p.stdout + p.stderr
  after = _metrics(base)
  assert [r["step"] for r in after] == list(range(1, 9))
  for a, b in zip(before, after):
    for key in ("loss", "ce", "aux", "grad_norm", "learning_rate"):
      assert a[key] == b[key], (a["step"], key, a[key], b[key])
  report = json.loads((work / "report.json").read_text())
  assert list(report) == ["student", "student_ce_alone", "teacher"]
  for name in ("student", "student_ce_alone"):
    assert report[name]["kl_to_teacher"]["kl"] > 0, name
    assert report[name]["params"] == report["student"]["params"]
  assert report["student_ce_alone"]["kl_to_teacher"] != report["student"]["kl_to_teacher"]
  assert "| student (CE alone) |" in p.stdout


@pytest.mark.slow
def test_preference_and_adaptor_stages_run(demo):
  root, cache = demo
  _train([f"--config={REPO / 'configs/preference.py'}", f"--workdir={root / 'pref'}", cache,
          f"--config.student.workdir={root / 'mimic'}", *TINY], root)
  rows = _metrics(root / "pref")
  assert {"preference", "rewards/margin", "rewards/accuracy"} <= set(rows[-1])
  _train([f"--config={REPO / 'configs/adaptor.py'}", f"--workdir={root / 'adaptor'}", cache, *TINY],
         root)
  assert len(_metrics(root / "adaptor")) == 8


# launch/train.py, with the step after checkpoint 3 hanging: a SIGKILL then lands mid-run, always.
_HANG_AT_STEP_5 = """
import runpy, sys, time
from llavamod_jax import sharding
original, calls = sharding.batch_to_device, [0]
def hang_at_step_5(batch, mesh):
  calls[0] += 1
  if calls[0] == 5:
    time.sleep(3600)
  return original(batch, mesh)
sharding.batch_to_device = hang_at_step_5
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.slow
def test_sigkill_and_restart_logs_the_uninterrupted_losses(demo):
  """Killed (SIGKILL, no chance to save) during step 5, after checkpoint 3: the restart goes on from
  step 3 and logs every loss the fixture's uninterrupted run logged."""
  root, cache = demo
  common = [f"--config={REPO / 'configs/mimic.py'}", cache, *TINY]
  work = root / "killed"
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "TRANSFORMERS_VERBOSITY": "error"}
  proc = subprocess.Popen([sys.executable, "-c", _HANG_AT_STEP_5, str(REPO / "launch" / "train.py"),
                           *common, f"--workdir={work}"], cwd=root, env=env,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.time() + 200
  while (not (work / "metrics.jsonl").exists() or len(_metrics(work)) < 4
         or not (work / "checkpoints" / "3").is_dir()):  # orbax renames it into place when final
    assert proc.poll() is None and time.time() < deadline, "the run ended before it could be killed"
    time.sleep(0.05)
  proc.send_signal(signal.SIGKILL)
  assert proc.wait() == -signal.SIGKILL
  assert sorted(p.name for p in (work / "checkpoints").iterdir()) == ["3"]
  assert [r["step"] for r in _metrics(work)] == [1, 2, 3, 4]  # step 4 logged, never saved
  p = _train([*common, f"--workdir={work}"], root)
  assert f"resumed from {work}/checkpoints/3" in p.stdout + p.stderr
  straight, resumed = _metrics(root / "mimic"), _metrics(work)  # the fixture's uninterrupted run
  assert [r["step"] for r in resumed] == list(range(1, 9))
  for a, b in zip(straight, resumed):
    for key in ("loss", "kl", "ce", "aux", "grad_norm"):
      assert a[key] == b[key], (a["step"], key, a[key], b[key])


@pytest.mark.slow
# TensorStore's reads in flight when a restore fails report to orbax's closed event loop; the run
# drops those reports (resume.py), pytest's per-test hook sees them first.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_a_damaged_latest_checkpoint_falls_back_to_the_one_before(demo, tmp_path, caplog):
  """The fixture's finished run (checkpoints 6 and 8) with checkpoint 8 damaged three ways in turn:
  its arrays overwritten, its arrays truncated, its optimizer state deleted. Each restart warns
  once, naming the step and why, resumes from 6 and logs what the uninterrupted run logged; every
  damaged step stays, renamed aside."""
  import damage

  from llavamod_jax.train import loop

  root, _ = demo
  cfg = _tiny_mimic_config(root)
  cfg.total_steps, cfg.log_every = 8, 1  # as TINY: the fixture's run is the uninterrupted one
  work = tmp_path / "damaged"
  shutil.copytree(root / "mimic", work, ignore=shutil.ignore_patterns("baseline_ce"))
  straight = _metrics(root / "mimic")
  for kind in ("overwrite", "truncate", "delete_item"):
    damage.DAMAGE[kind](work / "checkpoints" / "8")
    caplog.clear()
    with caplog.at_level(logging.WARNING):
      loop.run(cfg, work)
    warned = [r.getMessage() for r in caplog.records
              if r.levelno >= logging.WARNING and "cannot be restored" in r.getMessage()]
    assert len(warned) == 1 and f"{work}/checkpoints/8 cannot be restored (" in warned[0], warned
    assert "resuming from step 6" in warned[0]
    resumed = _metrics(work)
    assert [r["step"] for r in resumed] == list(range(1, 9)), kind
    for a, b in zip(straight, resumed):
      for key in ("loss", "kl", "ce", "aux", "grad_norm"):
        assert a[key] == b[key], (kind, a["step"], key, a[key], b[key])
  assert sorted(p.name for p in (work / "checkpoints").iterdir()) == [
      "6", "8", "8.damaged", "8.damaged-2", "8.damaged-3"]


@pytest.mark.parametrize("flag, expected", [
    ("--config.optimizer.lrr=1",
     "error: --config.optimizer.lrr=1: the config has no key 'lrr'. Did you mean \"lr\" instead of "
     "\"lrr\"?"),
    ("--config=configs/mimic.py:bogus",
     "error: --config=configs/mimic.py:bogus: ValueError: configs/mimic.py:bogus: expected one of "
     "('d2s', 'd2d', 'd2s_paper', 'd2d_paper')"),
    ("--config.optimizer.lr=fast",
     "error: --config.optimizer.lr=fast: ValueError: could not convert string to float: 'fast'"),
    ("--config=configs/nope.py",
     "error: OSError: [Errno 2] No such file or directory: 'configs/nope.py'"),
    ("--config.student.moe.dispatch=sorted",
     "error: config.student.moe.dispatch: 'sorted': expected one of ('dropless', 'capacity')"),
    ("--config.data.train_files=missing.jsonl",
     "error: config.data.train_files: [0] 'missing.jsonl': no such file"),
])
def test_a_user_error_is_one_line(tmp_path, flag, expected):
  """Unknown or misspelt keys (with the suggestion), bad variants, bad values, missing files: one
  line on stderr, exit 1, no traceback; checked before any model or data is built."""
  p = _train(["--config=configs/mimic.py", flag, f"--workdir={tmp_path / 'w'}",
              f"--config.demo.cache={tmp_path / 'cache'}"], REPO, check=False, timeout=120)
  assert p.returncode == 1
  assert p.stderr.strip().splitlines()[-1] == expected, p.stderr
  assert "Traceback" not in p.stderr + p.stdout
  assert not (tmp_path / "cache").exists()  # nothing built


@pytest.mark.slow
def test_a_changed_model_or_data_is_refused_naming_each_key(demo, tmp_path):
  """The fixture's workdir restarted with another student width, then another batch: one message
  naming the workdir, each key and both values, exit 1; the workdir is left as it was."""
  root, cache = demo
  work = tmp_path / "changed"
  shutil.copytree(root / "mimic", work, ignore=shutil.ignore_patterns("baseline_ce"))
  before = {p: p.read_bytes() for p in work.rglob("*") if p.is_file()}
  common = [f"--config={REPO / 'configs/mimic.py'}", cache, *TINY, f"--workdir={work}"]
  p = _train([*common, "--config.student.scratch.hidden_size=96"], root, check=False)
  assert p.returncode == 1 and "Traceback" not in p.stderr and "Event loop" not in p.stderr
  err = p.stderr[p.stderr.index("error: "):].splitlines()
  assert err[0] == (f"error: {work}: this run's config changes the parameter or optimizer-state "
                    "shapes of the run the workdir holds, so it cannot continue it:")
  assert "  config.student.scratch.hidden_size: 64 in the workdir, 96 now" in err
  assert "  params/language_model/embed_tokens/embedding: stored (453, 64), this run (453, 96)" in err
  assert err[-1] == "Use a new --workdir, or set these keys back to the workdir's values."
  p = _train([*common, "--config.data.batch_size=8"], root, check=False)
  assert p.returncode == 1 and "Traceback" not in p.stderr
  assert "  config.data.batch_size: 4 in the workdir, 8 now" in p.stderr
  assert {p: p.read_bytes() for p in work.rglob("*") if p.is_file()} == before


@pytest.mark.slow
@pytest.mark.parametrize("policy", ["stop", "skip"])
def test_nan_guard(tmp_path, monkeypatch, policy):
  """A batch that makes the loss NaN: 'stop' raises and keeps the last good checkpoint; 'skip'
  leaves the state untouched and goes on. A NaN state is never checkpointed."""
  import jax
  import jax.numpy as jnp

  from llavamod_jax import checkpoint, demo, sharding
  from llavamod_jax.demo import recipes
  from llavamod_jax.train import loop

  cfg = recipes.teacher()
  cfg.demo.cache = str(tmp_path / "cache")
  cfg.total_steps, cfg.checkpoint_every, cfg.log_every = 4, 1, 1
  cfg.demo.shapes.num_train, cfg.demo.shapes.num_eval, cfg.demo.shapes.image_size = 16, 4, 32
  cfg.data.batch_size, cfg.data.max_length = 2, 96
  cfg.nan_policy = policy
  cfg = demo.prepare(cfg)
  calls = {"n": 0}
  original = sharding.batch_to_device

  def poisoned(batch, mesh):
    calls["n"] += 1
    out = original(batch, mesh)
    if calls["n"] == 2:
      out["pixel_values"] = out["pixel_values"] * jnp.nan
    return out

  monkeypatch.setattr(sharding, "batch_to_device", poisoned)
  work = tmp_path / "work"
  if policy == "stop":
    with pytest.raises(loop.NonFiniteLoss, match="step 2"):
      loop.run(cfg, work)
    assert sorted(p.name for p in (work / "checkpoints").iterdir()) == ["1"]
  else:
    last = loop.run(cfg, work)
    assert last["skipped_total"] == 1
    rows = _metrics(work)
    assert [r["skipped"] for r in rows] == [0, 1, 0, 0]
  _, params = checkpoint.restore_model(work / "checkpoints")
  assert all(bool(jnp.isfinite(x).all()) for x in jax.tree.leaves(params))


@pytest.mark.slow
def test_eight_simulated_devices_log_the_one_device_losses(demo):
  """--config.mesh.data=2 --config.mesh.expert=4 on 8 CPU devices: the same run, the same losses."""
  root, cache = demo
  env_flags = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
  old = {k: os.environ.get(k) for k in env_flags}
  os.environ.update(env_flags)
  try:
    _train([f"--config={REPO / 'configs/mimic.py'}", f"--workdir={root / 'mesh'}", cache, *TINY,
            "--config.mesh.data=2", "--config.mesh.expert=4"], root)
  finally:
    for k, v in old.items():
      os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
  one, eight = _metrics(root / "mimic"), _metrics(root / "mesh")
  assert len(one) == len(eight) == 8
  for a, b in zip(one, eight):
    for key in ("loss", "kl", "ce", "aux"):
      assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), (a["step"], key)


def _tiny_mimic_config(root):
  """configs/mimic.py as TINY sets it, on the demo fixture's cache, turned into plain inputs."""
  import importlib.util

  from llavamod_jax import demo as demo_lib

  spec = importlib.util.spec_from_file_location("mimic_config", REPO / "configs" / "mimic.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  cfg = module.get_config()
  cfg.demo.cache = str(root / "cache")
  cfg.demo.teacher_steps, cfg.demo.vision_steps = 4, 3
  cfg.demo.shapes.update({"num_train": 48, "num_eval": 8, "image_size": 32})
  cfg.total_steps, cfg.log_every, cfg.checkpoint_every, cfg.final_report = 6, 2, 3, False
  cfg.data.batch_size, cfg.data.max_length = 4, 96
  return demo_lib.prepare(cfg)


@pytest.mark.slow
def test_sigterm_saves_at_that_step_and_the_restart_continues(demo, tmp_path, monkeypatch):
  """SIGTERM during step 4: the step finishes, checkpoint 4 is saved (checkpoint_every is 3), the run
  returns; restarted, it goes on from step 4 and logs what the fixture's uninterrupted run logged."""
  from llavamod_jax import sharding
  from llavamod_jax.train import loop

  root, _ = demo
  cfg = _tiny_mimic_config(root)
  cfg.total_steps, cfg.log_every = 8, 1  # as TINY: the fixture's run is the uninterrupted one
  calls = {"n": 0}
  original = sharding.batch_to_device

  def terminated_at_step_4(batch, mesh):
    calls["n"] += 1
    if calls["n"] == 4:
      os.kill(os.getpid(), signal.SIGTERM)
    return original(batch, mesh)

  work = tmp_path / "preempted"
  monkeypatch.setattr(sharding, "batch_to_device", terminated_at_step_4)
  loop.run(cfg, work)
  assert sorted(int(p.name) for p in (work / "checkpoints").iterdir()) == [3, 4]
  assert [r["step"] for r in _metrics(work)] == [1, 2, 3, 4]
  monkeypatch.setattr(sharding, "batch_to_device", original)
  loop.run(cfg, work)
  straight, resumed = _metrics(root / "mimic"), _metrics(work)
  assert [r["step"] for r in resumed] == list(range(1, 9))
  for a, b in zip(straight, resumed):
    for key in ("loss", "kl", "ce", "aux", "grad_norm"):
      assert a[key] == b[key], (a["step"], key, a[key], b[key])


@pytest.mark.slow
def test_periodic_evaluation_logs_the_held_out_kl(demo, tmp_path):
  """eval_every: the held-out KL in metrics.jsonl equals evaluation.kl_to_teacher of the saved
  student on the same records (one batch of them), at the step it was logged."""
  from llavamod_jax import evaluation, workdir
  from llavamod_jax.train import loop

  root, _ = demo
  cfg = _tiny_mimic_config(root)
  held_out = tmp_path / "held_out.jsonl"  # exactly one batch, so per-batch and per-token means agree
  held_out.write_text("".join(Path(cfg.data.eval_files[0]).read_text().splitlines(True)[:4]))
  cfg.data.eval_files = [str(held_out)]
  cfg.eval_every, cfg.eval_batches = 3, 1
  work = tmp_path / "work"
  loop.run(cfg, work)

  rows = _metrics(work)
  assert [r["step"] for r in rows] == [2, 3, 4, 6]
  assert "eval/kl" not in rows[0] and "loss" not in rows[1]  # eval-only line at step 3
  assert "eval/kl" in rows[3] and "loss" in rows[3]  # both at the last step
  last = rows[3]
  assert last["eval/loss"] == pytest.approx(last["eval/kl"] + last["eval/ce"] + 0.01 * last["eval/aux"],
                                            rel=1e-5)
  student, sparams, tokenizer, info = workdir.load_model(work)
  teacher, tparams, _, tinfo = workdir.load_model(info.teacher)
  records = evaluation.read_records([held_out], image_root=cfg.data.image_root)
  batches = evaluation.kl_batches(tokenizer, info, tinfo, records, batch_size=4, max_length=96)
  want = evaluation.kl_to_teacher(student, sparams, teacher, tparams, batches)["kl"]
  assert last["eval/kl"] == pytest.approx(want, rel=1e-4)


@pytest.mark.slow
def test_scanned_layers_log_the_unrolled_losses(demo, tmp_path):
  """scan_layers on for the student and the teacher (upcycled MoE in every other layer, trainable
  FFN patterns, checkpoints): the same run as the fixture's unrolled one, the same losses."""
  from llavamod_jax import checkpoint
  from llavamod_jax.models import scan
  from llavamod_jax.train import loop

  root, _ = demo
  cfg = _tiny_mimic_config(root)
  cfg.total_steps, cfg.log_every = 8, 1  # as TINY
  cfg.student.scan_layers = cfg.teacher.scan_layers = True
  work = tmp_path / "scanned"
  loop.run(cfg, work)
  model, params = checkpoint.restore_model(work / "checkpoints")
  assert model.cfg.text.scan_layers and scan.is_scanned(params["language_model"])
  for a, b in zip(_metrics(root / "mimic"), _metrics(work)):
    for key in ("loss", "kl", "ce", "aux", "grad_norm", "moe/max_expert_load"):
      assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), (a["step"], key)
