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


OBJECTIVES = ("forward_kl", "reverse_kl", "skew_forward_kl", "skew_reverse_kl", "jsd", "soft_ce")


def _kl(logp, logq):
  """sum_v p (log p - log q) over the last axis, p = exp(logp), with 0 log 0 = 0 (a bucket of
  probability 0 has logp = -inf). A contraction, not multiply-then-sum: XLA:CPU lowers the latter to
  a reduce fusion that made this line ~15% of the mimic step (bench/parts.py); HIGHEST: on TPU a
  default-precision f32 contraction would round its inputs to bf16."""
  live = logp > -jnp.inf
  diff = jnp.where(live, logp - jnp.where(live, logq, 0.0), 0.0)
  return jnp.einsum("...v,...v->...", jnp.exp(logp), diff, precision=jax.lax.Precision.HIGHEST)


def _log_mix(weight: float, logp, logq):
  """log(weight * p + (1 - weight) * q) from log-probabilities, weight in [0, 1]."""
  if weight <= 0.0:
    return logq
  if weight >= 1.0:
    return logp
  return jnp.logaddexp(jnp.log(weight) + logp, jnp.log1p(-weight) + logq)


def divergence(logp, logq, objective: str = "forward_kl", alpha: float = 0.1, beta: float = 0.5):
  """Per-position divergence between the teacher's distribution p and the student's q, both given
  as log-probabilities over the last axis (a vocabulary, or top-k buckets and a tail):
    forward_kl       KL(p || q)
    reverse_kl       KL(q || p)
    skew_forward_kl  KL(p || alpha p + (1 - alpha) q)        (DistiLLM's skew KL)
    skew_reverse_kl  KL(q || alpha q + (1 - alpha) p)        (DistiLLM's skew reverse KL)
    jsd              beta KL(p || m) + (1 - beta) KL(q || m), m = beta p + (1 - beta) q  (GKD)
    soft_ce          -sum p log q   (the original's "KD" value: forward KL's gradient, plus H(p))
  """
  if objective == "forward_kl":
    return _kl(logp, logq)
  if objective == "reverse_kl":
    return _kl(logq, logp)
  if objective == "skew_forward_kl":
    return _kl(logp, _log_mix(alpha, logp, logq))
  if objective == "skew_reverse_kl":
    return _kl(logq, _log_mix(alpha, logq, logp))
  if objective == "jsd":
    logm = _log_mix(beta, logp, logq)
    return beta * _kl(logp, logm) + (1.0 - beta) * _kl(logq, logm)
  if objective == "soft_ce":
    live = logp > -jnp.inf
    return -jnp.einsum("...v,...v->...", jnp.exp(logp), jnp.where(live, logq, 0.0),
                       precision=jax.lax.Precision.HIGHEST)
  raise ValueError(f"distillation objective {objective!r}: expected one of {OBJECTIVES}")


def objective_of(objective: str = "forward_kl", reverse: bool = False) -> str:
  """The objective a (objective, reverse) pair names: `reverse=True` is the older spelling of
  objective='reverse_kl'."""
  if objective not in OBJECTIVES:
    raise ValueError(f"distillation objective {objective!r}: expected one of {OBJECTIVES}")
  if reverse and objective not in ("forward_kl", "reverse_kl"):
    raise ValueError(f"reverse=True with objective={objective!r}: reverse selects 'reverse_kl'; "
                     "give only the objective")
  return "reverse_kl" if reverse else objective


def token_divergence(student_logits, teacher_logits, temperature: float = 1.0,
                     objective: str = "forward_kl", alpha: float = 0.1, beta: float = 0.5):
  """Per-position `divergence` of the teacher's and the student's softmax at `temperature`, fp32."""
  s = jax.nn.log_softmax(student_logits.astype(jnp.float32) / temperature, axis=-1)
  t = jax.nn.log_softmax(teacher_logits.astype(jnp.float32) / temperature, axis=-1)
  return divergence(t, s, objective, alpha, beta)


def token_kl(student_logits, teacher_logits, temperature: float = 1.0, reverse: bool = False):
  """Per-position KL(teacher || student) (KL(student || teacher) when reverse), fp32 [...]."""
  return token_divergence(student_logits, teacher_logits, temperature,
                          "reverse_kl" if reverse else "forward_kl")


