"""The demo teacher: a tiny LLaVA trained from scratch on the synthetic shapes set.

    python launch/train.py --config=configs/teacher.py --workdir=workdirs/teacher

(`configs/mimic.py` trains and caches this teacher by itself when it is missing, starting it from a
pretrained vision tower; llavamod_jax/demo/README.md.)
"""

from llavamod_jax.demo import recipes


def get_config(arg=None):
  if arg:
    raise ValueError(f"configs/teacher.py:{arg}: takes no argument")
  return recipes.teacher()
