"""Stage 1, mimic distillation: KL(teacher || student) on response tokens.

    python launch/train.py --config=configs/mimic.py              # embedded demo (dense-to-sparse)
    python launch/train.py --config=configs/mimic.py:d2d          # demo, dense-to-dense, KL only
    python launch/train.py --config=configs/mimic.py:d2d_paper    # Qwen2-7B LLaVA -> Qwen2-0.5B
    python launch/train.py --config=configs/mimic.py:d2s_paper    # upcycled 4 experts, top-2

The paper variants read the inputs a user provides (HF format; launch/convert.py) at the paths below,
each overridable (`--config.teacher.hf_dir=...`), with the original scripts' hyperparameters.
Both were planned for v4-8, v5e-8, v5e-16, v5p-8, v5p-16 and v6e-8 (fsdp over every chip; 1 row per
chip x 8 micro-batches) and fit each: d2s at most 11.2 GiB per chip, 7.6 on v5e-8 (docs/scale.md).
"""

from llavamod_jax.train import config

TEACHER = "checkpoints/llava-qwen2-7b-hf"  # the dense LLaVA teacher (CLIP-L/336 + Qwen2-7B)
DATA, IMAGES = "data/llava_mix665k.json", "data/images"
VARIANTS = ("d2s", "d2d", "d2s_paper", "d2d_paper")


def get_config(arg=None):
  arg = arg or "d2s"
  if arg not in VARIANTS:
    raise ValueError(f"configs/mimic.py:{arg}: expected one of {VARIANTS}")
  if arg.endswith("_paper"):
    c = config.base()
    c.teacher.init, c.teacher.hf_dir = "hf", TEACHER
    c.student.init = "workdir"
    c.student.workdir = "workdirs/adaptor" if arg == "d2d_paper" else "workdirs/mimic_d2d"
    c.trainable = "dense_to_dense" if arg == "d2d_paper" else "dense_to_sparse"
    config.paper_data(c, [DATA], IMAGES, batch=1, accum=8, lr=2e-5)
  else:
    from llavamod_jax.demo import recipes

    c = recipes.config("mimic")
    c.total_steps = 300
    c.checkpoint_every = 100
    c.optimizer.lr = 2e-3
    c.optimizer.warmup_ratio = 0.05
    s = c.student.scratch
    s.hidden_size, s.intermediate_size, s.num_layers = 64, 128, 2
    # The demo student's LLM is not pretrained, so all of it trains.
    c.trainable = "dense_to_dense"
    c.demo.baseline = True  # the report's "student (CE alone)" row: what distilling adds
  c.stage = "mimic"
  if arg.startswith("d2s"):
    c.student.upcycle.num_experts = 4
    c.student.upcycle.top_k = 2
    c.loss.ce_weight = 1.0  # the original's kd_lm
  else:
    c.loss.ce_weight = 0.0  # the original's only_kd
  return c
