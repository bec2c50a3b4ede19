"""demo/recipes.py: the CE-alone baseline of the mimic demo (tests/launch/test_train.py trains it)."""

import importlib.util
from pathlib import Path

from llavamod_jax.demo import recipes
from llavamod_jax.train.config import STAGES, validate

REPO = Path(__file__).resolve().parents[2]


def _config(name, arg=None):
  spec = importlib.util.spec_from_file_location(f"{name}_config", REPO / "configs" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def test_only_the_mimic_demo_trains_a_ce_alone_baseline():
  assert _config("mimic").demo.baseline and _config("mimic", "d2d").demo.baseline
  assert "demo" not in _config("mimic", "d2s_paper")
  for name in ("adaptor", "preference", "teacher"):
    assert not _config(name).demo.baseline, name


def test_ce_alone_is_the_run_without_its_teacher():
  cfg = _config("mimic")
  cfg.teacher.init, cfg.teacher.hf_dir = "hf", "teacher_hf"  # as demo.prepare leaves it
  cfg.student.init, cfg.data.train_files = "scratch", ["train.jsonl"]
  cfg.lock()
  base = recipes.ce_alone(cfg)
  assert STAGES[base.stage] == "sft" and base.teacher.init == "none"
  validate(base)
  assert (cfg.stage, cfg.teacher.init) == ("mimic", "hf")  # the distilled run's config is untouched
  got, want = base.to_dict(), cfg.to_dict()
  for key in ("stage", "teacher"):
    got.pop(key), want.pop(key)
  assert got == want  # the same student, data, steps, optimizer, trainable parameters and seed

  cfg.loss.on_policy_fraction = 0.5  # on-policy distillation: the baseline has no teacher to score
  validate(recipes.ce_alone(cfg))
