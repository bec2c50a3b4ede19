"""train/resume.py: a changed config is named, a damaged checkpoint is set aside for the one before it."""

import json
import logging
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest

from damage import DAMAGE, delete_item, overwrite, truncate
from llavamod_jax import checkpoint
from llavamod_jax.train import resume


def _state(step: int, width: int = 64):
  """A params tree and an opt_state-like tree whose values say which step wrote them."""
  params = {"dense": {"kernel": jnp.full((width, width), float(step)), "bias": jnp.arange(width) + step}}
  opt_state = ({"mu": jax.tree.map(jnp.zeros_like, params)}, {"count": jnp.int32(step)})
  return params, opt_state


def _save(root: Path, steps=(3, 6)) -> None:
  with checkpoint.manager(root, max_to_keep=None) as mngr:
    for step in steps:
      params, opt_state = _state(step)
      checkpoint.save_items(mngr, step, {checkpoint.PARAMS: ocp.args.StandardSave(params),
                                         checkpoint.OPT_STATE: ocp.args.StandardSave(opt_state)})


def _restore_newest(root: Path, width: int = 64, changes=()):
  params, opt_state = _state(0, width)
  abstract = lambda tree: jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)  # noqa: E731

  def restore(step):
    got = checkpoint.restore_items(mngr, step, {
        checkpoint.PARAMS: ocp.args.StandardRestore(abstract(params)),
        checkpoint.OPT_STATE: ocp.args.StandardRestore(abstract(opt_state))})
    return got[checkpoint.PARAMS]

  with checkpoint.manager(root, create=False) as mngr:
    return resume.restore_newest(mngr, restore, workdir=root.parent, changes=changes,
                                 expected={checkpoint.PARAMS: params,
                                           checkpoint.OPT_STATE: opt_state})


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_damaged_newest_step_falls_back_and_is_set_aside(tmp_path, caplog, damage):
  root = tmp_path / "checkpoints"
  _save(root)
  intact = {p.relative_to(root / "6"): p.read_bytes() for p in (root / "6").rglob("*") if p.is_file()}
  DAMAGE[damage](root / "6")
  with caplog.at_level(logging.WARNING, logger=resume.__name__):
    step, params = _restore_newest(root)
  assert step == 3
  np.testing.assert_array_equal(params["dense"]["kernel"], np.full((64, 64), 3.0))
  assert sorted(p.name for p in root.iterdir()) == ["3", "6.damaged"]  # renamed, not deleted
  assert {p.relative_to(root / "6.damaged") for p in (root / "6.damaged").rglob("*")
          if p.is_file()} <= set(intact)
  warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
  assert len(warnings) == 1, warnings
  assert f"{root}/6 cannot be restored (" in warnings[0]
  assert "resuming from step 3" in warnings[0] and "6.damaged" in warnings[0]
  with checkpoint.manager(root, create=False) as mngr:  # orbax sees step 6 as free to write again
    assert mngr.all_steps() == [3]


def test_a_second_damage_of_the_same_step_is_kept_beside_the_first(tmp_path):
  root = tmp_path / "checkpoints"
  _save(root)
  overwrite(root / "6")
  _restore_newest(root)
  _save(root, steps=(6,))
  truncate(root / "6")
  assert _restore_newest(root)[0] == 3
  assert sorted(p.name for p in root.iterdir()) == ["3", "6.damaged", "6.damaged-2"]


def test_no_restorable_step_lists_what_was_tried_and_renames_nothing(tmp_path):
  root = tmp_path / "checkpoints"
  _save(root)
  overwrite(root / "6")
  delete_item(root / "3")
  with pytest.raises(resume.NoRestorableCheckpoint) as e:
    _restore_newest(root)
  lines = str(e.value).splitlines()
  assert lines[0] == f"{root}: no checkpoint can be restored; tried, newest first:"
  assert lines[1].startswith("  step 6: ") and lines[2] == "  step 3: FileNotFoundError: item(s) " \
      "['opt_state'] missing"
  assert sorted(p.name for p in root.iterdir()) == ["3", "6"]


def test_no_steps_is_a_fresh_start(tmp_path):
  (tmp_path / "checkpoints").mkdir()
  assert _restore_newest(tmp_path / "checkpoints") is None


def test_changed_shapes_are_named_not_taken_for_damage(tmp_path):
  root = tmp_path / "checkpoints"
  _save(root)
  changes = [("student.scratch.hidden_size", 64, 96), ("log_every", 1, 5)]
  with pytest.raises(resume.ChangedRun) as e:
    _restore_newest(root, width=96, changes=changes)
  msg = str(e.value)
  assert msg.startswith(f"{tmp_path}: this run's config changes the parameter or optimizer-state "
                        "shapes")
  assert "  config.student.scratch.hidden_size: 64 in the workdir, 96 now" in msg
  assert "log_every" not in msg  # cannot change a shape
  assert "  params/dense/kernel: stored (64, 64), this run (96, 96)" in msg
  assert "  opt_state/0/mu/dense/bias: stored (64,), this run (96,)" in msg
  assert msg.endswith("Use a new --workdir, or set these keys back to the workdir's values.")
  assert sorted(p.name for p in root.iterdir()) == ["3", "6"]


def _config(**overrides):
  c = ml_collections.ConfigDict({"seed": 0, "total_steps": 10, "log_every": 1,
                                 "data": {"train_files": ["a.jsonl"], "batch_size": 4,
                                          "eval_files": []}})
  for key, value in overrides.items():
    section, _, name = key.rpartition(".")
    (c[section] if section else c)[name] = value
  return c


def test_config_changes_are_every_differing_key_with_both_values():
  previous = json.loads(_config().to_json_best_effort())
  got = resume.config_changes(previous, _config(**{"total_steps": 20, "data.train_files":
                                                   ["a.jsonl", "b.jsonl"]}))
  assert got == [("data.train_files", ["a.jsonl"], ["a.jsonl", "b.jsonl"]), ("total_steps", 10, 20)]
  previous["data"]["gone"] = 1
  assert resume.config_changes(previous, _config()) == [("data.gone", 1, "(absent)")]


def test_a_data_change_is_an_error_naming_the_workdir_and_each_key(tmp_path):
  changes = resume.config_changes(json.loads(_config().to_json_best_effort()),
                                  _config(**{"data.batch_size": 8, "seed": 1, "total_steps": 20}))
  with pytest.raises(resume.ChangedRun) as e:
    resume.check_data(tmp_path, changes)
  assert str(e.value).splitlines() == [
      f"{tmp_path}: this run's config changes the data it reads (files, order or batches) of the "
      "run the workdir holds, so it cannot continue it:",
      "  config.data.batch_size: 4 in the workdir, 8 now",
      "  config.seed: 0 in the workdir, 1 now",
      "Use a new --workdir, or set these keys back to the workdir's values."]


def test_harmless_changes_are_logged(tmp_path, caplog):
  changes = resume.config_changes(json.loads(_config().to_json_best_effort()),
                                  _config(**{"total_steps": 20, "data.eval_files": ["e.jsonl"]}))
  with caplog.at_level(logging.WARNING, logger=resume.__name__):
    resume.check_data(tmp_path, changes)
  assert [r.getMessage() for r in caplog.records] == [
      "config.data.eval_files changed since the workdir's last run: [] -> [\"e.jsonl\"]",
      "config.total_steps changed since the workdir's last run: 10 -> 20"]
