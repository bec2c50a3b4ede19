"""Plain-loop references of the original's MoE gate and block (for tests)."""

import numpy as np


def _softmax(x):
  z = np.exp(x - x.max(-1, keepdims=True))
  return z / z.sum(-1, keepdims=True)


def reference_gate(logits, k, capacity, noise=None):
  """The original's rule, token by token: picks, queue positions (top-1 first), drops, renormalise."""
  t, e = logits.shape
  probs = _softmax(logits.astype(np.float64))
  picks = []
  for i in range(t):
    chosen = [int(np.argmax(probs[i]))]
    for _ in range(1, k):
      score = logits[i] + (0 if noise is None else noise[i])
      score = np.where(np.isin(np.arange(e), chosen), -np.inf, score)
      chosen.append(int(np.argmax(score)))
    picks.append(chosen)
  fill = [0] * e
  positions = [[None] * k for _ in range(t)]
  for j in range(k):  # every token's choice j queues after all choices < j
    for i in range(t):
      positions[i][j] = fill[picks[i][j]]
      fill[picks[i][j]] += 1
  weights = np.zeros((t, k))
  kept = np.zeros((t, k), bool)
  for i in range(t):
    g = [probs[i, picks[i][j]] if positions[i][j] < capacity else 0.0 for j in range(k)]
    kept[i] = [positions[i][j] < capacity for j in range(k)]
    weights[i] = np.array(g) / max(sum(g), np.finfo(np.float32).eps)
  return np.array(picks), weights, kept, probs


def silu(x):
  return x / (1 + np.exp(-x))


def reference_block(x, params, k, capacity=None, normalize=True):
  """MoE block output token by token: route, run each chosen expert, weight, sum."""
  h = x.reshape(-1, x.shape[-1]).astype(np.float64)
  logits = h @ np.asarray(params["router"], np.float64)
  cap = capacity if capacity is not None else 10**9
  picks, weights, kept, _ = reference_gate(logits, k, cap)
  if capacity is None and not normalize:
    weights = np.take_along_axis(_softmax(logits), picks, -1)
  ex = {n: np.asarray(v, np.float64) for n, v in params["experts"].items()}
  out = np.zeros_like(h)
  for t in range(h.shape[0]):
    for j in range(k):
      if not kept[t, j]:
        continue
      e = picks[t, j]
      a = silu(h[t] @ ex["gate_proj"][e]) * (h[t] @ ex["up_proj"][e])
      out[t] += weights[t, j] * (a @ ex["down_proj"][e])
  return out.reshape(x.shape), picks, kept
