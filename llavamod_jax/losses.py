"""Distillation and preference losses: pure functions of logits / log-probs and masks.

Label convention (one for the whole project): a batch carries `input_ids` and `labels` of the same
length, `labels[t] = input_ids[t]` where the token is trained and IGNORE (-100) elsewhere. Logits at
position t predict token t + 1: `next_token_targets` pairs logits[t] with labels[t + 1] and masks
the last position. Every mask below is [batch, seq] over logits positions.

The original LLaVA-MoD's distillation mask is off by one: it takes logits[t] where labels[t] is
trained (so it skips the prediction of each answer's first token and includes the one after its end
token); `distill_mask(labels, shift=False)` reproduces it. Its next-token CE and log-probs are shifted
correctly, as here. Its "KD" value is the soft cross-entropy -sum p_T log p_S, which has the gradient
of forward KL but is larger by the teacher's entropy; we report the KL itself.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from llavamod_jax.data.templates import IGNORE  # noqa: F401 (the label convention's value)


def next_token_targets(labels):
  """targets[t] = labels[t + 1] and whether it is trained; both [batch, seq], last position off."""
  nxt = jnp.concatenate([labels[:, 1:], jnp.full_like(labels[:, :1], IGNORE)], axis=1)
  return jnp.where(nxt == IGNORE, 0, nxt), nxt != IGNORE


def distill_mask(labels, shift: bool = True):
  """Logits positions whose distributions are distilled: those predicting a trained token.

  shift=False: the original's off-by-one, positions whose own label is trained.
  """
  return next_token_targets(labels)[1] if shift else labels != IGNORE


def _masked_mean(per_token, mask):
  mask = mask.astype(jnp.float32)
  return jnp.sum(per_token * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def common_vocab(student_logits, teacher_logits, vocab_size: int | None = None):
  """Slice both to a shared vocabulary (teacher 152064 rows vs student 151936: padding rows)."""
  n = vocab_size or min(student_logits.shape[-1], teacher_logits.shape[-1])
  return student_logits[..., :n], teacher_logits[..., :n]


def token_kl(student_logits, teacher_logits, temperature: float = 1.0, reverse: bool = False):
  """Per-position KL(teacher || student) (KL(student || teacher) when reverse), fp32 [...]."""
  s = jax.nn.log_softmax(student_logits.astype(jnp.float32) / temperature, axis=-1)
  t = jax.nn.log_softmax(teacher_logits.astype(jnp.float32) / temperature, axis=-1)
  logp, logq = (s, t) if reverse else (t, s)
  # A contraction, not multiply-then-sum: XLA:CPU lowers the latter to a reduce fusion that made this
  # line ~15% of the mimic step (bench/parts.py); the value is the same.
  # HIGHEST: on TPU a default-precision f32 contraction would round its inputs to bf16.
  return jnp.einsum("...v,...v->...", jnp.exp(logp), logp - logq,
                    precision=jax.lax.Precision.HIGHEST)


def kl_distillation(student_logits, teacher_logits, mask, temperature: float = 1.0, *,
                    reverse: bool = False, vocab_size: int | None = None):
  """Mean over masked positions of KL(teacher || student) at `temperature`, scaled by T^2.

  Logits [batch, seq, vocab] at the same positions; `mask` [batch, seq] selects response positions
  (see `distill_mask`). The teacher side gets no gradient.
  """
  s, t = common_vocab(student_logits, jax.lax.stop_gradient(teacher_logits), vocab_size)
  return _masked_mean(token_kl(s, t, temperature, reverse), mask) * temperature**2


def token_logps(logits, targets):
  """log p(target) per position, fp32: logits [..., vocab], targets [...] int."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]


def cross_entropy(logits, labels):
  """Next-token CE, mean over trained tokens; logits [batch, seq, vocab], labels [batch, seq]."""
  targets, mask = next_token_targets(labels)
  return _masked_mean(-token_logps(logits, targets), mask)


def sequence_logps(logits, labels, average: bool = False):
  """Summed (or mean) log-prob of each sequence's trained tokens -> [batch]."""
  targets, mask = next_token_targets(labels)
  lp = jnp.sum(token_logps(logits, targets) * mask, axis=-1)
  return lp / jnp.maximum(jnp.sum(mask, axis=-1), 1) if average else lp


