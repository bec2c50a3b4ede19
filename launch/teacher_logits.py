r"""Run the teacher once over a mimic stage's data and store its top-k logits; then distil from them
with no teacher in memory.

    python launch/teacher_logits.py --config=configs/mimic.py[:variant] --out=DIR [--top_k=64] \
        [--dtype=float16] [--records_per_part=4096] [--config.x=y ...]
    python launch/train.py --config=configs/mimic.py --config.teacher.init=offline \
        --config.teacher.logits_dir=DIR

Reads the same config as training (teacher, data files, template, max_length, temperature, mask,
mesh, batch), over `data.train_files` and `data.eval_files`. Stores, for every record and every
distilled position, the teacher's k largest log-probabilities (`--dtype`: float16, or float32 for
exact values), their token ids and the log-sum-exp of all its logits (llavamod_jax/data/
teacher_logits.py). Restarting with the same --out continues at the first incomplete part; the
settings must be the same. Several processes: the same flags as launch/train.py, and --out on a
path every host shares.
"""

from __future__ import annotations

import logging
import sys

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", "configs/mimic.py", "Mimic stage config file.",
                                          lock_config=True)
_OUT = flags.DEFINE_string("out", None, "Directory of the stored logits.", required=True)
_TOP_K = flags.DEFINE_integer("top_k", None, "Logits kept per position (default: "
                              "config.teacher.top_k).", lower_bound=1)
_DTYPE = flags.DEFINE_enum("dtype", "float16", ["float16", "float32"],
                           "Storage of the top-k log-probabilities.")
_PER_PART = flags.DEFINE_integer("records_per_part", 4096, "Records per part: the unit of "
                                 "resumption (rounded up to whole batches).", lower_bound=1)
_DISTRIBUTED = flags.DEFINE_enum("distributed", "auto", ["auto", "on", "off"],
                                 "Start jax.distributed (see launch/train.py).")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "HOST:PORT of process 0.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes.", lower_bound=1)
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.", lower_bound=0)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.basicConfig(level=logging.INFO, stream=sys.stdout,
                      format="%(asctime)s %(levelname)s %(name)s: %(message)s")
  for noisy in ("absl", "orbax", "jax._src", "grain"):
    logging.getLogger(noisy).setLevel(logging.WARNING)
  from llavamod_jax import distributed

  distributed.initialize(_DISTRIBUTED.value, _COORDINATOR.value, _NUM_PROCESSES.value,
                         _PROCESS_ID.value, None)
  from llavamod_jax import cli
  from llavamod_jax.train import offline

  with cli.user_errors():  # bad input: one clear line
    cfg = _CONFIG.value
    if "demo" in cfg:  # the embedded default: its data and teacher are built (or read from cache)
      from llavamod_jax import demo
      cfg = demo.prepare(cfg)
    offline.run(cfg, _OUT.value, top_k=_TOP_K.value, dtype=_DTYPE.value,
                records_per_part=_PER_PART.value)


if __name__ == "__main__":
  from llavamod_jax import cli
  app.run(main, flags_parser=cli.config_app_parser())
