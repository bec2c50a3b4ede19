"""Stage 1, mimic distillation: KL(teacher || student) on response tokens.

    python launch/train.py --config=configs/mimic.py              # embedded demo (dense-to-sparse)
    python launch/train.py --config=configs/mimic.py:d2d          # dense-to-dense, KL only
    python launch/train.py --config=configs/mimic.py:d2d_paper    # Qwen2-7B LLaVA -> Qwen2-0.5B
    python launch/train.py --config=configs/mimic.py:d2s_paper    # upcycled 4 experts, top-2
"""

from llavamod_jax.train import recipes


def get_config(arg=None):
  return recipes.mimic(arg)
