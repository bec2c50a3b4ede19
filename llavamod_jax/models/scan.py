"""Scanned layers: the stacked parameter layout and conversions to and from the unrolled one.

With `scan_layers` a model runs its layers as one `nn.scan` over a repeating group of `period`
consecutive layers, so XLA compiles the group once instead of once per layer. The group is the
shortest run of layers that repeats: 1 for a dense LM or a ViT, 2 for an MoE LM with experts in every
other layer (the paper's `sparse` upcycling), the whole depth when nothing repeats.

Layouts of the layer parameters (under `language_model/` or `vision_tower/`):
  unrolled  layers_{i}/...                 one subtree per layer, as HF names them
  scanned   scanned_layers/layer_{j}/...   every leaf stacked on a leading axis of num_layers / period;
                                           entry g of member j is layer g * period + j
HF import and export, upcycling and trainable-parameter patterns speak the unrolled layout;
`relayout` converts a parameter tree to the layout a config asks for, `unrolled` back.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

SCANNED = "scanned_layers"
_UNROLLED_KEY = re.compile(r"layers_(\d+)$")
_MEMBER_KEY = re.compile(r"layer_(\d+)$")


def period(kinds: Sequence[Any]) -> int:
  """Length of the shortest group of layers that repeats: kinds[i] == kinds[i % p] for every i."""
  n = len(kinds)
  for p in range(1, n + 1):
    if n % p == 0 and all(kinds[i] == kinds[i % p] for i in range(n)):
      return p
  return max(n, 1)


def text_period(cfg) -> int:
  """Scan group length of a `TextConfig`: dense and MoE layers differ."""
  moe = set(cfg.moe_layers) if cfg.num_experts else set()
  return period([i in moe for i in range(cfg.num_layers)])


def is_scanned(tree) -> bool:
  return isinstance(tree, dict) and SCANNED in tree


# ---------------------------------------------------------------------------------------------
# One stack of layers (the subtree of a DecoderLM or a VisionTower).
# ---------------------------------------------------------------------------------------------


def stack(tree: dict, num_layers: int, p: int) -> dict:
  """`layers_{i}` subtrees of `tree` -> `scanned_layers/layer_{j}` with leaves stacked by group."""
  missing = [i for i in range(num_layers) if f"layers_{i}" not in tree]
  if missing or num_layers % p:
    raise ValueError(f"cannot stack {num_layers} layers in groups of {p}: missing layers {missing}")
  rest = {k: v for k, v in tree.items() if not _UNROLLED_KEY.match(k)}
  groups = num_layers // p
  group = {}
  for j in range(p):
    parts = [tree[f"layers_{g * p + j}"] for g in range(groups)]
    _same_structure(parts, [g * p + j for g in range(groups)])
    group[f"layer_{j}"] = jax.tree.map(lambda *xs: _stack(xs), *parts)
  return {**rest, SCANNED: group}


def unstack(tree: dict, *, host: Callable | None = None) -> dict:
  """Inverse of `stack`. host: a function that reads an array to numpy (`sharding.to_host`); each
  stacked leaf is then read once and its layers are views of it (what an exporter wants: no second
  copy on the device)."""
  if not is_scanned(tree):
    return tree
  group = tree[SCANNED]
  p = len(group)
  out = {k: v for k, v in tree.items() if k != SCANNED}
  for key, member in group.items():
    j = int(_MEMBER_KEY.match(key).group(1))
    if host is not None:
      member = jax.tree.map(host, member)
    groups = jax.tree.leaves(member)[0].shape[0]
    for g in range(groups):
      out[f"layers_{g * p + j}"] = jax.tree.map(lambda x, g=g: x[g], member)
  return out


def _stack(xs):
  if all(isinstance(x, np.ndarray) for x in xs):
    return np.stack(xs)
  return jnp.stack(xs)


def _same_structure(parts, layers):
  first = jax.tree.structure(parts[0])
  for part, i in zip(parts[1:], layers[1:]):
    if jax.tree.structure(part) != first:
      raise ValueError(f"layer {i} has other parameters than layer {layers[0]}; they cannot share "
                       "a scan group")


# ---------------------------------------------------------------------------------------------
# Whole models.
# ---------------------------------------------------------------------------------------------


def _parts(cfg) -> list[tuple[str | None, Any, int]]:
  """[(params key or None for the root, sub-config, scan period)] of a model's layer stacks."""
  from llavamod_jax.models.configs import LlavaConfig, TextConfig

  if isinstance(cfg, LlavaConfig):
    return [("language_model", cfg.text, text_period(cfg.text)), ("vision_tower", cfg.vision, 1)]
  if isinstance(cfg, TextConfig):
    return [(None, cfg, text_period(cfg))]
  return [(None, cfg, 1)]


