"""Analytic FLOPs (train/flops.py) against XLA's count of the same unrolled computation on CPU.

XLA counts every op (norms, softmax, activations, RoPE) besides the matmuls the analytic count
covers, so its number is a little higher; at these widths the rest is a few percent."""

import jax
import jax.numpy as jnp
import pytest

from llavamod_jax import models
from llavamod_jax.models.configs import TextConfig, VisionConfig
from llavamod_jax.train import flops


def _xla_flops(fn, *args) -> float:
  cost = jax.jit(fn).lower(*args).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost["flops"])


TEXT = TextConfig(vocab_size=512, hidden_size=256, intermediate_size=1024, num_layers=2,
                  num_heads=4, num_kv_heads=2)


# The MoE case runs the "dense" kernel (every expert on every token): XLA counts what it computes,
# which is the analytic count with k = E experts per token.
@pytest.mark.parametrize("cfg", [TEXT, TEXT.replace(num_experts=4, moe_layers=(1,),
                                                    moe_impl="dense")], ids=["dense", "moe"])
def test_lm_forward_and_train_flops_match_xla(cfg):
  model = models.build(cfg)
  params = models.init_params(model)
  ids = jnp.zeros((2, 64), jnp.int32)
  fwd = lambda p: model.apply({"params": p}, ids).logits  # noqa: E731
  want = sum(flops.forward_flops(cfg.replace(num_experts_per_tok=cfg.num_experts or 2), 2,
                                 64).values())
  got = _xla_flops(fwd, params)
  assert want <= got <= 1.1 * want, (got / want)
  if cfg.num_experts:
    return
  grad = jax.grad(lambda p: jnp.sum(fwd(p)))
  want = flops.train_flops(cfg, 2, 64, "all")
  got = _xla_flops(grad, params)
  assert 0.95 * want <= got <= 1.15 * want, (got / want)


def test_vision_tower_flops_match_xla():
  cfg = VisionConfig(hidden_size=256, intermediate_size=1024, num_layers=2, num_heads=4,
                     image_size=112, patch_size=14)
  model = models.build(cfg)
  params = models.init_params(model)
  pixels = jnp.zeros((3, 112, 112, 3))
  got = _xla_flops(lambda p: model.apply({"params": p}, pixels).last_hidden_state, params)
  want = flops.vision_forward_flops(cfg, 3)
  assert want <= got <= 1.1 * want, (got / want)
