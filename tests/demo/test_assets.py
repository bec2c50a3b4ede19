"""demo/assets.py: the demo cache's stamps (shapes version and demo-teacher recipe)."""

import json

from llavamod_jax.demo import assets, synthetic


def test_demo_artefacts_are_cached_only_for_the_current_shapes_version(tmp_path, caplog):
  art = tmp_path / "teacher_hf"
  assert not assets.is_cached(art, "config.json")  # nothing there
  art.mkdir()
  (art / "config.json").write_text("{}")
  caplog.set_level("INFO")
  assert not assets.is_cached(art, "config.json")  # no stamp: an artefact from before the stamps
  assert "teacher_hf" in caplog.text and "rebuilding" in caplog.text
  assets.stamp(art)
  assert json.loads((art / assets.STAMP).read_text()) == {"shapes_version": synthetic.VERSION,
                                                          "demo_recipe": assets.DEMO_RECIPE}
  assert assets.is_cached(art, "config.json")
  for stale in ({"shapes_version": synthetic.VERSION - 1, "demo_recipe": assets.DEMO_RECIPE},
                {"shapes_version": synthetic.VERSION, "demo_recipe": assets.DEMO_RECIPE - 1},
                {"shapes_version": synthetic.VERSION}):
    (art / assets.STAMP).write_text(json.dumps(stale))
    assert not assets.is_cached(art, "config.json"), stale  # other data or another teacher recipe
  (art / assets.STAMP).write_text("not json")
  assert not assets.is_cached(art, "config.json")
  assets.stamp(art)
  (art / "config.json").unlink()
  assert not assets.is_cached(art, "config.json")  # stamped but incomplete
