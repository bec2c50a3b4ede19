"""launch/train.py over two processes on loopback (2 CPU devices each) against one process with 4:
the same losses, one set of files, a checkpoint that restores; preference batches regrouped."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
import tiny_run
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from llavamod_jax import checkpoint, models, sharding

# The module fixture is computed once: every test of this file runs on one xdist worker
# (`--dist loadgroup`, pyproject.toml).
pytestmark = pytest.mark.xdist_group("multihost")

REPO = Path(__file__).resolve().parents[2]
STEPS = 4
# The mimic stage on tiny_run's models (a dense teacher, an MoE student, both from workdirs: no demo
# teacher to train) and a small shapes set; the default mesh puts all 4 devices on "data".
TINY = [f"--config={REPO / 'configs/mimic.py'}", f"--config.total_steps={STEPS}",
        "--config.log_every=1", "--config.checkpoint_every=2", "--config.final_report=False",
        "--config.demo.shapes.num_train=24", "--config.demo.shapes.num_eval=4",
        "--config.demo.shapes.image_size=32", "--config.demo.shapes.file=captions_train.jsonl",
        "--config.data.batch_size=4", "--config.data.max_length=128", "--config.optimizer.lr=1e-2",
        "--config.demo.baseline=False"]
KEYS = ("loss", "kl", "ce", "aux", "grad_norm")


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _launch(argvs, devices: int, cwd, timeout=300):
  """Start one train.py per argv list (all at once), wait for all; returns their stdouts."""
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "TRANSFORMERS_VERBOSITY": "error",
         "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
  procs = [subprocess.Popen([sys.executable, str(REPO / "launch" / "train.py"), *argv], cwd=cwd,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for argv in argvs]
  outs = []
  try:
    for p in procs:
      outs.append(p.communicate(timeout=timeout)[0])
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.communicate()
  for p, out in zip(procs, outs):
    if p.returncode:
      raise AssertionError(f"train.py failed ({p.returncode}):\n" + "\n---\n".join(
          o[-3000:] for o in outs))
  return outs


def _metrics(workdir):
  return [json.loads(l) for l in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  root = tmp_path_factory.mktemp("multihost")
  student, sparams = tiny_run.student()
  teacher = models.build(tiny_run.llava_config())
  tiny_run.make_workdir(root / "student", student, sparams)
  tiny_run.make_workdir(root / "teacher", teacher, tiny_run.random_params(teacher, seed=3))
  common = [*TINY, f"--config.demo.cache={root / 'cache'}",
            "--config.student.init=workdir", f"--config.student.workdir={root / 'student'}",
            "--config.teacher.init=workdir", f"--config.teacher.workdir={root / 'teacher'}"]
  # Two processes first, so that their process 0 builds the shapes set while process 1 waits.
  address = f"--coordinator_address=127.0.0.1:{_free_port()}"
  two = _launch([[*common, f"--workdir={root / 'two'}", address, "--num_processes=2",
                  f"--process_id={i}"] for i in range(2)], devices=2, cwd=root)
  _launch([[*common, f"--workdir={root / 'one'}"]], devices=4, cwd=root)
  return root, two


@pytest.mark.slow
def test_two_processes_log_the_one_process_losses(runs):
  root, logs = runs
  assert all(f"process {i} of 2, 2 local / 4 global devices" in logs[i] for i in range(2))
  assert not any("skipped" in line for log in logs for line in log.splitlines()
                 if "data:" in line)  # no record skipped: the global batches match exactly
  one, two = _metrics(root / "one"), _metrics(root / "two")
  assert [r["step"] for r in two] == [r["step"] for r in one] == list(range(1, STEPS + 1))
  for a, b in zip(one, two):
    for key in KEYS:
      assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-7), (a["step"], key)
  assert two[-1]["loss"] < two[0]["loss"]  # it trained
  # Tokens per second counts both processes' rows.
  assert two[0]["tokens_per_sec"] > 0


@pytest.mark.slow
def test_files_are_written_once_and_the_checkpoint_restores(runs):
  root, _ = runs
  work = root / "two"
  names = sorted(p.name for p in work.iterdir())
  assert names == sorted(["checkpoints", "config.json", "loss_curves.png", "metrics.jsonl",
                          "run.json", "tensorboard", "tokenizer"])
  assert len(list((work / "tensorboard").iterdir())) == 1  # one event file: process 0's
  assert sorted(p.name for p in (work / "checkpoints").iterdir()) == ["2", "4"]
  # One data-iterator state per process: each resumes on its own rows.
  assert sorted(p.name for p in (work / "checkpoints" / "4" / "data").glob("*.json")) == [
      "process_0-of-2.json", "process_1-of-2.json"]
  model, params = checkpoint.restore_model(work / "checkpoints")
  _, reference = checkpoint.restore_model(root / "one" / "checkpoints")
  assert model.cfg.text.num_experts == 4
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(reference)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)


def test_pair_order_groups_chosen_then_rejected():
  # Process blocks [c0 c0 r0 r0 | c1 c1 r1 r1] -> [c0 c0 c1 c1 | r0 r0 r1 r1].
  assert sharding.pair_order(2, 2).tolist() == [0, 1, 4, 5, 2, 3, 6, 7]
  assert sharding.pair_order(1, 3).tolist() == list(range(6))


def test_preference_batches_are_regrouped_across_processes():
  """What two processes' blocks become: the one-process preference batch (checked on this process's
  devices, where the global array is the two blocks stacked)."""
  mesh = Mesh(np.asarray(jax.devices()[:1]), ("data",))
  spec = NamedSharding(mesh, PartitionSpec("data"))
  rows = np.arange(8)[:, None] * np.ones((1, 3), np.int32)  # one process: c0 c1 c2 c3 r0 r1 r2 r3
  blocks = np.concatenate([rows[[0, 1, 4, 5]], rows[[2, 3, 6, 7]]])  # process 0 | process 1
  got = sharding.chosen_then_rejected(jax.device_put(blocks, spec), 2, spec)
  np.testing.assert_array_equal(np.asarray(got), rows)
