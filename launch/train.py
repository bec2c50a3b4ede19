r"""Train one stage of LLaVA-MoD.

    python launch/train.py --config=configs/mimic.py [--workdir=DIR] [--config.optimizer.lr=1e-4]

With no flag but the config, the embedded default runs: it builds the synthetic shapes set, trains
(or reuses) a tiny teacher, upcycles a tiny student and distils it. Restarting with the same workdir
resumes from its latest checkpoint. The workdir defaults to workdirs/<stage>.
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


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.basicConfig(level=logging.INFO, stream=sys.stdout,
                      format="%(asctime)s %(levelname)s %(name)s: %(message)s")
  for noisy in ("absl", "orbax", "jax._src", "grain"):
    logging.getLogger(noisy).setLevel(logging.WARNING)
  from llavamod_jax.train import loop

  cfg = _CONFIG.value
  workdir = _WORKDIR.value or f"workdirs/{cfg.stage}"
  loop.run(cfg, workdir)
  if cfg.final_report:
    from llavamod_jax.train import report
    report.final_report(cfg, workdir)


if __name__ == "__main__":
  app.run(main)
