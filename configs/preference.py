"""Stage 2, preference distillation: DPO-family loss with the teacher as reference model.

    python launch/train.py --config=configs/preference.py         # demo, after configs/mimic.py
    python launch/train.py --config=configs/preference.py:paper   # RLAIF-V pairs, kto_pair

Planned for v4-8, v5e-8, v5e-16, v5p-8, v5p-16 and v6e-8 (fsdp over every chip; 1 pair per chip x 8
micro-batches): fits each, at most 13.9 GiB per chip, 8.8 on v5e-8 (docs/scale.md).
"""

from llavamod_jax.train import config

TEACHER = "checkpoints/llava-qwen2-7b-hf"  # the dense LLaVA teacher (CLIP-L/336 + Qwen2-7B)
PAIRS, IMAGES = "data/rlaif_v.jsonl", "data/images"


def get_config(arg=None):
  if arg == "paper":
    c = config.base()
    c.teacher.init, c.teacher.hf_dir = "hf", TEACHER
    c.student.workdir = "workdirs/mimic_d2s"
    config.paper_data(c, [PAIRS], IMAGES, batch=1, accum=8, lr=2e-6)
  elif arg:
    raise ValueError(f"configs/preference.py:{arg}: expected no argument or 'paper'")
  else:
    from llavamod_jax.demo import recipes

    c = recipes.config("preference")
    c.student.workdir = "workdirs/mimic"
    c.total_steps = 100
    c.optimizer.lr = 5e-5  # higher rates move the demo student far from its teacher
    c.data.batch_size = 8
  c.stage = "preference"
  c.student.init = "workdir"
  c.trainable = "preference"
  c.loss.loss_type = "kto_pair"  # what the original's script uses
  c.loss.beta = 0.1
  return c
