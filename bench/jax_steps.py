"""Our side of the train-step benchmarks: models from `models/configs.py`, steps from
`train/steps.make_train_step`, exactly as `launch/train.py` builds them (text-only LMs)."""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from llavamod_jax import models, moe
from llavamod_jax.models.configs import TextConfig
from llavamod_jax.train import optim, steps


# Trainable parameters of a text-only LM (no projector): "ffn" is the paper's dense-to-sparse stage.
TRAINABLE = {"all": [r".*"], "ffn": [r"layers_\d+/mlp/.*"]}
LR = 1e-5  # small, so a few timed steps keep the loss near its starting value


def random_params(model, seed: int = 0):
  """Random parameters drawn on the host from the model's abstract shapes (no init compile):
  N(0, 0.02) weights, unit norm scales, N(0, 0.02) biases, U(+-1/sqrt(hidden)) routers."""
  rng = np.random.default_rng(seed)
  flat = traverse_util.flatten_dict(nn.unbox(models.abstract_params(model)), sep="/")
  out = {}
  for path, s in flat.items():
    if "norm" in path:
      x = np.ones(s.shape)
    elif path.endswith("router"):
      x = rng.uniform(-1, 1, s.shape) / np.sqrt(s.shape[0])
    else:
      x = rng.normal(0.0, 0.02, s.shape)
    out[path] = jnp.asarray(x, s.dtype)
  return traverse_util.unflatten_dict(out, sep="/")


def build(cfg: TextConfig, seed: int = 0):
  model = models.build(cfg)
  return model, random_params(model, seed)


def build_student(dense_cfg: TextConfig, experts: int, top_k: int, layers: str, seed: int = 1, **moe_options):
  """MoE student (module, params) with the dense student's shapes and distinct random experts (as
  after some training, so routing decides what is computed)."""
  return build(moe.moe_text_config(dense_cfg, experts, top_k, layers, **moe_options), seed)


# Compiled steps by (kind, configs, loss options, trainable, batch shapes): benchmarks that time the
# same computation (the train-step, scaling and parts sections) compile it once.
_COMPILED: dict = {}


@dataclasses.dataclass
class JaxStep:
  """A train step with its state; `__call__` runs one step and blocks until it is done."""

  step: object
  state: object
  batch: dict
  teacher_params: object
  key: tuple = ()
  last: dict | None = None
  compiled: object = None

  def __call__(self):
    if self.compiled is None:  # compiled ahead of time once: run and cost analysis share it
      if self.key not in _COMPILED:
        _COMPILED[self.key] = self.step.lower(self.state, self.batch, self.teacher_params).compile()
      self.compiled = _COMPILED[self.key]
    self.state, metrics = self.compiled(self.state, self.batch, self.teacher_params)
    self.last = jax.block_until_ready(metrics)
    return self.last


def make_step(kind: str, student, student_params, teacher=None, teacher_params=None, *, batch,
              trainable: str = "all", ce_weight: float = 1.0, chunk_size: int | None = None,
              fused: bool = True, lr: float = LR) -> JaxStep:
  """kind "mimic" (KL + ce_weight * CE + 0.01 aux) or "sft" (CE + 0.01 aux); AdamW, no clipping.
  `chunk_size`: None is `LossConfig`'s default (what launch/train.py builds); 0 full logits; > 0 the
  chunked loss, fused with the LM heads or (fused=False) checkpointed chunks."""
  tx, _ = optim.adamw(lr, total_steps=10_000, warmup_ratio=0.0, grad_clip_norm=0.0)
  if chunk_size is None:
    chunk_size = steps.LossConfig().chunk_size
  cfg = steps.LossConfig(ce_weight=ce_weight, chunk_size=chunk_size, fused=fused)
  step = steps.make_train_step(kind, student, teacher, tx, cfg)
  # Steps donate their state: train on a copy so the caller's params stay usable.
  state = steps.init_state(jax.tree.map(jnp.copy, student_params), TRAINABLE[trainable], tx)
  arrays = {k: jnp.asarray(v) for k, v in batch.items()}
  key = (kind, student.cfg, teacher.cfg if kind == "mimic" else None, cfg, trainable, lr,
         tuple(sorted((k, v.shape, str(v.dtype)) for k, v in arrays.items())))
  return JaxStep(step, state, arrays, teacher_params if kind == "mimic" else None, key)


def xla_flops(step: JaxStep) -> float:
  """FLOPs of the compiled step from XLA's cost analysis (counts padding and recomputation)."""
  if step.compiled is None:
    step()
  cost = step.compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0]
  return float(cost.get("flops", float("nan"))) if cost else float("nan")


def numpy_params(params):
  return jax.tree.map(np.asarray, params)
