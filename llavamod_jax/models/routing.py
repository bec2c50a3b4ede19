"""Top-k routing for the sparse MoE student: choices, weights, capacity and token dropping, aux losses.

Pure functions over flattened tokens: `router_logits` is [tokens, experts] and every statistic is taken
over all tokens given (the original's S: the whole micro-batch, padding included).

Default rule (dropless, deterministic): softmax over all experts in fp32, top-k, the k weights
renormalised to sum to 1 — with identical experts this reproduces the dense FFN exactly.

The original's DeepSpeed top-2 gate, offered as options:
  * Gumbel noise on every choice after the first (it is added even at evaluation);
  * capacity = ceil(k * tokens / experts * capacity_factor), raised to `min_capacity`;
    queue positions give all first choices priority (cumsum over tokens in order), then all second
    choices after them, ...; a choice at position >= capacity is dropped; the surviving softmax
    weights are divided by max(their sum, eps); a token with every choice dropped gets zero.
  * the load-balancing loss uses the first-choice mask before dropping.
"""

from __future__ import annotations

import math
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp


@flax.struct.dataclass
class Routing:
  experts: Any  # int32 [tokens, k], choice j of each token
  weights: Any  # f32 [tokens, k], combine weights (0 for a dropped choice)
  router_probs: Any  # f32 [tokens, experts], softmax over all experts
  positions: Any = None  # int32 [tokens, k], queue position inside the chosen expert (capacity mode)
  kept: Any = None  # bool [tokens, k]; all True when dropless


def choose(router_logits, top_k: int, noise=None) -> tuple[jax.Array, jax.Array]:
  """Pick k distinct experts per token: choice 0 by the softmax, later choices by logits (+ noise).

  Returns (router_probs [T, E] f32, experts [T, k] int32). Ties go to the lower expert index.
  """
  logits = router_logits.astype(jnp.float32)
  probs = jax.nn.softmax(logits, axis=-1)
  taken = jnp.zeros(logits.shape, bool)
  picks = []
  for j in range(top_k):
    score = probs if j == 0 else (logits if noise is None else logits + noise)
    idx = jnp.argmax(jnp.where(taken, -jnp.inf, score), axis=-1)
    picks.append(idx)
    taken = taken | jax.nn.one_hot(idx, logits.shape[-1], dtype=bool)
  return probs, jnp.stack(picks, axis=-1).astype(jnp.int32)


def gumbel_noise(rng, shape) -> jax.Array:
  return jax.random.gumbel(rng, shape, jnp.float32)


def route_dropless(router_logits, top_k: int, *, normalize: bool = True, noise=None) -> Routing:
  probs, experts = choose(router_logits, top_k, noise)
  weights = jnp.take_along_axis(probs, experts, axis=-1)
  if normalize:
    weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
  return Routing(experts=experts, weights=weights, router_probs=probs,
                 kept=jnp.ones(experts.shape, bool))


def expert_capacity(num_tokens: int, num_experts: int, top_k: int, capacity_factor: float,
                    min_capacity: int = 0) -> int:
  return max(int(math.ceil(num_tokens / num_experts * capacity_factor * top_k)), min_capacity)


def route_with_capacity(router_logits, top_k: int, capacity: int, *, noise=None) -> Routing:
  probs, experts = choose(router_logits, top_k, noise)
  num_experts = probs.shape[-1]
  masks = jax.nn.one_hot(experts, num_experts, dtype=jnp.int32)  # [T, k, E]
  offset = jnp.zeros((num_experts,), jnp.int32)
  positions = []
  for j in range(top_k):
    loc = jnp.cumsum(masks[:, j], axis=0) - 1 + offset  # [T, E]
    positions.append(jnp.sum(loc * masks[:, j], axis=-1))
    offset = offset + jnp.sum(masks[:, j], axis=0)  # choice j queues after every choice < j
  positions = jnp.stack(positions, axis=-1)
  kept = positions < capacity
  gates = jnp.take_along_axis(probs, experts, axis=-1) * kept
  denom = jnp.maximum(jnp.sum(gates, axis=-1, keepdims=True), jnp.finfo(jnp.float32).eps)
  return Routing(experts=experts, weights=gates / denom, router_probs=probs, positions=positions,
                 kept=kept)


def load_balancing_loss(routing: Routing) -> jax.Array:
  """E^2 * mean_e(mean_t probs[t, e] * fraction of tokens whose first choice is e)."""
  num_experts = routing.router_probs.shape[-1]
  me = jnp.mean(routing.router_probs, axis=0)
  ce = jnp.mean(jax.nn.one_hot(routing.experts[:, 0], num_experts, dtype=jnp.float32), axis=0)
  return jnp.mean(me * ce) * num_experts * num_experts


def z_loss(router_logits) -> jax.Array:
  """Router z-loss (ST-MoE): mean over tokens of logsumexp(logits)^2."""
  return jnp.mean(jnp.square(jax.nn.logsumexp(router_logits.astype(jnp.float32), axis=-1)))


def metrics(routing: Routing) -> dict[str, jax.Array]:
  num_experts = routing.router_probs.shape[-1]
  p = routing.router_probs
  return {
      "tokens_per_expert": jnp.sum(jax.nn.one_hot(routing.experts, num_experts), axis=(0, 1)),
      "fraction_dropped": 1.0 - jnp.mean(routing.kept.astype(jnp.float32)),
      "router_entropy": jnp.mean(-jnp.sum(p * jnp.log(jnp.maximum(p, 1e-30)), axis=-1)),
  }
