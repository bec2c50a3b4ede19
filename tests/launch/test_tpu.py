"""launch/tpu/{gcloud,pod}.py against a fake `gcloud` that records every call (one JSON line each).

The fake keeps a little state (does the slice exist, which states `describe` reports next) in a JSON
file, so create / wait / delete behave as they would. Most calls run in-process as
`pod.main(pod.parse(argv))`; a few run as a user types them.
"""

import importlib.util
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import pytest
from absl import app

REPO = Path(__file__).resolve().parents[2]
TPU = REPO / "launch" / "tpu"
FAKE_GCLOUD = f"""#!{sys.executable} -S
import json, os, sys
args = sys.argv[1:]
with open(os.environ["FAKE_GCLOUD_LOG"], "a") as f:
  f.write(json.dumps(args) + "\\n")
path = os.environ["FAKE_GCLOUD_STATE"]
st = json.load(open(path)) if os.path.exists(path) else {{}}
st.setdefault("exists", False)
verb, code = args[3], 0
if verb == "create":
  st["exists"] = True
elif verb == "delete":
  st["exists"] = False
elif verb == "describe":
  if not st["exists"]:
    print("ERROR: NOT_FOUND", file=sys.stderr); code = 1
  elif "--format=json" in args:
    print(json.dumps({{"networkEndpoints": [{{}}] * st.get("workers", 2)}}))
  elif st.get("states"):
    print(st["states"].pop(0))
  else:
    print("ACTIVE" if args[2] == "queued-resources" else "READY")
elif verb == "ssh":
  worker = next(a for a in args if a.startswith("--worker=")).split("=")[1]
  print(f"step 1 on worker {{worker}}"); print(f"step 2 on worker {{worker}}")
  if "train.py" in args[-1]:
    code = st.get("train_exit", {{}}).get(worker, 0)
  sys.exit(code)  # workers run at once: leave the state file alone
json.dump(st, open(path, "w"))
sys.exit(code)
"""
POD = ["--name=lm", "--zone=us-central2-b", "--accelerator_type=v4-32"]
VENV_PYTHON = '"$HOME"/llavamod_venv/bin/python'  # --venv's default, as the remote shell sees it
RUN = ["--config=configs/mimic.py:d2s_paper", "--workdir=gs://bucket/llavamod/mimic"]


