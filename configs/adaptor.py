"""Stage 0, adaptor init: train the projector on captions (vision tower and LLM frozen).

    python launch/train.py --config=configs/adaptor.py            # embedded demo
    python launch/train.py --config=configs/adaptor.py:paper      # CLIP-L/336 + Qwen2-0.5B, 558k captions

Planned for v4-8, v5e-8, v5e-16, v5p-8, v5p-16 and v6e-8 (fsdp over every chip; 8 rows per chip x 2
micro-batches): fits each, at most 9.4 GiB per chip (docs/scale.md; `launch/plan.py` before a run).
"""

from llavamod_jax.train import config

VISION = "checkpoints/clip-vit-large-patch14-336"  # openai/clip-vit-large-patch14-336, HF format
LLM = "checkpoints/Qwen2-0.5B"  # Qwen/Qwen2-0.5B (or Qwen2-1.5B)
CAPTIONS, IMAGES = "data/blip_laion_cc_sbu_558k.json", "data/images"


def get_config(arg=None):
  if arg == "paper":
    c = config.base()
    c.student.init = "compose"
    c.student.vision_hf_dir, c.student.llm_hf_dir = VISION, LLM
    config.paper_data(c, [CAPTIONS], IMAGES, batch=8, accum=2, lr=1e-3)
  elif arg:
    raise ValueError(f"configs/adaptor.py:{arg}: expected no argument or 'paper'")
  else:
    from llavamod_jax.demo import recipes

    c = recipes.config("adaptor")
    c.demo.shapes.file = "captions_train.jsonl"
    c.total_steps = 100
    c.optimizer.lr = 1e-3
  c.stage = "adaptor"
  c.teacher.init = "none"
  c.trainable = "adaptor"
  return c
