"""The distillation objectives and the top-k (offline teacher) KL against numpy formulas written
from their definitions, chunked paths included."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llavamod_jax import losses

jax.config.update("jax_enable_x64", False)


def _log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _kl(p, q):
  return np.sum(np.where(p > 0, p * (np.log(np.where(p > 0, p, 1)) - np.log(q)), 0.0), -1)


def numpy_objective(s_logits, t_logits, mask, objective, temperature, alpha=0.1, beta=0.5):
  """Straight from the definitions, float64: p teacher, q student, both at temperature T."""
  p = np.exp(_log_softmax(t_logits.astype(np.float64) / temperature))
  q = np.exp(_log_softmax(s_logits.astype(np.float64) / temperature))
  if objective == "forward_kl":
    per = _kl(p, q)
  elif objective == "reverse_kl":
    per = _kl(q, p)
  elif objective == "skew_forward_kl":
    per = _kl(p, alpha * p + (1 - alpha) * q)
  elif objective == "skew_reverse_kl":
    per = _kl(q, alpha * q + (1 - alpha) * p)
  elif objective == "jsd":
    m = beta * p + (1 - beta) * q
    per = beta * _kl(p, m) + (1 - beta) * _kl(q, m)
  elif objective == "soft_ce":
    per = -np.sum(p * np.log(q), -1)
  return np.sum(per * mask) / max(mask.sum(), 1) * temperature**2


def _data(seed=0, b=2, s=7, v=11, scale=3.0):
  rng = np.random.default_rng(seed)
  s_logits = rng.normal(size=(b, s, v)).astype(np.float32) * scale
  t_logits = rng.normal(size=(b, s, v)).astype(np.float32) * scale
  mask = rng.random((b, s)) < 0.6
  mask[0, 0] = True
  return s_logits, t_logits, mask


@pytest.mark.parametrize("objective", losses.OBJECTIVES)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_objectives_equal_their_formulas(objective, temperature):
  s, t, mask = _data()
  kw = dict(alpha=0.3, beta=0.3)
  got = losses.distillation_loss(jnp.asarray(s), jnp.asarray(t), jnp.asarray(mask), objective,
                                 temperature, **kw)
  want = numpy_objective(s, t, mask, objective, temperature, **kw)
  np.testing.assert_allclose(float(got), want, rtol=2e-5, atol=1e-6)


@pytest.mark.parametrize("objective", ["skew_forward_kl", "skew_reverse_kl", "jsd"])
def test_skew_and_jsd_limits(objective):
  """Skew with alpha = 0 is the plain KL; JSD with beta = 0 or 1 is 0 (m equals one side)."""
  s, t, mask = [jnp.asarray(x) for x in _data(1)]
  if objective == "jsd":
    for b in (0.0, 1.0):
      assert float(losses.distillation_loss(s, t, mask, "jsd", beta=b)) == pytest.approx(0, abs=1e-6)
  else:
    plain = "forward_kl" if objective == "skew_forward_kl" else "reverse_kl"
    np.testing.assert_allclose(float(losses.distillation_loss(s, t, mask, objective, alpha=0.0)),
                               float(losses.distillation_loss(s, t, mask, plain)), rtol=1e-6)


def test_objective_gradient_matches_finite_differences():
  s, t, mask = _data(2, b=1, s=3, v=5)
  for objective in losses.OBJECTIVES:
    f = lambda x: losses.distillation_loss(x, jnp.asarray(t), jnp.asarray(mask), objective, 1.5)  # noqa: E731,B023
    g = np.asarray(jax.grad(f)(jnp.asarray(s)))
    eps = 1e-3
    num = np.zeros_like(s, np.float64)
    for idx in np.ndindex(s.shape):
      d = np.zeros_like(s)
      d[idx] = eps
      num[idx] = (numpy_objective(s + d, t, mask, objective, 1.5)
                  - numpy_objective(s - d, t, mask, objective, 1.5)) / (2 * eps)
    np.testing.assert_allclose(g, num, rtol=2e-3, atol=2e-4, err_msg=objective)


@pytest.mark.parametrize("objective", losses.OBJECTIVES)
def test_chunked_objectives_equal_unchunked(objective):
  rng = np.random.default_rng(3)
  b, s, h, v = 2, 13, 6, 17
  hs = jnp.asarray(rng.normal(size=(b, s, h)), jnp.float32)
  ht = jnp.asarray(rng.normal(size=(b, s, h)), jnp.float32)
  ws = jnp.asarray(rng.normal(size=(h, v)), jnp.float32)
  wt = jnp.asarray(rng.normal(size=(h, v + 3)), jnp.float32)  # a teacher with padding rows
  labels = jnp.asarray(np.where(rng.random((b, s)) < 0.5, rng.integers(0, v, (b, s)), -100))
  kl_mask = losses.distill_mask(labels)
  targets, ce_mask = losses.next_token_targets(labels)

  def full(ws):
    return losses.distillation_loss(hs @ ws, ht @ wt, kl_mask, objective, 2.0, 0.2, 0.4)

  def chunked(ws):
    return losses.chunked_distillation(hs, ht, lambda x: x @ ws, lambda x: x @ wt, kl_mask, targets,
                                       ce_mask, chunk_size=4, temperature=2.0, objective=objective,
                                       alpha=0.2, beta=0.4)["kl"]

  np.testing.assert_allclose(float(chunked(ws)), float(full(ws)), rtol=1e-5)
  want = numpy_objective(np.asarray(hs @ ws), np.asarray(ht @ wt)[..., :v], np.asarray(kl_mask),
                         objective, 2.0, 0.2, 0.4)
  np.testing.assert_allclose(float(full(ws)), want, rtol=2e-5)
  np.testing.assert_allclose(jax.grad(chunked)(ws), jax.grad(full)(ws), rtol=1e-4, atol=1e-6)


def test_reverse_flag_is_reverse_kl_and_conflicts_are_errors():
  assert losses.objective_of("forward_kl", True) == "reverse_kl"
  with pytest.raises(ValueError, match="reverse=True with objective='jsd'"):
    losses.objective_of("jsd", True)
  with pytest.raises(ValueError, match="expected one of"):
    losses.distillation_loss(jnp.zeros((1, 1, 3)), jnp.zeros((1, 1, 3)), jnp.ones((1, 1)), "kl")


# ---------------------------------------------------------------------------------------------
# Top-k KL (stored teacher logits).
# ---------------------------------------------------------------------------------------------


def _topk(t_logits, k, temperature):
  """What launch/teacher_logits.py stores: the k largest logits, their ids, lse of logits / T."""
  ids = np.argsort(-t_logits, axis=-1, kind="stable")[..., :k]
  top = np.take_along_axis(t_logits, ids, -1)
  z = t_logits.astype(np.float64) / temperature
  lse = z.max(-1) + np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1))
  return top, ids.astype(np.int32), lse.astype(np.float32)


def numpy_topk_kl(s_logits, top, ids, lse, mask, temperature):
  """The issue's formula, a plain loop over positions."""
  total, n = 0.0, 0
  for idx in np.ndindex(mask.shape):
    if not mask[idx]:
      continue
    p = np.exp(top[idx].astype(np.float64) / temperature - lse[idx])
    q_all = np.exp(_log_softmax(s_logits[idx].astype(np.float64) / temperature))
    q = q_all[ids[idx]]
    p_tail, q_tail = 1 - p.sum(), 1 - q.sum()
    kl = np.sum(p * (np.log(p) - np.log(q)))
    if len(ids[idx]) < s_logits.shape[-1]:
      kl += p_tail * (np.log(p_tail) - np.log(q_tail))
    total += kl
    n += 1
  return total / max(n, 1) * temperature**2


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_topk_kl_equals_the_formula(temperature):
  s, t, mask = _data(4, v=23, scale=2.0)
  top, ids, lse = _topk(t, 5, temperature)
  got = losses.topk_kl(jnp.asarray(s), jnp.asarray(top), jnp.asarray(ids), jnp.asarray(lse),
                       jnp.asarray(mask), temperature)
  want = numpy_topk_kl(s, top, ids, lse, mask, temperature)
  np.testing.assert_allclose(float(got), want, rtol=1e-5)
  # The bucketed KL is a lower bound of the full KL (data processing inequality).
  assert float(got) <= float(losses.distillation_loss(jnp.asarray(s), jnp.asarray(t),
                                                      jnp.asarray(mask), "forward_kl",
                                                      temperature)) + 1e-6


