"""The attention implementations (models/attention.py): every path that runs on CPU equals the einsum
attention the models always had; cudnn and splash are refused off their platform; splash compiles
for a TPU topology (where libtpu is installed) and holds far less temporary memory than the einsum."""

import math
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import needs
from llavamod_jax import models, sharding
from llavamod_jax.models import attention as attn
from llavamod_jax.models.configs import TextConfig, VisionConfig


def _previous(q, k, v, mask, dtype):
  """The attention of layers.py before the implementations were split (the reference)."""
  b, s, h, d = q.shape
  kv_heads = k.shape[2]
  q = q.reshape(b, s, kv_heads, h // kv_heads, d)
  scores = jnp.einsum("bskgd,btkd->bkgst", q, k, preferred_element_type=jnp.float32)
  scores = scores / math.sqrt(d)
  if mask is not None:
    scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores, axis=-1).astype(dtype)
  out = jnp.einsum("bkgst,btkd->bskgd", probs, v.astype(dtype))
  return out.reshape(b, s, h * d)


def _qkv(b=2, s=24, t=None, heads=4, kv_heads=2, d=16, dtype=jnp.float32, seed=0):
  r = np.random.default_rng(seed)
  t = t or s
  return (jnp.asarray(r.standard_normal((b, s, heads, d)), dtype),
          jnp.asarray(r.standard_normal((b, t, kv_heads, d)), dtype),
          jnp.asarray(r.standard_normal((b, t, kv_heads, d)), dtype))


def _right_padded(lengths, t):
  return jnp.asarray(np.arange(t)[None] < np.asarray(lengths)[:, None])


def _causal(keys, s):
  return jnp.tril(jnp.ones((s, s), bool))[None] & keys[:, None, :]


@pytest.mark.parametrize("impl", ["xla", "auto"])
def test_cpu_paths_equal_the_previous_einsum_bit_for_bit(impl):
  q, k, v = _qkv()
  keys = _right_padded([17, 24], 24)
  dense = _causal(keys, 24)
  for dtype in (jnp.float32, jnp.bfloat16):
    want = _previous(q, k, v, dense, dtype)
    # The dense mask the LM builds today, with or without the causal flag on top; key padding + causal.
    for got in (attn.attention(q, k, v, dense, dtype, impl),
                attn.attention(q, k, v, dense, dtype, impl, causal=True),
                attn.attention(q, k, v, keys, dtype, impl, causal=True)):
      np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))
    np.testing.assert_array_equal(attn.attention(q, k, v, None, dtype, impl),
                                  _previous(q, k, v, None, dtype))


def test_cache_decoding_keeps_the_offset_causal_rule():
  # 3 new tokens written at slots 5..7 of a 10-slot cache: query i sees slots <= 5 + i.
  q, _, _ = _qkv(s=3)
  _, k, v = _qkv(s=10, seed=1)
  keys = _right_padded([8, 10], 10)
  q_slot, k_slot = 5 + jnp.arange(3)[:, None], jnp.arange(10)[None]
  dense = (k_slot <= q_slot)[None] & keys[:, None, :]
  got = attn.attention(q, k, v, keys, jnp.float32, "auto", causal=True, q_offset=5)
  np.testing.assert_array_equal(got, _previous(q, k, v, dense, jnp.float32))


def test_dot_product_attention_arguments_match_within_1e6():
  """The cudnn path's call of `jax.nn.dot_product_attention`, run by its xla implementation."""
  q, k, v = _qkv(s=40)
  keys = _right_padded([29, 40], 40)
  got = attn.dot_product_attention(q, k, v, keys, jnp.float32, True, "xla").reshape(2, 40, -1)
  np.testing.assert_allclose(got, _previous(q, k, v, _causal(keys, 40), jnp.float32), atol=1e-6)
  got = attn.dot_product_attention(q, k, v, None, jnp.float32, False, "xla").reshape(2, 40, -1)
  np.testing.assert_allclose(got, _previous(q, k, v, None, jnp.float32), atol=1e-6)


@pytest.mark.parametrize("causal", [True, False])
def test_splash_kernel_interpreted_matches_within_1e6(causal):
  """The splash kernel in Pallas' interpreter: segment ids for key padding, a sequence (200) padded to
  the 128-token tile; padded query rows see the valid keys, as in the einsum."""
  q, k, v = _qkv(s=200, heads=4, kv_heads=2, d=32)
  keys = _right_padded([150, 200], 200) if causal else None
  dense = _causal(keys, 200) if causal else None
  got = attn.splash_attention(q, k, v, keys, jnp.float32, causal, interpret=True)
  np.testing.assert_allclose(got.reshape(2, 200, -1), _previous(q, k, v, dense, jnp.float32),
                             atol=1e-6)


