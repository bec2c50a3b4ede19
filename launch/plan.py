r"""Will a stage fit a slice? Compiles its train step ahead of time and reports per-chip memory.

    python launch/plan.py --config=configs/mimic.py:d2s_paper --topology=v5p-8 [--out=plan.json] \
        [--compare_attention] [--config.data.batch_size=8 ...]

Builds the stage's teacher and student from their config files alone (HF `config.json`, or a
workdir's checkpoint config; no weights, no data), shards them with the run's mesh and rules over
the slice, and compiles the step `launch/train.py` runs for it. TPU slices (v4-8, v5p-8, v5e-16,
v6e-8, ...; llavamod_jax/train/plan.py lists them) need libtpu (`pip install -e ".[tpu]"`), not a
TPU; `--topology=local` compiles for this machine's devices.

Exit code: 0 fits, 1 does not fit, 2 bad input (unknown slice, missing config file, bad config).
"""

from __future__ import annotations

import json
import logging
import sys

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Stage config file[:variant].",
                                          lock_config=True)
_TOPOLOGY = flags.DEFINE_string("topology", "local", "A TPU slice (v5p-8, v5e-16, ...) or 'local'.")
_OUT = flags.DEFINE_string("out", None, "Write the plan as JSON here.")
_COMPARE = flags.DEFINE_bool("compare_attention", False, "Compile a second time with "
                             "attention='xla' and report the memory the configured kernels save.")
_HBM_GIB = flags.DEFINE_float("hbm_gib", None, "Plan against this much memory per chip (GiB) "
                              "instead of the slice's HBM (or the local devices' limit).")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(levelname)s %(message)s")
  for noisy in ("absl", "orbax", "jax._src", "grain"):
    logging.getLogger(noisy).setLevel(logging.ERROR)
  from llavamod_jax.train import plan

  if _CONFIG.value is None:
    print("--config is required, e.g. --config=configs/mimic.py:d2s_paper", file=sys.stderr)
    return 2
  try:
    hbm = None if _HBM_GIB.value is None else int(_HBM_GIB.value * plan.GiB)
    report = plan.plan(_CONFIG.value, _TOPOLOGY.value, hbm_bytes=hbm,
                       compare_attention=_COMPARE.value)
  except (plan.PlanError, FileNotFoundError, ValueError) as e:
    print(f"plan: {e}", file=sys.stderr)
    return 2
  print(plan.summary(report))
  if _OUT.value:
    with open(_OUT.value, "w") as f:
      json.dump(report, f, indent=2)
  return 0 if report["fits"] else 1


if __name__ == "__main__":
  from llavamod_jax import cli
  app.run(main, flags_parser=cli.config_app_parser(exit_code=2))
