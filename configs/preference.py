"""Stage 2, preference distillation: DPO-family loss with the teacher as reference model.

    python launch/train.py --config=configs/preference.py         # demo, after configs/mimic.py
    python launch/train.py --config=configs/preference.py:paper   # RLAIF-V pairs, kto_pair
"""

from llavamod_jax.train import recipes


def get_config(arg=None):
  return recipes.preference(arg)
