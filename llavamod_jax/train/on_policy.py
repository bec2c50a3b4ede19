"""On-policy distillation (GKD, Agarwal et al. 2024): on a fraction of the steps the student answers
the batch's prompts itself and the mimic step distils the teacher's distribution on those answers.

With `loss.on_policy_fraction` = lambda > 0, each step draws u from a generator seeded by (seed, step)
(so a resumed run draws the same) and when u < lambda replaces the batch's responses by the
student's samples (temperature 1, the KV-cache sampler, `loss.on_policy_max_new_tokens` at most):
row r keeps its prompt (the tokens before its first trained one: a multi-turn record keeps its
first question and is answered once) and its images; its labels become the sampled tokens, up to and
including EOS, cut to the row's length. The batch carries `on_policy` [B] (1 on sampled rows): the
step computes the KL there as everywhere and leaves those rows out of the CE, since a student's own
sample is no target.
"""

from __future__ import annotations

import jax
import numpy as np

from llavamod_jax import generate
from llavamod_jax.data.templates import IGNORE


def draw(seed: int, step: int, fraction: float) -> bool:
  """Whether step `step` (0-based, the step about to run) trains on the student's samples."""
  return fraction > 0 and np.random.default_rng([seed, step, 0x6B64]).random() < fraction


def sampled_batch(student, params, batch: dict, *, rng, eos_token_id, pad_token_id: int,
                  max_new_tokens: int) -> dict:
  """`batch` (a host batch of the student's view) with each row's response replaced by a sample of
  the student: see the module docstring. Rows without a trained token are kept as they are."""
  ids, labels = np.asarray(batch["input_ids"]), np.asarray(batch["labels"])
  b, length = ids.shape
  trained = labels != IGNORE
  answered = trained.any(axis=1)
  first = np.where(answered, trained.argmax(axis=1), length)  # prompt length of each row
  # Prompts left-padded to the row length (one compiled sampler for every batch); a row with no
  # response gets a one-token stand-in prompt and its sample is dropped.
  prompts = np.full((b, length), pad_token_id, np.int32)
  mask = np.zeros((b, length), np.int32)
  for r in range(b):
    n = first[r] if answered[r] else 1
    prompts[r, length - n:] = ids[r, :n] if answered[r] else pad_token_id
    mask[r, length - n:] = 1
  pixels = batch.get("pixel_values")
  if pixels is not None:
    pixels = np.asarray(pixels)[np.asarray(batch["image_mask"], bool)]  # in row order
  out = generate.generate(student, params, prompts, mask, pixels, max_new_tokens=max_new_tokens,
                          temperature=1.0, eos_token_id=eos_token_id, pad_token_id=pad_token_id,
                          rng=rng)
  tokens, lengths = np.asarray(jax.device_get(out.tokens)), np.asarray(jax.device_get(out.lengths))
  new_ids = ids.copy()
  new_labels = np.full_like(labels, IGNORE)
  new_mask = np.asarray(batch["attention_mask"]).copy()
  for r in np.flatnonzero(answered):
    p = first[r]
    n = min(int(lengths[r]), length - p)
    new_ids[r, p:] = pad_token_id
    new_ids[r, p:p + n] = tokens[r, :n]
    new_labels[r, p:p + n] = tokens[r, :n]
    new_mask[r, p:] = 0
    new_mask[r, :p + n] = 1
  keep = {k: v for k, v in batch.items() if not k.startswith("teacher_")}
  return {**keep, "input_ids": new_ids, "labels": new_labels, "attention_mask": new_mask,
          "on_policy": answered.astype(np.int32)}


def off_policy(batch: dict) -> dict:
  """`batch` as it is, marked as data (`on_policy` 0): every batch of a run with a nonzero fraction
  has the same arrays, so the step compiles once."""
  return {**batch, "on_policy": np.zeros((batch["input_ids"].shape[0],), np.int32)}
