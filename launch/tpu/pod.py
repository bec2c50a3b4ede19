r"""Run a training stage on a Cloud TPU VM pod slice, driving gcloud from your workstation.

  python launch/tpu/pod.py up --name=llavamod --zone=us-central2-b --accelerator_type=v4-32 \
      --config=configs/mimic.py:d2s_paper --workdir=gs://BUCKET/llavamod/mimic_d2s \
      --config.optimizer.lr=1e-5

Commands:
  create   a TPU VM (or with --queued a queued resource), then wait until it is ready
  install  make a Python 3.11 venv with uv (--venv), copy this checkout (or clone --repo at --ref)
           to every worker, pip install -e . jax[tpu] into the venv
  run      launch/train.py on every worker at once (--detach: in the background, survives ssh)
  logs     follow a detached run's log (--worker=0 by default, or all)
  stop     SIGTERM a detached run on every worker (train.py saves a checkpoint first)
  delete   delete the VM or the queued resource, without prompting
  up       create + install + run (--delete_after: delete when the run ends)

Flags that start with --config., and everything after a bare --, go to launch/train.py. --dry_run
prints the gcloud commands, one shell-quoted line each, and runs nothing. The gcloud binary is
$GCLOUD or `gcloud` on PATH. Shared flags fit in a file: --flagfile=pod.flags. Needs only
Python and absl-py on the workstation.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from pathlib import Path

import gcloud  # launch/tpu/gcloud.py, beside this file: the command builders
from absl import app, flags

REPO = Path(__file__).resolve().parents[2]
COMMANDS = ("create", "install", "run", "logs", "stop", "delete", "up")
REMOTE_TARBALL = "llavamod_jax_src.tar.gz"
MAX_COPY_BYTES = 256 * 2**20  # more than code: models or data that belong on gs://

FLAGS = flags.FlagValues()
_d = {"flag_values": FLAGS}
flags.DEFINE_string("name", None, "TPU VM name (also the queued resource's id).", **_d)
flags.DEFINE_string("zone", None, "Zone (default: gcloud's compute/zone).", **_d)
flags.DEFINE_string("project", None, "Project (default: gcloud's core/project).", **_d)
flags.DEFINE_string("accelerator_type", None, "Slice type, e.g. v4-32, v5litepod-16, v5p-64.", **_d)
flags.DEFINE_string("runtime_version", None, "TPU software version (default: v2-alpha-tpuv5-lite "
                    "for v5litepod, v2-alpha-tpuv5 for v5p, v2-alpha-tpuv6e for v6e, else "
                    "tpu-ubuntu2204-base).", **_d)
flags.DEFINE_bool("queued", False, "Request the slice as a queued resource.", **_d)
flags.DEFINE_bool("spot", False, "Spot capacity (cheaper, can be preempted).", **_d)
flags.DEFINE_bool("preemptible", False, "Preemptible TPU VM (older than --spot).", **_d)
flags.DEFINE_integer("wait_timeout", 3600, "Seconds to wait for the slice to be ready.", **_d)
flags.DEFINE_integer("poll_interval", 30, "Seconds between state checks while waiting.", **_d)
flags.DEFINE_string("repo", None, "Git URL to clone on the workers instead of copying this "
                    "checkout.", **_d)
flags.DEFINE_string("ref", "HEAD", "Branch, tag or commit of --repo.", **_d)
flags.DEFINE_string("remote_dir", "llavamod_jax", "Checkout on the workers (relative to home).",
                    **_d)
flags.DEFINE_string("venv", "~/llavamod_venv", "Virtual environment that `install` creates on "
                    "every worker with uv (Python --python_version) and that runs train.py; '' "
                    "uses --python as it is.", **_d)
flags.DEFINE_string("python_version", "3.11", "Python of --venv (the code needs >= 3.11; the TPU VM "
                    "images bring 3.10).", **_d)
flags.DEFINE_string("python", None, "Python on the workers, used as it is (a shell word: "
                    "~/venv/bin/python works; no --venv is made); default: --venv's.", **_d)
flags.DEFINE_string("jax", "jax[tpu]", "pip requirement for JAX on the workers, e.g. "
                    "jax[tpu]==0.10.2.", **_d)
flags.DEFINE_string("config", None, "Stage config, relative to the repo: configs/mimic.py[:arg].",
                    **_d)
flags.DEFINE_string("workdir", None, "Run directory; gs://BUCKET/PATH on a multi-host slice.", **_d)
flags.DEFINE_multi_string("env", [], "NAME=VALUE set for train.py on every worker (repeat), "
                          "e.g. --env=LIBTPU_INIT_ARGS=... --env=XLA_FLAGS=...", **_d)
flags.DEFINE_integer("num_workers", None, "Hosts in the slice (default: from --accelerator_type "
                     "for single-host slices, else from `describe`).", **_d)
flags.DEFINE_enum("stream", "all", ["all", "prefix", "worker0"], "run output: all: gcloud's "
                  "interleaved output; prefix: each line tagged [worker N]; worker0: only worker "
                  "0's, the others' to --log_dir.", **_d)
flags.DEFINE_string("log_dir", None, "Where --stream=worker0 writes the other workers' output "
                    "(default: tpu_logs/NAME).", **_d)
flags.DEFINE_bool("detach", False, "run: start in the background on every worker and return.", **_d)
flags.DEFINE_string("worker", "0", "logs: which worker's log (a number or all).", **_d)
flags.DEFINE_bool("delete_after", False, "up: delete the slice when the run ends, even on "
                  "failure.", **_d)
flags.DEFINE_bool("dry_run", False, "Print the gcloud commands instead of running them.", **_d)


class PodError(Exception):
  """Something outside the flags went wrong: gcloud missing or failing, a timeout."""


def find_gcloud() -> str:
  path = os.environ.get("GCLOUD") or shutil.which("gcloud")
  if not path or not shutil.which(path):
    raise PodError(f"gcloud not found ({'GCLOUD=' + path if path else 'not on PATH'}): install "
                   "the Google Cloud CLI (https://cloud.google.com/sdk/docs/install) or set "
                   "GCLOUD=/path/to/gcloud")
  return path


class Gcloud:
  """Runs gcloud argument lists; with dry_run prints them instead, one shell-quoted line each."""

  def __init__(self, dry_run: bool):
    self.dry_run = dry_run
    self.binary = None if dry_run else find_gcloud()

  def note(self, message: str) -> None:  # a comment line in a dry run, progress otherwise
    print(f"# {message}" if self.dry_run else message, file=sys.stdout if self.dry_run else
          sys.stderr, flush=True)

  def call(self, args: list[str], check: bool = True) -> int:
    line = shlex.join(["gcloud", *args])
    if self.dry_run:
      print(line, flush=True)
      return 0
    print(f"+ {line}", file=sys.stderr, flush=True)
    code = subprocess.call([self.binary, *args])
    if code and check:
      raise PodError(f"`gcloud {shlex.join(args[:4])} ...` exited with {code}")
    return code

  def output(self, args: list[str]) -> str | None:
    """stdout of a query, or None when it fails (e.g. the resource does not exist yet)."""
    p = subprocess.run([self.binary, *args], capture_output=True, text=True, check=False)
    return p.stdout.strip() if p.returncode == 0 else None

  def parallel(self, commands: list[list[str]], mode: str, log_dir: Path) -> int:
    """One process per worker; lines tagged [worker N] (prefix) or only worker 0's shown (worker0,
    the others' written to log_dir/worker-N.log). Returns the first nonzero exit status."""
    if self.dry_run:
      self.note("run these at the same time, one per worker:")
      return max(self.call(c) for c in commands)
    with contextlib.ExitStack() as files:
      logs = {}
      if mode == "worker0" and len(commands) > 1:
        log_dir.mkdir(parents=True, exist_ok=True)
        logs = {i: files.enter_context(open(log_dir / f"worker-{i}.log", "w"))
                for i in range(1, len(commands))}
        self.note(f"workers 1-{len(commands) - 1} write to {log_dir}/worker-N.log")
      codes = self._pump(commands, mode, logs)
    for i, code in enumerate(codes):
      if code:
        where = f"; its output: {logs[i].name}" if i in logs else ""
        print(f"worker {i} exited with {code}{where}", file=sys.stderr)
    return next((c for c in codes if c), 0)

  def _pump(self, commands, mode, logs) -> list[int]:
    lock = threading.Lock()
    for c in commands:
      print(f"+ {shlex.join(['gcloud', *c])}", file=sys.stderr, flush=True)
    procs = [subprocess.Popen([self.binary, *c], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, errors="replace") for c in commands]

    def pump(i, proc):
      for line in proc.stdout:
        if i in logs:
          logs[i].write(line)
          logs[i].flush()
        else:
          with lock:
            sys.stdout.write(f"[worker {i}] {line}" if mode == "prefix" else line)
            sys.stdout.flush()

    threads = [threading.Thread(target=pump, args=(i, p), daemon=True) for i, p in enumerate(procs)]
    for t in threads:
      t.start()
    try:
      codes = [p.wait() for p in procs]
    finally:  # Ctrl-C: end the local ssh clients too
      for p in procs:
        if p.poll() is None:
          p.terminate()
    for t in threads:
      t.join()
    return codes