@pytest.mark.parametrize("objective", losses.OBJECTIVES)
def test_topk_at_full_vocabulary_equals_the_online_loss(objective):
  """k = vocabulary (ids in any order): the same value and gradient as the teacher in memory."""
  s, t, mask = _data(5, v=13)
  top, ids, lse = _topk(t, 13, 1.5)
  args = [jnp.asarray(x) for x in (top, ids, lse)]
  off = lambda x: losses.topk_kl(x, *args, jnp.asarray(mask), 1.5, objective, 0.2, 0.3)  # noqa: E731
  on = lambda x: losses.distillation_loss(x, jnp.asarray(t), jnp.asarray(mask), objective, 1.5,  # noqa
                                          0.2, 0.3)
  x = jnp.asarray(s)
  np.testing.assert_allclose(float(off(x)), float(on(x)), rtol=1e-5)
  np.testing.assert_allclose(jax.grad(off)(x), jax.grad(on)(x), rtol=1e-4, atol=1e-7)


def test_topk_kl_gradient_is_finite_with_padding_and_peaked_teacher():
  """Untrained positions hold zeros (ids 0, logits 0, lse 0) and a teacher whose top-k holds all of
  its mass: no NaN in value or gradient."""
  s, t, mask = _data(6, v=19)
  t[..., :4] += 60.0  # top-4 hold the whole distribution: the tail underflows to 0
  top, ids, lse = _topk(t, 4, 1.0)
  top[~mask], ids[~mask], lse[~mask] = 0, 0, 0
  args = [jnp.asarray(x) for x in (top, ids, lse)]
  for objective in losses.OBJECTIVES:
    f = lambda x: losses.topk_kl(x, *args, jnp.asarray(mask), 1.0, objective)  # noqa: E731,B023
    v, g = jax.value_and_grad(f)(jnp.asarray(s))
    assert np.isfinite(float(v)) and np.all(np.isfinite(np.asarray(g))), objective


