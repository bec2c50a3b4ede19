"""Autoregressive generation with the functional KV cache, as one jitted function.

One prefill writes the (left-padded) prompt into a cache of length prompt_len + max_new_tokens, then
a `lax.while_loop` feeds one token at a time and stops as soon as every sequence has emitted EOS.
Positions and masks follow transformers' `generate` (position = cumsum(mask) - 1, pads at 0; new
tokens continue from the row's count of real prompt tokens), so greedy tokens match it exactly.

Works for `DecoderLM` and `Llava`, which share one call signature and a `logits(hidden_states)`
method; only Llava's prefill gets pixel_values (channels-last [images, H, W, 3]); decode steps pass
None, so a generated image token id is embedded as text, as transformers does.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from llavamod_jax.models.llm import init_cache


@flax.struct.dataclass
class GenerateOutput:
  tokens: Any  # [batch, max_new_tokens] int32; pad_token_id after a row's EOS (EOS itself kept)
  lengths: Any  # [batch] generated tokens per row, up to and including its EOS


def generate(model, params, input_ids, attention_mask=None, pixel_values=None, *,
             max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0, eos_token_id=None,
             pad_token_id: int = 0, rng=None) -> GenerateOutput:
  """Greedy (temperature 0) or temperature + nucleus sampling; prompts must be left-padded."""
  input_ids = jnp.asarray(input_ids, jnp.int32)
  if attention_mask is None:
    attention_mask = jnp.ones_like(input_ids)
  mask = np.asarray(attention_mask)
  if mask.shape != input_ids.shape:
    raise ValueError(f"attention_mask has shape {mask.shape}, "
                     f"expected input_ids' shape {input_ids.shape}")
  # The last prompt slot is where the first token's logits come from, so it must be real.
  if not mask[:, -1].all():
    raise ValueError("generate expects left-padded prompts (attention_mask[:, -1] all ones); "
                     f"rows {np.flatnonzero(mask[:, -1] == 0).tolist()} end in padding")
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
  if temperature < 0 or not 0 < top_p <= 1:
    raise ValueError(f"need temperature >= 0 and 0 < top_p <= 1, got {temperature}, {top_p}")
  # EOS ids as a [vocab] mask: one compiled program whatever the ids or their count.
  vocab = getattr(model.cfg, "text", model.cfg).vocab_size
  eos = np.zeros(vocab, bool)
  if eos_token_id is not None:
    eos_ids = np.atleast_1d(eos_token_id).astype(np.int64)
    if ((eos_ids < 0) | (eos_ids >= vocab)).any():
      raise ValueError(f"eos_token_id {eos_token_id} outside the model's vocabulary [0, {vocab})")
    eos[eos_ids] = True
  rng = jax.random.PRNGKey(0) if rng is None else rng
  pixel_values = None if pixel_values is None else jnp.asarray(pixel_values)
  return _generate(model, params, input_ids, jnp.asarray(mask, jnp.int32), pixel_values, rng,
                   jnp.float32(temperature), jnp.float32(top_p), jnp.asarray(eos),
                   jnp.int32(pad_token_id), max_new_tokens=int(max_new_tokens),
                   greedy=temperature == 0)


def sample_logits(logits, rng, temperature, top_p, greedy: bool):
  """Next tokens [batch] from logits [batch, vocab]: argmax, or temperature then top-p sampling.

  The nucleus keeps a token when the probability mass ranked strictly above it is < top_p, the rule
  of transformers' TopPLogitsWarper (the top token is always kept); tokens tied with the last kept
  one are kept too, where transformers breaks the tie by sort order.
  """
  if greedy:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits.astype(jnp.float32) / temperature
  ranked = jnp.sort(logits, axis=-1)[:, ::-1]  # [batch, vocab], descending
  probs = jax.nn.softmax(ranked, axis=-1)
  mass_above = jnp.cumsum(probs, axis=-1) - probs
  # top_p == 1 keeps everything even if rounding pushes mass_above of a tiny tail to 1.
  keep = (mass_above < top_p) | (top_p >= 1.0)
  cutoff = jnp.min(jnp.where(keep, ranked, jnp.inf), axis=-1, keepdims=True)
  logits = jnp.where(logits >= cutoff, logits, -jnp.inf)
  return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


def _last_logits(module, input_ids, mask, positions, cache, index, pixel_values):
  """One forward through the cache; the LM head runs on the last position only."""
  out = module(input_ids, pixel_values, mask, positions, cache=cache, cache_index=index,
               compute_logits=False)
  return module.logits(out.hidden_states[:, -1]).astype(jnp.float32), out.cache


# Only what changes the program is static: the model (a hashable Flax module), the output length
# and greedy vs sampling, so jax's cache compiles once per (model, shapes, those two); temperature,
# top_p, the EOS mask and the pad id are traced values.
@functools.partial(jax.jit, static_argnames=("model", "max_new_tokens", "greedy"))
def _generate(model, params, input_ids, mask, pixel_values, rng, temperature, top_p, eos,
              pad_token_id, *, max_new_tokens, greedy):
  batch, prompt_len = input_ids.shape
  text_cfg = getattr(model.cfg, "text", model.cfg)
  variables = {"params": params}

  # Generated slots are all valid; causality keeps a query from seeing slots not yet written.
  cache_mask = jnp.concatenate([mask, jnp.ones((batch, max_new_tokens), jnp.int32)], axis=1)
  positions = jnp.where(mask == 1, jnp.cumsum(mask, axis=1) - 1, 0)
  prompt_real = jnp.sum(mask, axis=1)  # [batch]; the first new token's position

  def pick(logits, step, done):
    token = sample_logits(logits, jax.random.fold_in(rng, step), temperature, top_p, greedy)
    token = jnp.where(done, pad_token_id, token)
    return token, done | eos[token]

  cache = init_cache(text_cfg, batch, prompt_len + max_new_tokens)
  logits, cache = model.apply(variables, input_ids, cache_mask, positions, cache, 0, pixel_values,
                              method=_last_logits)
  token, done = pick(logits, 0, jnp.zeros((batch,), bool))
  tokens = jnp.full((batch, max_new_tokens), pad_token_id, jnp.int32).at[:, 0].set(token)
  lengths = jnp.ones((batch,), jnp.int32)

  def cond(state):
    step, _, _, done, _ = state
    return (step < max_new_tokens) & ~jnp.all(done)

  def body(state):
    step, tokens, lengths, done, cache = state
    prev = jax.lax.dynamic_slice_in_dim(tokens, step - 1, 1, axis=1)  # [batch, 1]
    position = (prompt_real + step - 1)[:, None]
    logits, cache = model.apply(variables, prev, cache_mask, position, cache, prompt_len + step - 1,
                                None, method=_last_logits)
    lengths = lengths + ~done
    token, done = pick(logits, step, done)
    tokens = jax.lax.dynamic_update_slice_in_dim(tokens, token[:, None], step, axis=1)
    return step + 1, tokens, lengths, done, cache

  _, tokens, lengths, _, _ = jax.lax.while_loop(cond, body, (1, tokens, lengths, done, cache))
  return GenerateOutput(tokens=tokens, lengths=lengths)