def distillation_loss(student_logits, teacher_logits, mask, objective: str = "forward_kl",
                      temperature: float = 1.0, alpha: float = 0.1, beta: float = 0.5, *,
                      vocab_size: int | None = None):
  """Mean over masked positions of `divergence(p, q, objective)` at `temperature`, scaled by T^2.

  Logits [batch, seq, vocab] at the same positions; `mask` [batch, seq] selects response positions
  (see `distill_mask`). The teacher side gets no gradient.
  """
  s, t = common_vocab(student_logits, jax.lax.stop_gradient(teacher_logits), vocab_size)
  per_token = token_divergence(s, t, temperature, objective, alpha, beta)
  return _masked_mean(per_token, mask) * temperature**2


def kl_distillation(student_logits, teacher_logits, mask, temperature: float = 1.0, *,
                    reverse: bool = False, vocab_size: int | None = None):
  """`distillation_loss` with forward KL(teacher || student) (reverse: KL(student || teacher))."""
  return distillation_loss(student_logits, teacher_logits, mask,
                           "reverse_kl" if reverse else "forward_kl", temperature,
                           vocab_size=vocab_size)


# ---------------------------------------------------------------------------------------------
# Distillation from stored top-k teacher logits (launch/teacher_logits.py).
# ---------------------------------------------------------------------------------------------

# The teacher's tail probability is floored here when it is computed as 1 - sum(top-k): stored
# log-probabilities carry rounding, and a tail of exactly 0 against a student tail > 0 would make
# the reverse objectives infinite. Its share of any objective is below 1e-10.
TAIL_FLOOR = 1e-12


def sanitize_topk(topk_logits, topk_ids, logsumexp, mask):
  """Positions outside `mask` get a valid stand-in (ids 0..k-1 with probability 1/k each), so no
  term or gradient there is NaN; the positions themselves carry no weight in the losses."""
  k = topk_ids.shape[-1]
  m = mask.astype(bool)
  logits = jnp.where(m[..., None], topk_logits.astype(jnp.float32), 0.0)
  ids = jnp.where(m[..., None], topk_ids, jnp.arange(k, dtype=topk_ids.dtype))
  lse = jnp.where(m, logsumexp.astype(jnp.float32), jnp.log(jnp.float32(k)))
  return logits, ids, lse


def topk_log_distributions(student_logits, topk_logits, topk_ids, logsumexp,
                           temperature: float = 1.0):
  """The teacher's and the student's distributions over the k stored ids and one tail bucket, as
  log-probabilities [..., k + 1] (just [..., k] when k is the vocabulary: no tail).

  teacher: p_i = exp(t_i / T - lse_T) for the stored logits t_i (`logsumexp` is lse_T, the
  log-sum-exp of all the teacher's logits / T), p_tail = 1 - sum_i p_i;
  student: q = softmax(student_logits / T), q_tail = 1 - sum_i q[id_i], computed as the log-sum-exp
  of the student's logits outside the stored ids (no cancellation when the tail is small)."""
  s = student_logits.astype(jnp.float32) / temperature
  k, vocab = topk_ids.shape[-1], s.shape[-1]
  lse_s = jax.nn.logsumexp(s, axis=-1)
  logq = jnp.take_along_axis(s, topk_ids, axis=-1) - lse_s[..., None]
  logp = topk_logits.astype(jnp.float32) / temperature - logsumexp.astype(jnp.float32)[..., None]
  if k >= vocab:
    return logp, logq
  flat_s = s.reshape(-1, vocab)
  flat_ids = topk_ids.reshape(-1, k)
  rows = jnp.arange(flat_s.shape[0])[:, None]
  outside = jnp.full(flat_s.shape, True).at[rows, flat_ids].set(False).reshape(s.shape)
  logq_tail = jax.nn.logsumexp(jnp.where(outside, s, -jnp.inf), axis=-1) - lse_s
  p_tail = jnp.maximum(1.0 - jnp.sum(jnp.exp(logp), axis=-1), TAIL_FLOOR)
  return (jnp.concatenate([logp, jnp.log(p_tail)[..., None]], axis=-1),
          jnp.concatenate([logq, logq_tail[..., None]], axis=-1))


def token_topk_divergence(student_logits, topk_logits, topk_ids, logsumexp, temperature: float = 1.0,
                          objective: str = "forward_kl", alpha: float = 0.1, beta: float = 0.5):
  """Per-position `divergence` over the top-k buckets and the tail (`topk_log_distributions`)."""
  logp, logq = topk_log_distributions(student_logits, topk_logits, topk_ids, logsumexp, temperature)
  return divergence(logp, logq, objective, alpha, beta)