@pytest.mark.parametrize("objective", ["forward_kl", "jsd", "skew_reverse_kl"])
def test_chunked_topk_equals_unchunked(objective):
  rng = np.random.default_rng(7)
  b, s, h, v, k = 2, 11, 5, 21, 6
  hs = jnp.asarray(rng.normal(size=(b, s, h)), jnp.float32)
  ws = jnp.asarray(rng.normal(size=(h, v + 2)), jnp.float32)  # student vocab larger: sliced to v
  t = rng.normal(size=(b, s, v)).astype(np.float32) * 2
  labels = jnp.asarray(np.where(rng.random((b, s)) < 0.5, rng.integers(0, v, (b, s)), -100))
  kl_mask = losses.distill_mask(labels)
  targets, ce_mask = losses.next_token_targets(labels)
  top, ids, lse = [jnp.asarray(x) for x in _topk(t, k, 2.0)]

  def full(ws):
    logits = hs @ ws
    return (losses.topk_kl(logits[..., :v], top, ids, lse, kl_mask, 2.0, objective)
            + losses.cross_entropy(logits, labels))

  def chunked(ws):
    out = losses.chunked_topk_distillation(hs, lambda x: x @ ws, top, ids, lse, kl_mask, targets,
                                           ce_mask, chunk_size=4, temperature=2.0, vocab_size=v,
                                           objective=objective)
    return out["kl"] + out["ce"]

  np.testing.assert_allclose(float(chunked(ws)), float(full(ws)), rtol=1e-5)
  np.testing.assert_allclose(jax.grad(chunked)(ws), jax.grad(full)(ws), rtol=1e-4, atol=1e-6)
