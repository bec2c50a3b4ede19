"""The fused LM head + loss (losses.fused_*) against the unfused losses on full logits: values and
gradients with respect to the student's hidden states and head weights, for every objective, with
masks that differ between KL and CE, rows of different lengths, a row with nothing trained, tied
embeddings, a vocabulary slice, a frozen head, the stored top-k teacher, and under jit."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llavamod_jax import losses, models
from llavamod_jax.models.configs import TextConfig

IGN = losses.IGNORE
B, S = 3, 13


def _lm(hidden, vocab, tie=False, seed=0):
  cfg = TextConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_layers=1,
                   num_heads=2, num_kv_heads=1, tie_word_embeddings=tie, initializer_range=0.5)
  model = models.build(cfg)
  return model, models.init_params(model, seed)


def _masks(rng):
  labels = rng.integers(0, 40, (B, S))
  labels[:, :4] = IGN  # prompts
  labels[0, -3:] = IGN  # a shorter row (right padding)
  labels[1, 6:9] = IGN  # a gap
  labels[2, :] = IGN  # nothing trained
  targets, ce_mask = losses.next_token_targets(jnp.asarray(labels))
  kl_mask = losses.distill_mask(jnp.asarray(labels))
  ce_mask = ce_mask.at[0, 4:6].set(False)  # CE on fewer positions than the KL
  return kl_mask, targets, ce_mask


def _close(got, want, rtol=1e-5):
  for path, w in jax.tree_util.tree_leaves_with_path(want):
    g = dict(jax.tree_util.tree_leaves_with_path(got))[path]
    scale = float(np.abs(w).max()) or 1.0
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=rtol, atol=rtol * scale,
                               err_msg=jax.tree_util.keystr(path))


def _setup(tie=False, teacher_vocab=46, seed=0):
  rng = np.random.default_rng(seed)
  student, sp = _lm(16, 40, tie, seed)
  teacher, tp = _lm(24, teacher_vocab, False, seed + 1)
  s_head, s_fn = models.lm_head(student, sp)
  t_head, t_fn = models.lm_head(teacher, tp)
  sh = jnp.asarray(rng.standard_normal((B, S, 16)), jnp.float32)
  th = jnp.asarray(rng.standard_normal((B, S, 24)), jnp.float32)
  return s_head, s_fn, t_head, t_fn, sh, th, _masks(rng)


def _unfused(s_head, s_fn, t_head, t_fn, sh, th, masks, *, kl_weight, ce_weight, vocab_size=None,
             **div):
  kl_mask, targets, ce_mask = masks
  s_logits = s_fn(s_head, sh)
  kl = losses.distillation_loss(s_logits, t_fn(t_head, th), kl_mask, vocab_size=vocab_size, **div)
  ce = jnp.sum(-losses.token_logps(s_logits, targets) * ce_mask) / jnp.maximum(ce_mask.sum(), 1)
  return kl_weight * kl + ce_weight * ce, (kl, ce)


@pytest.mark.parametrize("objective", losses.OBJECTIVES)
@pytest.mark.parametrize("chunk", [4, 64])  # several chunks (one skipped) / a single chunk
def test_fused_distillation_equals_the_unfused_loss(objective, chunk):
  s_head, s_fn, t_head, t_fn, sh, th, masks = _setup()
  div = dict(objective=objective, temperature=1.7, alpha=0.3, beta=0.4)
  kw = dict(kl_weight=0.8, ce_weight=0.6)

  def fused(hp, h):
    out = losses.fused_distillation(h, hp, s_fn, th, t_head, t_fn, *masks, chunk_size=chunk, **kw,
                                    **div)
    return out["loss"], (out["kl"], out["ce"])

  (v, (kl, ce)), g = jax.value_and_grad(fused, argnums=(0, 1), has_aux=True)(s_head, sh)
  (v0, (kl0, ce0)), g0 = jax.value_and_grad(
      lambda hp, h: _unfused(hp, s_fn, t_head, t_fn, h, th, masks, **kw, **div),
      argnums=(0, 1), has_aux=True)(s_head, sh)
  assert float(v0) > 0.5  # not a vanishing loss
  np.testing.assert_allclose([v, kl, ce], [v0, kl0, ce0], rtol=1e-5)
  _close(g, g0)
  assert float(jnp.abs(g[1][2]).max()) == 0.0  # the untrained row gets no gradient


@pytest.mark.parametrize("tie", [False, True])
def test_tied_embeddings_and_a_vocabulary_slice(tie):
  s_head, s_fn, t_head, t_fn, sh, th, masks = _setup(tie=tie, teacher_vocab=40, seed=2)
  assert ("embed_tokens" if tie else "lm_head") in s_head
  kw = dict(kl_weight=1.0, ce_weight=0.5, vocab_size=33)
  f = lambda hp, h: losses.fused_distillation(h, hp, s_fn, th, t_head, t_fn, *masks, chunk_size=5,  # noqa
                                              **kw)["loss"]
  v, g = jax.value_and_grad(f, argnums=(0, 1))(s_head, sh)
  v0, g0 = jax.value_and_grad(lambda hp, h: _unfused(hp, s_fn, t_head, t_fn, h, th, masks, **kw)[0],
                              argnums=(0, 1))(s_head, sh)
  np.testing.assert_allclose(v, v0, rtol=1e-5)
  _close(g, g0)


def test_a_frozen_head_gets_no_weight_gradient_and_the_hidden_one_is_exact():
  """The stage that trains the FFNs only: the head is a constant; the fused forward then computes
  no weight gradient (one [hidden, vocab] matmul per chunk fewer), and the hidden gradient is exact."""
  s_head, s_fn, t_head, t_fn, sh, th, masks = _setup(seed=3)
  kw = dict(kl_weight=1.0, ce_weight=1.0)

  def fused(h):
    return losses.fused_distillation(h, s_head, s_fn, th, t_head, t_fn, *masks, chunk_size=4,
                                     **kw)["loss"]
  g = jax.grad(fused)(sh)
  g0 = jax.grad(lambda h: _unfused(s_head, s_fn, t_head, t_fn, h, th, masks, **kw)[0])(sh)
  _close(g, g0)
  # The weight gradient, a [vocab, hidden] contraction over positions, is absent.
  weight_grad = "f32[40,16] = dot_general"
  assert weight_grad not in str(jax.make_jaxpr(jax.grad(fused))(sh))
  with_head = jax.grad(lambda hp, h: losses.fused_distillation(
      h, hp, s_fn, th, t_head, t_fn, *masks, chunk_size=4, **kw)["loss"], argnums=(0, 1))
  assert weight_grad in str(jax.make_jaxpr(with_head)(s_head, sh))


def test_fused_loss_in_a_larger_graph_under_jit():
  """Another term on the same hidden states, a cotangent other than 1 and jit."""
  s_head, s_fn, t_head, t_fn, sh, th, masks = _setup(seed=4)

  def total(fused, hp, h):
    if fused:
      loss = losses.fused_distillation(h, hp, s_fn, th, t_head, t_fn, *masks, chunk_size=4,
                                       kl_weight=1.0, ce_weight=0.3)["loss"]
    else:
      loss = _unfused(hp, s_fn, t_head, t_fn, h, th, masks, kl_weight=1.0, ce_weight=0.3)[0]
    return 2.5 * loss + jnp.sum(jnp.sin(h)) * 1e-2 + 0.1 * jnp.sum(hp["lm_head"]["kernel"] ** 2)

  g = jax.jit(jax.grad(lambda hp, h: total(True, hp, h), argnums=(0, 1)))(s_head, sh)
  g0 = jax.grad(lambda hp, h: total(False, hp, h), argnums=(0, 1))(s_head, sh)
  _close(g, g0)


@pytest.mark.parametrize("objective", ["forward_kl", "reverse_kl", "jsd"])
def test_fused_topk_distillation_equals_topk_kl(objective):
  s_head, s_fn, t_head, t_fn, sh, th, masks = _setup(teacher_vocab=40, seed=5)
  kl_mask, targets, ce_mask = masks
  t_logits = t_fn(t_head, th)
  top_logits, top_ids = jax.lax.top_k(t_logits, 6)
  lse = jax.nn.logsumexp(t_logits, -1)
  div = dict(objective=objective, temperature=1.0)

  def fused(hp, h):
    return losses.fused_topk_distillation(h, hp, s_fn, top_logits, top_ids, lse, *masks,
                                          ce_weight=0.5, chunk_size=4, **div)["loss"]

  def unfused(hp, h):
    s_logits = s_fn(hp, h)
    kl = losses.topk_kl(s_logits, top_logits, top_ids, lse, kl_mask, **div)
    ce = jnp.sum(-losses.token_logps(s_logits, targets) * ce_mask) / ce_mask.sum()
    return kl + 0.5 * ce

  v, g = jax.value_and_grad(fused, argnums=(0, 1))(s_head, sh)
  v0, g0 = jax.value_and_grad(unfused, argnums=(0, 1))(s_head, sh)
  np.testing.assert_allclose(v, v0, rtol=1e-5)
  _close(g, g0)


@pytest.mark.parametrize("chunk", [3, 64])
def test_fused_cross_entropy_equals_cross_entropy(chunk):
  s_head, s_fn, _, _, sh, _, (_, targets, ce_mask) = _setup(tie=True, seed=6)
  f = lambda hp, h: losses.fused_cross_entropy(h, hp, s_fn, targets, ce_mask, chunk_size=chunk)  # noqa
  v, g = jax.value_and_grad(f, argnums=(0, 1))(s_head, sh)

  def plain(hp, h):  # a plain log-softmax and gather over the full logits
    logp = jax.nn.log_softmax(s_fn(hp, h), -1)
    picked = jnp.take_along_axis(logp, targets[..., None], -1)[..., 0]
    return -jnp.sum(picked * ce_mask) / ce_mask.sum()
  v0, g0 = jax.value_and_grad(plain, argnums=(0, 1))(s_head, sh)
  np.testing.assert_allclose(v, v0, rtol=1e-5)
  _close(g, g0)


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("tie", [False, True])
def test_sequence_logps_fused_and_chunked_equal_the_full_logits(fused, tie):
  """Per-row log-probs ([batch]) under a cotangent that weighs the rows differently (as DPO's does):
  the hidden gradient from the forward pass, the head's from the backward pass's second run."""
  s_head, s_fn, _, _, sh, _, _ = _setup(tie=tie, seed=7)
  labels = np.asarray(np.random.default_rng(7).integers(0, 40, (B, S)))
  labels[:, :3] = IGN
  labels[1, 8:] = IGN
  labels[2, :] = IGN
  labels = jnp.asarray(labels)
  weights = jnp.asarray([0.7, -1.3, 2.0])

  def ours(hp, h):
    if fused:
      lp = losses.fused_sequence_logps(h, hp, s_fn, labels, chunk_size=4)
    else:
      lp = losses.chunked_sequence_logps(h, lambda x: s_fn(hp, x), labels, chunk_size=4)
    return jnp.sum(weights * lp), lp

  (v, lp), g = jax.value_and_grad(ours, argnums=(0, 1), has_aux=True)(s_head, sh)
  want_lp = losses.sequence_logps(s_fn(s_head, sh), labels)
  (v0, _), g0 = jax.value_and_grad(
      lambda hp, h: (jnp.sum(weights * losses.sequence_logps(s_fn(hp, h), labels)), 0),
      argnums=(0, 1), has_aux=True)(s_head, sh)
  np.testing.assert_allclose(lp, want_lp, rtol=1e-5)
  assert float(lp[2]) == 0.0 and float(jnp.abs(want_lp[:2]).min()) > 5.0
  # v sums terms of both signs: compare it at the scale of its terms
  np.testing.assert_allclose(v, v0, rtol=1e-5, atol=1e-5 * float(jnp.sum(jnp.abs(weights * want_lp))))
  _close(g, g0)
  g_hidden_only = jax.grad(lambda h: ours(s_head, h)[0])(sh)  # a frozen head
  _close(g_hidden_only, g0[1])
