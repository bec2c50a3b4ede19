"""The demo's vision-tower pretraining: the tiny ViT learns to see the shapes before LLaVA is trained.

A real LLaVA starts from a pretrained CLIP tower. Trained from scratch through the language model's
loss instead, the demo's tower learns colours within a few hundred steps but not shapes, and the
language model stays close to blind. So the demo does what CLIP pretraining does for a real LLaVA, on
the train split's ground truth (`scenes.jsonl`): for each of the 18 (colour, shape) kinds, whether it
is in the image and whether it lies wholly on the left / right (`synthetic.labels`). A linear head reads
each patch feature that LLaVA will read (`hidden_states[vision_feature_layer]`, class token dropped as
the "default" strategy does) and the image-level logit is a soft maximum over the patches, so every
patch learns to say what it shows. The head is thrown away; LLaVA training then keeps the tower frozen.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import flax.linen as nn
import jax
import numpy as np
import optax

from llavamod_jax.data import image as image_lib
from llavamod_jax.data import synthetic
from llavamod_jax.models.configs import LlavaConfig
from llavamod_jax.models.vision import VisionTower

log = logging.getLogger(__name__)


class TowerProbe(nn.Module):
  """The tower plus a per-patch linear head pooled to one logit per label."""

  cfg: LlavaConfig
  num_labels: int

  @nn.compact
  def __call__(self, pixel_values):  # [images, H, W, 3] -> [images, num_labels]
    hs = VisionTower(self.cfg.vision, name="vision_tower")(pixel_values).hidden_states
    feats = hs[self.cfg.vision_feature_layer]
    if self.cfg.vision_feature_select_strategy == "default":
      feats = feats[:, 1:]
    logits = nn.Dense(self.num_labels, name="head")(nn.LayerNorm(name="head_norm")(feats))
    # Soft maximum over patches: log-mean-exp, so an empty image starts near sigmoid(0).
    return jax.nn.logsumexp(logits, axis=1) - np.log(feats.shape[1])


def load_split(root: str | Path, split: str, cfg: LlavaConfig) -> tuple[np.ndarray, np.ndarray]:
  """Pixels [n, H, W, 3] (the tower's preprocessing) and labels [n, groups * kinds] of one split."""
  root = Path(root)
  kind = "clip" if cfg.vision.is_clip else "siglip"
  pixels, targets = [], []
  for line in (root / "scenes.jsonl").read_text().splitlines():
    sc = synthetic.Scene.from_dict(json.loads(line))
    if sc.split != split:
      continue
    img = image_lib.load_image(str(root / sc.image))
    pixels.append(image_lib.preprocess(img, kind=kind, size=cfg.vision.image_size))
    targets.append(synthetic.labels(sc).reshape(-1))
  if not pixels:
    raise ValueError(f"{root / 'scenes.jsonl'}: no scenes of split {split!r}")
  return np.stack(pixels), np.stack(targets)


def exact_match(logits: np.ndarray, targets: np.ndarray) -> dict[str, float]:
  """Per label group: the fraction of images whose 18 answers are all right."""
  right = ((logits > 0) == (targets > 0.5)).reshape(len(targets), len(synthetic.LABEL_GROUPS), -1)
  return {g: float(right[:, i].all(-1).mean()) for i, g in enumerate(synthetic.LABEL_GROUPS)}


def pretrain(cfg: LlavaConfig, root: str | Path, *, steps: int, batch_size: int = 64,
             lr: float = 2e-3, seed: int = 0) -> tuple[dict, dict[str, float]]:
  """Trains a fresh tower of `cfg.vision` on the shapes set at `root`; returns (vision_tower params,
  stats: the first and last training loss, held-out exact match per label group)."""
  x_train, y_train = load_split(root, "train", cfg)
  x_eval, y_eval = load_split(root, "eval", cfg)
  probe = TowerProbe(cfg, y_train.shape[1])
  params = nn.unbox(probe.init(jax.random.key(seed), x_train[:1])["params"])
  tx = optax.adamw(optax.warmup_cosine_decay_schedule(0.0, lr, max(1, steps // 20), steps),
                   weight_decay=0.01)
  opt_state = tx.init(params)

  @jax.jit
  def step(params, opt_state, x, y):
    def loss_fn(p):
      return optax.sigmoid_binary_cross_entropy(probe.apply({"params": p}, x), y).mean()
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
  logits = np.concatenate([np.asarray(predict({"params": params}, x_eval[i:i + 256]))
                           for i in range(0, len(x_eval), 256)])
  scores = exact_match(logits, y_eval)
  log.info("vision tower pretraining: held-out exact match %s",
           ", ".join(f"{k} {v:.3f}" for k, v in scores.items()))
  return params["vision_tower"], {"loss_first": first, "loss_last": float(loss), **scores}
