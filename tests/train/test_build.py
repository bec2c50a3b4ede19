"""train/build.py: the demo cache's stamps (shapes version and demo-teacher recipe)."""

import json

from llavamod_jax.data import synthetic
from llavamod_jax.train import build


def test_demo_artefacts_are_cached_only_for_the_current_shapes_version(tmp_path, caplog):
  art = tmp_path / "teacher_hf"
  assert not build._cached(art, "config.json")  # nothing there
  art.mkdir()
  (art / "config.json").write_text("{}")
  caplog.set_level("INFO")
  assert not build._cached(art, "config.json")  # no stamp: an artefact from before the stamps
  assert "teacher_hf" in caplog.text and "rebuilding" in caplog.text
  build._stamp(art)
  assert json.loads((art / build._STAMP).read_text()) == {"shapes_version": synthetic.VERSION,
                                                          "demo_recipe": build.DEMO_RECIPE}
  assert build._cached(art, "config.json")
  for stale in ({"shapes_version": synthetic.VERSION - 1, "demo_recipe": build.DEMO_RECIPE},
                {"shapes_version": synthetic.VERSION, "demo_recipe": build.DEMO_RECIPE - 1},
                {"shapes_version": synthetic.VERSION}):
    (art / build._STAMP).write_text(json.dumps(stale))
    assert not build._cached(art, "config.json"), stale  # other data or another teacher recipe
  (art / build._STAMP).write_text("not json")
  assert not build._cached(art, "config.json")
  build._stamp(art)
  (art / "config.json").unlink()
  assert not build._cached(art, "config.json")  # stamped but incomplete
