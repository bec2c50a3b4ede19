"""The demo's probes: teacher_probe's scorer and question kinds, lookup_probe's features and a run."""

import numpy as np

from llavamod_jax.demo import lookup_probe, synthetic, teacher_probe


# --- teacher_probe.py ------------------------------------------------------------------------------


def test_teacher_probe_scores_like_a_loop():
  # An answer is right when each response token is the argmax at the position before it.
  import tiny_run

  from llavamod_jax import models

  probe = teacher_probe
  model = models.build(tiny_run.llava_config())
  params = tiny_run.random_params(model, seed=3)
  rng = np.random.default_rng(0)
  rows, length, n_img = 6, 40, (tiny_run.IMAGE_SIZE // 7) ** 2
  ids = rng.integers(5, 60, (rows, length)).astype(np.int32)
  ids[:, 2:2 + n_img] = model.cfg.image_token_id
  pixels = rng.standard_normal((rows, tiny_run.IMAGE_SIZE, tiny_run.IMAGE_SIZE, 3)).astype(np.float32)
  batch = {"input_ids": ids, "pixel_values": pixels, "attention_mask": np.ones_like(ids),
           "image_mask": np.ones(rows, bool)}
  logits = np.asarray(model.apply({"params": params}, ids, pixels, batch["attention_mask"],
                                  image_mask=batch["image_mask"]).logits)
  labels = np.full_like(ids, -100)
  for r in range(rows):  # responses of 1-3 tokens at the end; rows 0-2 copy the model's own argmax
    n = 1 + r % 3
    for t in range(length - n, length):
      labels[r, t] = logits[r, t - 1].argmax() if r < 3 else (logits[r, t - 1].argmax() + r) % 60
  labels[1, length - 1] = (labels[1, length - 1] + 1) % 60  # one wrong token spoils a whole answer
  batch["labels"] = labels
  want = [all(labels[r, t] == logits[r, t - 1].argmax() for t in range(1, length) if labels[r, t] >= 0)
          for r in range(rows)]
  got = np.asarray(probe.make_scorer(model)(params, batch))
  assert want == [True, False, True, False, False, False]
  np.testing.assert_array_equal(got, want)
  assert probe.summarize(got, ["a", "a", "b", "b", "b", "c"]) == {"a": 0.5, "b": 0.333, "c": 0.0}


def test_teacher_probe_question_kinds():
  probe = teacher_probe
  seen = set()
  for i in range(40):
    sc = synthetic.scene("eval", i)
    for r in synthetic.records(sc)["eval"]:
      kind = probe.question_kind(r, sc)
      seen.add(kind)
      if kind.startswith("color"):
        assert (kind == "color, 1 object") == (len(sc.objects) == 1)
      if kind.startswith("position"):
        sides = {"left" if o.x < sc.size / 2 else "right" for o in sc.objects}
        assert (kind == "position, all on one side") == (len(sides) == 1 and all(
            sc.side(o) for o in sc.objects))
      if kind.startswith("pope"):
        assert kind == f"pope, {r['conversations'][1]['value']}"
  assert {"color, 1 object", "color, 2+ objects", "count, all shapes", "count, one shape",
          "pope, yes", "pope, no", "caption"} <= seen


# --- lookup_probe.py -------------------------------------------------------------------------------


def test_lookup_probe_kind_features_by_hand():
  # Each patch: the one-hot of its kind, then of its half (left, right); every dimension standardised
  # over all patches of all images.
  import types

  from llavamod_jax.models.configs import LlavaConfig, TextConfig, VisionConfig

  probe = lookup_probe
  scenes = {f"s{i}": synthetic.scene("eval", i) for i in range(6)}
  images = sorted(scenes)
  vision = VisionConfig(hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2,
                        image_size=scenes["s0"].size, patch_size=16)
  cfg = LlavaConfig(text=TextConfig(vocab_size=8, hidden_size=8, intermediate_size=8, num_layers=1,
                                    num_heads=1, num_kv_heads=1), vision=vision, image_token_id=3)
  got = probe.image_features(types.SimpleNamespace(features="side_kinds"), cfg, None, images, scenes)
  n = scenes["s0"].size // 16
  want = np.zeros((len(images), n * n, len(synthetic.COMBOS) + 3))
  for i, name in enumerate(images):
    labels = synthetic.patch_labels(scenes[name], 16)
    for j in range(n * n):
      want[i, j, labels[j]] = 1.0
      want[i, j, len(synthetic.COMBOS) + 1 + (1 if j % n >= n / 2 else 0)] = 1.0
  flat = want.reshape(-1, want.shape[-1])
  want = (want - flat.mean(0)) / (flat.std(0) + 1e-6)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  assert got.shape == (6, n * n, len(synthetic.COMBOS) + 3)


def test_lookup_probe_runs_at_minuscule_sizes(tmp_path):
  probe = lookup_probe
  res = probe.main([f"--demo_cache={tmp_path}", "--num_train=12", "--num_eval=6", "--features=kinds",
                    "--steps=4", "--eval_every=2", "--hidden=16", "--layers=1", "--heads=2",
                    "--kv_heads=2"])
  rows = res["history"]
  assert [r["step"] for r in rows] == [2, 4]
  kinds = [k for k in rows[-1] if k not in ("step", "loss", "seconds")]
  assert kinds and all(0.0 <= rows[-1][k] <= 1.0 for k in kinds)
  assert all(np.isfinite(r["loss"]) for r in rows)
