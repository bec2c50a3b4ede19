"""Logical axis names -> mesh axes. The rules table lives in configs; this is the default."""

from __future__ import annotations

import flax.linen as nn
import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

# (logical axis, mesh axis or axes). Order matters: the first rule whose mesh axes are free wins.
DEFAULT_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("activation_batch", ("data", "fsdp")),
    ("activation_length", None),
    ("activation_embed", None),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv", "tensor"),
    ("expert", "expert"),
    ("norm", None),
)


def param_shardings(abstract_boxed, mesh: Mesh, rules=DEFAULT_RULES):
  """NamedShardings for a tree of `nn.LogicallyPartitioned` leaves (see models.abstract_params)."""
  specs = nn.get_partition_spec(abstract_boxed)
  return nn.logical_to_mesh_sharding(specs, mesh, list(rules))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def to_host(x):
  """A numpy copy of a (possibly multi-host sharded) array."""
  import numpy as np

  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    from jax.experimental import multihost_utils
    x = multihost_utils.process_allgather(x, tiled=True)
  return np.asarray(jax.device_get(x))
