"""A restart of a workdir: what changed since its last run, and the newest checkpoint that restores.

Before anything is restored the loop asks two questions:
  1. `config_changes`: the config against WORKDIR/config.json, the one the workdir was trained with.
     A change of the data the run reads (its files, their order, what a batch holds) would make
     the resumed run train on other batches than an uninterrupted one: `check_data` makes it an
     error. Anything else (total steps, logging, evaluation cadence, learning rate, ...) is logged.
  2. `restore_newest`: the checkpoints newest first. A step whose stored parameter or optimizer
     shapes differ from the new run's is a changed model: an error naming the config keys that
     differ (`ChangedRun`). A step that cannot be read (arrays overwritten or truncated, an item
     missing, metadata that does not parse) is damaged: one warning names it and why, the next
     older step is tried, and once one restores, the damaged steps are renamed aside to
     `<step>.damaged` (never deleted) so the run can write those steps again. When none restores,
     nothing is renamed and `NoRestorableCheckpoint` lists every step tried and why.
Every process decides the same: a step restores only when it restores on all of them.
"""

from __future__ import annotations

import json
import logging
import sys
from typing import Any, Callable, TypeVar

import jax
import orbax.checkpoint as ocp
from etils import epath

from llavamod_jax import checkpoint, distributed, fileutil
from llavamod_jax.models import configs
from llavamod_jax.train.config import ConfigError

log = logging.getLogger(__name__)
T = TypeVar("T")
CONFIG_JSON = "config.json"
DAMAGED = ".damaged"

# Keys whose change gives a resumed run other batches than the uninterrupted run would have seen.
DATA_KEYS = ("stage", "seed", "data.train_files", "data.weights", "data.shuffle", "data.batch_size",
             "data.max_length", "data.template", "data.image_aspect", "data.image_root",
             "data.images_per_sample", "data.tokenizer")
# Keys whose change can change the stored shapes (named when the shapes differ).
MODEL_KEYS = ("student.", "trainable", "demo.", "optimizer.")
_ABSENT = "(absent)"


class ChangedRun(ConfigError):
  """The workdir was trained with a config this run cannot continue."""


class NoRestorableCheckpoint(RuntimeError):
  """Every checkpoint of the workdir failed to restore."""


# ---------------------------------------------------------------------------------------------
# 1. The config against the workdir's.
# ---------------------------------------------------------------------------------------------


def previous_config(workdir: fileutil.AnyPath) -> dict | None:
  """WORKDIR/config.json as a dict, or None when there is none (a run of an older version)."""
  path = workdir / CONFIG_JSON
  if not path.exists():
    return None
  try:
    return json.loads(path.read_text())
  except json.JSONDecodeError as e:
    log.warning("%s does not parse (%s): the config is not compared with the workdir's", path, e)
    return None


def config_changes(previous: dict, cfg) -> list[tuple[str, Any, Any]]:
  """(dotted key, value in the workdir, value now) for every key that differs, sorted by key."""
  old, new = _flatten(previous), _flatten(json.loads(cfg.to_json_best_effort()))
  return [(k, old.get(k, _ABSENT), new.get(k, _ABSENT)) for k in sorted(set(old) | set(new))
          if old.get(k, _ABSENT) != new.get(k, _ABSENT)]


def check_data(workdir, changes: list[tuple[str, Any, Any]]) -> None:
  """Raise `ChangedRun` for changes of the data; log the others."""
  data = [c for c in changes if c[0] in DATA_KEYS]
  if data:
    raise ChangedRun(_changed(workdir, "the data it reads (files, order or batches)", data))
  for key, old, new in changes:
    log.warning("config.%s changed since the workdir's last run: %s -> %s", key, _show(old),
                _show(new))


def _changed(workdir, what: str, changes, details: list[str] = ()) -> str:
  lines = [f"{workdir}: this run's config changes {what} of the run the workdir holds, so it cannot "
           "continue it:"]
  lines += [f"  config.{k}: {_show(old)} in the workdir, {_show(new)} now" for k, old, new in changes]
  lines += list(details)
  lines.append("Use a new --workdir, or set these keys back to the workdir's values.")
  return "\n".join(lines)


