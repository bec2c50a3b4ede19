"""Several processes, one run: when to start JAX's distributed runtime, and who does what once.

JAX is multi-controller: every host runs the same program on its own devices, and the processes meet
in collectives (a jitted step over a global mesh, orbax saves, barriers). This module decides whether
`jax.distributed.initialize` runs (it must, before any JAX computation, on every process of a
multi-host run, and must not on a plain single-process run) and offers the few coordination helpers
the loop needs. Every helper here is collective: all processes must call it, in the same order.

Modes (`launch/train.py --distributed`):
  auto  initialize when a coordinator is named (`--coordinator_address` or $JAX_COORDINATOR_ADDRESS)
        or when this is a Cloud TPU VM (JAX then finds the pod slice's hosts itself); else stay a
        single process. A laptop, a CPU box or one GPU machine therefore never initializes.
  on    always initialize; flags left unset come from JAX's cluster detection (TPU, SLURM, Open MPI,
        Kubernetes).
  off   never initialize.
"""

from __future__ import annotations

import glob
import importlib.util
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from typing import TypeVar

import jax
import numpy as np

log = logging.getLogger(__name__)
MODES = ("auto", "on", "off")
T = TypeVar("T")

# Set by the GKE TPU webhook and by multi-slice launchers; a GCE TPU VM shows its chips as devices.
_TPU_ENV = ("TPU_WORKER_HOSTNAMES", "TPU_PROCESS_ADDRESSES")
_TPU_DEVICES = ("/dev/accel[0-9]*", "/dev/vfio/[0-9]*")


def on_tpu_vm(environ: Mapping[str, str] = os.environ) -> bool:
  """A Cloud TPU VM: libtpu is installed and TPU chips (or a TPU launcher's variables) are present.
  Looks only at files and variables: asking JAX would start its backend, which must wait until after
  `jax.distributed.initialize`."""
  if importlib.util.find_spec("libtpu") is None:
    return False
  return any(environ.get(k) for k in _TPU_ENV) or any(glob.glob(p) for p in _TPU_DEVICES)


def should_initialize(mode: str, coordinator_address: str | None, *, tpu_vm: bool,
                      environ: Mapping[str, str] = os.environ) -> bool:
  """Whether `--distributed=mode` starts the distributed runtime (see the module docstring)."""
  if mode not in MODES:
    raise ValueError(f"--distributed={mode!r}: expected one of {MODES}")
  if mode == "off":
    return False
  if mode == "on":
    return True
  return bool(coordinator_address or environ.get("JAX_COORDINATOR_ADDRESS")) or tpu_vm


def initialize(mode: str = "auto", coordinator_address: str | None = None,
               num_processes: int | None = None, process_id: int | None = None,
               local_device_ids: Sequence[int] | None = None) -> bool:
  """Start `jax.distributed` when `mode` says so (call before anything touches JAX's devices);
  returns whether it started. Explicit cluster flags with nothing to start them are an error rather
  than a silent single-process run."""
  explicit = {"--coordinator_address": coordinator_address, "--num_processes": num_processes,
              "--process_id": process_id, "--local_device_ids": local_device_ids}
  given = [k for k, v in explicit.items() if v is not None]
  if not should_initialize(mode, coordinator_address, tpu_vm=mode == "auto" and on_tpu_vm()):
    if given:
      raise ValueError(f"{', '.join(given)} given, but --distributed={mode} starts no distributed "
                       "runtime: add --coordinator_address=HOST:PORT (or --distributed=on to let "
                       "JAX detect the cluster)")
    return False
  # CPU processes need a cross-process collectives backend (jax 0.10 defaults to gloo; older
  # versions to none). Only the CPU client reads this, so TPU and GPU runs are unaffected.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                             process_id=process_id,
                             local_device_ids=list(local_device_ids) if local_device_ids else None)
  log.info("distributed: process %d of %d, %d local / %d global devices", jax.process_index(),
           jax.process_count(), jax.local_device_count(), jax.device_count())
  return True


# ---------------------------------------------------------------------------------------------
# Collective helpers (no-ops in a single process).
# ---------------------------------------------------------------------------------------------


def is_main() -> bool:
  """Process 0: the one that writes shared files (metrics, run info, caches)."""
  return jax.process_index() == 0


def barrier(name: str) -> None:
  """Wait until every process got here; `name` must be the same on all of them."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # noqa: PLC0415

    multihost_utils.sync_global_devices(name)


def main_first(name: str, fn: Callable[[], T]) -> T:
  """Run `fn` on process 0, then on the others. For caches: process 0 builds, the others read what
  it wrote instead of racing it. `fn` must do no collectives (the processes run it at different
  times) and must find its own output when it runs a second time."""
  if jax.process_count() == 1:
    return fn()
  if is_main():
    out = fn()
    barrier(name)
    return out
  barrier(name)
  return fn()


def main_value(value: int) -> int:
  """Process 0's `value` on every process: one decision for all (e.g. "is the cache complete?"),
  even where the processes would see different files."""
  if jax.process_count() == 1:
    return value
  from jax.experimental import multihost_utils  # noqa: PLC0415

  return int(multihost_utils.broadcast_one_to_all(np.int32(value)))


def any_process(flag: bool) -> bool:
  """True on every process when `flag` is True on any (a signal that reached only some hosts)."""
  if jax.process_count() == 1:
    return bool(flag)
  from jax.experimental import multihost_utils  # noqa: PLC0415

  return bool(np.asarray(multihost_utils.process_allgather(np.int32(flag))).any())


def total(value: float) -> float:
  """The sum of `value` over processes (per-process counts such as tokens in the local batch), in
  float32 (what devices carry without x64): good to ~1e-7 relative, enough for throughput."""
  if jax.process_count() == 1:
    return float(value)
  from jax.experimental import multihost_utils  # noqa: PLC0415

  return float(np.asarray(multihost_utils.process_allgather(np.float32(value))).sum())