def wait_ready(g: Gcloud, pod: gcloud.Pod) -> None:
  want, query = gcloud.READY[pod.queued], gcloud.state(pod)
  if g.dry_run:
    g.note(f"repeat until it prints {want} (at most {FLAGS.wait_timeout}s):")
    g.call(query)
    return
  deadline = time.monotonic() + FLAGS.wait_timeout
  while (state := g.output(query)) != want:
    if state in gcloud.FAILED:
      raise PodError(f"{pod.name} is {state}; delete it (pod.py delete) and create it again")
    if time.monotonic() >= deadline:
      raise PodError(f"{pod.name} is not {want} after {FLAGS.wait_timeout}s (last state: "
                     f"{state or 'none'}); raise --wait_timeout or check the console")
    g.note(f"{pod.name}: {state or 'no state yet'}; waiting for {want}")
    time.sleep(FLAGS.poll_interval)
  g.note(f"{pod.name}: {want}")


def create(g: Gcloud, pod: gcloud.Pod) -> None:
  if not g.dry_run and (state := g.output(gcloud.state(pod))) is not None:
    g.note(f"{pod.name} exists ({state or 'no state'}); not creating it again")
  else:
    g.call(gcloud.create(pod))
  wait_ready(g, pod)


def pack(repo: Path, out: Path) -> int:
  """The files git would version (tracked, plus untracked ones not ignored) into a .tar.gz."""
  try:
    listing = subprocess.run(["git", "-C", str(repo), "ls-files", "-z", "--cached", "--others",
                              "--exclude-standard"], capture_output=True, check=True).stdout
  except (OSError, subprocess.CalledProcessError) as e:
    raise PodError(f"cannot list the files of {repo} with git ({e}); pass --repo=URL to clone "
                   "on the workers instead") from e
  names = [n for n in listing.decode().split("\0") if n and (repo / n).is_file()]
  sizes = sorted(((repo / n).stat().st_size, n) for n in names)
  if sum(s for s, _ in sizes) > MAX_COPY_BYTES:
    biggest = ", ".join(f"{n} ({s / 2**20:.0f} MiB)" for s, n in sizes[-3:][::-1])
    raise PodError(f"{repo} holds {sum(s for s, _ in sizes) / 2**20:.0f} MiB that git does not "
                   f"ignore (largest: {biggest}); add model and data folders to .gitignore and "
                   "stage them on the workers from gs:// (docs/tpu.md), or pass --repo=URL")
  with tarfile.open(out, "w:gz") as tar:
    for name in names:
      tar.add(repo / name, arcname=name)
  return len(names)