def _show(value) -> str:
  return value if value == _ABSENT else json.dumps(value)


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
  out = {}
  for k, v in d.items():
    if isinstance(v, dict) and v:
      out.update(_flatten(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


# ---------------------------------------------------------------------------------------------
# 2. The newest checkpoint that restores.
# ---------------------------------------------------------------------------------------------


def restore_newest(mngr: ocp.CheckpointManager, restore: Callable[[int], T], *, workdir,
                   expected: dict[str, Any], changes=(), model_cfg=None) -> tuple[int, T] | None:
  """(step, restore(step)) for the newest step that restores, or None when there are none.

  `expected` maps checkpoint items (params, opt_state) to trees shaped like the new run's; a step
  whose stored shapes differ raises `ChangedRun` naming `changes` (config_changes) that may explain
  it, and `model_cfg`'s differences from the stored model config."""
  tried = []
  for step in sorted(mngr.all_steps(), reverse=True):
    missing = sorted(set(expected) - checkpoint.stored_items(mngr, step))
    try:
      if missing:
        raise FileNotFoundError(f"item(s) {missing} missing")
      stored = mngr.item_metadata(step)
      problems = [line for item, tree in expected.items()
                  for line in _shape_mismatches(item, stored[item], tree)]
    except Exception as e:  # noqa: BLE001 - unreadable metadata is damage like any other
      problems, failure = [], _reason(e)
    else:
      failure = None
    if distributed.any_process(bool(problems)):
      raise ChangedRun(_changed(workdir, "the parameter or optimizer-state shapes",
                                [c for c in changes if c[0].startswith(MODEL_KEYS)],
                                _model_details(mngr, step, model_cfg, problems)))
    if failure is None:
      try:
        got = restore(step)
      except Exception as e:  # noqa: BLE001 - orbax and tensorstore raise many kinds for bad data
        failure = _reason(e)
        _drop_closed_loop_reports()
    if not distributed.any_process(failure is not None):
      _set_aside(mngr, tried, step)
      return step, got
    tried.append((step, failure or "it failed to restore on another process"))
  if tried:
    raise NoRestorableCheckpoint(
        f"{mngr.directory}: no checkpoint can be restored; tried, newest first:\n"
        + "\n".join(f"  step {s}: {why}" for s, why in tried)
        + "\nNothing was renamed or deleted. Move the damaged steps away to start again.")
  return None


def _shape_mismatches(item: str, stored, expected) -> list[str]:
  stored = getattr(stored, "tree", stored)  # TreeMetadata wraps the tree of ArrayMetadata
  got = {_path(p): tuple(x.shape) for p, x in jax.tree_util.tree_flatten_with_path(stored)[0]}
  want = {_path(p): tuple(x.shape) for p, x in jax.tree_util.tree_flatten_with_path(expected)[0]}
  lines = [f"  {item}/{p}: stored, not in this run" for p in sorted(set(got) - set(want))]
  lines += [f"  {item}/{p}: in this run, not stored" for p in sorted(set(want) - set(got))]
  lines += [f"  {item}/{p}: stored {got[p]}, this run {want[p]}" for p in sorted(set(got) & set(want))
            if got[p] != want[p]]
  return lines


def _path(path) -> str:
  # Orbax's metadata spells a NamedTuple's fields as dict keys: compare names, not key kinds.
  return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def _model_details(mngr, step: int, model_cfg, problems: list[str]) -> list[str]:
  out = []
  if model_cfg is not None:
    try:
      stored = checkpoint.restore_items(mngr, step, {
          checkpoint.MODEL_CONFIG: ocp.args.JsonRestore()})[checkpoint.MODEL_CONFIG]
    except Exception:  # noqa: BLE001 - the shapes below say enough
      stored = None
    if stored is not None:
      old, new = _flatten(stored), _flatten(json.loads(json.dumps(configs.to_dict(model_cfg))))
      out += [f"  model {k}: {_show(old.get(k, _ABSENT))} in checkpoint {step}, "
              f"{_show(new.get(k, _ABSENT))} now" for k in sorted(set(old) | set(new))
              if old.get(k, _ABSENT) != new.get(k, _ABSENT)]
  shown = problems[:8]
  out += shown + ([f"  ... and {len(problems) - len(shown)} more"] if len(problems) > 8 else [])
  return out


def _reason(e: BaseException) -> str:
  """The shortest message of an exception chain, on one line: TensorStore's outer errors carry
  the whole store spec, the inner ones say what went wrong."""
  messages = []
  while e is not None and len(messages) < 8:
    messages.append(f"{type(e).__name__}: {' '.join(str(e).split())}")
    e = e.__cause__ or e.__context__
  message = min(messages, key=len) if len(messages) > 1 else messages[0]
  return message if len(message) <= 300 else message[:297] + "..."


def _drop_closed_loop_reports() -> None:
  """A failed read leaves TensorStore's pending callbacks aimed at orbax's closed event loop, and
  Python prints each one's RuntimeError as "Exception ignored" (dozens of tracebacks after the
  run's one warning). Drop exactly those; every other unraisable exception is reported as before."""
  previous = sys.unraisablehook
  if getattr(previous, "drops_closed_loop", False):
    return

  def hook(unraisable):
    e = unraisable.exc_value
    if not (isinstance(e, RuntimeError) and str(e) == "Event loop is closed"):
      previous(unraisable)

  hook.drops_closed_loop = True
  sys.unraisablehook = hook


def _set_aside(mngr: ocp.CheckpointManager, damaged: list[tuple[int, str]], restored: int) -> None:
  """Rename each damaged step to `<step>.damaged` (`.damaged-2`, ... when taken), one warning
  each, and make the manager forget it, so the run can write that step again."""
  if not damaged:
    return
  root = epath.Path(mngr.directory)
  for step, why in damaged if distributed.is_main() else ():
    target, n = root / f"{step}{DAMAGED}", 1
    while target.exists():
      n += 1
      target = root / f"{step}{DAMAGED}-{n}"
    (root / str(step)).rename(target)
    log.warning("checkpoint %s/%d cannot be restored (%s); resuming from step %d instead; the "
                "damaged step is renamed to %s (delete it when done)", root, step, why, restored,
                target.name)
  distributed.barrier("llavamod_jax.resume.set_aside")
  mngr.reload()
