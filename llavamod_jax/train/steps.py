"""Jit-compiled train and eval steps: sft (CE), mimic (KL to the teacher), preference (DPO family).

A step is `state, metrics = step(state, batch, teacher_params)`; the train state is donated, so its
buffers are reused for the new state. Inside one jit: the teacher's forward (no gradient), the
student's forward and backward over the trainable parameters only, gradient accumulation over
micro-batches, the optimizer update. A step whose loss or gradient is not finite leaves the state
unchanged and reports `skipped=1`; the loop decides whether to stop. A step runs on the mesh its
placed arguments live on, inside the sharding rules context (`sharding.on_argument_mesh`), so the
models' activation constraints take effect.

Batch (arrays, leading dim = global batch): `input_ids`, `attention_mask`, `labels` [B, S]
(`losses.IGNORE` where not trained), optional `pixel_values` [B * images_per_sample, H, W, 3] with
`image_mask` [B * images_per_sample] (row r owns its images_per_sample slots; see `Llava.embed`).
The teacher reads the same arrays unless `teacher_input_ids` / `teacher_attention_mask` /
`teacher_labels` / `teacher_pixel_values` are given (e.g. a different image-token count); response
positions are then paired in order. Preference batches hold the chosen rows then the rejected rows
(2B rows, same prompts); `reference_logps` [2B] may be precomputed, else the teacher computes them.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.struct
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from llavamod_jax import losses, models, moe, sharding
from llavamod_jax.train.config import LossConfig
from llavamod_jax.train.optim import merge, partition

__all__ = ["LossConfig", "TrainState", "init_state", "loss_fn", "make_eval_step", "make_train_step"]


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any  # trainable parameters (nested dict)
  frozen: Any  # everything else; no gradient, no optimizer state
  opt_state: Any
  rng: jax.Array

  def full_params(self):
    return merge(self.params, self.frozen)


def init_state(params, patterns, tx: optax.GradientTransformation, seed: int = 0) -> TrainState:
  trainable, frozen = partition(params, patterns)
  return TrainState(step=jnp.int32(0), params=trainable, frozen=frozen, opt_state=tx.init(trainable),
                    rng=jax.random.key(seed))


# ---------------------------------------------------------------------------------------------
# Forward passes.
# ---------------------------------------------------------------------------------------------


def _moe_metrics(moe_state) -> dict[str, jax.Array]:
  s = moe.stats(moe_state)  # [moe layers, ...] in either parameter layout
  if not s:
    return {}
  load = s["tokens_per_expert"] / jnp.maximum(jnp.sum(s["tokens_per_expert"], -1, keepdims=True), 1)
  return {
      "moe/max_expert_load": jnp.mean(jnp.max(load, -1)),
      "moe/fraction_dropped": jnp.mean(s["fraction_dropped"]),
      "moe/router_entropy": jnp.mean(s["router_entropy"]),
  }


def _aux_terms(moe_state, cfg: LossConfig):
  aux = moe.aux_losses(moe_state)
  return (cfg.aux_coef * aux["load_balancing_loss"] + cfg.z_coef * aux["z_loss"],
          {"aux": aux["load_balancing_loss"], "z_loss": aux["z_loss"]})


# ---------------------------------------------------------------------------------------------
# Losses of each step kind: fn(params, teacher_params, batch, rng, train) -> (loss, metrics).
# ---------------------------------------------------------------------------------------------


def sft_loss(student, cfg: LossConfig):
  def fn(params, teacher_params, batch, rng, train):
    del teacher_params
    chunked = cfg.chunk_size > 0  # no full-vocabulary logits (bench/mimic_memory.py)
    out, moe_state = models.forward(student, params, batch, train=train, rng=rng,
                                    logits=not chunked)
    if chunked and cfg.fused:
      targets, mask = losses.next_token_targets(batch["labels"])
      ce = losses.fused_cross_entropy(out.hidden_states, *models.lm_head(student, params), targets,
                                      mask, chunk_size=cfg.chunk_size)
    elif chunked:
      head = lambda h: student.apply({"params": params}, h, method=student.logits)  # noqa: E731
      targets, mask = losses.next_token_targets(batch["labels"])
      ce = losses.chunked_cross_entropy(out.hidden_states, head, targets, mask,
                                        chunk_size=cfg.chunk_size)
    else:
      ce = losses.cross_entropy(out.logits, batch["labels"])
    aux, aux_metrics = _aux_terms(moe_state, cfg)
    loss = ce + aux
    return loss, {"loss": loss, "ce": ce, **aux_metrics, **_moe_metrics(moe_state)}
  return fn


def mimic_loss(student, teacher, cfg: LossConfig):
  """KL (`cfg.objective`) to the teacher in memory, or, with `teacher=None`, to its stored top-k
  logits that the batch carries (`teacher_topk_logits`, `teacher_topk_ids` [B, S, k],
  `teacher_logsumexp` [B, S], at the student's distilled positions; data.teacher_logits)."""
  vocab = cfg.vocab_size or None
  div_kw = dict(temperature=cfg.temperature, objective=losses.objective_of(cfg.objective,
                                                                            cfg.reverse_kl),
                alpha=cfg.skew_alpha, beta=cfg.jsd_beta)

  def fn(params, teacher_params, batch, rng, train):
    chunked = cfg.chunk_size > 0
    offline = teacher is None
    if not offline:
      t_out, _ = models.forward(teacher, teacher_params, batch, "teacher_", logits=not chunked)
    s_out, moe_state = models.forward(student, params, batch, train=train, rng=rng,
                                      logits=not chunked)
    labels = batch["labels"]
    kl_mask = losses.distill_mask(labels, cfg.shift_mask)
    targets, ce_mask = losses.next_token_targets(labels)
    metrics = {}
    if "on_policy" in batch:  # the student's own samples are distilled, never CE targets
      sampled = batch["on_policy"].astype(bool)
      ce_mask = ce_mask & ~sampled[:, None]
      metrics["on_policy"] = jnp.mean(sampled.astype(jnp.float32))
    s_repr = s_out.hidden_states if chunked else s_out.logits
    aligned = offline or "teacher_labels" not in batch
    if offline:
      topk = (batch["teacher_topk_logits"], batch["teacher_topk_ids"], batch["teacher_logsumexp"])
      s_kl, kl_mask_kl = s_repr, kl_mask
    else:
      t_repr = jax.lax.stop_gradient(t_out.hidden_states if chunked else t_out.logits)
      if aligned:
        s_kl, kl_mask_kl = s_repr, kl_mask
      else:  # different prompt lengths: pair the response positions of both, in order
        s_kl, t_repr, kl_mask_kl = losses.pair_positions(
            s_repr, kl_mask, t_repr, losses.distill_mask(batch["teacher_labels"], cfg.shift_mask))
    fused = None  # the fused losses' differentiable kl_weight * kl + ce_weight * ce
    if chunked and cfg.fused:
      s_head = models.lm_head(student, params)
      with_ce = bool(cfg.ce_weight) and aligned  # one pass computes both when positions line up
      ce_mask_kl = ce_mask if with_ce else jnp.zeros_like(ce_mask)
      weights = dict(kl_weight=cfg.kl_weight, ce_weight=cfg.ce_weight if with_ce else 0.0,
                     chunk_size=cfg.chunk_size, vocab_size=vocab, **div_kw)
      if offline:
        out = losses.fused_topk_distillation(s_kl, *s_head, *topk, kl_mask_kl, targets, ce_mask_kl,
                                             **weights)
      else:
        out = losses.fused_distillation(s_kl, *s_head, t_repr, *models.lm_head(teacher, teacher_params),
                                        kl_mask_kl, targets, ce_mask_kl, **weights)
      fused, kl, ce = out["loss"], out["kl"], out["ce"] if with_ce else None
      if cfg.ce_weight and not with_ce:
        ce = losses.fused_cross_entropy(s_out.hidden_states, *s_head, targets, ce_mask,
                                        chunk_size=cfg.chunk_size)
        fused = fused + cfg.ce_weight * ce
    elif chunked:
      head_s = lambda h: student.apply({"params": params}, h, method=student.logits)  # noqa: E731
      with_ce = bool(cfg.ce_weight) and aligned  # one pass computes both when positions line up
      ce_mask_kl = ce_mask if with_ce else jnp.zeros_like(ce_mask)
      if offline:
        out = losses.chunked_topk_distillation(s_kl, head_s, *topk, kl_mask_kl, targets, ce_mask_kl,
                                               chunk_size=cfg.chunk_size, vocab_size=vocab, **div_kw)
      else:
        head_t = lambda h: teacher.apply({"params": teacher_params}, h, method=teacher.logits)  # noqa
        out = losses.chunked_distillation(s_kl, t_repr, head_s, head_t, kl_mask_kl, targets,
                                          ce_mask_kl, chunk_size=cfg.chunk_size, vocab_size=vocab,
                                          **div_kw)
      kl = out["kl"]
      if with_ce:
        ce = out["ce"]
      elif cfg.ce_weight:
        ce = losses.chunked_cross_entropy(s_out.hidden_states, head_s, targets, ce_mask,
                                          chunk_size=cfg.chunk_size)
      else:
        ce = None
    else:
      if offline:
        kl = losses.topk_kl(s_kl[..., :vocab] if vocab else s_kl, *topk, kl_mask_kl, **div_kw)
      else:
        kl = losses.distillation_loss(s_kl, t_repr, kl_mask_kl, vocab_size=vocab, **div_kw)
      ce = jnp.sum(-losses.token_logps(s_out.logits, targets) * ce_mask) / jnp.maximum(
          jnp.sum(ce_mask.astype(jnp.float32)), 1.0)  # = losses.cross_entropy off-policy
    aux, aux_metrics = _aux_terms(moe_state, cfg)
    if fused is not None:
      loss = fused + aux
    else:
      loss = cfg.kl_weight * kl + aux + (cfg.ce_weight * ce if ce is not None else 0.0)
    if ce is not None:
      metrics["ce"] = ce
    return loss, {"loss": loss, "kl": kl, **metrics, **aux_metrics, **_moe_metrics(moe_state)}
  return fn


def _sequence_logps(model, params, out, labels, cfg: LossConfig):
  """Summed log-probs of each row's trained tokens: from full logits, or chunk by chunk from the
  final hidden states (chunk_size > 0; fused or checkpointed chunks)."""
  if not cfg.chunk_size:
    return losses.sequence_logps(out.logits, labels)
  if cfg.fused:
    return losses.fused_sequence_logps(out.hidden_states, *models.lm_head(model, params), labels,
                                       chunk_size=cfg.chunk_size)
  head = lambda h: model.apply({"params": params}, h, method=model.logits)  # noqa: E731
  return losses.chunked_sequence_logps(out.hidden_states, head, labels, chunk_size=cfg.chunk_size)


def preference_loss(student, teacher, cfg: LossConfig):
  chunked = cfg.chunk_size > 0

  def fn(params, teacher_params, batch, rng, train):
    s_out, moe_state = models.forward(student, params, batch, train=train, rng=rng,
                                      logits=not chunked)
    policy = _sequence_logps(student, params, s_out, batch["labels"], cfg)
    if "reference_logps" in batch:
      reference = batch["reference_logps"]
    else:
      t_out, _ = models.forward(teacher, teacher_params, batch, "teacher_", train=False,
                                logits=not chunked)
      reference = _sequence_logps(teacher, teacher_params, t_out,
                                  batch.get("teacher_labels", batch["labels"]), cfg)
    reference = jax.lax.stop_gradient(reference)
    half = policy.shape[0] // 2
    pref, metrics = losses.preference_loss(policy[:half], policy[half:], reference[:half],
                                           reference[half:], beta=cfg.beta, loss_type=cfg.loss_type,
                                           label_smoothing=cfg.label_smoothing)
    aux, aux_metrics = _aux_terms(moe_state, cfg)
    loss = pref + aux
    return loss, {"loss": loss, "preference": pref, **metrics, **aux_metrics,
                  **_moe_metrics(moe_state)}
  return fn


LOSSES = {"sft": sft_loss, "mimic": mimic_loss, "preference": preference_loss}


def loss_fn(kind: str, student, teacher, cfg: LossConfig) -> Callable:
  if kind not in LOSSES:
    raise ValueError(f"step kind {kind!r}: expected one of {sorted(LOSSES)}")
  return LOSSES[kind](student, cfg) if kind == "sft" else LOSSES[kind](student, teacher, cfg)


# ---------------------------------------------------------------------------------------------
# Steps.
# ---------------------------------------------------------------------------------------------


def _micro_batches(batch, n: int):
  """Split every array's leading axis into [n, size / n, ...], micro-batch i = rows [i*size/n, ...).

  The rows of each micro-batch are resharded over the batch's mesh axes (`activation_batch`): as the
  batch arrives, each device holds a contiguous block of rows, which after the split lies on the
  micro-batch axis, so every device would compute every row of a micro-batch (measured on v5e-8 for
  the adaptor stage at 2,048 tokens: 17 GiB of temporaries per chip instead of 5). The reshard moves
  the input rows once per step; a no-op outside a mesh and rules context."""
  def split(x):
    if x.shape[0] % n:
      raise ValueError(f"batch dimension {x.shape[0]} is not divisible by grad_accum_steps={n}")
    x = x.reshape(n, x.shape[0] // n, *x.shape[1:])
    return nn.with_logical_constraint(x, (None, "activation_batch") + (None,) * (x.ndim - 2))
  return jax.tree.map(split, batch)


def make_train_step(kind: str, student, teacher, tx: optax.GradientTransformation,
                    cfg: LossConfig = LossConfig(), *, grad_accum_steps: int = 1,
                    schedule: optax.Schedule | None = None):
  """A jitted `step(state, batch, teacher_params) -> (state, metrics)` (state donated)."""
  loss = loss_fn(kind, student, teacher, cfg)
  router_noise = getattr(student.cfg, "text", student.cfg).router_noise == "gumbel"

  def grads_of(trainable, frozen, teacher_params, batch, rng):
    def f(p):
      return loss(merge(p, frozen), teacher_params, batch, rng if router_noise else None, True)
    (_, metrics), grads = jax.value_and_grad(f, has_aux=True)(trainable)
    return grads, metrics

  def step(state: TrainState, batch, teacher_params):
    rng, step_rng = jax.random.split(state.rng)
    if grad_accum_steps == 1:
      grads, metrics = grads_of(state.params, state.frozen, teacher_params, batch, step_rng)
    else:
      if kind == "preference":
        batch = _interleave_halves(batch, grad_accum_steps)
      micro = _micro_batches(batch, grad_accum_steps)

      def body(acc, xs):
        mb, i = xs
        g, m = grads_of(state.params, state.frozen, teacher_params, mb, jax.random.fold_in(step_rng, i))
        return jax.tree.map(jnp.add, acc, (g, m)), None

      zeros = jax.eval_shape(lambda: grads_of(state.params, state.frozen, teacher_params,
                                              jax.tree.map(lambda x: x[0], micro), step_rng))
      zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), zeros)
      (grads, metrics), _ = jax.lax.scan(body, zeros, (micro, jnp.arange(grad_accum_steps)))
      grads, metrics = jax.tree.map(lambda x: x / grad_accum_steps, (grads, metrics))
    grad_norm = optax.global_norm(grads)
    ok = jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)  # noqa: E731
    new_state = state.replace(step=state.step + ok.astype(jnp.int32), params=keep(params, state.params),
                              opt_state=keep(opt_state, state.opt_state), rng=rng)
    metrics = {**metrics, "grad_norm": grad_norm, "skipped": (~ok).astype(jnp.int32)}
    if schedule is not None:
      metrics["learning_rate"] = schedule(state.step)
    return new_state, metrics

  return sharding.on_argument_mesh(jax.jit(step, donate_argnums=(0,)))


def _interleave_halves(batch, n: int):
  """Preference rows [chosen (n x m), rejected (n x m)] -> [chosen m, rejected m] x n, so that equal
  micro-batches each keep their chosen half first and their rejected half second."""
  def reorder(x):
    y = x.reshape(2, n, x.shape[0] // (2 * n), *x.shape[1:])
    return jnp.swapaxes(y, 0, 1).reshape(x.shape)
  return jax.tree.map(reorder, batch)


def make_eval_step(kind: str, student, teacher, cfg: LossConfig = LossConfig(), *,
                   rng: jax.Array | None = None):
  """A jitted `metrics = eval_step(params, batch, teacher_params)` (no update, train=False).

  `rng` is needed only by a student with Gumbel router noise (the original adds it at eval too).
  """
  loss = loss_fn(kind, student, teacher, cfg)
  return sharding.on_argument_mesh(jax.jit(lambda params, batch, teacher_params: loss(
      params, teacher_params, batch, rng, False)[1]))
