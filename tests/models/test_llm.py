"""DecoderLM (Qwen2 / LLaMA) against transformers on the same random weights."""

import jax.numpy as jnp
import numpy as np
import pytest

import tiny_hf
from llavamod_jax import hf


@pytest.fixture(scope="module", params=["qwen2", "llama"])
def pair(request, tmp_path_factory, torch):
  ref = tiny_hf.causal_lm(request.param, seed=1)
  path = tiny_hf.save(ref, tmp_path_factory.mktemp(request.param))
  model, params = hf.load(path)
  return ref, model, params


def test_logits_match_transformers(pair):
  ref, model, params = pair
  ids = np.random.default_rng(0).integers(0, tiny_hf.VOCAB, (2, 11))
  out = model.apply({"params": params}, jnp.asarray(ids))
  assert out.logits.shape == (2, 11, tiny_hf.VOCAB)
  assert tiny_hf.rel_err(out.logits, tiny_hf.torch_logits(ref, ids)) < 1e-4


def test_right_padding_matches_transformers(pair):
  ref, model, params = pair
  ids = np.random.default_rng(1).integers(0, tiny_hf.VOCAB, (2, 9))
  mask = np.ones_like(ids)
  mask[1, 5:] = 0
  got = np.asarray(
      model.apply({"params": params}, jnp.asarray(ids), attention_mask=jnp.asarray(mask)).logits)
  want = tiny_hf.torch_logits(ref, ids, mask)
  valid = mask.astype(bool)
  assert tiny_hf.rel_err(got[valid], want[valid]) < 1e-4


def test_left_padding_with_positions_matches_transformers(pair):
  ref, model, params = pair
  ids = np.random.default_rng(2).integers(0, tiny_hf.VOCAB, (2, 9))
  mask = np.ones_like(ids)
  mask[0, :4] = 0
  pos = np.maximum(np.cumsum(mask, -1) - 1, 0)
  got = np.asarray(model.apply({"params": params}, jnp.asarray(ids), attention_mask=jnp.asarray(mask),
                               position_ids=jnp.asarray(pos)).logits)
  want = tiny_hf.torch_logits(ref, ids, mask, position_ids=pos)
  valid = mask.astype(bool)
  assert tiny_hf.rel_err(got[valid], want[valid]) < 1e-4
  # The real tokens of the padded row equal the same tokens run unpadded.
  alone = np.asarray(model.apply({"params": params}, jnp.asarray(ids[:1, 4:])).logits)
  assert tiny_hf.rel_err(got[0, 4:], alone[0]) < 1e-5


@pytest.mark.parametrize("param_dtype", ["float32", "bfloat16"])
def test_bf16_within_tolerance_of_fp32(pair, tmp_path, param_dtype):
  ref, model, params = pair
  path = tiny_hf.save(ref, tmp_path / "m")
  model16, params16 = hf.load(path, dtype="bfloat16", param_dtype=param_dtype)
  leaf = params16["layers_0"]["mlp"]["up_proj"]["kernel"]
  assert leaf.dtype == jnp.dtype(param_dtype)
  ids = jnp.asarray(np.random.default_rng(3).integers(0, tiny_hf.VOCAB, (2, 8)))
  out16 = model16.apply({"params": params16}, ids).logits
  out32 = model.apply({"params": params}, ids).logits
  assert out16.dtype == jnp.bfloat16
  err = tiny_hf.rel_err(out16.astype(jnp.float32), out32)
  assert 0 < err < 3e-2  # bf16 has ~3 significant digits; 0 would mean bf16 was not used


def test_remat_gives_same_logits_and_grads(pair, tmp_path):
  import jax
  ref, model, params = pair
  model_r, _ = hf.load(tiny_hf.save(ref, tmp_path / "m"), remat=True)
  ids = jnp.asarray(np.random.default_rng(4).integers(0, tiny_hf.VOCAB, (1, 6)))

  def loss(m):
    return lambda p: jnp.mean(m.apply({"params": p}, ids).logits ** 2)

  g1, g2 = jax.grad(loss(model))(params), jax.grad(loss(model_r))(params)
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_remat_policies_keep_the_gradients_and_save_less(pair, capsys):
  """Each remat policy gives the unrematerialised gradients; full keeps the fewest residuals for the
  backward pass, save_dots the most of the three, no remat more than any."""
  import jax
  from jax.ad_checkpoint import print_saved_residuals

  from llavamod_jax import models

  _, model, params = pair
  ids = jnp.asarray(np.random.default_rng(5).integers(0, tiny_hf.VOCAB, (2, 6)))

  def loss(m):
    return lambda p: jnp.mean(m.apply({"params": p}, ids).logits ** 2)

  want = jax.grad(loss(model))(params)
  saved, named = {}, {}
  for policy in ("off", "none", "full", "save_qkv_proj", "save_out_proj", "save_dot_except_mlp",
                 "save_dots_no_batch", "save_dots"):
    m = model if policy == "off" else models.build(model.cfg.replace(remat=True,
                                                                     remat_policy=policy))
    for a, b in zip(jax.tree.leaves(jax.grad(loss(m))(params)), jax.tree.leaves(want)):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    capsys.readouterr()
    print_saved_residuals(loss(m), params)
    lines = capsys.readouterr().out.splitlines()
    saved[policy] = len(lines)
    named[policy] = sorted(l.split("named '")[1].split("'")[0] for l in lines if "named '" in l)
  assert saved["full"] < saved["save_dots_no_batch"] < saved["save_dots"] < saved["off"], saved
  assert saved["none"] == saved["off"]  # remat_policy none: no remat
  # The named projections each policy keeps, in every layer; the FFN's are never among them.
  layers = model.cfg.num_layers
  assert named["full"] == named["save_dots"] == named["off"] == []
  assert named["save_qkv_proj"] == sorted(["k_proj", "q_proj", "v_proj"] * layers)
  assert named["save_out_proj"] == ["o_proj"] * layers
  assert named["save_dot_except_mlp"] == sorted(["k_proj", "o_proj", "q_proj", "v_proj"] * layers)
  with pytest.raises(ValueError, match="remat_policy 'everything': expected one of"):
    bad = models.build(model.cfg.replace(remat=True, remat_policy="everything"))
    bad.init(jax.random.key(0), ids)
