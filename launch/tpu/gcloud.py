"""The gcloud argument lists and remote shell commands that launch/tpu/pod.py runs; pure functions.

Every builder returns the arguments after `gcloud` (the caller picks the binary), so tests and
--dry_run see exactly what would run. Remote commands are single shell strings for
`tpu-vm ssh --command`, with every user value shell-quoted.
"""

from __future__ import annotations

import dataclasses
import re
import shlex

JAX_TPU_WHEELS = "https://storage.googleapis.com/jax-releases/libtpu_releases.html"
READY = {False: "READY", True: "ACTIVE"}  # TPU VM state / queued-resource state, by `queued`
FAILED = {"FAILED", "SUSPENDED", "PREEMPTED", "TERMINATED", "STOPPED"}
# Slices with one host (one worker); every other slice runs one process per host.
SINGLE_HOST = {"v2-8", "v3-8", "v4-8", "v5p-8", "v5litepod-1", "v5litepod-4", "v5litepod-8",
               "v6e-1", "v6e-4", "v6e-8"}
RUN_LOG, RUN_PID = "tpu_run.log", "tpu_run.pid"  # inside the remote checkout
# TPU software version by generation (the accelerator type's prefix); v2, v3 and v4 take the base.
RUNTIMES = {"v5litepod": "v2-alpha-tpuv5-lite", "v5p": "v2-alpha-tpuv5", "v6e": "v2-alpha-tpuv6e"}


@dataclasses.dataclass(frozen=True)
class Pod:
  """A TPU VM (or the node of a queued resource of the same name) and where it lives."""
  name: str
  zone: str | None = None
  project: str | None = None
  accelerator_type: str | None = None
  runtime_version: str | None = None  # default: by generation, see RUNTIMES
  queued: bool = False
  spot: bool = False
  preemptible: bool = False

  @property
  def runtime(self) -> str:
    generation = (self.accelerator_type or "").rsplit("-", 1)[0]
    return self.runtime_version or RUNTIMES.get(generation, "tpu-ubuntu2204-base")

  @property
  def where(self) -> list[str]:
    return [f"--{k}={v}" for k, v in (("zone", self.zone), ("project", self.project)) if v]


def create(pod: Pod) -> list[str]:
  if pod.spot and pod.preemptible:
    raise ValueError("--spot and --preemptible exclude each other (spot is the newer of the two)")
  if not pod.accelerator_type:
    raise ValueError("--accelerator_type is required to create a slice (e.g. v4-32, v5litepod-16)")
  if pod.queued:
    if pod.preemptible:
      raise ValueError("queued resources take --spot, not --preemptible")
    return ["compute", "tpus", "queued-resources", "create", pod.name, f"--node-id={pod.name}",
            *pod.where, f"--accelerator-type={pod.accelerator_type}",
            f"--runtime-version={pod.runtime}", *(["--spot"] if pod.spot else [])]
  return ["compute", "tpus", "tpu-vm", "create", pod.name, *pod.where,
          f"--accelerator-type={pod.accelerator_type}", f"--version={pod.runtime}",
          *(["--spot"] if pod.spot else []), *(["--preemptible"] if pod.preemptible else [])]


def state(pod: Pod) -> list[str]:
  """Prints one word: the queued resource's state (ACTIVE when granted) or the VM's (READY)."""
  if pod.queued:
    return ["compute", "tpus", "queued-resources", "describe", pod.name, *pod.where,
            "--format=value(state.state)"]
  return ["compute", "tpus", "tpu-vm", "describe", pod.name, *pod.where, "--format=value(state)"]


def describe_json(pod: Pod) -> list[str]:
  return ["compute", "tpus", "tpu-vm", "describe", pod.name, *pod.where, "--format=json"]


def delete(pod: Pod) -> list[str]:
  if pod.queued:  # --force deletes the node first, then the request
    return ["compute", "tpus", "queued-resources", "delete", pod.name, *pod.where, "--force",
            "--quiet"]
  return ["compute", "tpus", "tpu-vm", "delete", pod.name, *pod.where, "--quiet"]


def ssh(pod: Pod, command: str, worker: str | int = "all") -> list[str]:
  return ["compute", "tpus", "tpu-vm", "ssh", pod.name, *pod.where, f"--worker={worker}",
          f"--command={command}"]


def scp(pod: Pod, src: str, dest: str, worker: str | int = "all") -> list[str]:
  return ["compute", "tpus", "tpu-vm", "scp", src, f"{pod.name}:{dest}", *pod.where,
          f"--worker={worker}"]


def single_host(accelerator_type: str | None, num_workers: int | None = None) -> bool:
  return num_workers == 1 if num_workers else accelerator_type in SINGLE_HOST


def check_workdir(workdir: str | None, multi_host: bool) -> None:
  if not workdir:
    raise ValueError("--workdir is required (gs://BUCKET/PATH on a multi-host slice)")
  if multi_host and not workdir.startswith("gs://"):
    raise ValueError(
        f"--workdir={workdir}: a multi-host slice needs a gs:// workdir that every worker writes "
        "its checkpoint shards to and reads back (e.g. --workdir=gs://BUCKET/llavamod/mimic); a "
        "local path would split the checkpoint over the workers' disks. Pass --num_workers=1 "
        "for a single-host slice.")