def test_unknown_or_foreign_implementations_are_refused():
  q, k, v = _qkv()
  with pytest.raises(ValueError, match=r"config key attention='flash': expected one of auto, xla"):
    attn.attention(q, k, v, None, jnp.float32, "flash")
  with pytest.raises(ValueError, match=r"attention='cudnn' runs on GPU only; .* compiled for cpu"):
    attn.attention(q, k, v, None, jnp.bfloat16, "cudnn")
  with pytest.raises(ValueError, match=r"attention='splash' runs on TPU only"):
    attn.attention(q, k, v, None, jnp.bfloat16, "splash", causal=True)


def test_model_config_key_reaches_the_layers():
  """An explicit kernel off its platform: parameters still initialise abstractly (plan, conversion),
  compiling the model names the config key."""
  tower = models.VisionTower(VisionConfig(hidden_size=16, intermediate_size=24, num_layers=1,
                                          num_heads=2, image_size=14, patch_size=7,
                                          attention="splash"))
  params = nn.meta.unbox(models.abstract_params(tower))
  pixels = jax.ShapeDtypeStruct((1, 14, 14, 3), jnp.float32)
  with pytest.raises(ValueError, match="config key attention='splash' runs on TPU only; .* for cpu"):
    jax.jit(tower.apply).lower({"params": params}, pixels)
  fp32 = models.DecoderLM(TextConfig(vocab_size=32, hidden_size=16, intermediate_size=24,
                                     num_layers=1, num_heads=2, num_kv_heads=1, attention="cudnn"))
  with pytest.raises(ValueError, match="attention='cudnn' needs dtype bfloat16 or float16, got float32"):
    models.abstract_params(fp32)


# ---------------------------------------------------------------------------------------------
# A TPU topology, compile-only (libtpu describes the chips; nothing runs).
# ---------------------------------------------------------------------------------------------

needs_libtpu = needs.libtpu


@pytest.fixture(scope="module")
def tpu_mesh():
  os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")  # no metadata server off a TPU VM
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  from jax.experimental import topologies
  devices = topologies.get_topology_desc(platform="tpu", topology_name="v5e:2x2").devices
  return sharding.make_mesh({"data": -1, "fsdp": 1, "expert": 1, "tensor": 1}, devices)


def _compile(fn, mesh, *shapes):
  rows = sharding.batch_sharding(mesh)
  args = [jax.ShapeDtypeStruct(s, d, sharding=rows) for s, d in shapes]
  with sharding.rules_context(mesh):
    return jax.jit(fn).lower(*args).compile()


@needs_libtpu
def test_splash_compiles_for_a_tpu_topology_with_less_temporary_memory(tpu_mesh):
  # One row of 2048 tokens per chip, 8 query heads over 2 KV heads of 128, bf16, key padding.
  b, s, heads, kv_heads, d = 4, 2048, 8, 2, 128
  shapes = [((b, s, heads, d), jnp.bfloat16), ((b, s, kv_heads, d), jnp.bfloat16),
            ((b, s, kv_heads, d), jnp.bfloat16), ((b, s), jnp.bool_)]
  temp = {}
  for impl in ("xla", "splash", "auto"):
    compiled = _compile(lambda q, k, v, keys, impl=impl: attn.attention(
        q, k, v, keys, jnp.bfloat16, impl, causal=True), tpu_mesh, *shapes)
    temp[impl] = compiled.memory_analysis().temp_size_in_bytes
    assert ("tpu_custom_call" in compiled.as_text()) == (impl != "xla"), impl
  # The einsum holds a chip's fp32 scores, [8 heads, 2048, 2048] (128 MiB); splash holds tiles.
  assert temp["xla"] >= heads * s * s * 4 > 50 * temp["splash"]
  assert temp["auto"] == temp["splash"]


@needs_libtpu
def test_vision_tower_compiles_with_splash_for_a_tpu_topology(tpu_mesh):
  """Full (non-causal) attention over 17 tokens (padded to a tile inside); SigLIP's probe attends
  from one query, so it takes xla."""
  cfg = VisionConfig(model_type="siglip_vision_model", hidden_size=64, intermediate_size=96,
                     num_layers=2, num_heads=2, image_size=28, patch_size=7, use_head=True,
                     hidden_act="gelu_pytorch_tanh", dtype="bfloat16", attention="splash")
  tower = models.VisionTower(cfg)
  abstract = models.abstract_params(tower)
  shardings = sharding.param_shardings(abstract, tpu_mesh)
  params = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        jax.tree.map(lambda x: x.value, abstract,
                                     is_leaf=lambda x: hasattr(x, "value")), shardings)
  pixels = jax.ShapeDtypeStruct((4, 28, 28, 3), jnp.float32, sharding=sharding.batch_sharding(tpu_mesh))
  with sharding.rules_context(tpu_mesh):
    compiled = jax.jit(lambda p, x: tower.apply({"params": p}, x).pooled).lower(params, pixels).compile()
  assert compiled.as_text().count("tpu_custom_call") >= cfg.num_layers
