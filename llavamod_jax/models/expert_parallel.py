"""Expert-parallel dropless dispatch: token rows travel to their experts' devices by all-to-all.

Inside `jax.shard_map` over the context mesh (`jax.set_mesh`; the train and eval steps enter the mesh
their arguments live on), every device holds a slice of the tokens (split over *every* mesh axis)
with their routing decisions, and the experts of its `expert` coordinate (`experts / ep` of them,
their `embed`/`mlp` shards gathered, as FSDP does). Per device:

  1. sort the (token, choice) rows by expert -- experts are contiguous per shard, so this also
     groups the rows by destination -- and write them into a send buffer [ep, capacity, hidden];
  2. `all_to_all` over `expert`: chunk d goes to expert shard d, which now holds the rows of every
     peer for its local experts;
  3. run the local experts on them (the block's blocked / ragged grouped matmul);
  4. the inverse `all_to_all` brings the results home; unsort, weight by the router, sum over k.

Routing, aux losses and metrics stay outside, on the global token arrays, so they are the ones the
single-device block computes.

Dropless needs a static buffer that holds the worst case: every row of a device may go to the same
shard, i.e. `tokens_per_device * min(k, experts / ep)` rows per destination (a token picks distinct
experts, so at most that many of its choices live on one shard). The send and receive buffers are
therefore `ep` times that -- `ep * min(k, E/ep) / k` times the rows actually routed -- and the
receiving grouped matmul runs over all of them (the blocked kernel computes every block; ragged_dot
skips the rows past the groups). At this bound the exchange moves as many bytes as an all-gather of
the tokens over `expert` would. A ragged all-to-all (`jax.lax.ragged_all_to_all`) would send only
the real rows, but XLA:CPU does not implement it (jax 0.10), so the fixed buffer is what runs
everywhere.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.sharding import AbstractMesh
from jax.sharding import PartitionSpec as P

EXPERT_AXIS = "expert"

# local_experts(rows [n, hidden] sorted by local expert, expert of each row [n] (num_local: none),
#               group_sizes [num_local], wg, wu, wd) -> [n, hidden]
LocalExperts = Callable[..., jax.Array]


def expert_mesh() -> AbstractMesh | None:
  """The context mesh when it shards experts (an `expert` axis of size > 1), else None."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or EXPERT_AXIS not in mesh.axis_names or mesh.shape[EXPERT_AXIS] == 1:
    return None
  if mesh.manual_axes:  # already inside a shard_map: stay local
    return None
  return mesh


def dispatch(tokens, experts, weights, wg, wu, wd, *, mesh: AbstractMesh,
             local_experts: LocalExperts) -> jax.Array:
  """Expert-parallel MoE combine: sum_j weights[t, j] * expert_{experts[t, j]}(tokens[t]).

  tokens [T, hidden]; experts, weights [T, k] (global arrays); wg, wu [E, hidden, inter] and
  wd [E, inter, hidden]. Returns [T, hidden].
  """
  num_experts = wg.shape[0]
  ep = mesh.shape[EXPERT_AXIS]
  if num_experts % ep:
    raise ValueError(f"num_experts={num_experts} is not divisible by the mesh's expert axis ({ep}); "
                     f"set config.mesh.expert to a divisor of it")
  # Tokens split over every mesh axis; padding rows (sentinel expert) are never sent.
  num_tokens = tokens.shape[0]
  pad = -num_tokens % mesh.size
  if pad:
    tokens = jnp.pad(tokens, ((0, pad), (0, 0)))
    experts = jnp.pad(experts, ((0, pad), (0, 0)), constant_values=num_experts)
    weights = jnp.pad(weights, ((0, pad), (0, 0)))
  rows = P(tuple(mesh.axis_names))
  per_shard = P(EXPERT_AXIS)
  body = functools.partial(_exchange, num_experts=num_experts, ep=ep, local_experts=local_experts)
  out = jax.shard_map(body, mesh=mesh, in_specs=(rows, rows, rows, per_shard, per_shard, per_shard),
                      out_specs=rows)(tokens, experts, weights, wg, wu, wd)
  return out[:num_tokens]


def _exchange(x, experts, weights, wg, wu, wd, *, num_experts: int, ep: int,
              local_experts: LocalExperts):
  """One device: x [t, hidden], experts / weights [t, k], its experts' weights [E / ep, ...]."""
  t, hidden = x.shape
  k = experts.shape[1]
  num_local = num_experts // ep
  capacity = t * min(k, num_local)  # rows one destination may get from this device, worst case

  # Sort (token, choice) rows by expert; a row's slot is its rank among the rows for its shard.
  flat = experts.reshape(-1)  # [t * k]; num_experts marks padding
  order = jnp.argsort(flat, stable=True)
  expert_sorted = flat[order]
  dest = expert_sorted // num_local  # ep for padding: dropped by the scatter
  sent = jnp.sum(jax.nn.one_hot(dest, ep, dtype=jnp.int32), axis=0)  # [ep]
  slot = jnp.arange(flat.shape[0]) - (jnp.cumsum(sent) - sent)[jnp.minimum(dest, ep - 1)]
  send = jnp.zeros((ep, capacity, hidden), x.dtype).at[dest, slot].set(x[order // k], mode="drop")
  send_expert = jnp.full((ep, capacity), num_local, jnp.int32).at[dest, slot].set(
      expert_sorted % num_local, mode="drop")

  # Chunk d of every device goes to expert shard d: [sources, capacity, ...] arrives.
  recv = jax.lax.all_to_all(send, EXPERT_AXIS, 0, 0, tiled=True).reshape(ep * capacity, hidden)
  recv_expert = jax.lax.all_to_all(send_expert, EXPERT_AXIS, 0, 0, tiled=True).reshape(-1)

  # The local experts on what arrived; empty slots (num_local) sort last and come back as zero.
  local_order = jnp.argsort(recv_expert, stable=True)
  group_sizes = jnp.sum(jax.nn.one_hot(recv_expert, num_local, dtype=jnp.int32), axis=0)
  done = local_experts(recv[local_order], recv_expert[local_order], group_sizes, wg, wu, wd)
  done = jnp.zeros_like(done).at[local_order].set(done).reshape(ep, capacity, hidden)

  # The inverse exchange returns each row to its sender, in the slots it left from.
  back = jax.lax.all_to_all(done, EXPERT_AXIS, 0, 0, tiled=True)
  picked = back.at[dest, slot].get(mode="fill", fill_value=0)  # [t * k, hidden], sorted order
  unsorted = jnp.zeros_like(picked).at[order].set(picked).reshape(t, k, hidden)
  return jnp.einsum("tkh,tk->th", unsorted, weights.astype(x.dtype))
