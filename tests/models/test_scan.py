"""scan_layers: the scanned model computes what the unrolled one does, and every tool that reads or
writes parameters (HF, upcycling, trainable patterns, checkpoints, generation) takes both layouts."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

import tiny_run
from llavamod_jax import checkpoint, generate, hf, models, moe
from llavamod_jax.models import scan
from llavamod_jax.train import optim


def _scanned(model, params):
  cfg = model.cfg.replace(text=model.cfg.text.replace(scan_layers=True),
                          vision=model.cfg.vision.replace(scan_layers=True))
  return models.build(cfg), scan.relayout(params, cfg)


def _batch(model, seed=0, rows=2, length=24):
  cfg = model.cfg
  rng = np.random.default_rng(seed)
  ids = rng.integers(cfg.image_token_id + 1, cfg.text.vocab_size, (rows, length))
  ids[:, 2:2 + cfg.num_image_tokens] = cfg.image_token_id
  mask = np.ones_like(ids)
  mask[1, -5:] = 0
  pixels = rng.standard_normal((rows, cfg.vision.image_size, cfg.vision.image_size, 3))
  return jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(pixels, jnp.float32)


@pytest.fixture(scope="module")
def student():
  """MoE in layers 0 and 2 of 4: the scan group is (MoE layer, dense layer), repeated twice."""
  dense = models.build(tiny_run.llava_config().replace(
      text=tiny_run.llava_config().text.replace(num_layers=4),
      vision=tiny_run.llava_config().vision.replace(num_layers=3)))
  return moe.upcycle(dense, tiny_run.random_params(dense, 3), num_experts=4, top_k=2,
                     layers="sparse", seed=1)


def test_period_is_the_shortest_repeating_group():
  for kinds in ([0] * 6, [1, 0] * 3, [1, 0, 0] * 2, [1, 1, 0, 0], [1, 0, 0, 0, 0]):
    p = scan.period(kinds)
    want = next(q for q in range(1, len(kinds) + 1)
                if len(kinds) % q == 0 and kinds == kinds[:q] * (len(kinds) // q))
    assert p == want, kinds


def test_stack_and_unstack_are_inverse(student):
  model, params = student
  smodel, sparams = _scanned(model, params)
  lm = sparams["language_model"][scan.SCANNED]
  assert set(lm) == {"layer_0", "layer_1"}  # (MoE, dense)
  np.testing.assert_array_equal(lm["layer_1"]["mlp"]["up_proj"]["kernel"][1],
                                params["language_model"]["layers_3"]["mlp"]["up_proj"]["kernel"])
  assert sparams["vision_tower"][scan.SCANNED]["layer_0"]["mlp"]["fc1"]["kernel"].shape[0] == 3
  # The stacked tree is exactly what the scanned module initialises.
  want = jax.tree.map(lambda x: (x.shape, x.dtype), nn.unbox(models.abstract_params(smodel)))
  assert jax.tree.map(lambda x: (x.shape, x.dtype), sparams) == want
  back = scan.relayout(sparams, model.cfg)
  for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(params)):
    np.testing.assert_array_equal(a, b)
  assert jax.tree.structure(back) == jax.tree.structure(params)


@pytest.mark.parametrize("remat", [False, True])
def test_scanned_equals_unrolled(student, remat):
  """Logits, the MoE aux losses and every gradient agree (fp32, <= 1e-5)."""
  model, params = student
  if remat:
    model = models.build(model.cfg.replace(text=model.cfg.text.replace(remat=True),
                                           vision=model.cfg.vision.replace(remat=True)))
  smodel, sparams = _scanned(model, params)
  ids, mask, pixels = _batch(model)

  def loss(m):
    def fn(p, ids, pixels, mask):
      out, state = m.apply({"params": p}, ids, pixels, mask, mutable=["moe"], train=True)
      aux = moe.aux_losses(state["moe"])
      return jnp.mean(out.logits ** 2) + aux["load_balancing_loss"] + aux["z_loss"], (out, state)
    return fn

  (l1, (o1, s1)), g1 = jax.jit(jax.value_and_grad(loss(model), has_aux=True))(params, ids, pixels,
                                                                              mask)
  (l2, (o2, s2)), g2 = jax.jit(jax.value_and_grad(loss(smodel), has_aux=True))(sparams, ids, pixels,
                                                                               mask)
  np.testing.assert_allclose(o2.logits, o1.logits, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(l2, l1, rtol=1e-5)
  per1, per2 = moe.per_layer(s1["moe"]), moe.per_layer(s2["moe"], smodel.cfg)
  assert sorted(per1) == sorted(per2) == ["language_model/layers_0/mlp", "language_model/layers_2/mlp"]
  for layer in per1:
    for name in per1[layer]:
      np.testing.assert_allclose(per2[layer][name], per1[layer][name], rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match="pass the model's config"):
    moe.per_layer(s2["moe"])
  g2 = scan.relayout(g2, model.cfg)  # gradients come in the parameters' layout
  flat1, flat2 = (traverse_util.flatten_dict(g, sep="/") for g in (g1, g2))
  assert flat1.keys() == flat2.keys()
  for k in flat1:
    np.testing.assert_allclose(flat2[k], flat1[k], rtol=1e-5, atol=1e-6, err_msg=k)


def test_generation_with_the_stacked_cache(student):
  model, params = student
  smodel, sparams = _scanned(model, params)
  cache = models.init_cache(smodel.cfg.text, 2, 10)
  assert len(cache) == 2 and cache[0]["k"].shape[:3] == (2, 2, 10)  # (groups, batch, slots)
  ids, _, pixels = _batch(model, seed=1, length=20)
  mask = np.ones(ids.shape, np.int32)
  mask[0, :3] = 0  # left padding
  a = generate.generate(model, params, ids, mask, pixels, max_new_tokens=6)
  b = generate.generate(smodel, sparams, ids, mask, pixels, max_new_tokens=6)
  np.testing.assert_array_equal(b.tokens, a.tokens)


def test_hf_export_of_a_scanned_model_is_the_unrolled_one(student, tmp_path):
  model, params = student
  smodel, sparams = _scanned(model, params)
  hf.save(model, params, tmp_path / "a")
  hf.save(smodel, sparams, tmp_path / "b")
  for f in ("config.json", "model.safetensors"):
    assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f
  _, loaded = hf.load(tmp_path / "b")
  for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(params)):
    np.testing.assert_array_equal(a, b)


def test_upcycling_a_scanned_dense_model(student):
  model, params = student
  dense = models.build(tiny_run.llava_config().replace(
      text=tiny_run.llava_config().text.replace(num_layers=4, scan_layers=True)))
  dparams = tiny_run.random_params(dense, 5)
  up, uparams = moe.upcycle(dense, dparams, num_experts=4, top_k=2, layers="sparse", seed=1)
  assert up.cfg.text.scan_layers and scan.is_scanned(uparams["language_model"])
  ref, rparams = moe.upcycle(models.build(scan.unrolled_config(dense.cfg)),
                             scan.relayout(dparams, scan.unrolled_config(dense.cfg)),
                             num_experts=4, top_k=2, layers="sparse", seed=1)
  for a, b in zip(jax.tree.leaves(scan.relayout(uparams, ref.cfg)), jax.tree.leaves(rparams)):
    np.testing.assert_array_equal(a, b)


def test_trainable_patterns_speak_unrolled_paths(student):
  model, params = student
  _, sparams = _scanned(model, params)
  for stage in ("dense_to_sparse", "adaptor", "all"):
    pats = optim.trainable_patterns(stage)
    t1, f1 = optim.partition(params, pats)
    t2, f2 = optim.partition(sparams, pats)
    # Unstacking the scanned partition gives the unrolled one, leaf for leaf.
    for got, want in ((t2, t1), (f2, f1)):
      got = scan.relayout(got, model.cfg) if got else got
      assert (traverse_util.flatten_dict(got, sep="/").keys()
              == traverse_util.flatten_dict(want, sep="/").keys()), stage
  with pytest.raises(ValueError, match="layers_0/mlp/router.*but not.*layers_2/mlp/router|"
                                       "layers_2/mlp/router.*but not.*layers_0/mlp/router"):
    optim.partition(sparams, [r"language_model/layers_0/mlp/router"])


def test_checkpoint_round_trip_keeps_the_layout(student, tmp_path):
  model, params = student
  smodel, sparams = _scanned(model, params)
  checkpoint.save_model(tmp_path / "ck", smodel, sparams, step=1)
  back_model, back = checkpoint.restore_model(tmp_path / "ck")
  assert back_model.cfg == smodel.cfg
  for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(sparams)):
    np.testing.assert_array_equal(a, b)


def test_scanned_tower_keeps_only_the_selected_hidden_states(student):
  model, params = student
  cfg = model.cfg.vision
  tower, stower = models.build(cfg), models.build(cfg.replace(scan_layers=True))
  vparams = params["vision_tower"]
  sparams = scan.relayout(vparams, stower.cfg)
  pixels = _batch(model)[2]
  want = tower.apply({"params": vparams}, pixels)
  every = stower.apply({"params": sparams}, pixels)
  for a, b in zip(every.hidden_states, want.hidden_states, strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
  select = (0, -2, 3, 1)
  got = stower.apply({"params": sparams}, pixels, select=select)
  assert got.hidden_states == ()  # not kept per layer
  for i, a in zip(select, got.selected, strict=True):
    np.testing.assert_allclose(a, want.hidden_states[i], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(got.last_hidden_state, want.last_hidden_state, rtol=1e-5, atol=1e-5)