def topk_kl(student_logits, teacher_topk_logits, teacher_topk_ids, teacher_logsumexp, mask,
            temperature: float = 1.0, objective: str = "forward_kl", alpha: float = 0.1,
            beta: float = 0.5):
  """Mean over masked positions of the divergence between the teacher's stored top-k distribution
  (the tail of its distribution as one bucket) and the student's, scaled by T^2. Exact when k is the
  vocabulary. student_logits [batch, seq, vocab] (sliced to the distilled vocabulary), the teacher's
  [batch, seq, k] logits and ids and [batch, seq] log-sum-exp at `temperature`, mask [batch, seq]."""
  logits, ids, lse = sanitize_topk(jax.lax.stop_gradient(teacher_topk_logits), teacher_topk_ids,
                                   jax.lax.stop_gradient(teacher_logsumexp), mask)
  per_token = token_topk_divergence(student_logits, logits, ids, lse, temperature, objective, alpha,
                                    beta)
  return _masked_mean(per_token, mask) * temperature**2


@jax.custom_vjp
def token_logps(logits, targets):
  """log p(target) per position, fp32: logits [..., vocab], targets [...] int.

  Its gradient is written out (g * (onehot(target) - softmax)): one elementwise pass over the
  vocabulary, where autodiff of log_softmax + take_along_axis scatters into a zero [..., vocab]
  tensor and runs the softmax's backward over it (docs/benchmark_notes.md, change 5)."""
  return _token_logps_fwd(logits, targets)[0]


def _token_logps_fwd(logits, targets):
  z = logits.astype(jnp.float32)
  lse = jax.nn.logsumexp(z, axis=-1)
  picked = jnp.take_along_axis(z, targets[..., None], axis=-1)[..., 0]
  return picked - lse, (logits, lse, targets)


def _token_logps_bwd(res, g):
  logits, lse, targets = res
  hit = jax.lax.broadcasted_iota(targets.dtype, logits.shape, logits.ndim - 1) == targets[..., None]
  d = (hit.astype(jnp.float32) - jnp.exp(logits.astype(jnp.float32) - lse[..., None])) * g[..., None]
  return d.astype(logits.dtype), None


token_logps.defvjp(_token_logps_fwd, _token_logps_bwd)


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
# The other recipes' terms (issue 24): LLaVA-KD's visual KL and relation distillation, LLaVADI's
# hidden-state alignment. Each pairs the k-th visual (or trained) position of a student row with the
# k-th of the teacher's row, so towers whose prompts place the image differently still pair.
# ---------------------------------------------------------------------------------------------


def visual_mask(input_ids, image_token_id: int):
  """[batch, seq] bool: the image-token slots (the positions the vision tower's features fill)."""
  return input_ids == image_token_id


def _paired(student_x, student_mask, teacher_x, teacher_mask, what: str):
  """`pair_positions`, with both rows' counts required equal (checked when the masks are concrete)."""
  s_count, t_count = jnp.sum(student_mask, axis=1), jnp.sum(teacher_mask, axis=1)
  if not isinstance(s_count, jax.core.Tracer) and not isinstance(t_count, jax.core.Tracer):
    bad = [i for i, (a, b) in enumerate(zip(s_count.tolist(), t_count.tolist())) if a != b]
    if bad:
      i = bad[0]
      raise ValueError(f"{what}: row {i} has {int(s_count[i])} student and {int(t_count[i])} teacher "
                       f"positions; the terms pair them one to one, so the counts must be equal "
                       f"({len(bad)} row(s) differ)")
  s, t, mask = pair_positions(student_x, student_mask, teacher_x, teacher_mask)
  (t_mask,) = trained_first(teacher_mask, teacher_mask)
  return s, t, mask & t_mask[:, :mask.shape[1]]


def visual_kl(student_logits, teacher_logits, student_visual, teacher_visual, *,
              temperature: float = 1.0, objective: str = "forward_kl"):
  """LLaVA-KD's MDist on the image: KL(teacher || student) of the output distributions at the
  visual-token positions (the logits at the image slots themselves, not shifted), mean over the
  visual tokens of the batch, scaled by T^2 (LLaVA-KD: T = 1). logits [batch, seq, vocab] (each side
  its own sequence), visual masks [batch, seq] (`visual_mask`) with equal counts per row. The
  teacher side gets no gradient."""
  s, t, mask = _paired(student_logits, student_visual, jax.lax.stop_gradient(teacher_logits),
                       teacher_visual, "visual_kl")
  return distillation_loss(s, t, mask, objective, temperature)


