"""Generation: KV-cache decoding against full forwards, tokens against transformers' `generate`."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tiny_hf
from llavamod_jax import generate as gen
from llavamod_jax import hf, moe
from llavamod_jax.models.llm import init_cache

PADS = (0, 3, 5)  # left pads per prompt row
PROMPT_LEN = 7
NEW = 8


@pytest.fixture(scope="module")
def models(torch, tmp_path_factory):
  """name -> (transformers model, our module, params), tiny and random."""
  out = {}
  for name, build in [("qwen2", lambda: tiny_hf.causal_lm("qwen2")),
                      ("llama", lambda: tiny_hf.causal_lm("llama")),
                      ("llava", lambda: tiny_hf.llava("clip", "qwen2"))]:
    ref = build()  # tiny_hf sharpens q/k so position and mask mistakes show in the tokens
    out[name] = (ref, *hf.load(tiny_hf.save(ref, tmp_path_factory.mktemp(name))))
  return out


def prompts(name, model, seed=0):
  """Left-padded batch: input_ids, attention_mask [batch, seq], pixel_values or None."""
  rng = np.random.default_rng(seed)
  n_img = model.cfg.num_image_tokens if name == "llava" else 0
  length = PROMPT_LEN + n_img
  ids = rng.integers(3, 100, (len(PADS), length))
  mask = (np.arange(length)[None] >= np.asarray(PADS)[:, None]).astype(np.int64)
  ids[mask == 0] = 0
  if not n_img:
    return ids, mask, None
  for row, pad in enumerate(PADS):  # one image per row, placed right after the padding
    ids[row, pad + 1:pad + 1 + n_img] = tiny_hf.IMAGE_TOKEN
  return ids, mask, rng.standard_normal((len(PADS), 28, 28, 3)).astype(np.float32)


def positions(mask):
  """transformers' generate: cumsum(mask) - 1, padding at 0."""
  return np.where(mask == 1, np.cumsum(mask, axis=1) - 1, 0)


@functools.partial(jax.jit, static_argnums=0)
def apply(model, params, ids, pix, **kw):
  return model.apply({"params": params}, ids, pix, **kw)


def hf_generate(ref, ids, mask, pix, eos, pad=0):
  """transformers' greedy tokens padded to NEW with `pad`, and the smallest top-2 logit gap."""
  import torch

  kw = {} if pix is None else {"pixel_values": torch.as_tensor(pix.transpose(0, 3, 1, 2).copy())}
  with torch.no_grad():
    out = ref.generate(torch.as_tensor(ids), attention_mask=torch.as_tensor(mask), do_sample=False,
                       max_new_tokens=NEW, eos_token_id=eos, pad_token_id=pad, output_scores=True,
                       return_dict_in_generate=True, **kw)
  tokens = np.full((len(ids), NEW), pad)
  new = out.sequences[:, ids.shape[1]:].numpy()
  tokens[:, :new.shape[1]] = new
  top2 = np.sort(torch.stack(out.scores, 1).float().numpy(), axis=-1)[..., -2:]
  return tokens, float(np.min(top2[..., 1] - top2[..., 0]))


@pytest.mark.parametrize("name", ["qwen2", "llava"])
def test_cache_decoding_matches_full_forward(models, name):
  _, model, params = models[name]
  ids, mask, pix = prompts(name, model)
  batch, length = ids.shape
  fed = np.random.default_rng(1).integers(3, 100, (batch, NEW))  # no image token ids
  cache_mask = jnp.asarray(np.concatenate([mask, np.ones_like(fed)], axis=1))

  out = apply(model, params, ids, pix, attention_mask=cache_mask, position_ids=positions(mask),
              cache=init_cache(getattr(model.cfg, "text", model.cfg), batch, length + NEW),
              cache_index=0)
  prefill, cached, cache = out.logits, [out.logits[:, -1]], out.cache
  for k in range(NEW - 1):
    pos = mask.sum(axis=1, keepdims=True) + k
    out = apply(model, params, fed[:, k:k + 1], None, attention_mask=cache_mask, position_ids=pos,
                cache=cache, cache_index=length + k)
    cached.append(out.logits[:, -1])
    cache = out.cache

  full_ids = np.concatenate([ids, fed], axis=1)
  full_mask = np.asarray(cache_mask)
  full = apply(model, params, full_ids, pix, attention_mask=full_mask,
               position_ids=positions(full_mask)).logits
  assert tiny_hf.rel_err(np.stack(cached, 1), full[:, length - 1:-1]) <= 1e-5
  # The prefill's logits at the prompt's real tokens too (padding rows attend to nothing).
  real = mask.astype(bool)
  assert tiny_hf.rel_err(np.asarray(prefill)[real], np.asarray(full[:, :length])[real]) <= 1e-5


