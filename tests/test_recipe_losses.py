"""The other recipes' terms (issue 24) against numpy formulas written from the papers:
LLaVA-KD's visual KL (MDist on the image slots) and relation distillation (RDist), LLaVADI's
hidden-state alignment with its projection. Float64 numpy, plain loops over rows and tokens."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llavamod_jax import losses

IMG = 9  # the image token id of these rows


def _rows(rng, n_img, prefix, total, batch=2):
  """Rows of `prefix` text tokens, `n_img` image slots, then text, `total` long."""
  ids = rng.integers(0, IMG, (batch, total))
  ids[:, prefix:prefix + n_img] = IMG
  return ids


def _log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _slots(ids):
  return [list(np.flatnonzero(row == IMG)) for row in ids]


def test_visual_kl_is_the_kl_at_the_image_slots_paired_in_order():
  """KL(p_teacher || q_student) at the k-th image slot of each side (the student's prompt puts the
  image 2 tokens later than the teacher's), mean over the batch's visual tokens, times T^2."""
  rng = np.random.default_rng(0)
  s_ids, t_ids = _rows(rng, 4, 3, 12), _rows(rng, 4, 1, 10)
  s = rng.standard_normal((2, 12, 7)) * 2
  t = rng.standard_normal((2, 10, 7)) * 2
  for temp in (1.0, 2.0):
    total, n = 0.0, 0
    for b in range(2):
      for i, j in zip(_slots(s_ids)[b], _slots(t_ids)[b]):
        logq, logp = _log_softmax(s[b, i] / temp), _log_softmax(t[b, j] / temp)
        total += np.sum(np.exp(logp) * (logp - logq))
        n += 1
    want = total / n * temp**2
    got = losses.visual_kl(jnp.asarray(s, jnp.float32), jnp.asarray(t, jnp.float32),
                           losses.visual_mask(jnp.asarray(s_ids), IMG),
                           losses.visual_mask(jnp.asarray(t_ids), IMG), temperature=temp)
    assert float(got) == pytest.approx(want, rel=1e-5)
  # Text positions do not count: changing a text logit leaves the loss alone.
  s2 = s.copy()
  s2[:, 0] += 5.0
  again = losses.visual_kl(jnp.asarray(s2, jnp.float32), jnp.asarray(t, jnp.float32),
                           losses.visual_mask(jnp.asarray(s_ids), IMG),
                           losses.visual_mask(jnp.asarray(t_ids), IMG), temperature=2.0)
  assert float(again) == pytest.approx(float(got), rel=1e-6)


def test_visual_kl_names_rows_whose_image_token_counts_differ():
  rng = np.random.default_rng(1)
  s_ids, t_ids = _rows(rng, 4, 1, 8), _rows(rng, 3, 1, 8)
  with pytest.raises(ValueError, match=r"visual_kl: row 0 has 4 student and 3 teacher positions"):
    losses.visual_kl(jnp.zeros((2, 8, 5)), jnp.zeros((2, 8, 5)), losses.visual_mask(jnp.asarray(s_ids), IMG),
                     losses.visual_mask(jnp.asarray(t_ids), IMG))


def test_relation_distillation_is_one_minus_the_cosine_of_the_relation_matrices():
  """Per row: R = Z Z^T over the visual tokens' features (student width 5, teacher 7: R is [n, n] on
  both sides), 1 - cos(vec R_s, vec R_t); the mean over rows. The teacher gets no gradient."""
  rng = np.random.default_rng(2)
  s_ids, t_ids = _rows(rng, 5, 2, 11), _rows(rng, 5, 0, 9)
  zs, zt = rng.standard_normal((2, 11, 5)), rng.standard_normal((2, 9, 7))
  want = []
  for b in range(2):
    a = zs[b, _slots(s_ids)[b]]
    c = zt[b, _slots(t_ids)[b]]
    r_s, r_t = (a @ a.T).ravel(), (c @ c.T).ravel()
    want.append(1 - r_s @ r_t / (np.linalg.norm(r_s) * np.linalg.norm(r_t)))
  args = (losses.visual_mask(jnp.asarray(s_ids), IMG), losses.visual_mask(jnp.asarray(t_ids), IMG))
  f = lambda a, c: losses.relation_distillation(a, c, *args)  # noqa: E731
  got = f(jnp.asarray(zs, jnp.float32), jnp.asarray(zt, jnp.float32))
  assert float(got) == pytest.approx(np.mean(want), rel=1e-5)
  assert 0.0 < float(got) < 2.0
  # Equal relation matrices (the student's features an orthogonal map of the teacher's) -> 0.
  q, _ = np.linalg.qr(rng.standard_normal((7, 7)))
  same = np.zeros((2, 11, 7))
  for b in range(2):
    same[b, _slots(s_ids)[b]] = zt[b, _slots(t_ids)[b]] @ q
  assert float(f(jnp.asarray(same, jnp.float32), jnp.asarray(zt, jnp.float32))) == pytest.approx(0.0, abs=1e-6)
  g_s, g_t = jax.grad(f, (0, 1))(jnp.asarray(zs, jnp.float32), jnp.asarray(zt, jnp.float32))
  assert float(jnp.abs(g_t).sum()) == 0.0 and float(jnp.abs(g_s).sum()) > 0.0
  # Finite differences along a random direction (float64 numpy loss as the reference).
  d = rng.standard_normal(zs.shape)
  eps = 1e-3

  def np_loss(x):
    out = []
    for b in range(2):
      a, c = x[b, _slots(s_ids)[b]], zt[b, _slots(t_ids)[b]]
      r_s, r_t = (a @ a.T).ravel(), (c @ c.T).ravel()
      out.append(1 - r_s @ r_t / (np.linalg.norm(r_s) * np.linalg.norm(r_t)))
    return np.mean(out)
  fd = (np_loss(zs + eps * d) - np_loss(zs - eps * d)) / (2 * eps)
  assert float(jnp.sum(g_s * d)) == pytest.approx(fd, rel=1e-3)


def test_hidden_alignment_is_the_mse_of_the_projected_student_states():
  """LLaVADI: MSE(MLP(h_student), h_teacher) at the paired answer positions, the MLP
  Linear(d_s, d_t) - GELU - Linear(d_t, d_t); mean over positions and units."""
  import math

  rng = np.random.default_rng(3)
  hs, ht = rng.standard_normal((2, 8, 4)), rng.standard_normal((2, 6, 6))
  s_mask = np.zeros((2, 8), bool)
  s_mask[:, 5:] = True
  t_mask = np.zeros((2, 6), bool)
  t_mask[:, 3:] = True
  proj = losses.init_hidden_projection(jax.random.key(0), 4, 6)
  w1, b1, w2, b2 = (np.asarray(proj[k], np.float64) for k in ("w1", "b1", "w2", "b2"))
  assert np.all(np.abs(w1) <= 1 / math.sqrt(4)) and np.all(np.abs(w2) <= 1 / math.sqrt(6))
  gelu = np.vectorize(lambda x: 0.5 * x * (1 + math.erf(x / math.sqrt(2))))
  total, n = 0.0, 0
  for b in range(2):
    for i, j in zip(np.flatnonzero(s_mask[b]), np.flatnonzero(t_mask[b])):
      y = gelu(hs[b, i] @ w1 + b1) @ w2 + b2
      total += np.mean((y - ht[b, j]) ** 2)
      n += 1
  got = losses.hidden_alignment(jnp.asarray(hs, jnp.float32), jnp.asarray(ht, jnp.float32),
                                jnp.asarray(s_mask), jnp.asarray(t_mask), proj)
  assert float(got) == pytest.approx(total / n, rel=1e-5)
  # The projection trains; the teacher does not.
  g = jax.grad(lambda p, t: losses.hidden_alignment(jnp.asarray(hs, jnp.float32), t, jnp.asarray(s_mask),
                                                    jnp.asarray(t_mask), p), (0, 1))(proj, jnp.asarray(ht, jnp.float32))
  assert all(float(jnp.abs(x).sum()) > 0 for x in jax.tree.leaves(g[0]))
  assert float(jnp.abs(g[1]).sum()) == 0.0
  with pytest.raises(ValueError, match="student width 4 and teacher width 6 differ"):
    losses.hidden_alignment(jnp.asarray(hs, jnp.float32), jnp.asarray(ht, jnp.float32),
                            jnp.asarray(s_mask), jnp.asarray(t_mask))
