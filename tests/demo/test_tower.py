"""demo/tower.py: the demo tower's pretraining data, patch labels, head, scoring and projector start."""

import json

import flax.linen as nn
import jax
import numpy as np

from llavamod_jax.demo import synthetic, tower
from llavamod_jax.models.configs import LlavaConfig, TextConfig, VisionConfig
from llavamod_jax.models.llava import Projector


def _cfg():
  text = TextConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2,
                    num_kv_heads=1)
  vision = VisionConfig(hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2,
                        image_size=32, patch_size=8)
  return LlavaConfig(text=text, vision=vision, image_token_id=3)


def test_patch_labels_by_a_plain_pixel_loop():
  """Each patch's label from the rendered pixels: count, pixel by pixel, which object colour covers it
  (objects never share a colour and kind in one scene, and backgrounds are never a palette colour)."""
  palette = {v: k for k, v in synthetic.COLORS.items()}
  for i in range(12):
    sc = synthetic.scene("train", i, image_size=32)
    img = synthetic.render(sc)
    got = synthetic.patch_labels(sc, 8)
    assert got.shape == (16,) and got.dtype == np.int32
    for p in range(16):
      py, px = divmod(p, 4)
      counts = {}
      for y in range(py * 8, py * 8 + 8):
        for x in range(px * 8, px * 8 + 8):
          color = palette.get(tuple(int(c) for c in img[y, x]))
          if color is not None:
            shape = next(o.shape for o in sc.objects if o.color == color
                         and (x + 0.5 - o.x) ** 2 + (y + 0.5 - o.y) ** 2 <= o.radius ** 2)
            k = synthetic.COMBOS.index((color, shape))
            counts[k] = counts.get(k, 0) + 1
      best = max(counts, key=counts.get) if counts else None
      want = best if best is not None and counts[best] >= 8 else synthetic.BACKGROUND
      assert got[p] == want, (i, p, counts)


def test_patch_accuracy_by_hand():
  bg = synthetic.BACKGROUND
  red_circle, red_square, blue_circle = 0, 1, 3  # COMBOS is colour-major: red*, green*, blue*, ...
  targets = np.array([[red_circle, red_circle, red_circle, red_circle, bg, bg]])
  answers = np.array([[red_circle, red_square, blue_circle, bg, bg, red_circle]])
  logits = np.eye(tower.NUM_CLASSES)[answers]
  got = tower.patch_accuracy(logits, targets)
  assert got == {"kind": 0.25, "color": 0.5, "shape": 0.5, "background": 0.5}


def test_projector_init_standardises_the_features():
  cfg = _cfg()
  rng = np.random.default_rng(0)
  pixels = rng.normal(size=(6, 32, 32, 3)).astype(np.float32)
  vision = tower.TowerProbe(cfg).init(jax.random.key(0), pixels[:1])["params"]["vision_tower"]
  vision = jax.tree.map(lambda x: getattr(x, "value", x), vision,
                        is_leaf=lambda x: hasattr(x, "value"))
  proj = Projector(cfg).init(jax.random.key(1), np.zeros((1, 16, 16), np.float32))["params"]
  proj = jax.tree.map(lambda x: getattr(x, "value", x), proj, is_leaf=lambda x: hasattr(x, "value"))
  new = tower.projector_init(cfg, proj, vision, pixels)
  f = np.asarray(tower.features(cfg, vision, pixels), np.float64).reshape(-1, 16)
  z = (f - f.mean(0)) / (f.std(0) + 1e-6)
  want = z @ np.asarray(proj["linear_1"]["kernel"]) + np.asarray(proj["linear_1"]["bias"])
  got = f @ np.asarray(new["linear_1"]["kernel"]) + np.asarray(new["linear_1"]["bias"])
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
  assert new["linear_2"] is proj["linear_2"]


def test_pretrain_reads_the_split_and_learns(tmp_path):
  root = tmp_path / "shapes"
  synthetic.build(root, num_train=32, num_eval=8, image_size=32)
  cfg = _cfg()
  x, y = tower.load_split(root, "eval", cfg)
  assert x.shape == (8, 32, 32, 3) and y.shape == (8, 16)
  scene = synthetic.Scene.from_dict(json.loads((root / "scenes.jsonl").read_text().splitlines()[32]))
  np.testing.assert_array_equal(y[0], synthetic.patch_labels(scene, 8))
  assert tower.load_split(root, "train", cfg, limit=5)[0].shape[0] == 5
  init = tower.TowerProbe(cfg).init(jax.random.key(0), x[:1])["params"]
  params, stats = tower.pretrain(cfg, root, steps=100, batch_size=8, lr=5e-3)
  assert stats["loss_last"] < 0.6 * stats["loss_first"]
  assert all(0.0 <= stats[k] <= 1.0 for k in ("kind", "color", "shape", "background"))
  before = np.asarray(init["vision_tower"]["embeddings"]["patch_embedding"]["kernel"].value)
  after = np.asarray(params["embeddings"]["patch_embedding"]["kernel"])
  assert before.shape == after.shape and not np.allclose(before, after)
  # With the prototype term the features are pulled onto their kind's prototype: the reported
  # held-out distance, recomputed here from the features and the prototypes, falls well below the
  # fresh tower's and the kinds-only tower's.
  protos = np.asarray(tower.prototypes(cfg.vision.hidden_size))
  assert protos.shape == (tower.NUM_CLASSES, 16)
  np.testing.assert_allclose(protos.std(), 1.0, atol=0.15)

  def distance(vision):
    f = np.asarray(tower.features(cfg, vision, x), np.float64)
    return float(np.mean((f - protos[y]) ** 2))

  pulled, pulled_stats = tower.pretrain(cfg, root, steps=100, batch_size=8, lr=5e-3,
                                        prototype_weight=10.0)
  for vision, st in ((params, stats), (pulled, pulled_stats)):
    np.testing.assert_allclose(st["prototype_mse"], distance(vision), rtol=1e-4)
  fresh = distance(nn.unbox(init["vision_tower"]))
  assert pulled_stats["prototype_mse"] < 0.5 * min(fresh, stats["prototype_mse"])