def test_llava_decodes_generated_image_token_as_text(models):
  """A decode step may emit the image token id; transformers then embeds it as an ordinary token."""
  import torch

  ref, model, params = models["llava"]
  ids, _, pix = prompts("llava", model)
  ids, pix = ids[:1], pix[:1]
  length = ids.shape[1]
  with torch.no_grad():
    pre = ref(input_ids=torch.as_tensor(ids), use_cache=True,
              pixel_values=torch.as_tensor(pix.transpose(0, 3, 1, 2).copy()))
    want = ref(input_ids=torch.tensor([[tiny_hf.IMAGE_TOKEN]]), past_key_values=pre.past_key_values,
               attention_mask=torch.ones(1, length + 1, dtype=torch.long)).logits[:, -1].numpy()
  mask = jnp.ones((1, length + 1), jnp.int32)
  out = apply(model, params, ids, pix, attention_mask=mask, cache_index=0,
              cache=init_cache(model.cfg.text, 1, length + 1))
  got = apply(model, params, jnp.array([[tiny_hf.IMAGE_TOKEN]]), None, attention_mask=mask,
              cache=out.cache, cache_index=length)
  assert tiny_hf.rel_err(got.logits[:, -1], want) <= 1e-5


@pytest.mark.parametrize("name", ["qwen2", "llama", "llava"])
def test_greedy_matches_transformers(models, name):
  ref, model, params = models[name]
  ids, mask, pix = prompts(name, model)
  eos = ref.generation_config.eos_token_id  # LLaMA's config has one (2), Qwen2's none
  want, gap = hf_generate(ref, ids, mask, pix, eos)
  # Logits agree to ~1e-6; a smaller top-2 gap would make the comparison a coin toss.
  assert gap > 1e-4, f"near-tie in the reference ({gap}); pick another seed"
  out = gen.generate(model, params, ids, mask, pix, max_new_tokens=NEW, eos_token_id=eos)
  np.testing.assert_array_equal(out.tokens, want)


def test_upcycled_moe_generates_the_dense_tokens(models):
  """An upcycled student computes what the dense model does, through the cache and the loop too."""
  _, model, params = models["qwen2"]
  ids, mask, _ = prompts("qwen2", model)
  dense = gen.generate(model, params, ids, mask, max_new_tokens=NEW).tokens
  moe_model, moe_params = moe.upcycle(model, params, num_experts=4, top_k=2, layers="all")
  out = gen.generate(moe_model, moe_params, ids, mask, max_new_tokens=NEW)
  np.testing.assert_array_equal(out.tokens, dense)


def expected_lengths(tokens, eos):
  hit = np.isin(tokens, eos)
  return np.where(hit.any(axis=1), hit.argmax(axis=1) + 1, tokens.shape[1])


def test_eos_stops_and_pads_like_transformers(models):
  ref, model, params = models["qwen2"]
  ids, mask, _ = prompts("qwen2", model)
  greedy = np.asarray(gen.generate(model, params, ids, mask, max_new_tokens=NEW).tokens)
  eos = int(greedy[0, 2])
  assert eos not in greedy[0, :2]
  lengths = expected_lengths(greedy, [eos])
  assert len(set(lengths.tolist())) > 1, "the EOS should end rows at different steps"
  for eos_ids, pad in [(eos, 0), ([eos, int(greedy[1, 1])], 7),
                       (sorted(set(greedy[:, 0].tolist())), 0)]:  # last: all rows end at step 0
    want, _ = hf_generate(ref, ids, mask, None, eos_ids, pad=pad)
    out = gen.generate(model, params, ids, mask, max_new_tokens=NEW, eos_token_id=eos_ids,
                       pad_token_id=pad)
    np.testing.assert_array_equal(out.tokens, want)
    np.testing.assert_array_equal(out.lengths, expected_lengths(greedy, eos_ids))
    for row, n in enumerate(np.asarray(out.lengths)):
      assert (np.asarray(out.tokens)[row, n:] == pad).all()