def relation_distillation(student_features, teacher_features, student_visual, teacher_visual):
  """LLaVA-KD's RDist: per row, the relation matrix R = Z Z^T of the features Z [n_visual, d] at the
  visual positions (LLaVA-KD: the final LM-head logits, raw), and 1 - cos(vec R_student,
  vec R_teacher); the mean over rows with visual tokens (LLaVA-KD's released code flattens the
  whole batch into one vector; at its batch of one row per device the two are equal). Widths may
  differ (R is [n, n] on both sides). The teacher side gets no gradient."""
  s, t, mask = _paired(student_features, student_visual, jax.lax.stop_gradient(teacher_features),
                       teacher_visual, "relation_distillation")
  m = mask[..., None].astype(jnp.float32)
  hi = jax.lax.Precision.HIGHEST
  r_s = jnp.einsum("bnd,bmd->bnm", s.astype(jnp.float32) * m, s.astype(jnp.float32) * m, precision=hi)
  r_t = jnp.einsum("bnd,bmd->bnm", t.astype(jnp.float32) * m, t.astype(jnp.float32) * m, precision=hi)
  dot = jnp.sum(r_s * r_t, axis=(1, 2))
  norms = jnp.sqrt(jnp.sum(r_s * r_s, axis=(1, 2))) * jnp.sqrt(jnp.sum(r_t * r_t, axis=(1, 2)))
  cos = dot / jnp.maximum(norms, 1e-8)  # torch's cosine_similarity eps
  rows = jnp.any(mask, axis=1).astype(jnp.float32)
  return jnp.sum((1.0 - cos) * rows) / jnp.maximum(jnp.sum(rows), 1.0)


def init_hidden_projection(key, student_width: int, teacher_width: int, dtype=jnp.float32):
  """LLaVADI's projection of the student's hidden states to the teacher's width:
  Linear(d_s -> d_t) - GELU - Linear(d_t -> d_t), initialised as torch's nn.Linear (uniform
  +-1/sqrt(fan_in) weights and biases). A trainable parameter of the student side."""
  k = jax.random.split(key, 4)
  u = lambda kk, shape, fan_in: jax.random.uniform(  # noqa: E731
      kk, shape, dtype, -1.0 / fan_in**0.5, 1.0 / fan_in**0.5)
  return {"w1": u(k[0], (student_width, teacher_width), student_width),
          "b1": u(k[1], (teacher_width,), student_width),
          "w2": u(k[2], (teacher_width, teacher_width), teacher_width),
          "b2": u(k[3], (teacher_width,), teacher_width)}


def project_hidden(projection, hidden):
  """`init_hidden_projection`'s MLP on hidden states [..., d_s] -> [..., d_t] (exact GELU, as
  torch's nn.GELU)."""
  x = hidden.astype(jnp.float32) @ projection["w1"] + projection["b1"]
  return jax.nn.gelu(x, approximate=False) @ projection["w2"] + projection["b2"]


def hidden_alignment(student_hidden, teacher_hidden, student_mask, teacher_mask, projection=None):
  """LLaVADI's token alignment: the MSE between the student's last-layer hidden states, projected to
  the teacher's width (`project_hidden`; None when the widths are equal), and the teacher's, at the
  paired positions of the masks (LLaVADI: the answer tokens, or every attended token); the mean over
  positions and hidden units. The teacher side gets no gradient."""
  s, t, mask = _paired(student_hidden, student_mask, jax.lax.stop_gradient(teacher_hidden),
                       teacher_mask, "hidden_alignment")
  if projection is not None:
    s = project_hidden(projection, s)
  if s.shape[-1] != t.shape[-1]:
    raise ValueError(f"hidden_alignment: student width {s.shape[-1]} and teacher width "
                     f"{t.shape[-1]} differ; give a projection (init_hidden_projection)")
  per_token = jnp.mean((s.astype(jnp.float32) - t.astype(jnp.float32)) ** 2, axis=-1)
  return _masked_mean(per_token, mask)


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