def _each(params, cfg, fn: Callable[[dict, Any, int], dict]):
  params = dict(params)
  for key, sub, p in _parts(cfg):
    if key is None:
      params = fn(params, sub, p)
    elif key in params:
      params[key] = fn(params[key], sub, p)
  return params


def relayout(params, cfg):
  """`params` (either layout) in the layout `cfg` asks for (`scan_layers` of each stack)."""
  def fn(tree, sub, p):
    if sub.scan_layers and not is_scanned(tree):
      return stack(tree, sub.num_layers, p)
    if not sub.scan_layers and is_scanned(tree):
      return unstack(tree)
    return tree
  return _each(params, cfg, fn)


def unrolled_config(cfg):
  """`cfg` with every stack unrolled."""
  from llavamod_jax.models.configs import LlavaConfig

  if isinstance(cfg, LlavaConfig):
    return cfg.replace(text=cfg.text.replace(scan_layers=False),
                       vision=cfg.vision.replace(scan_layers=False))
  return cfg.replace(scan_layers=False)


def unrolled(model, params, *, host: Callable | None = None):
  """(module, params) in the unrolled layout (HF export, upcycling); `host` as in `unstack`."""
  params = _each(params, model.cfg, lambda tree, sub, p: unstack(tree, host=host))
  return model.clone(cfg=unrolled_config(model.cfg), parent=None), params


_STACKED = re.compile(rf"(^|/){SCANNED}/layer_(\d+)/")


def members(flat_paths: Sequence[str]) -> dict[str, int]:
  """{prefix before `scanned_layers`: its number of members (the scan period)} over flattened
  ("/"-joined) parameter or collection paths."""
  found: dict[str, set[str]] = {}
  for path in flat_paths:
    m = _STACKED.search(path)
    if m:
      found.setdefault(path[:m.start()], set()).add(m.group(2))
  return {k: len(v) for k, v in found.items()}


def unrolled_paths(path: str, shape: Sequence[int], counts: dict[str, int]) -> list[str]:
  """The unrolled paths one flattened stacked path stands for (its entries in order); [path] when it
  is not stacked. `counts` is `members` of the tree's paths."""
  m = _STACKED.search(path)
  if not m:
    return [path]
  p, j = counts[path[:m.start()]], int(m.group(2))
  head, tail = path[:m.start()] + m.group(1), path[m.end():]
  return [f"{head}layers_{g * p + j}/{tail}" for g in range(shape[0])]


def unstack_collection(flat: dict[str, Any], counts: dict[str, int]) -> dict[str, Any]:
  """A flattened sown collection ({"language_model/scanned_layers/layer_1/mlp/z_loss": [groups]})
  with stacked entries split per layer ("language_model/layers_3/mlp/z_loss": scalar). `counts`:
  the scan period of each stack (a collection need not name every member: dense layers sow none)."""
  out = {}
  for path, value in flat.items():
    paths = unrolled_paths(path, value.shape, counts)
    if paths == [path]:
      out[path] = value
    else:
      out.update((p, value[g]) for g, p in enumerate(paths))
  return out
