"""Which parameters train, and the optimizer that trains them.

Parameters are split by regular expressions over their paths ("language_model/layers_0/mlp/router")
into a trainable tree and a frozen tree. Only the trainable tree is differentiated and given
optimizer state, so frozen parameters cost no gradient memory, no Adam moments, and never change.
"""

from __future__ import annotations

import math
import re
from typing import Sequence

import optax
from flax import traverse_util

from llavamod_jax.models import scan

# The paper's stages (as the original code sets requires_grad; the vision tower is always frozen).
STAGE_TRAINABLE = {
    "adaptor": (r"multi_modal_projector/.*",),
    "dense_to_dense": (r"language_model/.*", r"multi_modal_projector/.*"),
    # FFNs of every layer (experts + router where sparse, the dense FFN elsewhere) and the projector.
    "dense_to_sparse": (r"language_model/layers_\d+/mlp/.*", r"multi_modal_projector/.*"),
    "preference": (r"language_model/layers_\d+/mlp/.*", r"multi_modal_projector/.*"),
    "all": (r".*",),
}


def trainable_patterns(spec: str | Sequence[str]) -> tuple[str, ...]:
  """A stage name from STAGE_TRAINABLE, one regular expression over parameter paths (any other
  string), or a list of them."""
  if isinstance(spec, str):
    return STAGE_TRAINABLE.get(spec, (spec,))
  return tuple(spec)


def partition(params, patterns: Sequence[str]):
  """(trainable, frozen) nested dicts; a path is trainable when any pattern fully matches it.

  Patterns name unrolled paths (`layers_3/mlp/...`) whatever the layout: a stacked parameter of
  scanned layers trains when the patterns match it in every layer it holds (models/scan.py)."""
  compiled = [re.compile(p) for p in patterns]
  flat = traverse_util.flatten_dict(params, sep="/")
  members = scan.members(list(flat))
  train = {k: v for k, v in flat.items() if _trains(k, v, compiled, members)}
  if not train:
    raise ValueError(f"no parameter matches the trainable patterns {list(patterns)}; paths look "
                     f"like {sorted(flat)[:3]}; stage names: {sorted(STAGE_TRAINABLE)}")
  frozen = {k: v for k, v in flat.items() if k not in train}
  return (traverse_util.unflatten_dict(train, sep="/"), traverse_util.unflatten_dict(frozen, sep="/"))


def _trains(path: str, leaf, compiled, members: dict[str, int]) -> bool:
  paths = scan.unrolled_paths(path, leaf.shape, members)
  hits = [any(c.fullmatch(p) for c in compiled) for p in paths]
  if any(hits) and not all(hits):
    raise ValueError(f"the trainable patterns match {paths[hits.index(True)]} but not "
                     f"{paths[hits.index(False)]}: layers that share a stacked parameter of "
                     f"scanned layers ({path}) train together; set scan_layers=False or widen the "
                     "patterns")
  return all(hits)


def merge(trainable, frozen):
  flat = {**traverse_util.flatten_dict(frozen, sep="/"), **traverse_util.flatten_dict(trainable, sep="/")}
  return traverse_util.unflatten_dict(flat, sep="/")


def learning_rate_schedule(lr: float, total_steps: int, warmup_ratio: float = 0.03,
                           end_ratio: float = 0.0) -> optax.Schedule:
  """Linear warmup then cosine decay, as the original's HF Trainer (warmup_ratio 0.03, cosine):
  ceil(total_steps * warmup_ratio) warmup steps (`TrainingArguments.get_warmup_steps`), the rate at
  update k (from 0) = lr * k / warmup, then the cosine down to lr * end_ratio."""
  warmup = math.ceil(total_steps * warmup_ratio)
  if total_steps <= warmup:
    return optax.linear_schedule(0.0, lr, max(warmup, 1))
  return optax.warmup_cosine_decay_schedule(0.0, lr, warmup, total_steps, end_value=lr * end_ratio)


def adamw(lr: float, total_steps: int, *, warmup_ratio: float = 0.03, weight_decay: float = 0.0,
          b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8, grad_clip_norm: float = 1.0,
          end_ratio: float = 0.0) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """AdamW with warmup + cosine and optional global-norm clipping (0 disables it)."""
  schedule = learning_rate_schedule(lr, total_steps, warmup_ratio, end_ratio)
  parts = [optax.clip_by_global_norm(grad_clip_norm)] if grad_clip_norm > 0 else []
  parts.append(optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay))
  return optax.chain(*parts), schedule


def from_config(o, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """`adamw` with the fields of a run config's `optimizer` section."""
  return adamw(o.lr, total_steps, warmup_ratio=o.warmup_ratio, weight_decay=o.weight_decay,
               b1=o.b1, b2=o.b2, eps=o.eps, grad_clip_norm=o.grad_clip_norm,
               end_ratio=o.end_ratio)
