"""Orbax checkpoints: one directory per step, one named item per kind of state.

Layout of `CKPT_DIR/<step>/`:
  params/        the parameter tree (orbax StandardSave: tensorstore/OCDBT, restorable onto any mesh)
  model_config/  `configs.to_dict(model.cfg)` as JSON, so a checkpoint rebuilds its own module
  opt_state/     the optimizer state (a training run's checkpoints; `save_train_state`)
  train_state/   JSON: the step, the optimizer's own step count and the rng key data
  data/          the grain iterator's state, so a resumed run continues on the same batches
Readers that only want the model ignore the training items.

Orbax writes each step into a temporary directory and renames it into place once every item is
written, so a crash never leaves a step that looks complete; `save_items` waits for the (async) write
to finish before it returns.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

import flax.linen as nn
import jax
import orbax.checkpoint as ocp
from etils import epath

from llavamod_jax import models, sharding
from llavamod_jax.models import configs

PARAMS = "params"
MODEL_CONFIG = "model_config"
OPT_STATE, TRAIN_STATE, DATA = "opt_state", "train_state", "data"


def _grain():
  import grain  # only training checkpoints hold a data iterator

  return grain


def _handlers() -> dict[str, ocp.CheckpointHandler]:
  return {PARAMS: ocp.StandardCheckpointHandler(), MODEL_CONFIG: ocp.JsonCheckpointHandler(),
          OPT_STATE: ocp.StandardCheckpointHandler(), TRAIN_STATE: ocp.JsonCheckpointHandler(),
          DATA: _grain().checkpoint.CheckpointHandler()}


def _path(ckpt_dir: str | os.PathLike) -> epath.Path:
  # Orbax's tensorstore backend rejects relative paths; URIs (gs://...) are absolute already.
  path = epath.Path(ckpt_dir)
  return path if "://" in str(ckpt_dir) else epath.Path(os.path.abspath(os.fspath(ckpt_dir)))


def manager(ckpt_dir: str | os.PathLike, *, create: bool = True,
            item_handlers: Mapping[str, ocp.CheckpointHandler] | None = None,
            **options) -> ocp.CheckpointManager:
  """A CheckpointManager over `ckpt_dir` that knows the model items (and any `item_handlers`).

  create=False leaves a missing directory missing (readers). `options` are
  `ocp.CheckpointManagerOptions` fields (max_to_keep, save_interval_steps, ...); step directories
  keep orbax's default names (`CKPT_DIR/<step>`), which the item checks here rely on.
  """
  renamed = sorted(set(options) & {"step_prefix", "step_format_fixed_length", "step_name_format"})
  if renamed:
    raise ValueError(f"checkpoint.manager: {renamed} not supported (step directories are <step>)")
  handlers = {**_handlers(), **(item_handlers or {})}
  opts = ocp.CheckpointManagerOptions(create=create, **options)
  return ocp.CheckpointManager(_path(ckpt_dir), item_handlers=handlers, options=opts)


def save_items(mngr: ocp.CheckpointManager, step: int, items: Mapping[str, ocp.args.CheckpointArgs]):
  """Write `items` (name -> orbax save args) as checkpoint `step` and wait until it is final."""
  if step in mngr.all_steps():
    raise FileExistsError(f"{mngr.directory}: step {step} already exists")
  saved = mngr.save(step, args=ocp.args.Composite(**items), force=True)
  mngr.wait_until_finished()
  if not saved:
    raise RuntimeError(f"{mngr.directory}: orbax declined to save step {step}")


def resolve_step(mngr: ocp.CheckpointManager, step: int | None) -> int:
  """`step`, or the latest one when None; raises naming the directory if there is no such step."""
  steps = mngr.all_steps()
  if not steps:
    raise FileNotFoundError(f"{mngr.directory}: no checkpoint steps found "
                            f"(expected subdirectories like {mngr.directory}/0 written by orbax)")
  if step is None:
    return max(steps)
  if step not in steps:
    raise FileNotFoundError(f"{mngr.directory}: no checkpoint at step {step} (steps: {sorted(steps)})")
  return step


def restore_items(mngr: ocp.CheckpointManager, step: int,
                  items: Mapping[str, ocp.args.CheckpointArgs]) -> dict[str, Any]:
  """Restore the named items of `step`; a missing item is an error naming the step directory."""
  stored = stored_items(mngr, step)
  missing = [name for name in items if name not in stored]
  if missing:
    raise FileNotFoundError(f"{mngr.directory}/{step}: checkpoint has no item(s) {missing} "
                            f"(it has {sorted(stored)})")
  restored = mngr.restore(step, args=ocp.args.Composite(**items))
  return {name: restored[name] for name in items}


def stored_items(mngr: ocp.CheckpointManager, step: int) -> set[str]:
  """The item directories of step `step` (params, opt_state, ...)."""
  step_dir = epath.Path(mngr.directory) / str(step)
  return {p.name for p in step_dir.iterdir() if p.is_dir()} if step_dir.exists() else set()


# ---------------------------------------------------------------------------------------------------
# A training run: model, optimizer state, step and rng, data iterator.


def save_train_state(mngr: ocp.CheckpointManager, step: int, model_cfg, params, opt_state,
                     meta: dict, data_iter) -> None:
  """Start writing checkpoint `step` of a run (async: `mngr.wait_until_finished()` ends it).
  `meta` is JSON (step counters, rng key data). A step that already exists is left as it is."""
  if step in mngr.all_steps():
    return
  mngr.save(step, args=ocp.args.Composite(**{
      PARAMS: ocp.args.StandardSave(params),
      MODEL_CONFIG: ocp.args.JsonSave(configs.to_dict(model_cfg)),
      OPT_STATE: ocp.args.StandardSave(opt_state),
      TRAIN_STATE: ocp.args.JsonSave(meta),
      DATA: _grain().checkpoint.CheckpointSave(data_iter),
  }), force=True)


def restore_train_state(mngr: ocp.CheckpointManager, step: int, params, opt_state, data_iter):
  """(params, opt_state, meta) of checkpoint `step`, restored onto the shapes, dtypes and shardings
  of the given `params` and `opt_state`; `data_iter` is set to the saved position."""
  abstract = lambda tree: jax.tree.map(  # noqa: E731
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)
  got = restore_items(mngr, step, {
      PARAMS: ocp.args.StandardRestore(abstract(params)),
      OPT_STATE: ocp.args.StandardRestore(abstract(opt_state)),
      TRAIN_STATE: ocp.args.JsonRestore(),
      DATA: _grain().checkpoint.CheckpointRestore(data_iter),
  })
  return got[PARAMS], got[OPT_STATE], got[TRAIN_STATE]


# ---------------------------------------------------------------------------------------------------
# Model only: params + the config that rebuilds the module.


def save_model(ckpt_dir: str | os.PathLike, model, params, step: int = 0) -> epath.Path:
  """Write `params` and `model.cfg` as checkpoint `step` of `ckpt_dir`; returns the step directory."""
  params = nn.unbox(params)
  problems = _mismatches(_flatten(params), _flatten(nn.unbox(models.abstract_params(model))))
  if problems:
    raise ValueError(f"{ckpt_dir}: params do not match the model, nothing written\n"
                     + "\n".join(problems[:40]))
  with manager(ckpt_dir) as mngr:
    save_items(mngr, step, {
        PARAMS: ocp.args.StandardSave(params),
        MODEL_CONFIG: ocp.args.JsonSave(configs.to_dict(model.cfg)),
    })
    return epath.Path(mngr.directory) / str(step)


def restore_config(ckpt_dir: str | os.PathLike, step: int | None = None):
  """The model config stored with checkpoint `step` (latest when None)."""
  with _reader(ckpt_dir) as mngr:
    step = resolve_step(mngr, step)
    return _config(mngr, step)


def restore_model(ckpt_dir: str | os.PathLike, step: int | None = None, *, mesh=None, rules=None,
                  shardings=None):
  """Rebuild (model, params) from checkpoint `step` of `ckpt_dir` (latest when None).

  Params come back in the dtype they were saved in, placed on `shardings` (a tree like the params),
  or on `sharding.param_shardings` of the model's logical axes over `mesh` with `rules` (default
  `sharding.DEFAULT_RULES`), or else on this process's first device.
  """
  with _reader(ckpt_dir) as mngr:
    step = resolve_step(mngr, step)
    model = models.build(_config(mngr, step))
    boxed = models.abstract_params(model)
    if shardings is None and mesh is not None:
      shardings = sharding.param_shardings(boxed, mesh, rules or sharding.DEFAULT_RULES)
    if shardings is None:
      one = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
      shardings = jax.tree.map(lambda _: one, nn.unbox(boxed))
    target = _params_target(mngr, step, nn.unbox(boxed), shardings)
    params = restore_items(mngr, step, {PARAMS: ocp.args.StandardRestore(target)})[PARAMS]
  return model, params


def _reader(ckpt_dir) -> ocp.CheckpointManager:
  path = _path(ckpt_dir)
  if not path.exists():
    raise FileNotFoundError(f"{ckpt_dir}: checkpoint directory does not exist")
  return manager(path, create=False)


def _config(mngr: ocp.CheckpointManager, step: int):
  d = restore_items(mngr, step, {MODEL_CONFIG: ocp.args.JsonRestore()})[MODEL_CONFIG]
  return configs.from_dict(d)


def _params_target(mngr, step: int, expected, shardings):
  """ShapeDtypeStructs to restore into: stored dtypes, checked against the model's shapes."""
  if PARAMS not in stored_items(mngr, step):
    raise FileNotFoundError(f"{mngr.directory}/{step}: checkpoint has no '{PARAMS}' item")
  stored = mngr.item_metadata(step)[PARAMS]
  stored = getattr(stored, "tree", stored)  # TreeMetadata wraps the tree of ArrayMetadata
  flat_stored = _flatten(stored)
  problems = _mismatches(flat_stored, _flatten(expected))
  if problems:
    raise ValueError(f"{mngr.directory}/{step}/{PARAMS}: parameters do not match the stored "
                     "model config\n" + "\n".join(problems[:40]))
  return jax.tree_util.tree_map_with_path(
      lambda path, e, sh: jax.ShapeDtypeStruct(e.shape, flat_stored[_key(path)].dtype, sharding=sh),
      expected, shardings)


def _mismatches(got: dict[str, Any], expected: dict[str, Any]) -> list[str]:
  """Missing, unexpected and wrongly shaped parameters, one line each (flat path -> array-like)."""
  problems = [f"  missing parameter: {p}" for p in sorted(set(expected) - set(got))]
  problems += [f"  unexpected parameter: {p}" for p in sorted(set(got) - set(expected))]
  problems += [f"  {p}: shape {tuple(got[p].shape)}, model expects {tuple(e.shape)}"
               for p, e in sorted(expected.items())
               if p in got and tuple(got[p].shape) != tuple(e.shape)]
  return problems


def _flatten(tree) -> dict[str, Any]:
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {_key(path): leaf for path, leaf in leaves}


def _key(path) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)