def python() -> str:
  """The workers' Python: --python, else --venv's, else python3."""
  if FLAGS.python:
    return FLAGS.python
  return gcloud.venv_python(FLAGS.venv) if FLAGS.venv else "python3"


def _venv() -> tuple[str, str] | None:
  return (FLAGS.venv, FLAGS.python_version) if FLAGS.venv and not FLAGS.python else None


def install(g: Gcloud, pod: gcloud.Pod) -> None:
  if FLAGS.repo:
    g.call(gcloud.ssh(pod, gcloud.install_from_git(FLAGS.remote_dir, FLAGS.repo, FLAGS.ref,
                                                   python(), FLAGS.jax, _venv())))
    return
  tarball = Path(tempfile.gettempdir()) / f"llavamod_jax-{pod.name}.tar.gz"
  if g.dry_run:
    g.note(f"pack the files `git ls-files --cached --others --exclude-standard` lists in {REPO} "
           f"into {tarball}")
  else:
    g.note(f"packed {pack(REPO, tarball)} files of {REPO} ({tarball.stat().st_size:,} bytes)")
  g.call(gcloud.scp(pod, str(tarball), REMOTE_TARBALL))
  g.call(gcloud.ssh(pod, gcloud.install_from_tarball(FLAGS.remote_dir, REMOTE_TARBALL,
                                                     python(), FLAGS.jax, _venv())))


def num_workers(g: Gcloud, pod: gcloud.Pod) -> int:
  if FLAGS.num_workers:
    return FLAGS.num_workers
  if gcloud.single_host(pod.accelerator_type):
    return 1
  if g.dry_run:
    raise app.UsageError(f"--stream={FLAGS.stream} --dry_run: pass --num_workers (the hosts of "
                         f"{pod.accelerator_type or 'the slice'})")
  info = g.output(gcloud.describe_json(pod))
  if info is None:
    raise PodError(f"cannot describe {pod.name} to count its workers; pass --num_workers")
  return len(json.loads(info).get("networkEndpoints", [])) or 1