def _chunked_kd(student_hidden, student_head: Callable, teacher_xs: tuple, per_token: Callable,
                kl_mask, targets, ce_mask, chunk_size: int, temperature: float):
  """The chunk loop of both chunked distillations: per chunk, the student's logits, the summed
  `per_token(student_logits, *teacher_chunk)` over kl_mask and the summed CE over ce_mask."""
  n_teacher = len(teacher_xs)

  def chunk(sh, *rest):
    t, (km, tgt, cm) = rest[:n_teacher], rest[n_teacher:]
    s_full = student_head(sh)
    kl = jnp.sum(jnp.where(km.astype(bool), per_token(s_full, *t), 0.0))
    return kl, jnp.sum(-token_logps(s_full, tgt) * cm)

  trained = kl_mask.astype(bool) | ce_mask.astype(bool)
  kl_sum, ce_sum = _sum_chunks(chunk, trained, (student_hidden, *teacher_xs, kl_mask, targets,
                                                ce_mask), (jnp.float32(0), jnp.float32(0)), chunk_size)
  kl_count = jnp.maximum(jnp.sum(kl_mask.astype(jnp.float32)), 1.0)
  ce_count = jnp.maximum(jnp.sum(ce_mask.astype(jnp.float32)), 1.0)
  return {"kl": kl_sum / kl_count * temperature**2, "ce": ce_sum / ce_count}


def chunked_distillation(student_hidden, teacher_hidden, student_head: Callable, teacher_head: Callable,
                         kl_mask, targets, ce_mask, *, chunk_size: int = 256,
                         temperature: float = 1.0, reverse: bool = False,
                         vocab_size: int | None = None, objective: str = "forward_kl",
                         alpha: float = 0.1, beta: float = 0.5) -> dict[str, jax.Array]:
  """`distillation_loss` (as "kl", whatever the objective) and next-token CE from final hidden
  states, `chunk_size` positions at a time.

  `*_hidden` [batch, seq, hidden] (after the final norm); `*_head` map a [batch, chunk, hidden] slice
  to logits; `kl_mask`, `targets`, `ce_mask` [batch, seq] (see `distill_mask`, `next_token_targets`).
  Only trained positions (kl_mask | ce_mask) get logits: they are moved to the front of their rows
  and chunks without any are skipped, so in LLaVA data, where image tokens, system prompt and
  questions carry no loss, most of both LM heads and of the softmax/KL over the vocabulary is never
  computed. Each chunk is rematerialised in the backward pass, so at most one chunk of logits per
  model is alive at a time; value and gradient equal the unchunked losses.
  """
  objective = objective_of(objective, reverse)

  def per_token(s_full, th):
    s_logits, t_logits = common_vocab(s_full, jax.lax.stop_gradient(teacher_head(th)), vocab_size)
    return token_divergence(s_logits, t_logits, temperature, objective, alpha, beta)

  return _chunked_kd(student_hidden, student_head, (teacher_hidden,), per_token, kl_mask, targets,
                     ce_mask, chunk_size, temperature)


def chunked_topk_distillation(student_hidden, student_head: Callable, teacher_topk_logits,
                              teacher_topk_ids, teacher_logsumexp, kl_mask, targets, ce_mask, *,
                              chunk_size: int = 256, temperature: float = 1.0,
                              vocab_size: int | None = None, objective: str = "forward_kl",
                              alpha: float = 0.1, beta: float = 0.5) -> dict[str, jax.Array]:
  """`topk_kl` (as "kl") and next-token CE from the student's final hidden states, `chunk_size`
  positions at a time, as `chunked_distillation` does with a teacher in memory. `vocab_size`: the
  distilled vocabulary the teacher's top-k was taken over (the student's logits are cut to it)."""
  logits, ids, lse = sanitize_topk(jax.lax.stop_gradient(teacher_topk_logits), teacher_topk_ids,
                                   jax.lax.stop_gradient(teacher_logsumexp), kl_mask)

  def per_token(s_full, t, i, z):
    s_logits = s_full[..., :vocab_size] if vocab_size else s_full
    return token_topk_divergence(s_logits, t, i, z, temperature, objective, alpha, beta)

  return _chunked_kd(student_hidden, student_head, (logits, ids, lse), per_token, kl_mask, targets,
                     ce_mask, chunk_size, temperature)


def chunked_cross_entropy(hidden, head: Callable, targets, mask, *, chunk_size: int = 256):
  """`cross_entropy` from final hidden states, `chunk_size` positions of logits at a time; as in
  `chunked_distillation`, only positions in `mask` get logits."""

  def chunk(h, tgt, m):
    return jnp.sum(-token_logps(head(h), tgt) * m)

  total = _sum_chunks(chunk, mask.astype(bool), (hidden, targets, mask), jnp.float32(0), chunk_size)
  return total / jnp.maximum(jnp.sum(mask.astype(jnp.float32)), 1.0)


# ---------------------------------------------------------------------------------------------
# Fused LM head + loss: the student's gradient computed in the forward pass, chunk by chunk.
# ---------------------------------------------------------------------------------------------


def _zero_like(x):
  return jnp.zeros(x.shape, x.dtype)