def _module(name):
  spec = importlib.util.spec_from_file_location(name, TPU / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  sys.modules[name] = module  # pod.py imports `gcloud` by that name, as when run as a script
  spec.loader.exec_module(module)
  return module


gcloud = _module("gcloud")
pod = _module("pod")


class Fake:
  def __init__(self, root: Path):
    self.bin = root / "bin"
    self.bin.mkdir()
    self.exe = self.bin / "gcloud"
    self.exe.write_text(FAKE_GCLOUD)
    self.exe.chmod(0o755)
    self.log, self.state = root / "calls.jsonl", root / "state.json"

  def set(self, **state):
    self.state.write_text(json.dumps(state))

  @property
  def calls(self) -> list[list[str]]:
    return [json.loads(l) for l in self.log.read_text().splitlines()] if self.log.exists() else []

  def verbs(self):
    return [" ".join(c[2:4]) for c in self.calls]


@pytest.fixture
def fake(tmp_path, monkeypatch):
  f = Fake(tmp_path)
  monkeypatch.setenv("GCLOUD", str(f.exe))  # never the real gcloud, whatever PATH holds
  monkeypatch.setenv("FAKE_GCLOUD_LOG", str(f.log))
  monkeypatch.setenv("FAKE_GCLOUD_STATE", str(f.state))
  return f


def _pod(*argv):
  return pod.main(pod.parse(["pod.py", *argv]))


def _subprocess(*argv, env):
  return subprocess.run([sys.executable, str(TPU / "pod.py"), *argv], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=60, check=False)


# --- pure command builders ------------------------------------------------------------------------

def test_create_and_delete_commands():
  p = gcloud.Pod("lm", zone="us-central2-b", project="proj", accelerator_type="v4-32")
  assert gcloud.create(p) == [
      "compute", "tpus", "tpu-vm", "create", "lm", "--zone=us-central2-b", "--project=proj",
      "--accelerator-type=v4-32", "--version=tpu-ubuntu2204-base"]
  v5e = gcloud.create(gcloud.Pod("lm", accelerator_type="v5litepod-16", spot=True))
  assert v5e[-2:] == ["--version=v2-alpha-tpuv5-lite", "--spot"]
  assert gcloud.Pod("lm", accelerator_type="v6e-64").runtime == "v2-alpha-tpuv6e"
  assert gcloud.Pod("lm", accelerator_type="v5p-128").runtime == "v2-alpha-tpuv5"
  assert gcloud.create(gcloud.Pod("lm", accelerator_type="v4-8", preemptible=True))[-1] == (
      "--preemptible")
  q = gcloud.Pod("lm", zone="z", accelerator_type="v4-32", runtime_version="v2-alpha-tpuv4",
                 queued=True, spot=True)
  assert gcloud.create(q) == [
      "compute", "tpus", "queued-resources", "create", "lm", "--node-id=lm", "--zone=z",
      "--accelerator-type=v4-32", "--runtime-version=v2-alpha-tpuv4", "--spot"]
  assert gcloud.delete(p) == ["compute", "tpus", "tpu-vm", "delete", "lm", "--zone=us-central2-b",
                              "--project=proj", "--quiet"]
  assert gcloud.delete(q) == ["compute", "tpus", "queued-resources", "delete", "lm", "--zone=z",
                              "--force", "--quiet"]
  assert gcloud.state(q)[-1] == "--format=value(state.state)"
  assert gcloud.state(p)[-1] == "--format=value(state)"
  with pytest.raises(ValueError, match="exclude each other"):
    gcloud.create(gcloud.Pod("lm", accelerator_type="v4-8", spot=True, preemptible=True))
  with pytest.raises(ValueError, match="queued resources take --spot"):
    gcloud.create(gcloud.Pod("lm", accelerator_type="v4-8", queued=True, preemptible=True))
  with pytest.raises(ValueError, match="--accelerator_type is required"):
    gcloud.create(gcloud.Pod("lm"))


def test_workdir_must_be_on_gcs_for_multi_host_slices():
  gcloud.check_workdir("gs://b/run", multi_host=True)
  gcloud.check_workdir("runs/mimic", multi_host=False)
  with pytest.raises(ValueError, match="needs a gs:// workdir"):
    gcloud.check_workdir("runs/mimic", multi_host=True)
  with pytest.raises(ValueError, match="--workdir is required"):
    gcloud.check_workdir(None, multi_host=False)
  assert gcloud.single_host("v4-8") and gcloud.single_host("v5litepod-8")
  assert not gcloud.single_host("v4-32") and not gcloud.single_host(None)
  assert gcloud.single_host("v4-32", num_workers=1) and not gcloud.single_host("v4-8", 2)


@pytest.mark.skipif(not shutil.which("bash") or not shutil.which("setsid"), reason="needs bash")
def test_remote_commands_quote_through_a_shell(tmp_path):
  """The ssh --command strings, run by a real shell: train.py sees exactly the argv and environment
  given; a detached run gets its own process group and `stop` ends it with SIGTERM."""
  checkout = tmp_path / "checkout"
  (checkout / "launch").mkdir(parents=True)
  (checkout / "launch" / "train.py").write_text(
      "import json, os, signal, sys, time\n"
      "signal.signal(signal.SIGTERM, lambda *a: (print('TERM', flush=True), sys.exit(0)))\n"
      "print(json.dumps([sys.argv[1:], os.environ.get('XLA_FLAGS'), os.environ.get('Q'),\n"
      "                  os.getpid(), os.getpgid(0)]), flush=True)\n"
      "if os.environ.get('SLEEP'): time.sleep(20)\n")
  overrides = ["--config.data.train_files=('gs://b/a b.jsonl',)", "--config.optimizer.lr=1e-5"]
  env = ["XLA_FLAGS=--xla_foo=1 --xla_bar", "Q=it's \"quoted\" $HOME"]
  script = gcloud.train("checkout", "configs/mimic.py:d2s_paper", "gs://b/run", overrides, env,
                        shlex.quote(sys.executable))
  # As sshd starts it: a shell leading its own session.
  out = subprocess.run(["bash", "-c", script], cwd=tmp_path, capture_output=True, text=True,
                       check=True, start_new_session=True).stdout
  argv, xla_flags, q, pid, pgid = json.loads(out)
  assert argv == ["--config=configs/mimic.py:d2s_paper", "--workdir=gs://b/run", *overrides]
  assert (xla_flags, q) == ("--xla_foo=1 --xla_bar", "it's \"quoted\" $HOME")
  assert int((checkout / gcloud.RUN_PID).read_text()) == pid == pgid  # what `stop` signals

  detached = gcloud.train("checkout", "configs/mimic.py", "gs://b/run", [], [*env, "SLEEP=1"],
                          shlex.quote(sys.executable), detach=True)
  out = subprocess.run(["bash", "-c", detached], cwd=tmp_path, capture_output=True, text=True,
                       check=True, timeout=10).stdout
  pid = int((checkout / gcloud.RUN_PID).read_text())
  assert f"started pid {pid}" in out
  log = checkout / gcloud.RUN_LOG
  for _ in range(100):
    if log.exists() and log.read_text():
      break
    time.sleep(0.05)
  try:
    assert json.loads(log.read_text().splitlines()[0])[3:] == [pid, pid]  # own process group
    out = subprocess.run(["bash", "-c", gcloud.stop("checkout")], cwd=tmp_path,
                         capture_output=True, text=True, check=True).stdout
    assert f"stopped {pid}" in out and not (checkout / gcloud.RUN_PID).exists()
    for _ in range(100):
      if "TERM" in log.read_text():
        break
      time.sleep(0.05)
    assert "TERM" in log.read_text()
  finally:
    try:
      os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
      pass


def test_env_must_be_name_equals_value():
  assert gcloud.env_assignments(["A=x y", "B="]) == ["A='x y'", "B=''"]
  for bad in ["A", "1A=x", "A-B=x"]:
    with pytest.raises(ValueError, match="expected NAME=VALUE"):
      gcloud.env_assignments([bad])


# --- pod.py against the fake gcloud ---------------------------------------------------------------

def test_create_waits_until_ready(fake, capsys):
  fake.set(states=["CREATING", "CREATING", "READY"])
  assert _pod("create", *POD, "--spot", "--poll_interval=0") == 0
  assert fake.verbs() == ["tpu-vm describe", "tpu-vm create"] + ["tpu-vm describe"] * 3
  assert fake.calls[1] == ["compute", "tpus", "tpu-vm", "create", "lm", "--zone=us-central2-b",
                           "--accelerator-type=v4-32", "--version=tpu-ubuntu2204-base", "--spot"]
  assert "lm: CREATING; waiting for READY" in capsys.readouterr().err
  # It exists now: a second create only waits.
  assert _pod("create", *POD, "--poll_interval=0") == 0
  assert fake.verbs()[5:] == ["tpu-vm describe", "tpu-vm describe"]


def test_queued_resource_create_and_delete(fake):
  fake.set(states=["WAITING_FOR_RESOURCES", "PROVISIONING", "ACTIVE"])
  assert _pod("create", *POD, "--queued", "--runtime_version=v2-alpha-tpuv4",
              "--poll_interval=0") == 0
  assert fake.calls[1] == [
      "compute", "tpus", "queued-resources", "create", "lm", "--node-id=lm",
      "--zone=us-central2-b", "--accelerator-type=v4-32", "--runtime-version=v2-alpha-tpuv4"]
  assert fake.verbs()[2:] == ["queued-resources describe"] * 3
  assert _pod("delete", *POD, "--queued") == 0
  assert fake.calls[-1] == ["compute", "tpus", "queued-resources", "delete", "lm",
                            "--zone=us-central2-b", "--force", "--quiet"]


def test_create_fails_clearly(fake, capsys):
  fake.set(exists=True, states=["CREATING", "FAILED"])
  assert _pod("create", *POD, "--poll_interval=0") == 1
  assert "lm is FAILED; delete it" in capsys.readouterr().err
  fake.set(exists=True, states=["CREATING"] * 50)
  assert _pod("create", *POD, "--poll_interval=0", "--wait_timeout=0") == 1
  assert "not READY after 0s (last state: CREATING)" in capsys.readouterr().err


def test_install_copies_the_checkout_git_would_version(fake, tmp_path, monkeypatch, capsys):
  src = tmp_path / "src"
  (src / "configs").mkdir(parents=True)
  (src / "configs" / "mimic.py").write_text("# tracked\n")
  (src / "new.py").write_text("# untracked, not ignored\n")
  (src / ".gitignore").write_text("workdirs/\n")
  (src / "workdirs").mkdir()
  (src / "workdirs" / "big.bin").write_text("ignored")
  subprocess.run(["git", "init", "-q", str(src)], check=True)
  subprocess.run(["git", "-C", str(src), "add", "configs", ".gitignore"], check=True)
  monkeypatch.setattr(pod, "REPO", src)
  assert _pod("install", *POD) == 0
  scp, ssh = fake.calls
  tarball = os.path.realpath(Path(tempfile.gettempdir()) / "llavamod_jax-lm.tar.gz")
  assert scp[:6] == ["compute", "tpus", "tpu-vm", "scp", scp[4], "lm:llavamod_jax_src.tar.gz"]
  assert os.path.realpath(scp[4]) == tarball and scp[6:] == ["--zone=us-central2-b", "--worker=all"]
  with tarfile.open(scp[4]) as tar:
    assert sorted(tar.getnames()) == [".gitignore", "configs/mimic.py", "new.py"]
  assert ssh[:7] == ["compute", "tpus", "tpu-vm", "ssh", "lm", "--zone=us-central2-b",
                     "--worker=all"]
  assert ssh[7] == "--command=" + gcloud.install_from_tarball(
      "llavamod_jax", "llavamod_jax_src.tar.gz", VENV_PYTHON, "jax[tpu]", ("~/llavamod_venv", "3.11"))
  assert "tar -xzf llavamod_jax_src.tar.gz -C llavamod_jax" in ssh[7]
  # A Python 3.11 venv made by uv first (the TPU VM image has 3.10), then pip into it.
  venv = 'uv venv --quiet --seed --allow-existing --python 3.11 "$HOME"/llavamod_venv'
  pip = f"{VENV_PYTHON} -m pip install --quiet --upgrade -e . 'jax[tpu]'"
  assert venv in ssh[7] and pip in ssh[7] and ssh[7].index(venv) < ssh[7].index(pip)
  # Model weights left un-ignored in the checkout would be copied to every worker: refused.
  monkeypatch.setattr(pod, "MAX_COPY_BYTES", 100)
  (src / "weights.safetensors").write_bytes(b"0" * 200)
  assert _pod("install", *POD) == 1
  assert "largest: weights.safetensors" in capsys.readouterr().err and len(fake.calls) == 2


def test_install_from_git(fake):
  assert _pod("install", *POD, "--repo=https://example.com/me/llavamod_jax.git", "--ref=v1.2",
              "--jax=jax[tpu]==0.6.2", "--python=~/venv/bin/python") == 0
  (ssh,) = fake.calls
  assert ssh[6] == "--worker=all"
  command = ssh[7].removeprefix("--command=")
  assert "git clone --quiet https://example.com/me/llavamod_jax.git llavamod_jax" in command
  assert "fetch --quiet origin v1.2" in command
  assert "checkout --quiet --detach FETCH_HEAD" in command
  assert "~/venv/bin/python -m pip install --quiet --upgrade -e . 'jax[tpu]==0.6.2'" in command
  assert "uv venv" not in command  # an explicit --python is used as it is


def test_install_venv_options(fake):
  assert _pod("install", *POD, "--repo=https://example.com/r.git", "--python_version=3.12",
              "--venv=/opt/env") == 0
  assert _pod("install", *POD, "--repo=https://example.com/r.git", "--venv=") == 0
  made, plain = (c[7].removeprefix("--command=") for c in fake.calls)
  assert "uv venv --quiet --seed --allow-existing --python 3.12 /opt/env;" in made
  assert "/opt/env/bin/python -m pip install" in made
  assert "uv venv" not in plain and "; cd llavamod_jax && python3 -m pip install" in plain
  for command in (made, plain):  # valid shell
    assert subprocess.run(["bash", "-n", "-c", command]).returncode == 0


def test_run_on_all_workers_as_a_user_types_it(fake):
  env = {**os.environ, "PATH": f"{fake.bin}{os.pathsep}{os.environ['PATH']}"}
  env.pop("GCLOUD")  # found on PATH, before any real one
  p = _subprocess("run", *POD, "--project=proj", *RUN, "--config.optimizer.lr=1e-5",
                  "--env=LIBTPU_INIT_ARGS=--xla_tpu_enable_latency_hiding_scheduler=true",
                  "--", "--config.total_steps=100", "--distributed=on", env=env)
  assert p.returncode == 0, p.stderr
  (ssh,) = fake.calls
  assert ssh == [
      "compute", "tpus", "tpu-vm", "ssh", "lm", "--zone=us-central2-b", "--project=proj",
      "--worker=all",
      ("--command=cd llavamod_jax && echo $$ > tpu_run.pid && exec env "
       "LIBTPU_INIT_ARGS=--xla_tpu_enable_latency_hiding_scheduler="
       f"true {VENV_PYTHON} launch/train.py --config=configs/mimic.py:d2s_paper "
       "--workdir=gs://bucket/llavamod/mimic --config.optimizer.lr=1e-5 --config.total_steps=100 "
       "--distributed=on")]
  assert "step 2 on worker all" in p.stdout  # gcloud's output streams through
  assert "+ gcloud compute tpus tpu-vm ssh lm" in p.stderr


def test_run_streams_each_worker_prefixed_or_only_worker_0(fake, tmp_path, capfd):
  fake.set(exists=True, workers=3, train_exit={"2": 7})
  assert _pod("run", *POD, *RUN, "--stream=prefix") == 7
  assert fake.verbs() == ["tpu-vm describe"] + ["tpu-vm ssh"] * 3  # workers counted by describe
  assert sorted(c[6] for c in fake.calls[1:]) == ["--worker=0", "--worker=1", "--worker=2"]
  out, err = capfd.readouterr()
  assert sorted(out.splitlines()) == sorted(
      f"[worker {w}] step {s} on worker {w}" for w in range(3) for s in (1, 2))
  assert "worker 2 exited with 7" in err

  fake.set(exists=True, workers=3)
  assert _pod("run", *POD, *RUN, "--stream=worker0", "--num_workers=3",
              f"--log_dir={tmp_path / 'logs'}") == 0
  out, _ = capfd.readouterr()
  assert out.splitlines() == ["step 1 on worker 0", "step 2 on worker 0"]
  logged = (tmp_path / "logs" / "worker-2.log").read_text()
  assert logged == "step 1 on worker 2\nstep 2 on worker 2\n"


def test_detach_logs_stop(fake):
  assert _pod("run", *POD, *RUN, "--detach") == 0
  assert _pod("logs", *POD) == 0
  assert _pod("stop", *POD) == 0
  run, logs, stop = (c[7].removeprefix("--command=") for c in fake.calls)
  assert f"setsid nohup {VENV_PYTHON} launch/train.py" in run and "> tpu_run.log 2>&1" in run
  assert fake.calls[1][6] == "--worker=0" and logs == "tail -n +1 -F llavamod_jax/tpu_run.log"
  assert fake.calls[2][6] == "--worker=all"
  assert "P=$(cat llavamod_jax/tpu_run.pid) && { kill -TERM -- -$P" in stop


def test_up_creates_installs_runs_and_deletes(fake):
  fake.set(train_exit={"all": 3})
  assert _pod("up", *POD, *RUN, "--repo=https://example.com/r.git", "--poll_interval=0",
              "--delete_after", "--config.seed=1") == 3  # the run's exit status
  assert fake.verbs() == ["tpu-vm describe", "tpu-vm create", "tpu-vm describe", "tpu-vm ssh",
                          "tpu-vm ssh", "tpu-vm delete"]
  assert "git clone" in fake.calls[3][7]
  assert fake.calls[4][7].endswith("--workdir=gs://bucket/llavamod/mimic --config.seed=1")
  assert fake.calls[5][-1] == "--quiet"


def test_dry_run_prints_the_commands_and_calls_no_gcloud(fake, tmp_path):
  # No gcloud anywhere: a dry run must not look for one.
  env = {**os.environ, "PATH": str(tmp_path / "empty"), "GCLOUD": str(tmp_path / "nowhere")}
  p = _subprocess("up", *POD, "--queued", "--spot", *RUN, "--env=XLA_FLAGS=--a --b",
                  "--config.optimizer.lr=1e-5", "--delete_after", "--dry_run", env=env)
  assert p.returncode == 0, p.stderr
  assert not fake.log.exists()
  lines = [shlex.split(l) for l in p.stdout.splitlines() if not l.startswith("#")]
  assert all(l[0] == "gcloud" for l in lines)
  q = gcloud.Pod("lm", "us-central2-b", None, "v4-32", queued=True, spot=True)
  tarball = str(Path(tempfile.gettempdir()) / "llavamod_jax-lm.tar.gz")
  assert [l[1:] for l in lines] == [
      gcloud.create(q), gcloud.state(q), gcloud.scp(q, tarball, "llavamod_jax_src.tar.gz"),
      gcloud.ssh(q, gcloud.install_from_tarball("llavamod_jax", "llavamod_jax_src.tar.gz",
                                                VENV_PYTHON, "jax[tpu]", ("~/llavamod_venv", "3.11"))),
      gcloud.ssh(q, gcloud.train("llavamod_jax", "configs/mimic.py:d2s_paper",
                                 "gs://bucket/llavamod/mimic", ["--config.optimizer.lr=1e-5"],
                                 ["XLA_FLAGS=--a --b"], VENV_PYTHON)),
      gcloud.delete(q)]
  assert "# repeat until it prints ACTIVE" in p.stdout


def test_missing_gcloud_is_a_clear_error(tmp_path, monkeypatch, capsys):
  monkeypatch.delenv("GCLOUD", raising=False)
  monkeypatch.setenv("PATH", str(tmp_path))
  assert _pod("delete", "--name=lm") == 1
  err = capsys.readouterr().err
  assert "gcloud not found (not on PATH)" in err and "GCLOUD=/path/to/gcloud" in err
  monkeypatch.setenv("GCLOUD", str(tmp_path / "gcloud"))
  assert _pod("delete", "--name=lm") == 1
  assert f"gcloud not found (GCLOUD={tmp_path / 'gcloud'})" in capsys.readouterr().err


def test_flag_errors_come_before_any_gcloud_call(fake):
  cases = [
      (["run", *POD, "--config=configs/mimic.py", "--workdir=runs/mimic"], "needs a gs:// workdir"),
      (["up", *POD, "--config=configs/mimic.py", "--workdir=/tmp/x"], "needs a gs:// workdir"),
      (["run", *POD, "--workdir=gs://b/x"], "--config is required"),
      (["run", *POD, "--config=configs/nope.py", "--workdir=gs://b/x"], "no configs/nope.py in"),
      (["run", *POD, f"--config={REPO}/configs/mimic.py", "--workdir=gs://b/x"], "inside the repo"),
      (["run", *POD, *RUN, "--env=XLA_FLAGS"], "expected NAME=VALUE"),
      (["up", *POD, *RUN, "--detach", "--delete_after"], "exclude each other"),
      (["delete", *POD, "--config.seed=1"], "passes nothing to launch/train.py"),
      (["delete", "--zone=z"], "--name is required"),
      (["launch", *POD], "expected one command"),
      (["create", "--name=lm"], "--accelerator_type is required"),
      (["run", *POD, *RUN, "--stream=prefix", "--dry_run"], "pass --num_workers"),
  ]
  for argv, message in cases:
    with pytest.raises(app.UsageError, match=message):
      _pod(*argv)
  assert not fake.calls
  # One host: a local workdir is fine.
  assert _pod("run", "--name=lm", "--accelerator_type=v4-8", "--config=configs/mimic.py",
              "--workdir=runs/mimic") == 0
  assert _pod("run", *POD, "--num_workers=1", "--config=configs/mimic.py",
              "--workdir=runs/mimic") == 0
  with pytest.raises(Exception, match="Unknown command line flag 'bogus'"):
    pod.parse(["pod.py", "run", "--bogus=1"])