def check_run_flags(pod: gcloud.Pod) -> None:
  """Everything `run` needs, checked before `up` spends money on a slice."""
  config = FLAGS.config
  if not config:
    raise ValueError("--config is required, e.g. --config=configs/mimic.py:d2s_paper")
  config_file = config.split(":")[0]
  if Path(config_file).is_absolute():
    raise ValueError(f"--config={config}: give a path inside the repository (the workers read "
                     "it from their checkout), e.g. configs/mimic.py")
  if not FLAGS.repo and not (REPO / config_file).is_file():
    raise ValueError(f"--config={config}: no {config_file} in {REPO}")
  gcloud.check_workdir(FLAGS.workdir, not gcloud.single_host(pod.accelerator_type,
                                                              FLAGS.num_workers))
  gcloud.env_assignments(FLAGS.env)


def run(g: Gcloud, pod: gcloud.Pod, train_args: list[str]) -> int:
  script = gcloud.train(FLAGS.remote_dir, FLAGS.config, FLAGS.workdir, train_args, FLAGS.env,
                        python(), detach=FLAGS.detach)
  if FLAGS.detach or FLAGS.stream == "all":
    code = g.call(gcloud.ssh(pod, script), check=False)
    if FLAGS.detach and not code:
      g.note(f"follow it: pod.py logs --name={pod.name} ...; end it: pod.py stop ...")
    return code
  commands = [gcloud.ssh(pod, script, worker=i) for i in range(num_workers(g, pod))]
  return g.parallel(commands, FLAGS.stream, Path(FLAGS.log_dir or f"tpu_logs/{pod.name}"))


def main(argv) -> int:
  """argv: [program, command, train.py arguments...] as `parse` returns it."""
  if len(argv) < 2 or argv[1] not in COMMANDS:
    raise app.UsageError(f"expected one command of {', '.join(COMMANDS)}; got {argv[1:]}")
  command, train_args = argv[1], argv[2:]
  if train_args and command not in ("run", "up"):
    raise app.UsageError(f"{command} passes nothing to launch/train.py: {train_args}")
  if not FLAGS.name:
    raise app.UsageError("--name is required (the TPU VM's name)")
  try:
    pod = gcloud.Pod(FLAGS.name, FLAGS.zone, FLAGS.project, FLAGS.accelerator_type,
                     FLAGS.runtime_version, FLAGS.queued, FLAGS.spot, FLAGS.preemptible)
    if command in ("create", "up"):
      gcloud.create(pod)  # its flag errors, before any gcloud call
    if command in ("run", "up"):
      check_run_flags(pod)
    if command == "up" and FLAGS.detach and FLAGS.delete_after:
      raise ValueError("--detach and --delete_after exclude each other: the run would lose its "
                       "slice right after it started")
  except ValueError as e:
    raise app.UsageError(str(e)) from e
  try:
    g = Gcloud(FLAGS.dry_run)
    if command == "create":
      create(g, pod)
    elif command == "install":
      install(g, pod)
    elif command == "run":
      return run(g, pod, train_args)
    elif command == "logs":
      return g.call(gcloud.ssh(pod, gcloud.tail_log(FLAGS.remote_dir), worker=FLAGS.worker),
                    check=False)
    elif command == "stop":
      g.call(gcloud.ssh(pod, gcloud.stop(FLAGS.remote_dir)))
    elif command == "delete":
      g.call(gcloud.delete(pod))
    elif command == "up":
      try:
        create(g, pod)
        install(g, pod)
        return run(g, pod, train_args)
      finally:
        if FLAGS.delete_after:
          g.call(gcloud.delete(pod), check=False)
  except PodError as e:
    print(f"pod.py {command}: error: {e}", file=sys.stderr)
    return 1
  return 0


def parse(argv) -> list[str]:
  """Parse FLAGS (each from its default); returns [program, command, train.py arguments...]: the
  --config.* flags, and everything after a bare `--` (e.g. `-- --distributed=on`)."""
  argv = list(argv)
  cut = argv.index("--") if "--" in argv else len(argv)
  head, tail = argv[:cut], argv[cut + 1:]
  if any(a in ("-h", "--help", "-?", "--helpshort", "--helpfull") for a in head[1:]):
    print(__doc__.strip() + "\n\nflags:\n" + FLAGS.get_help())
    raise SystemExit(0)
  FLAGS.unparse_flags()
  rest = FLAGS(head, known_only=True)[1:]
  overrides = [a for a in rest if a.startswith("--config.")]
  # absl's own flags (--verbosity, ...) parse into its global FLAGS; unknown flags raise there.
  positional = flags.FLAGS([argv[0], *(a for a in rest if a not in overrides)])
  return [argv[0], *positional[1:], *overrides, *tail]


def _parser(argv):
  try:
    return parse(argv)
  except flags.Error as e:
    sys.stderr.write(f"FATAL Flags parsing error: {e}\nPass --help to see help on flags.\n")
    sys.exit(1)


if __name__ == "__main__":
  app.run(main, flags_parser=_parser)