def env_assignments(env: list[str]) -> list[str]:
  """["XLA_FLAGS=--a --b"] -> ["XLA_FLAGS='--a --b'"]: shell assignments, values quoted."""
  out = []
  for item in env:
    key, sep, value = item.partition("=")
    if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
      raise ValueError(f"--env={item}: expected NAME=VALUE")
    out.append(f"{key}={shlex.quote(value)}")
  return out


def home_path(path: str) -> str:
  """A path as one shell word; a leading ~/ stays the remote user's home ("$HOME"/...)."""
  return '"$HOME"/' + shlex.quote(path[2:]) if path.startswith("~/") else shlex.quote(path)


def venv_python(venv: str) -> str:
  return home_path(venv.rstrip("/") + "/bin/python")


def make_venv(venv: str, python_version: str) -> str:
  """Create (or keep) a virtual environment of Python `python_version` with uv, which fetches that
  Python itself: the TPU VM images' own Python (3.10 on tpu-ubuntu2204-base) is too old for the
  JAX this project needs."""
  return ('export PATH="$HOME/.local/bin:$PATH"; command -v uv >/dev/null 2>&1 || '
          "curl -LsSf https://astral.sh/uv/install.sh | sh; "
          f"uv venv --quiet --seed --allow-existing --python {shlex.quote(python_version)} "
          f"{home_path(venv)}; ")


def install_from_tarball(remote_dir: str, tarball: str, python: str, jax: str,
                         venv: tuple[str, str] | None = None) -> str:
  """Unpack the checkout and pip-install it with `jax`; `venv` = (path, python version) first
  creates that environment (then `python` should be its interpreter, `venv_python`)."""
  d = shlex.quote(remote_dir)
  return (f"set -e; {make_venv(*venv) if venv else ''}mkdir -p {d}; "
          f"tar -xzf {shlex.quote(tarball)} -C {d}; "
          f"rm -f {shlex.quote(tarball)}; {_pip(remote_dir, python, jax)}")


def install_from_git(remote_dir: str, repo: str, ref: str, python: str, jax: str,
                     venv: tuple[str, str] | None = None) -> str:
  d = shlex.quote(remote_dir)
  # Fetching the ref and checking out FETCH_HEAD works alike for a branch, a tag and a commit.
  return (f"set -e; {make_venv(*venv) if venv else ''}"
          f"[ -d {d}/.git ] || git clone --quiet {shlex.quote(repo)} {d}; "
          f"git -C {d} fetch --quiet origin {shlex.quote(ref)}; "
          f"git -C {d} checkout --quiet --detach FETCH_HEAD; {_pip(remote_dir, python, jax)}")


def _pip(remote_dir: str, python: str, jax: str) -> str:
  return (f"cd {shlex.quote(remote_dir)} && {python} -m pip install --quiet "
          f"--upgrade -e . {shlex.quote(jax)} -f {JAX_TPU_WHEELS}")


def train(remote_dir: str, config: str, workdir: str, train_args: list[str], env: list[str],
          python: str, detach: bool = False) -> str:
  """`cd CHECKOUT && ... python launch/train.py --config=... --workdir=... ARGS`, its pid in
  CHECKOUT/tpu_run.pid for `stop`. In the foreground the run replaces the ssh session's shell (a
  process group leader); with `detach` it starts in a session of its own, output in
  CHECKOUT/tpu_run.log, so a dropped connection does not end it."""
  cmd = python + " " + shlex.join(["launch/train.py", f"--config={config}",
                                   f"--workdir={workdir}", *train_args])
  assignments = " ".join(env_assignments(env))
  cd = f"cd {shlex.quote(remote_dir)} && "
  if not detach:
    return cd + f"echo $$ > {RUN_PID} && exec " + (f"env {assignments} " if env else "") + cmd
  return (cd + "{ " + (f"{assignments} " if env else "") +
          f"setsid nohup {cmd} > {RUN_LOG} 2>&1 < /dev/null & echo $! > {RUN_PID}; "
          f"echo \"started pid $(cat {RUN_PID}) on $(hostname)\"; }}")


def tail_log(remote_dir: str) -> str:
  return f"tail -n +1 -F {shlex.quote(remote_dir)}/{RUN_LOG}"


def stop(remote_dir: str) -> str:
  """SIGTERM to the run's process group (or its process): launch/train.py saves a checkpoint and
  exits."""
  pid = f"{shlex.quote(remote_dir)}/{RUN_PID}"
  return (f"if [ -f {pid} ] && P=$(cat {pid}) && "
          "{ kill -TERM -- -$P 2>/dev/null || kill -TERM $P 2>/dev/null; }; "
          "then echo \"stopped $P on $(hostname)\"; "
          f"else echo \"no run on $(hostname)\"; fi; rm -f {pid}")
