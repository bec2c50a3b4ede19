r"""Train one stage of LLaVA-MoD.

    python launch/train.py --config=configs/mimic.py [--workdir=DIR] [--config.optimizer.lr=1e-4]

With no flag but the config, the embedded default runs: it builds the synthetic shapes set, trains
(or reuses) a tiny teacher, upcycles a tiny student and distils it, then trains the same student
with CE alone and no teacher in WORKDIR/baseline_ce (config.demo.baseline) and reports the three
side by side. Restarting with the same workdir resumes from its latest checkpoint (the baseline's
too). The workdir defaults to workdirs/<stage>. A restart with a config that changes the data or
the model's shapes is refused, naming each key; a damaged newest checkpoint is renamed aside and the
one before it restored (llavamod_jax/train/resume.py). A user error (an unknown key, a bad value, a
missing file) is one line, `error: ...`, exit 1; `-v 1` shows its traceback.

Several processes (one per host; JAX's multi-controller runtime). Start the same command on every
host; each one reads only its rows of every global batch, so config.data.batch_size stays the global
batch (it must divide by the number of processes) and the run logs the losses a single process
would. Process 0 writes metrics.jsonl, TensorBoard, run.json, loss_curves.png and the final report;
orbax writes the checkpoints from all processes, so the workdir (and config.demo.cache, for the demo
teacher) must be one shared path: a shared filesystem or gs://.
  --distributed=auto|on|off  auto (default): start `jax.distributed` when --coordinator_address (or
                             $JAX_COORDINATOR_ADDRESS) is set or on a Cloud TPU VM, where JAX finds
                             the pod slice's hosts itself; a plain single-machine run never starts
                             it. on: always start it, letting JAX detect what the flags leave unset
                             (TPU, SLURM, Open MPI, Kubernetes). off: never.
  --coordinator_address=HOST:PORT  process 0's host and a free port, the same on every process
  --num_processes=N          how many processes take part
  --process_id=I             this process, 0 .. N-1 (process 0 is the one that writes)
  --local_device_ids=0,1     GPU/accelerator ids this process uses (default: all it sees)
On CPU the processes talk through gloo. Two processes on one machine, two CPU devices each:

    XLA_FLAGS=--xla_force_host_platform_device_count=2 python launch/train.py --config=... \
        --workdir=W --coordinator_address=127.0.0.1:8476 --num_processes=2 --process_id=0 &
    XLA_FLAGS=--xla_force_host_platform_device_count=2 python launch/train.py --config=... \
        --workdir=W --coordinator_address=127.0.0.1:8476 --num_processes=2 --process_id=1
"""

from __future__ import annotations

import logging
import sys

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", "configs/mimic.py", "Stage config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints and metrics go "
                               "(default: workdirs/<stage>).")
_DISTRIBUTED = flags.DEFINE_enum("distributed", "auto", ["auto", "on", "off"],
                                 "Start jax.distributed: auto (with --coordinator_address or on a "
                                 "TPU VM), on (always; JAX detects the cluster), off (never).")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None,
                                   "HOST:PORT of process 0, the same on every process.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes in the run.",
                                      lower_bound=1)
_PROCESS_ID = flags.DEFINE_integer("process_id", None,
                                   "This process's index, 0 .. num_processes-1.", lower_bound=0)
_LOCAL_DEVICE_IDS = flags.DEFINE_list("local_device_ids", None,
                                      "Accelerator ids this process uses (default: all visible).")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.basicConfig(level=logging.INFO, stream=sys.stdout,
                      format="%(asctime)s %(levelname)s %(name)s: %(message)s")
  for noisy in ("absl", "orbax", "jax._src", "grain"):
    logging.getLogger(noisy).setLevel(logging.WARNING)
  from llavamod_jax import distributed

  # Before anything touches JAX's devices: initialize must come first on every process.
  distributed.initialize(_DISTRIBUTED.value, _COORDINATOR.value, _NUM_PROCESSES.value,
                         _PROCESS_ID.value, _local_device_ids())
  from llavamod_jax import cli
  from llavamod_jax.train import loop, report, resume

  with cli.user_errors(resume.NoRestorableCheckpoint):  # the user's to fix: one line, exit 1
    cfg = _CONFIG.value
    if "demo" in cfg:  # the embedded default: build its assets, then train on them as on any inputs
      from llavamod_jax import demo
      from llavamod_jax.train import config as config_lib
      config_lib.validate(cfg, data=False, demo=True)  # a bad value or path fails before the
      config_lib.check_files(cfg)  # assets build
      cfg = demo.prepare(cfg)
    workdir = _WORKDIR.value or f"workdirs/{cfg.stage}"
    if "demo" in cfg and cfg.demo.baseline and cfg.stage != "mimic":
      raise ValueError(f"--config.demo.baseline=True: the CE-alone baseline is the mimic stage's "
                       f"(this config's stage is {cfg.stage!r})")
    loop.run(cfg, workdir)
    baselines = {}
    if "demo" in cfg and cfg.demo.baseline:  # the same student with CE alone: what distilling adds
      from llavamod_jax.demo import recipes
      baselines["student_ce_alone"] = f"{workdir}/baseline_ce"
      loop.run(recipes.ce_alone(cfg), baselines["student_ce_alone"])
    if cfg.final_report:
      report.final_report(cfg, workdir, baselines=baselines)


def _local_device_ids() -> list[int] | None:
  ids = _LOCAL_DEVICE_IDS.value
  if ids is None:
    return None
  if not all(i.strip().isdigit() for i in ids):
    raise app.UsageError(f"--local_device_ids={','.join(ids)}: expected integers like 0,1")
  return [int(i) for i in ids]


if __name__ == "__main__":
  from llavamod_jax import cli
  app.run(main, flags_parser=cli.config_app_parser())
