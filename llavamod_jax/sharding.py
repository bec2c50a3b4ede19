"""Parallelism: the mesh, where parameters and batches live, and the rules activations follow.

Every parameter carries logical axis names (`embed`, `mlp`, `heads`, `vocab`, `expert`, ...) and
activations are constrained by logical names too (`activation_batch`, ...; `models.layers.constrain`).
One rules table maps both onto the mesh axes (data, fsdp, expert, tensor). Parameters are placed with
`place`; activation constraints take effect only inside `rules_context` with a mesh set, which every
jitted step enters through `on_argument_mesh`.

Several processes: each one holds the same parameter values and its own rows of every global batch
(`batch_to_device`); placement builds global arrays from the host copies, never across hosts.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from llavamod_jax import models

AXES = ("data", "fsdp", "expert", "tensor")

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
    ("layers", None),  # the stacking axis of scanned layers (models/scan.py): every device holds all
)


# ---------------------------------------------------------------------------------------------
# The mesh and the rules context.
# ---------------------------------------------------------------------------------------------


def make_mesh(sizes: Mapping[str, int], devices=None) -> Mesh:
  """A mesh over `devices` (default: all) with the sizes of `AXES`; one size may be -1 (the rest)."""
  devices = jax.devices() if devices is None else list(devices)
  want = [int(sizes[a]) for a in AXES]
  n = len(devices)
  fixed = math.prod(s for s in want if s != -1)
  if want.count(-1) > 1 or n % fixed:
    raise ValueError(f"config.mesh {dict(zip(AXES, want))} does not fit {n} devices "
                     f"(at most one -1; the others must divide the device count)")
  want = [n // fixed if s == -1 else s for s in want]
  if math.prod(want) != n:
    raise ValueError(f"config.mesh {dict(zip(AXES, want))} uses {math.prod(want)} devices, "
                     f"{n} are present")
  return Mesh(np.asarray(devices).reshape(want), AXES)


@contextlib.contextmanager
def rules_context(mesh: Mesh | None, rules=DEFAULT_RULES):
  """Logical activation constraints map through `rules` onto `mesh` (None: rules only, no mesh, so
  constraints stay no-ops)."""
  with contextlib.ExitStack() as stack:
    if mesh is not None:
      stack.enter_context(jax.set_mesh(mesh))
    stack.enter_context(nn.logical_axis_rules(list(rules)))
    yield


class _OnArgumentMesh:
  """A jitted function that runs (traces, lowers) inside `rules_context` on the mesh its placed
  arguments live on. MoE blocks find the mesh there for expert-parallel dispatch and activation
  constraints find mesh and rules. Arguments on no mesh: rules only, constraints are no-ops."""

  def __init__(self, jitted, rules):
    self.jitted, self.rules = jitted, rules

  def _context(self, args):
    for x in jax.tree.leaves(args):
      if isinstance(getattr(x, "sharding", None), NamedSharding):
        return rules_context(x.sharding.mesh, self.rules)
    return rules_context(None, self.rules)

  def __call__(self, *args):
    with self._context(args):
      return self.jitted(*args)

  def lower(self, *args):
    with self._context(args):
      return self.jitted.lower(*args)

  def trace(self, *args):
    with self._context(args):
      return self.jitted.trace(*args)

  def __getattr__(self, name):
    return getattr(self.jitted, name)


def on_argument_mesh(jitted, rules=DEFAULT_RULES):
  return _OnArgumentMesh(jitted, rules)


# ---------------------------------------------------------------------------------------------
# Parameters.
# ---------------------------------------------------------------------------------------------


def param_shardings(abstract_boxed, mesh: Mesh, rules=DEFAULT_RULES):
  """NamedShardings for a tree of `nn.LogicallyPartitioned` leaves (see models.abstract_params)."""
  specs = nn.get_partition_spec(abstract_boxed)
  return nn.logical_to_mesh_sharding(specs, mesh, list(rules))


def place(model, params, mesh: Mesh, rules=DEFAULT_RULES):
  """`params` of `model` onto `mesh`, each leaf split as its logical axes and `rules` say."""
  shardings = param_shardings(models.abstract_params(model), mesh, rules)
  return jax.tree.map(_put, params, shardings)


def _put(x, target: NamedSharding):
  if target.is_fully_addressable:
    return jax.device_put(x, target)
  # A multi-process mesh: an array on this process's devices cannot be sent to the others' (no
  # cross-host transfers on CPU); every process holds the same values, so each one places its own
  # shards from its host copy.
  if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):  # keys have no host form; their data does
    data = jax.device_put(np.asarray(jax.random.key_data(x)), target)
    return jax.random.wrap_key_data(data, impl=jax.random.key_impl(x))
  return jax.device_put(np.asarray(x), target)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def replicate_unplaced(tree, mesh: Mesh):
  """Leaves not on `mesh` (scalars made outside jit: the step, optimizer counts, the rng) ->
  replicated on it. The step returns them so; inputs placed the same way let the first step's
  compilation serve every later step (and several processes need global arrays anyway)."""
  def put(x):
    placed = isinstance(getattr(x, "sharding", None), NamedSharding) and x.sharding.mesh == mesh
    return x if placed else _put(x, replicated(mesh))

  return jax.tree.map(put, tree)


def to_host(x):
  """A numpy copy of a (possibly multi-host sharded) array."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    from jax.experimental import multihost_utils
    x = multihost_utils.process_allgather(x, tiled=True)
  return np.asarray(jax.device_get(x))


# ---------------------------------------------------------------------------------------------
# Batches.
# ---------------------------------------------------------------------------------------------


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Batch arrays: rows (the leading axis) split over (data, fsdp)."""
  return NamedSharding(mesh, PartitionSpec(("data", "fsdp")))


def batch_to_device(batch: dict, mesh: Mesh) -> dict:
  """This process's numpy batch -> global arrays sharded along the batch axis over (data, fsdp).

  Process p's rows become block p of the global batch, which is the one-process batch (see
  data.pipeline). A preference batch (twice as many rows as examples: this process's chosen rows,
  then its rejected rows) is regrouped across processes into all chosen rows, then all rejected
  rows, the layout the preference step splits in half."""
  spec = batch_sharding(mesh)
  pairs = (jax.process_count() > 1
           and batch["input_ids"].shape[0] == 2 * batch["example_mask"].shape[0])
  out = {}
  for k, v in batch.items():
    if k == "example_mask":
      continue
    x = jax.make_array_from_process_local_data(spec, np.asarray(v))
    out[k] = chosen_then_rejected(x, jax.process_count(), spec) if pairs else x
  return out


def pair_order(processes: int, rows: int) -> np.ndarray:
  """Global row order that turns per-process blocks [chosen_p (rows), rejected_p (rows)], p = 0..P-1,
  into [chosen_0 .. chosen_P-1, rejected_0 .. rejected_P-1]."""
  return np.arange(processes * 2 * rows).reshape(processes, 2, rows).transpose(1, 0, 2).reshape(-1)


@functools.partial(jax.jit, static_argnames=("processes", "sharding"))
def chosen_then_rejected(x, processes: int, sharding):
  # Leading axis: rows, or image slots (K per row, owned in row order): both split the same way.
  order = pair_order(processes, x.shape[0] // (2 * processes))
  return jax.lax.with_sharding_constraint(x[order], sharding)