def _fused_sum(per_chunk: Callable, head_fn: Callable, head_params, hidden, trained, xs, consts, *,
               size: int, head_grad: bool, hidden_grad: bool, zeros: tuple):
  """Sums of `per_chunk(logits, consts, *xs_chunk)` (a tuple of arrays shaped like `zeros`, the
  first one differentiated: the gradient of its sum over elements) over `size`-position chunks of `hidden` [batch, seq, hidden], and the gradient of
  the first sum with respect to `hidden` and `head_params`, where logits = head_fn(head_params,
  hidden_chunk). Chunks without a `trained` position are skipped, as in `_sum_chunks`.
  -> (sums, d hidden [batch, seq, hidden] or None, d head_params or None)."""

  def chunk(h, *x):
    def f(hp, h_):
      out = per_chunk(head_fn(hp, h_), consts, *x)
      return out[0], out
    one = jnp.ones_like(zeros[0])
    g_h = g_hp = None
    if head_grad and hidden_grad:
      _, vjp, out = jax.vjp(f, head_params, h, has_aux=True)
      g_hp, g_h = vjp(one)
    elif head_grad:
      _, vjp, out = jax.vjp(lambda hp: f(hp, h), head_params, has_aux=True)
      (g_hp,) = vjp(one)
    elif hidden_grad:
      _, vjp, out = jax.vjp(lambda h_: f(head_params, h_), h, has_aux=True)
      (g_h,) = vjp(one)
    else:
      out = f(head_params, h)[1]
    return out, g_h, g_hp

  zeros_hp = jax.tree.map(_zero_like, head_params) if head_grad else None
  if hidden.shape[1] <= size:
    out, g_h, g_hp = chunk(hidden, *xs)
    return out, g_h, g_hp

  b, s = hidden.shape[:2]
  order = jnp.argsort(~trained, axis=1, stable=True)
  sort = lambda x: jnp.take_along_axis(x, order.reshape(order.shape + (1,) * (x.ndim - 2)), axis=1)  # noqa
  h_c = _chunks(sort(hidden), size)
  xs_c = tuple(_chunks(sort(x), size) for x in xs)
  live_c = _chunks(sort(trained), size)

  def skip(h, *x):
    return zeros, (_zero_like(h) if hidden_grad else None), zeros_hp

  def body(carry, c):
    total, acc = carry
    h, live, *x = c
    out, g_h, g_hp = jax.lax.cond(jnp.any(live), chunk, skip, h, *x)
    total = jax.tree.map(jnp.add, total, out)
    acc = jax.tree.map(jnp.add, acc, g_hp) if head_grad else acc
    return (total, acc), g_h

  (total, g_hp), g_h = jax.lax.scan(body, (zeros, zeros_hp), (h_c, live_c, *xs_c))
  if g_h is not None:
    g_h = jnp.moveaxis(g_h, 0, 1).reshape(b, -1, hidden.shape[-1])[:, :s]
    inverse = jnp.argsort(order, axis=1)
    g_h = jnp.take_along_axis(g_h, inverse[..., None], axis=1)
  return total, g_h, g_hp


def _fused(per_chunk: Callable, head_fn: Callable, head_params, hidden, trained, xs, consts, *,
           size: int, n_out: int = 3):
  """`_fused_sum`'s sums under a custom VJP: differentiated, the forward pass also computes the
  gradient of the first sum (the loss) with respect to `hidden` and `head_params` (only those being
  differentiated: a frozen head costs no weight gradient), and the backward pass scales it by the
  incoming cotangent. Neither head runs again in the backward pass and no logits are kept for it:
  the residuals are one [batch, seq, hidden] array and one head-sized array. The other sums are
  values only (their cotangents are dropped; callers stop their gradient)."""
  kw = dict(size=size, zeros=tuple(jnp.float32(0) for _ in range(n_out)))

  @jax.custom_vjp
  def run(hp, h, xs_, consts_):
    return _fused_sum(per_chunk, head_fn, hp, h, trained, xs_, consts_, head_grad=False,
                      hidden_grad=False, **kw)[0]

  def fwd(hp, h, xs_, consts_):
    head_grad = any(leaf.perturbed for leaf in jax.tree.leaves(hp))
    hidden_grad = h.perturbed
    value = lambda t: jax.tree.map(lambda leaf: leaf.value, t)  # noqa: E731
    hp_v, h_v = value(hp), h.value
    out, g_h, g_hp = _fused_sum(per_chunk, head_fn, hp_v, h_v, trained, value(xs_), value(consts_),
                                head_grad=head_grad, hidden_grad=hidden_grad, **kw)
    return out, (g_h, g_hp)

  def bwd(res, ct):
    g_h, g_hp = res
    c = ct[0]
    if isinstance(c, jax.custom_derivatives.SymbolicZero):
      return None, None, None, None
    scale = lambda g: None if g is None else (g * c).astype(g.dtype)  # noqa: E731
    return (jax.tree.map(scale, g_hp) if g_hp is not None else None, scale(g_h), None, None)

  run.defvjp(fwd, bwd, symbolic_zeros=True)
  out = run(head_params, hidden, xs, consts)
  return (out[0],) + tuple(jax.lax.stop_gradient(o) for o in out[1:])


