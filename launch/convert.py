r"""Convert between Hugging Face model directories and Orbax checkpoints.

Hugging Face -> Orbax (step 0 unless --step):
  python launch/convert.py --hf_dir=DIR --ckpt_dir=CKPT [--dtype=bfloat16] [--param_dtype=float32]
Orbax -> Hugging Face (latest step unless --step):
  python launch/convert.py --ckpt_dir=CKPT --out_hf_dir=OUT [--dtype=bfloat16] [--overwrite]
The original LLaVA-MoD / MoE-LLaVA / LLaVA-1.5 code's checkpoint -> a plain transformers LLaVA (no
custom code, no DeepSpeed; llavamod_jax/hf/original.py):
  python launch/convert.py --from_original=DIR --out_hf_dir=OUT [--vision_dir=CLIP_DIR] [--dtype=...]
  --vision_dir: the image tower's directory when the checkpoint's config names it by hub id (needed
  when the checkpoint holds no tower weights, as LLaVA-1.5's).

--dtype is the module's compute dtype when reading HF, and the dtype of the written tensors when
writing HF (default: the checkpoint's own). --param_dtype is the dtype the params are stored in.
"""

from __future__ import annotations

import logging as std_logging
import os

from absl import app, flags, logging
from etils import epath

_HF_DIR = flags.DEFINE_string("hf_dir", None, "Hugging Face model directory to read.")
_CKPT_DIR = flags.DEFINE_string("ckpt_dir", None, "Orbax checkpoint directory (written or read).")
_OUT_HF_DIR = flags.DEFINE_string("out_hf_dir", None, "Hugging Face model directory to write.")
_STEP = flags.DEFINE_integer("step", None,
                             "Checkpoint step to write (default 0) or to read (default: latest).")
_DTYPE = flags.DEFINE_enum("dtype", None, ["float32", "bfloat16", "float16"],
                           "HF -> Orbax: compute dtype. Orbax -> HF: dtype of the written tensors.")
_PARAM_DTYPE = flags.DEFINE_enum("param_dtype", None, ["float32", "bfloat16", "float16"],
                                 "HF -> Orbax only: dtype the params are stored in (default float32).")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace a non-empty --out_hf_dir.")
_FROM_ORIGINAL = flags.DEFINE_string("from_original", None, "A checkpoint directory of the original "
                                     "LLaVA-MoD / MoE-LLaVA / LLaVA-1.5 code to convert.")
_VISION_DIR = flags.DEFINE_string("vision_dir", None, "--from_original: the image tower's directory.")


def _direction() -> str:
  """'to_orbax', 'to_hf' or 'from_original' from the flags given; a usage error names what is
  wrong."""
  if _FROM_ORIGINAL.value:
    if _CKPT_DIR.value or _HF_DIR.value or not _OUT_HF_DIR.value:
      raise app.UsageError("--from_original takes --out_hf_dir (and not --ckpt_dir or --hf_dir)")
    if not os.path.isfile(os.path.join(_FROM_ORIGINAL.value, "config.json")):
      raise app.UsageError(f"--from_original={_FROM_ORIGINAL.value}: no config.json there")
    return "from_original"
  if _VISION_DIR.value:
    raise app.UsageError("--vision_dir only applies to --from_original")
  if not _CKPT_DIR.value:
    raise app.UsageError("--ckpt_dir is required")
  if bool(_HF_DIR.value) == bool(_OUT_HF_DIR.value):
    raise app.UsageError("give exactly one of --hf_dir (HF -> Orbax) or --out_hf_dir (Orbax -> HF)")
  if _HF_DIR.value:
    if _OVERWRITE.value:
      raise app.UsageError("--overwrite only applies to --out_hf_dir (Orbax -> HF)")
    if not os.path.isfile(os.path.join(_HF_DIR.value, "config.json")):
      raise app.UsageError(f"--hf_dir={_HF_DIR.value}: no config.json there")
    return "to_orbax"
  if _PARAM_DTYPE.value:
    raise app.UsageError("--param_dtype only applies to --hf_dir (HF -> Orbax)")
  if not epath.Path(_CKPT_DIR.value).is_dir():  # epath: gs:// checkpoints work too
    raise app.UsageError(f"--ckpt_dir={_CKPT_DIR.value}: no such checkpoint directory")
  return "to_hf"


def _summary(params) -> str:
  import jax

  leaves = jax.tree.leaves(params)
  count = sum(x.size for x in leaves)
  nbytes = sum(x.size * x.dtype.itemsize for x in leaves)
  dtypes = sorted({str(x.dtype) for x in leaves})
  return f"{count:,} parameters, {nbytes:,} bytes ({'/'.join(dtypes)})"


def _quiet_orbax(record) -> bool:
  # Orbax logs dozens of INFO lines per save/restore; keep its warnings, drop the chatter.
  return record.levelno >= std_logging.WARNING or "/orbax/" not in record.pathname


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  direction = _direction()
  logging.get_absl_logger().addFilter(_quiet_orbax)

  from llavamod_jax import checkpoint, hf

  try:
    if direction == "from_original":
      out = hf.from_original(_FROM_ORIGINAL.value, _OUT_HF_DIR.value, vision_dir=_VISION_DIR.value,
                             dtype=_DTYPE.value, overwrite=_OVERWRITE.value)
      logging.info("wrote Hugging Face model %s from the original checkpoint %s", out,
                   _FROM_ORIGINAL.value)
    elif direction == "to_orbax":
      model, params = hf.load(_HF_DIR.value, dtype=_DTYPE.value or "float32",
                              param_dtype=_PARAM_DTYPE.value or "float32")
      logging.info("read %s: %s, %s", _HF_DIR.value, type(model).__name__, _summary(params))
      step_dir = checkpoint.save_model(_CKPT_DIR.value, model, params, step=_STEP.value or 0)
      logging.info("wrote Orbax checkpoint %s", step_dir)
    else:
      model, params = checkpoint.restore_model(_CKPT_DIR.value, step=_STEP.value)
      logging.info("read %s: %s, %s", _CKPT_DIR.value, type(model).__name__, _summary(params))
      out = hf.save(model, params, _OUT_HF_DIR.value, dtype=_DTYPE.value, overwrite=_OVERWRITE.value)
      logging.info("wrote Hugging Face model %s (tensors in %s)", out,
                   _DTYPE.value or "the checkpoint's dtype")
  except (FileNotFoundError, FileExistsError, ValueError, NotImplementedError) as e:
    # Missing inputs and occupied outputs are the user's to fix; no traceback.
    raise app.UsageError(str(e)) from e


if __name__ == "__main__":
  app.run(main)