# ---------------------------------------------------------------------------------------------
# Memory-bounded distillation: logits built chunk by chunk from final hidden states.
# ---------------------------------------------------------------------------------------------


def _chunks(x, size: int):
  """[batch, seq, ...] -> [chunks, batch, size, ...], zero-padded at the end."""
  b, s = x.shape[:2]
  n = -(-s // size)
  x = jnp.pad(x, [(0, 0), (0, n * size - s)] + [(0, 0)] * (x.ndim - 2))
  return jnp.moveaxis(x.reshape(b, n, size, *x.shape[2:]), 1, 0)


def trained_first(trained, *xs):
  """Each row's trained positions moved to its front, in order (a stable sort per row; rows stay
  rows, so a batch sharded over devices stays where it is): `xs` [batch, seq, ...] permuted alike.

  The losses are sums over positions, so the order does not change them; what it changes is that the
  chunks past every row's last trained position hold nothing to compute (see `_sum_chunks`)."""
  order = jnp.argsort(~trained, axis=1, stable=True)
  return tuple(jnp.take_along_axis(x, order.reshape(order.shape + (1,) * (x.ndim - 2)), axis=1)
               for x in xs)


def pair_positions(student_x, student_mask, teacher_x, teacher_mask):
  """Student and teacher rows whose prompts differ in length (e.g. another image-token count):
  the k-th trained position of each student row paired with the k-th of the teacher's row.
  -> (student_x, teacher_x, mask), trained positions first, cut to the shorter sequence (every
  response fits in it)."""
  s, mask = trained_first(student_mask, student_x, student_mask)
  (t,) = trained_first(teacher_mask, teacher_x)
  n = min(s.shape[1], t.shape[1])
  return s[:, :n], t[:, :n], mask[:, :n]


def _sum_chunks(chunk: Callable, trained, xs, zero, size: int):
  """Sum of `chunk` over the `size`-position chunks of `xs` ([batch, seq, ...] each), computing only
  the chunks that hold a position of `trained` [batch, seq].

  Trained positions move to the front of their rows; each chunk runs under `jax.lax.cond`, which
  executes one branch, forward and in the backward pass alike, so a chunk without trained positions
  costs no LM head and no vocabulary-sized work. Each chunk is rematerialised in the backward pass
  (the checkpoint wraps the cond: inside it, the cond would pass the LM-head weights out as
  residuals, a copy per chunk). With a single chunk there is nothing to skip, and no cond: on
  XLA:CPU a cond around the vocabulary-sized work makes it 1.2-1.3x slower (its ops are not fused
  across the branch boundary; measured at 512 positions x 32,000)."""
  if xs[0].shape[1] <= size:
    return jax.checkpoint(chunk)(*xs)
  xs = tuple(_chunks(x, size) for x in trained_first(trained, *xs, trained))

  @jax.checkpoint
  def skippable(live, *xs_c):
    return jax.lax.cond(jnp.any(live), chunk, lambda *_: zero, *xs_c)

  def body(total, c):
    return jax.tree.map(jnp.add, total, skippable(c[-1], *c[:-1])), None

  total, _ = jax.lax.scan(body, zero, xs)
  return total


def chunked_distillation(student_hidden, teacher_hidden, student_head: Callable, teacher_head: Callable,
                         kl_mask, targets, ce_mask, *, chunk_size: int = 256,
                         temperature: float = 1.0, reverse: bool = False,
                         vocab_size: int | None = None) -> dict[str, jax.Array]:
  """`kl_distillation` and next-token CE from final hidden states, `chunk_size` positions at a time.

  `*_hidden` [batch, seq, hidden] (after the final norm); `*_head` map a [batch, chunk, hidden] slice
  to logits; `kl_mask`, `targets`, `ce_mask` [batch, seq] (see `distill_mask`, `next_token_targets`).
  Only trained positions (kl_mask | ce_mask) get logits: they are moved to the front of their rows
  and chunks without any are skipped, so in LLaVA data, where image tokens, system prompt and
  questions carry no loss, most of both LM heads and of the softmax/KL over the vocabulary is never
  computed. Each chunk is rematerialised in the backward pass, so at most one chunk of logits per
  model is alive at a time; value and gradient equal the unchunked losses.
  """

  def chunk(sh, th, km, tgt, cm):
    s_full = student_head(sh)
    s_logits, t_logits = common_vocab(s_full, jax.lax.stop_gradient(teacher_head(th)), vocab_size)
    kl = jnp.sum(token_kl(s_logits, t_logits, temperature, reverse) * km)
    return kl, jnp.sum(-token_logps(s_full, tgt) * cm)

  trained = kl_mask.astype(bool) | ce_mask.astype(bool)
  kl_sum, ce_sum = _sum_chunks(chunk, trained, (student_hidden, teacher_hidden, kl_mask, targets,
                                                ce_mask), (jnp.float32(0), jnp.float32(0)), chunk_size)
  kl_count = jnp.maximum(jnp.sum(kl_mask.astype(jnp.float32)), 1.0)
  ce_count = jnp.maximum(jnp.sum(ce_mask.astype(jnp.float32)), 1.0)
  return {"kl": kl_sum / kl_count * temperature**2, "ce": ce_sum / ce_count}


def chunked_cross_entropy(hidden, head: Callable, targets, mask, *, chunk_size: int = 256):
  """`cross_entropy` from final hidden states, `chunk_size` positions of logits at a time; as in
  `chunked_distillation`, only positions in `mask` get logits."""

  def chunk(h, tgt, m):
    return jnp.sum(-token_logps(head(h), tgt) * m)

  total = _sum_chunks(chunk, mask.astype(bool), (hidden, targets, mask), jnp.float32(0), chunk_size)
  return total / jnp.maximum(jnp.sum(mask.astype(jnp.float32)), 1.0)


# ---------------------------------------------------------------------------------------------
# Preference distillation (the teacher is the reference model).
# ---------------------------------------------------------------------------------------------

LOSS_TYPES = ("sigmoid", "kto_pair", "ipo", "hinge")


def preference_loss(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
                    reference_rejected_logps, beta: float = 0.1, loss_type: str = "sigmoid",
                    label_smoothing: float = 0.0):
  """DPO-family loss over [batch] sequence log-probs -> (loss, metrics).

  sigmoid: DPO, -log sigmoid(beta * margin), with conservative label smoothing;
  ipo: (margin - 1 / (2 beta))^2; hinge: relu(1 - beta * margin);
  kto_pair: the paired KTO of the original's script — each half's KL reference point is the batch
  mean of the other half's log-ratio, clamped at 0, and the loss averages both halves.
  margin = (chosen - rejected) policy log-ratio minus the same for the reference.
  """
  chosen_ratio = policy_chosen_logps - reference_chosen_logps
  rejected_ratio = policy_rejected_logps - reference_rejected_logps
  margin = chosen_ratio - rejected_ratio
  if loss_type == "sigmoid":
    losses = (-jax.nn.log_sigmoid(beta * margin) * (1 - label_smoothing)
              - jax.nn.log_sigmoid(-beta * margin) * label_smoothing)
  elif loss_type == "ipo":
    losses = (margin - 1 / (2 * beta)) ** 2
  elif loss_type == "hinge":
    losses = jax.nn.relu(1 - beta * margin)
  elif loss_type == "kto_pair":
    chosen_kl = jnp.maximum(jnp.mean(chosen_ratio), 0)
    rejected_kl = jnp.maximum(jnp.mean(rejected_ratio), 0)
    losses = jnp.concatenate([1 - jax.nn.sigmoid(beta * (chosen_ratio - rejected_kl)),
                              1 - jax.nn.sigmoid(beta * (chosen_kl - rejected_ratio))])
  else:
    raise ValueError(f"loss_type {loss_type!r}: expected one of {LOSS_TYPES}")
  chosen_rewards = jax.lax.stop_gradient(beta * chosen_ratio)
  rejected_rewards = jax.lax.stop_gradient(beta * rejected_ratio)
  metrics = {
      "rewards/chosen": jnp.mean(chosen_rewards),
      "rewards/rejected": jnp.mean(rejected_rewards),
      "rewards/margin": jnp.mean(chosen_rewards - rejected_rewards),
      "rewards/accuracy": jnp.mean((chosen_rewards > rejected_rewards).astype(jnp.float32)),
      "logps/chosen": jnp.mean(policy_chosen_logps),
      "logps/rejected": jnp.mean(policy_rejected_logps),
  }
  return jnp.mean(losses), metrics