def fused_distillation(student_hidden, student_head_params, student_head_fn: Callable, teacher_hidden,
                       teacher_head_params, teacher_head_fn: Callable, kl_mask, targets, ce_mask, *,
                       kl_weight: float = 1.0, ce_weight: float = 0.0, chunk_size: int = 256,
                       temperature: float = 1.0, vocab_size: int | None = None,
                       objective: str = "forward_kl", alpha: float = 0.1,
                       beta: float = 0.5) -> dict[str, jax.Array]:
  """`chunked_distillation` with the LM heads fused into the loss: "loss" = kl_weight * kl +
  ce_weight * ce, differentiable with respect to `student_hidden` and `student_head_params` (the
  parameters `student_head_fn(params, hidden) -> logits` reads; `models.lm_head`); "kl" and "ce" are
  its parts, values only. The gradient is computed chunk by chunk in the forward pass (`_fused`):
  per chunk both heads run once and the student's logit gradient goes straight into the hidden-state
  and head-weight gradients, so the backward pass runs neither head again (the checkpointed chunks
  of `chunked_distillation` run both heads twice)."""
  objective = objective_of(objective, reverse=False)
  kl_count = jnp.maximum(jnp.sum(kl_mask.astype(jnp.float32)), 1.0)
  ce_count = jnp.maximum(jnp.sum(ce_mask.astype(jnp.float32)), 1.0)
  kl_scale, ce_scale = kl_weight * temperature**2 / kl_count, ce_weight / ce_count

  def per_chunk(s_full, consts, th, km, tgt, cm):
    t_params, kl_scale_, ce_scale_ = consts
    t_full = jax.lax.stop_gradient(teacher_head_fn(t_params, th))
    s_logits, t_logits = common_vocab(s_full, t_full, vocab_size)
    per_token = token_divergence(s_logits, t_logits, temperature, objective, alpha, beta)
    kl = jnp.sum(jnp.where(km.astype(bool), per_token, 0.0))
    ce = jnp.sum(-token_logps(s_full, tgt) * cm)
    return kl * kl_scale_ + ce * ce_scale_, kl, ce

  trained = kl_mask.astype(bool) | ce_mask.astype(bool)
  loss, kl, ce = _fused(per_chunk, student_head_fn, student_head_params, student_hidden, trained,
                        (jax.lax.stop_gradient(teacher_hidden), kl_mask, targets, ce_mask),
                        (teacher_head_params, kl_scale, ce_scale), size=chunk_size, n_out=3)
  return {"loss": loss, "kl": kl / kl_count * temperature**2, "ce": ce / ce_count}


def fused_topk_distillation(student_hidden, student_head_params, student_head_fn: Callable,
                            teacher_topk_logits, teacher_topk_ids, teacher_logsumexp, kl_mask, targets,
                            ce_mask, *, kl_weight: float = 1.0, ce_weight: float = 0.0,
                            chunk_size: int = 256, temperature: float = 1.0,
                            vocab_size: int | None = None, objective: str = "forward_kl",
                            alpha: float = 0.1, beta: float = 0.5) -> dict[str, jax.Array]:
  """`chunked_topk_distillation` fused as `fused_distillation` is: the teacher's stored top-k."""
  logits, ids, lse = sanitize_topk(jax.lax.stop_gradient(teacher_topk_logits), teacher_topk_ids,
                                   jax.lax.stop_gradient(teacher_logsumexp), kl_mask)
  kl_count = jnp.maximum(jnp.sum(kl_mask.astype(jnp.float32)), 1.0)
  ce_count = jnp.maximum(jnp.sum(ce_mask.astype(jnp.float32)), 1.0)
  kl_scale, ce_scale = kl_weight * temperature**2 / kl_count, ce_weight / ce_count

  def per_chunk(s_full, consts, t, i, z, km, tgt, cm):
    kl_scale_, ce_scale_ = consts
    s_logits = s_full[..., :vocab_size] if vocab_size else s_full
    per_token = token_topk_divergence(s_logits, t, i, z, temperature, objective, alpha, beta)
    kl = jnp.sum(jnp.where(km.astype(bool), per_token, 0.0))
    ce = jnp.sum(-token_logps(s_full, tgt) * cm)
    return kl * kl_scale_ + ce * ce_scale_, kl, ce

  trained = kl_mask.astype(bool) | ce_mask.astype(bool)
  loss, kl, ce = _fused(per_chunk, student_head_fn, student_head_params, student_hidden, trained,
                        (logits, ids, lse, kl_mask, targets, ce_mask), (kl_scale, ce_scale),
                        size=chunk_size, n_out=3)
  return {"loss": loss, "kl": kl / kl_count * temperature**2, "ce": ce / ce_count}


