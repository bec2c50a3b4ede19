"""Routing rules against plain-Python/numpy references of the original's DeepSpeed top-2 gate."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llavamod_jax.models import routing
from moe_reference import _softmax, reference_gate


@pytest.mark.parametrize("k,capacity", [(2, 3), (2, 5), (1, 2), (3, 4), (2, 100)])
def test_capacity_drops_exactly_the_reference_tokens(k, capacity):
  logits = np.random.default_rng(k * 10 + capacity).standard_normal((23, 5)).astype(np.float32) * 2
  r = routing.route_with_capacity(jnp.asarray(logits), k, capacity)
  picks, weights, kept, _ = reference_gate(logits, k, capacity)
  np.testing.assert_array_equal(r.experts, picks)
  np.testing.assert_array_equal(r.kept, kept)
  np.testing.assert_allclose(r.weights, weights, rtol=1e-5, atol=1e-7)
  if capacity < 23:
    assert (~kept).any()  # the case really drops something


def test_gumbel_noise_only_moves_later_choices():
  rng = np.random.default_rng(0)
  logits = rng.standard_normal((40, 4)).astype(np.float32)
  noise = rng.gumbel(size=(40, 4)).astype(np.float32) * 3
  r = routing.route_with_capacity(jnp.asarray(logits), 2, 1000, noise=jnp.asarray(noise))
  picks, weights, _, _ = reference_gate(logits, 2, 1000, noise)
  np.testing.assert_array_equal(r.experts, picks)
  np.testing.assert_allclose(r.weights, weights, rtol=1e-5)
  np.testing.assert_array_equal(r.experts[:, 0], logits.argmax(-1))
  clean = routing.route_with_capacity(jnp.asarray(logits), 2, 1000)
  assert (np.asarray(clean.experts[:, 1]) != np.asarray(r.experts[:, 1])).any()


def test_dropless_is_renormalised_topk():
  logits = np.random.default_rng(1).standard_normal((17, 6)).astype(np.float32)
  r = routing.route_dropless(jnp.asarray(logits), 2)
  probs = _softmax(logits.astype(np.float64))
  top = np.argsort(-probs, axis=-1)[:, :2]
  np.testing.assert_array_equal(r.experts, top)
  w = np.take_along_axis(probs, top, -1)
  np.testing.assert_allclose(r.weights, w / w.sum(-1, keepdims=True), rtol=1e-5)
  raw = routing.route_dropless(jnp.asarray(logits), 2, normalize=False)
  np.testing.assert_allclose(raw.weights, w, rtol=1e-5)


def test_load_balancing_and_z_loss_match_numpy():
  logits = np.random.default_rng(2).standard_normal((31, 4)).astype(np.float32) * 1.5
  r = routing.route_with_capacity(jnp.asarray(logits), 2, 3)  # drops do not change the aux loss
  probs = _softmax(logits.astype(np.float64))
  me = probs.mean(0)
  ce = np.eye(4)[probs.argmax(-1)].mean(0)
  assert math.isclose(float(routing.load_balancing_loss(r)), float(np.mean(me * ce) * 16), rel_tol=1e-5)
  lse = np.log(np.exp(logits.astype(np.float64)).sum(-1))
  assert math.isclose(float(routing.z_loss(jnp.asarray(logits))), float(np.mean(lse**2)), rel_tol=1e-5)


def test_metrics():
  logits = np.random.default_rng(3).standard_normal((20, 4)).astype(np.float32)
  r = routing.route_with_capacity(jnp.asarray(logits), 2, 4)
  picks, _, kept, probs = reference_gate(logits, 2, 4)
  m = routing.metrics(r)
  np.testing.assert_array_equal(m["tokens_per_expert"], np.bincount(picks.ravel(), minlength=4))
  assert math.isclose(float(m["fraction_dropped"]), 1 - kept.mean(), rel_tol=1e-6)
  ent = -(probs * np.log(probs)).sum(-1).mean()
  assert math.isclose(float(m["router_entropy"]), ent, rel_tol=1e-5)


def test_expert_capacity_formula():
  assert routing.expert_capacity(100, 4, 2, 1.5) == math.ceil(100 / 4 * 1.5 * 2)
  assert routing.expert_capacity(3, 4, 2, 1.0, min_capacity=4) == 4
  # The original's eval factor 2.0 with top-2 of 4 experts never drops: capacity == tokens.
  assert routing.expert_capacity(64, 4, 2, 2.0) == 64


def test_grad_of_weights_reaches_logits():
  logits = jnp.asarray(np.random.default_rng(4).standard_normal((8, 4)), jnp.float32)
  g = jax.grad(lambda x: jnp.sum(routing.route_dropless(x, 2).weights[:, 0] ** 2))(logits)
  assert float(jnp.abs(g).sum()) > 0
