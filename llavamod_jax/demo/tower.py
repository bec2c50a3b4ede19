"""The demo teacher's vision-tower pretraining, and its projector's starting point.

A real LLaVA starts from a pretrained CLIP tower; the demo's tiny LLaVA, trained from scratch
through the language model's loss, stays blind. So `pretrain` does what CLIP pretraining does, on
the train split's ground truth (`scenes.jsonl`): every patch feature LLaVA reads
(`hidden_states[vision_feature_layer]`, class token dropped as the "default" strategy does) learns,
with a linear head, which of the 18 (colour, shape) kinds covers that patch, or background
(`synthetic.patch_labels`). The head is thrown away; LLaVA training keeps the tower frozen. The
targets are per patch because the language model must find an object's patches by what each says.

`prototype_weight` > 0 (off in the demo) adds a term pulling every patch feature onto a fixed random
vector of its kind (`prototypes`; mean squared error), so that all patches of a kind look alike.

`projector_init` starts the LLaVA projector from standardised features: the tower's hidden states
carry a large constant part, which a fresh projector passes on, so the image tokens would all look
alike to the language model after its RMSNorm.

Measurements and what was tried: README.md of this package.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from llavamod_jax.data import image as image_lib
from llavamod_jax.demo import synthetic
from llavamod_jax.models.configs import LlavaConfig
from llavamod_jax.models.vision import VisionTower

log = logging.getLogger(__name__)
NUM_CLASSES = len(synthetic.COMBOS) + 1  # the kinds and BACKGROUND
BACKGROUND_WEIGHT = 0.2  # most patches are background; their loss counts this much
PROTOTYPE_SEED = 42


def prototypes(hidden_size: int) -> jax.Array:
  """The fixed target feature of each kind and of background: [NUM_CLASSES, hidden_size], N(0, 1)."""
  return jax.random.normal(jax.random.key(PROTOTYPE_SEED), (NUM_CLASSES, hidden_size))


def _select(cfg: LlavaConfig, hidden_states) -> jax.Array:
  """The patch features LLaVA reads from the tower's hidden states: [images, patches, hidden]."""
  feats = hidden_states[cfg.vision_feature_layer]
  return feats[:, 1:] if cfg.vision_feature_select_strategy == "default" else feats


def features(cfg: LlavaConfig, vision_params, pixel_values) -> jax.Array:
  """The patch features LLaVA reads: [images, patches, vision hidden]."""
  return _select(cfg, VisionTower(cfg.vision).apply({"params": vision_params}, pixel_values)
                 .hidden_states)


class TowerProbe(nn.Module):
  """The tower plus a linear head on every patch feature: [images, H, W, 3] -> (features [images,
  patches, vision hidden], logits [images, patches, NUM_CLASSES])."""

  cfg: LlavaConfig

  @nn.compact
  def __call__(self, pixel_values):
    hs = VisionTower(self.cfg.vision, name="vision_tower")(pixel_values).hidden_states
    feats = _select(self.cfg, hs)
    return feats, nn.Dense(NUM_CLASSES, name="head")(nn.LayerNorm(name="head_norm")(feats))