def fused_cross_entropy(hidden, head_params, head_fn: Callable, targets, mask, *,
                        chunk_size: int = 256) -> jax.Array:
  """`chunked_cross_entropy` with the LM head fused into the loss (see `fused_distillation`)."""
  count = jnp.maximum(jnp.sum(mask.astype(jnp.float32)), 1.0)

  def per_chunk(logits, consts, tgt, m):
    (inv_count,) = consts
    return (jnp.sum(-token_logps(logits, tgt) * m) * inv_count,)

  (ce,) = _fused(per_chunk, head_fn, head_params, hidden, mask.astype(bool), (targets, mask),
                 (1.0 / count,), size=chunk_size, n_out=1)
  return ce


def _row_logps(logits, consts, tgt, m):
  del consts
  return (jnp.sum(token_logps(logits, tgt) * m, axis=-1),)


def chunked_sequence_logps(hidden, head: Callable, labels, *, chunk_size: int = 256):
  """`sequence_logps` (summed) from final hidden states, `chunk_size` positions of logits at a
  time, checkpointed chunks as in `chunked_cross_entropy`."""
  targets, mask = next_token_targets(labels)

  def chunk(h, tgt, m):
    return _row_logps(head(h), None, tgt, m)[0]

  zero = jnp.zeros(hidden.shape[:1], jnp.float32)
  return _sum_chunks(chunk, mask, (hidden, targets, mask), zero, chunk_size)


def fused_sequence_logps(hidden, head_params, head_fn: Callable, labels, *,
                         chunk_size: int = 256) -> jax.Array:
  """`sequence_logps` (summed, [batch]) with the LM head fused in (see `fused_distillation`): the
  forward pass computes each row's log-prob gradient with respect to its hidden states, and the
  backward pass scales row b by its cotangent. The head weights' gradient mixes the rows by their
  cotangents, which the forward pass does not know: when the head is being differentiated, the
  backward pass runs the head again over the chunks for it (the preference stage trains the FFNs and
  the projector, so its head is frozen and this never runs)."""
  targets, mask = next_token_targets(labels)
  zeros = (jnp.zeros(hidden.shape[:1], jnp.float32),)
  kw = dict(size=chunk_size, zeros=zeros)

  @jax.custom_vjp
  def run(hp, h):
    return _fused_sum(_row_logps, head_fn, hp, h, mask, (targets, mask), None, head_grad=False,
                      hidden_grad=False, **kw)[0][0]

  def fwd(hp, h):
    head_grad = any(leaf.perturbed for leaf in jax.tree.leaves(hp))
    hp_v = jax.tree.map(lambda leaf: leaf.value, hp)
    out, g_h, _ = _fused_sum(_row_logps, head_fn, hp_v, h.value, mask, (targets, mask), None,
                             head_grad=False, hidden_grad=h.perturbed, **kw)
    return out[0], (g_h, hp_v if head_grad else None, h.value if head_grad else None)

  def bwd(res, ct):
    g_h, hp_v, h_v = res
    if isinstance(ct, jax.custom_derivatives.SymbolicZero):
      return None, None
    d_h = None if g_h is None else (g_h * ct[:, None, None]).astype(g_h.dtype)
    d_hp = None
    if hp_v is not None:
      d_hp = jax.grad(lambda hp: jnp.sum(ct * chunked_sequence_logps(
          h_v, lambda x: head_fn(hp, x), labels, chunk_size=chunk_size)))(hp_v)
    return d_hp, d_h

  run.defvjp(fwd, bwd, symbolic_zeros=True)
  return run(head_params, hidden)


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
