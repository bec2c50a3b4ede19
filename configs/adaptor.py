"""Stage 0, adaptor init: train the projector on captions (vision tower and LLM frozen).

    python launch/train.py --config=configs/adaptor.py            # demo
    python launch/train.py --config=configs/adaptor.py:paper      # CLIP-L/336 + Qwen2-0.5B, 558k captions
"""

from llavamod_jax.train import recipes


def get_config(arg=None):
  return recipes.adaptor(arg)