def load_split(root: str | Path, split: str, cfg: LlavaConfig,
               limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
  """Pixels [n, H, W, 3] (the tower's preprocessing) and patch labels [n, patches] of one split (its
  first `limit` scenes if given)."""
  root = Path(root)
  kind = "clip" if cfg.vision.is_clip else "siglip"
  size, patch = cfg.vision.image_size, cfg.vision.patch_size
  pixels, targets = [], []
  for line in (root / "scenes.jsonl").read_text().splitlines():
    sc = synthetic.Scene.from_dict(json.loads(line))
    if sc.split != split:
      continue
    if limit is not None and len(pixels) >= limit:
      break
    if sc.size != size:
      raise ValueError(f"{root / 'scenes.jsonl'}: image {sc.image} is {sc.size} pixels, the tower "
                       f"takes {size}")
    img = image_lib.load_image(str(root / sc.image))
    pixels.append(image_lib.preprocess(img, kind=kind, size=size))
    targets.append(synthetic.patch_labels(sc, patch))
  if not pixels:
    raise ValueError(f"{root / 'scenes.jsonl'}: no scenes of split {split!r}")
  return np.stack(pixels), np.stack(targets)


def patch_accuracy(logits: np.ndarray, targets: np.ndarray) -> dict[str, float]:
  """Held-out scores: on patches with an object, the kind / colour / shape right (a background answer
  is wrong on all three); on background patches, background answered."""
  pred = np.asarray(logits).argmax(-1)
  obj = targets != synthetic.BACKGROUND
  p, t = pred[obj], targets[obj]
  seen = p != synthetic.BACKGROUND
  n = len(synthetic.SHAPES)  # COMBOS is colour-major: kind = colour * n + shape
  mean = lambda x: float(np.mean(x)) if x.size else float("nan")  # noqa: E731
  return {"kind": mean(p == t), "color": mean(seen & (p // n == t // n)),
          "shape": mean(seen & (p % n == t % n)),
          "background": mean(pred[~obj] == synthetic.BACKGROUND)}


def pretrain(cfg: LlavaConfig, root: str | Path, *, steps: int, batch_size: int = 64,
             lr: float = 2e-3, seed: int = 0,
             prototype_weight: float = 0.0) -> tuple[dict, dict[str, float]]:
  """Trains a fresh tower of `cfg.vision` on the shapes set at `root`; returns (vision_tower params,
  stats: the first and last training loss, held-out `patch_accuracy` and `prototype_mse`, the mean
  squared distance per dimension of a held-out patch feature from its kind's prototype)."""
  x_train, y_train = load_split(root, "train", cfg)
  x_eval, y_eval = load_split(root, "eval", cfg)
  probe = TowerProbe(cfg)
  params = nn.unbox(probe.init(jax.random.key(seed), x_train[:1])["params"])
  tx = optax.adamw(optax.warmup_cosine_decay_schedule(0.0, lr, max(1, steps // 20), steps),
                   weight_decay=0.01)
  opt_state = tx.init(params)
  class_weight = jnp.where(jnp.arange(NUM_CLASSES) == synthetic.BACKGROUND, BACKGROUND_WEIGHT, 1.0)
  targets = prototypes(cfg.vision.hidden_size)

  @jax.jit
  def step(params, opt_state, x, y):
    def loss_fn(p):
      feats, logits = probe.apply({"params": p}, x)
      w = class_weight[y]
      per_patch = optax.softmax_cross_entropy_with_integer_labels(logits, y)
      if prototype_weight:
        per_patch += prototype_weight * jnp.mean(jnp.square(feats - targets[y]), -1)
      return jnp.sum(per_patch * w) / jnp.sum(w)
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  rng = np.random.default_rng(seed)
  t0, first = time.time(), None
  for i in range(1, steps + 1):
    idx = rng.integers(0, len(x_train), batch_size)
    params, opt_state, loss = step(params, opt_state, x_train[idx], y_train[idx])
    first = float(loss) if first is None else first
    if i % 100 == 0 or i == steps:
      log.info("vision tower pretraining: step %d/%d | loss %.4f | %.0f s", i, steps, float(loss),
               time.time() - t0)
  predict = jax.jit(probe.apply)
  feats, logits = zip(*(jax.device_get(predict({"params": params}, x_eval[i:i + 256]))
                        for i in range(0, len(x_eval), 256)))
  feats, logits = np.concatenate(feats), np.concatenate(logits)
  scores = patch_accuracy(logits, y_eval)
  scores["prototype_mse"] = float(np.mean(np.square(feats - np.asarray(targets)[y_eval])))
  log.info("vision tower pretraining: held-out patch accuracy %s",
           ", ".join(f"{k} {v:.3f}" for k, v in scores.items()))
  return params["vision_tower"], {"loss_first": first, "loss_last": float(loss), **scores}


def projector_init(cfg: LlavaConfig, projector_params, vision_params, pixel_values) -> dict:
  """`projector_params` with its first linear layer reading standardised features: with mean `mu` and
  spread `sd` of every feature over the given images' patches, kernel W -> W / sd and bias
  b -> b - (mu / sd) @ W, so linear_1(x) of the new layer is the old layer's linear_1((x - mu) / sd)."""
  f = np.asarray(features(cfg, vision_params, pixel_values), np.float64)
  f = f.reshape(-1, f.shape[-1])
  mu, sd = f.mean(0), f.std(0) + 1e-6
  lin = projector_params["linear_1"]
  w, b = np.asarray(lin["kernel"], np.float64), np.asarray(lin["bias"], np.float64)
  dtype = lin["kernel"].dtype
  new = {"kernel": jnp.asarray(w / sd[:, None], dtype), "bias": jnp.asarray(b - (mu / sd) @ w, dtype)}
  return {**projector_params, "linear_1": new}
