"""Losses against numpy references written from their definitions; chunked == unchunked; FD grads."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llavamod_jax import losses

IGN = losses.IGNORE


def _log_softmax(x):
  x = x.astype(np.float64)
  m = x.max(-1, keepdims=True)
  return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def _labels(rng, b, s, vocab):
  ids = rng.integers(0, vocab, (b, s))
  labels = ids.copy()
  for row in range(b):  # prompt masked, then an answer, then padding
    start, end = rng.integers(1, s // 2), rng.integers(s // 2 + 1, s + 1)
    labels[row, :start] = IGN
    labels[row, end:] = IGN
  return ids, labels


def test_distill_mask_shift_and_original_off_by_one():
  labels = np.array([[IGN, IGN, 5, 6, 7, IGN], [IGN, 3, 4, IGN, IGN, IGN]])
  np.testing.assert_array_equal(losses.distill_mask(jnp.asarray(labels)),
                                [[0, 1, 1, 1, 0, 0], [1, 1, 0, 0, 0, 0]])
  np.testing.assert_array_equal(losses.distill_mask(jnp.asarray(labels), shift=False),
                                [[0, 0, 1, 1, 1, 0], [0, 1, 1, 0, 0, 0]])
  targets, mask = losses.next_token_targets(jnp.asarray(labels))
  np.testing.assert_array_equal(targets[0], [0, 5, 6, 7, 0, 0])
  np.testing.assert_array_equal(mask, losses.distill_mask(jnp.asarray(labels)))


@pytest.mark.parametrize("temperature,reverse", [(1.0, False), (2.0, False), (1.0, True)])
def test_kl_matches_numpy(temperature, reverse):
  rng = np.random.default_rng(0)
  s_logits = rng.standard_normal((2, 5, 11)) * 2
  t_logits = rng.standard_normal((2, 5, 13)) * 2  # teacher has 2 padding rows
  mask = rng.random((2, 5)) < 0.6
  got = losses.kl_distillation(jnp.asarray(s_logits, jnp.float32), jnp.asarray(t_logits, jnp.float32),
                               jnp.asarray(mask), temperature, reverse=reverse)
  total, count = 0.0, 0
  for b in range(2):
    for t in range(5):
      if not mask[b, t]:
        continue
      ls = _log_softmax(s_logits[b, t, :11] / temperature)
      lt = _log_softmax(t_logits[b, t, :11] / temperature)
      p, lp, lq = (np.exp(ls), ls, lt) if reverse else (np.exp(lt), lt, ls)
      total += np.sum(p * (lp - lq))
      count += 1
  assert float(got) == pytest.approx(total / count * temperature**2, rel=1e-5)


def test_kl_is_zero_for_equal_logits_and_ignores_teacher_gradient():
  x = jnp.asarray(np.random.default_rng(1).standard_normal((1, 4, 7)), jnp.float32)
  mask = jnp.ones((1, 4), bool)
  assert float(losses.kl_distillation(x, x, mask)) == pytest.approx(0.0, abs=1e-6)
  g = jax.grad(lambda t: losses.kl_distillation(x + 1.0, t, mask))(x)
  assert float(jnp.abs(g).max()) == 0.0


def test_cross_entropy_and_sequence_logps_match_a_loop():
  rng = np.random.default_rng(2)
  logits = rng.standard_normal((3, 8, 10))
  _, labels = _labels(rng, 3, 8, 10)
  lp = _log_softmax(logits)
  per_seq, total, count = [], 0.0, 0
  for b in range(3):
    acc = []
    for t in range(7):
      if labels[b, t + 1] != IGN:
        acc.append(lp[b, t, labels[b, t + 1]])
    per_seq.append(acc)
    total += -sum(acc)
    count += len(acc)
  jl, jlab = jnp.asarray(logits, jnp.float32), jnp.asarray(labels)
  assert float(losses.cross_entropy(jl, jlab)) == pytest.approx(total / count, rel=1e-5)
  np.testing.assert_allclose(losses.sequence_logps(jl, jlab), [sum(a) for a in per_seq], rtol=1e-5)
  np.testing.assert_allclose(losses.sequence_logps(jl, jlab, average=True),
                             [sum(a) / len(a) for a in per_seq], rtol=1e-5)


def _np_sigmoid(x):
  return 1 / (1 + np.exp(-x))


@pytest.mark.parametrize("loss_type,label_smoothing",
                         [(t, 0.0) for t in losses.LOSS_TYPES] + [("sigmoid", 0.2)])
def test_preference_loss_matches_numpy(loss_type, label_smoothing):
  rng = np.random.default_rng(3)
  pc, pr, rc, rr = (rng.standard_normal(6) * 5 - 20 for _ in range(4))
  beta = 0.1
  margin = (pc - rc) - (pr - rr)
  if loss_type == "sigmoid":
    want = np.mean(-np.log(_np_sigmoid(beta * margin)) * (1 - label_smoothing)
                   - np.log(_np_sigmoid(-beta * margin)) * label_smoothing)
  elif loss_type == "ipo":
    want = np.mean((margin - 1 / (2 * beta)) ** 2)
  elif loss_type == "hinge":
    want = np.mean(np.maximum(0, 1 - beta * margin))
  else:
    ckl, rkl = max(np.mean(pc - rc), 0), max(np.mean(pr - rr), 0)
    want = np.mean(np.concatenate([1 - _np_sigmoid(beta * ((pc - rc) - rkl)),
                                   1 - _np_sigmoid(beta * (ckl - (pr - rr)))]))
  loss, m = losses.preference_loss(*(jnp.asarray(a, jnp.float32) for a in (pc, pr, rc, rr)),
                                   beta=beta, loss_type=loss_type, label_smoothing=label_smoothing)
  assert float(loss) == pytest.approx(want, rel=1e-5)
  assert float(m["rewards/chosen"]) == pytest.approx(np.mean(beta * (pc - rc)), rel=1e-5)
  assert float(m["rewards/margin"]) == pytest.approx(np.mean(beta * margin), rel=1e-5)
  assert float(m["rewards/accuracy"]) == pytest.approx(np.mean(margin > 0))


def test_unknown_preference_loss_type():
  with pytest.raises(ValueError, match="'dpo'"):
    losses.preference_loss(*(jnp.zeros(2),) * 4, loss_type="dpo")


def test_finite_difference_gradients():
  rng = np.random.default_rng(4)
  s = jnp.asarray(rng.standard_normal((1, 3, 5)), jnp.float32)
  t = jnp.asarray(rng.standard_normal((1, 3, 5)), jnp.float32)
  mask = jnp.asarray([[True, False, True]])
  d = jnp.asarray(rng.standard_normal(s.shape), jnp.float32)
  f = lambda x: losses.kl_distillation(x, t, mask, 1.5)  # noqa: E731
  eps = 1e-2
  fd = (f(s + eps * d) - f(s - eps * d)) / (2 * eps)
  assert float(jnp.sum(jax.grad(f)(s) * d)) == pytest.approx(float(fd), rel=1e-2, abs=1e-5)
  logps = jnp.asarray(rng.standard_normal(4) - 5, jnp.float32)
  ref = jnp.asarray(rng.standard_normal(4) - 5, jnp.float32)
  for loss_type in losses.LOSS_TYPES:
    g = lambda x: losses.preference_loss(x, ref, ref * 0.9, ref, loss_type=loss_type)[0]  # noqa
    dd = jnp.asarray(rng.standard_normal(4), jnp.float32)
    fd = (g(logps + eps * dd) - g(logps - eps * dd)) / (2 * eps)
    assert float(jnp.sum(jax.grad(g)(logps) * dd)) == pytest.approx(float(fd), rel=2e-2, abs=1e-5)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_token_logps_and_kl_gradients_equal_autodiff_of_the_plain_formulas(dtype):
  """`token_logps` carries a hand-written VJP (one pass over the vocabulary): its gradient equals
  autodiff of the plain formula (log_softmax, take_along_axis), with leading batch dimensions. The
  forward KL (autodiff; a written-out VJP measured slower, docs/benchmark_notes.md) against its
  plain formula too, for the student and the teacher side, at a temperature, with a
  zero-probability teacher bucket."""
  rng = np.random.default_rng(11)
  s = jnp.asarray(rng.standard_normal((2, 3, 7)) * 2, dtype)
  t = jnp.asarray(rng.standard_normal((2, 3, 7)) * 2, jnp.float32).at[0, 1, 4].set(-jnp.inf).astype(dtype)
  tgt = jnp.asarray(rng.integers(0, 7, (2, 3)), jnp.int32)
  w = jnp.asarray(rng.standard_normal((2, 3)), jnp.float32)

  def plain_logps(x):
    return jnp.take_along_axis(jax.nn.log_softmax(x.astype(jnp.float32), -1), tgt[..., None], -1)[..., 0]

  def plain_kl(x, y, temp):
    logq = jax.nn.log_softmax(x.astype(jnp.float32) / temp, -1)
    logp = jax.nn.log_softmax(y.astype(jnp.float32) / temp, -1)
    p = jnp.exp(logp)
    safe = jnp.where(p > 0, logp, 0.0)  # 0 log 0 = 0, with a finite gradient
    return jnp.sum(jnp.where(p > 0, p * (safe - logq), 0.0), -1)

  tol = dict(rtol=1e-5, atol=1e-6) if dtype == jnp.float32 else dict(rtol=2e-2, atol=2e-3)
  np.testing.assert_allclose(losses.token_logps(s, tgt), plain_logps(s), **tol)
  got = jax.grad(lambda x: jnp.sum(losses.token_logps(x, tgt) * w))(s)
  want = jax.grad(lambda x: jnp.sum(plain_logps(x) * w))(s)
  assert got.dtype == dtype
  np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), **tol)
  for temp in (1.0, 1.7):
    np.testing.assert_allclose(losses.token_kl(s, t, temp), plain_kl(s, t, temp), **tol)
    got = jax.grad(lambda x, y: jnp.sum(losses.token_kl(x, y, temp) * w), (0, 1))(s, t)
    want = jax.grad(lambda x, y: jnp.sum(plain_kl(x, y, temp) * w), (0, 1))(s, t)
    for a, b in zip(got, want):
      assert a.dtype == dtype and bool(jnp.all(jnp.isfinite(a.astype(jnp.float32))))
      np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), **tol)


@pytest.mark.parametrize("chunk_size", [1, 3, 4, 16])
@pytest.mark.parametrize("shift", [True, False])
def test_chunked_equals_unchunked_value_and_gradient(chunk_size, shift):
  rng = np.random.default_rng(5)
  b, s, h, vs, vt = 2, 7, 6, 9, 11
  hs = jnp.asarray(rng.standard_normal((b, s, h)), jnp.float32)
  ht = jnp.asarray(rng.standard_normal((b, s, h)), jnp.float32)
  ws = jnp.asarray(rng.standard_normal((h, vs)), jnp.float32)
  wt = jnp.asarray(rng.standard_normal((h, vt)), jnp.float32)
  _, labels = _labels(rng, b, s, vs)
  labels = jnp.asarray(labels)
  kl_mask = losses.distill_mask(labels, shift)
  targets, ce_mask = losses.next_token_targets(labels)

  def full(hs, ws):
    return (losses.kl_distillation(hs @ ws, ht @ wt, kl_mask, 2.0)
            + 0.5 * losses.cross_entropy(hs @ ws, labels))

  def chunked(hs, ws):
    out = losses.chunked_distillation(hs, ht, lambda x: x @ ws, lambda x: x @ wt, kl_mask, targets,
                                      ce_mask, chunk_size=chunk_size, temperature=2.0)
    return out["kl"] + 0.5 * out["ce"]

  v1, g1 = jax.value_and_grad(full, argnums=(0, 1))(hs, ws)
  v2, g2 = jax.value_and_grad(chunked, argnums=(0, 1))(hs, ws)
  assert float(v2) == pytest.approx(float(v1), rel=1e-5)
  for a, c in zip(g1, g2):
    np.testing.assert_allclose(c, a, rtol=1e-4, atol=1e-6)


def _sparse_masks(b, s, counts, vocab, rng, prompt=3):
  """Labels with `counts[r]` trained tokens in row r after a `prompt` of ignored positions (a
  LLaVA-like response-only mask; rows of different lengths, the rest padding)."""
  ids = rng.integers(0, vocab, (b, s))
  labels = np.full((b, s), IGN)
  for r, n in enumerate(counts):
    labels[r, prompt:prompt + n] = ids[r, prompt:prompt + n]
  return jnp.asarray(labels)


@pytest.mark.parametrize("counts,chunk_size", [
    ((4, 9), 2),   # rows with different numbers of trained positions; chunks left empty
    ((0, 5), 4),   # a row with nothing trained
    ((0, 0), 3),   # nothing trained at all: both losses 0 with zero gradients
    ((13, 13), 5),  # everything after the prompt trained: no chunk is empty
])
def test_chunked_skips_empty_chunks_value_and_gradient(counts, chunk_size):
  rng = np.random.default_rng(9)
  b, s, h, vs, vt = 2, 17, 6, 9, 11
  hs = jnp.asarray(rng.standard_normal((b, s, h)), jnp.float32)
  ht = jnp.asarray(rng.standard_normal((b, s, h)), jnp.float32)
  ws = jnp.asarray(rng.standard_normal((h, vs)), jnp.float32)
  wt = jnp.asarray(rng.standard_normal((h, vt)), jnp.float32)
  labels = _sparse_masks(b, s, counts, vs, rng)
  kl_mask = losses.distill_mask(labels, shift=False)  # differs from ce_mask by one position
  targets, ce_mask = losses.next_token_targets(labels)

  def full(hs, ws):
    return (losses.kl_distillation(hs @ ws, ht @ wt, kl_mask) + losses.cross_entropy(hs @ ws, labels)
            + 0.5 * losses.cross_entropy(hs @ ws, labels))

  def chunked(hs, ws):
    out = losses.chunked_distillation(hs, ht, lambda x: x @ ws, lambda x: x @ wt, kl_mask, targets,
                                      ce_mask, chunk_size=chunk_size)
    ce = losses.chunked_cross_entropy(hs, lambda x: x @ ws, targets, ce_mask, chunk_size=chunk_size)
    return out["kl"] + out["ce"] + 0.5 * ce

  v1, g1 = jax.value_and_grad(full, argnums=(0, 1))(hs, ws)
  v2, g2 = jax.jit(jax.value_and_grad(chunked, argnums=(0, 1)))(hs, ws)
  assert float(v2) == pytest.approx(float(v1), rel=1e-5, abs=1e-7)
  for a, c in zip(g1, g2):
    np.testing.assert_allclose(c, a, rtol=1e-4, atol=1e-6)


def test_chunked_runs_the_heads_only_on_chunks_with_trained_positions():
  """Trained positions move to the front of their rows; the chunks after the longest row's are not
  computed (the head's host callback counts the chunks that run)."""
  rng = np.random.default_rng(10)
  b, s, h, v = 2, 24, 4, 5
  hs, ht = (jnp.asarray(rng.standard_normal((b, s, h)), jnp.float32) for _ in range(2))
  w = jnp.asarray(rng.standard_normal((h, v)), jnp.float32)
  labels = _sparse_masks(b, s, (3, 7), v, rng, prompt=10)  # 7 trained -> 2 of 6 chunks of 4
  kl_mask = losses.distill_mask(labels)
  targets, ce_mask = losses.next_token_targets(labels)
  calls = []

  def head(x):
    jax.debug.callback(lambda: calls.append(1))
    return x @ w

  out = jax.jit(lambda hs: losses.chunked_distillation(hs, ht, head, lambda x: x @ w, kl_mask,
                                                       targets, ce_mask, chunk_size=4))(hs)
  jax.block_until_ready(out)
  jax.effects_barrier()
  assert len(calls) == 2
  calls.clear()
  jax.block_until_ready(jax.jit(lambda hs: losses.chunked_cross_entropy(
      hs, head, targets, ce_mask, chunk_size=4))(hs))
  jax.effects_barrier()
  assert len(calls) == 2
