"""The demo teacher: a tiny LLaVA trained from scratch on the synthetic shapes set.

    python launch/train.py --config=configs/teacher.py --workdir=workdirs/teacher
(`configs/mimic.py` trains and caches this teacher by itself when it is missing.)
"""

from llavamod_jax.train import recipes


def get_config(arg=None):
  del arg
  return recipes.teacher()