def nucleus(logits, temperature, top_p):
  """numpy: tokens whose higher-ranked probability mass is < top_p, and the renormalized probs."""
  z = logits.astype(np.float64) / temperature
  probs = np.exp(z - z.max())
  probs /= probs.sum()
  order = np.argsort(-probs, kind="stable")
  above = np.cumsum(probs[order]) - probs[order]
  kept = order[above < top_p]
  renorm = np.zeros_like(probs)
  renorm[kept] = probs[kept] / probs[kept].sum()
  return kept, renorm, np.min(np.abs(above - top_p))


def test_sampling(models):
  ref, model, params = models["qwen2"]
  ids, mask, _ = prompts("qwen2", model)
  greedy = gen.generate(model, params, ids, mask, max_new_tokens=NEW).tokens
  key = jax.random.PRNGKey(3)

  tiny_p = gen.generate(model, params, ids, mask, max_new_tokens=NEW, temperature=0.8, top_p=1e-6,
                        rng=key)
  np.testing.assert_array_equal(tiny_p.tokens, greedy)

  def sample(seed, temperature=1.0, top_p=1.0):
    out = gen.generate(model, params, ids, mask, max_new_tokens=NEW, temperature=temperature,
                       top_p=top_p, rng=jax.random.PRNGKey(seed))
    return np.asarray(out.tokens)

  np.testing.assert_array_equal(sample(3), sample(3))
  assert (sample(3) != sample(4)).any()
  # Every step draws fresh randomness: near-uniform sampling does not repeat one token along a row.
  assert all(len(set(row)) > 1 for row in sample(5, temperature=1e6).tolist())

  # First tokens over many seeds stay inside the nucleus computed from transformers' logits.
  temperature, top_p = 0.7, 0.5
  first = tiny_hf.torch_logits(ref, ids, mask, position_ids=positions(mask))[:, -1]
  seen = np.stack([sample(s, temperature, top_p)[:, 0] for s in range(150)], axis=1)
  for row in range(len(ids)):
    kept, _, margin = nucleus(first[row], temperature, top_p)
    assert margin > 1e-4 and 1 < len(kept) < tiny_hf.VOCAB // 2
    assert set(seen[row].tolist()) <= set(kept.tolist())
    assert len(set(seen[row].tolist())) > 1


def test_sample_logits_frequencies():
  logits = np.random.default_rng(0).standard_normal(16).astype(np.float32) * 2
  temperature, top_p, n = 1.5, 0.8, 20000
  kept, renorm, margin = nucleus(logits, temperature, top_p)
  assert margin > 1e-3 and 1 < len(kept) < len(logits)
  draws = gen.sample_logits(jnp.tile(logits, (n, 1)), jax.random.PRNGKey(0), temperature, top_p,
                            greedy=False)
  freq = np.bincount(np.asarray(draws), minlength=len(logits)) / n
  assert np.abs(freq - renorm).max() < 0.02  # ~6 standard errors
  assert freq[renorm == 0].sum() == 0


def test_repeated_calls_do_not_retrace(models, monkeypatch):
  _, model, params = models["qwen2"]
  traces = []
  sample_logits = gen.sample_logits
  monkeypatch.setattr(gen, "sample_logits",
                      lambda *a, **k: traces.append(1) or sample_logits(*a, **k))
  ids, mask, _ = prompts("qwen2", model)
  new = 5  # a length no other test compiles, so the first call must trace

  def run(seed, temperature, top_p, eos, module=model):
    rng = np.random.default_rng(seed)
    gen.generate(module, params, rng.integers(3, 100, ids.shape), mask, max_new_tokens=new,
                 temperature=temperature, top_p=top_p, eos_token_id=eos, pad_token_id=seed,
                 rng=jax.random.PRNGKey(seed))

  run(0, 0.7, 0.9, None)
  first = len(traces)
  assert first > 0
  run(1, 1.3, 1.0, 5)
  run(2, 0.4, 0.5, [5, 9, 11])
  run(3, 0.9, 0.2, 7, module=type(model)(model.cfg))  # an equal module, e.g. from a second hf.load
  assert len(traces) == first
