"""train/tower.py: the demo tower's pretraining data, labels, head and scoring."""

import json

import jax
import numpy as np

from llavamod_jax.data import synthetic
from llavamod_jax.models.configs import LlavaConfig, TextConfig, VisionConfig
from llavamod_jax.train import tower


def _cfg():
  text = TextConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2,
                    num_kv_heads=1)
  vision = VisionConfig(hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2,
                        image_size=32, patch_size=8)
  return LlavaConfig(text=text, vision=vision, image_token_id=3)


def test_labels_follow_the_scene_by_a_plain_loop():
  for i in range(20):
    sc = synthetic.scene("train", i, image_size=64)
    y = synthetic.labels(sc)
    for k, (color, shape) in enumerate(synthetic.COMBOS):
      here = [o for o in sc.objects if (o.color, o.shape) == (color, shape)]
      assert y[0, k] == float(bool(here))
      assert y[1, k] == float(any(o.x + o.radius <= 32 for o in here))
      assert y[2, k] == float(any(o.x - o.radius >= 32 for o in here))


def test_exact_match_counts_whole_rows():
  targets = np.zeros((2, 3 * 18), np.float32)
  targets[:, 0] = 1
  logits = np.where(targets > 0, 5.0, -5.0)
  logits[1, 18] = 1.0  # image 1: one wrong "left" answer
  assert tower.exact_match(logits, targets) == {"present": 1.0, "left": 0.5, "right": 1.0}


def test_pretrain_reads_the_split_and_learns(tmp_path):
  root = tmp_path / "shapes"
  synthetic.build(root, num_train=32, num_eval=8, image_size=32)
  cfg = _cfg()
  x, y = tower.load_split(root, "eval", cfg)
  assert x.shape == (8, 32, 32, 3) and y.shape == (8, 54)
  scene = synthetic.Scene.from_dict(json.loads((root / "scenes.jsonl").read_text().splitlines()[32]))
  np.testing.assert_array_equal(y[0], synthetic.labels(scene).reshape(-1))
  init = tower.TowerProbe(cfg, 54).init(jax.random.key(0), x[:1])["params"]
  params, stats = tower.pretrain(cfg, root, steps=60, batch_size=8, lr=3e-3)
  assert stats["loss_last"] < 0.5 * stats["loss_first"]
  assert all(0.0 <= stats[g] <= 1.0 for g in synthetic.LABEL_GROUPS)
  before = np.asarray(init["vision_tower"]["embeddings"]["patch_embedding"]["kernel"].value)
  after = np.asarray(params["embeddings"]["patch_embedding"]["kernel"])
  assert before.shape == after.shape and not np.allclose(before, after)
