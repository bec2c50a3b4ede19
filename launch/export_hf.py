r"""Export a training workdir as a Hugging Face model directory; optionally upload it to the hub.

  python launch/export_hf.py --workdir=runs/mimic --out=exports/student [--dtype=bfloat16] \
      [--overwrite]
  python launch/export_hf.py --workdir=runs/mimic --out=exports/student --push_to_hub=ORG/NAME [--dry_run]
  python launch/export_hf.py --out=exports/student --push_to_hub=ORG/NAME   # upload an existing export

The directory loads with `transformers.LlavaForConditionalGeneration.from_pretrained` (dense, or with a
Qwen2-MoE language model), `AutoTokenizer` and `AutoProcessor`; what it holds is described in
llavamod_jax/export.py. --push_to_hub uses huggingface_hub's own credentials (HF_TOKEN or
`hf auth login`); --dry_run lists the files and sizes that would be sent and makes no network call.
--workdir may be a gs:// URI; --out is a local directory.
"""

from __future__ import annotations

from pathlib import Path

from absl import app, flags, logging

from llavamod_jax import cli

FLAGS = flags.FlagValues()
_WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir to export.", flag_values=FLAGS)
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: latest).", flag_values=FLAGS)
_OUT = flags.DEFINE_string("out", None, "Hugging Face directory to write (or to upload).",
                           flag_values=FLAGS)
_DTYPE = flags.DEFINE_enum("dtype", None, ["float32", "bfloat16", "float16"],
                           "Dtype of the written tensors (default: the checkpoint's).",
                           flag_values=FLAGS)
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace a non-empty --out.", flag_values=FLAGS)
_PUSH_TO_HUB = flags.DEFINE_string("push_to_hub", None, "Upload --out to this hub repo (ORG/NAME).",
                                   flag_values=FLAGS)
_PRIVATE = flags.DEFINE_bool("private", False, "Create the hub repo as private.", flag_values=FLAGS)
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "With --push_to_hub: list what would be sent, send "
                             "nothing.", flag_values=FLAGS)


def parse(argv):
  return cli.parse(FLAGS, argv, __doc__)


def main(argv) -> list[tuple[str, int]] | None:
  """Returns the uploaded files (or those a dry run would send) when --push_to_hub is given."""
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not _OUT.value:
    raise app.UsageError("--out is required")
  if not _WORKDIR.value and not _PUSH_TO_HUB.value:
    raise app.UsageError("--workdir is required (or --push_to_hub alone, to upload an existing --out)")
  if _DRY_RUN.value and not _PUSH_TO_HUB.value:
    raise app.UsageError("--dry_run applies to --push_to_hub")
  if _PUSH_TO_HUB.value and "/" not in _PUSH_TO_HUB.value:
    raise app.UsageError(f"--push_to_hub={_PUSH_TO_HUB.value}: expected ORG/NAME")

  from llavamod_jax import export, fileutil, workdir

  if fileutil.is_remote(_OUT.value):
    raise app.UsageError(f"--out={_OUT.value}: export to a local directory (then copy it, or "
                         "--push_to_hub it)")
  out = Path(_OUT.value)
  if (_WORKDIR.value and not fileutil.is_remote(_WORKDIR.value)
      and Path(_WORKDIR.value).resolve().is_relative_to(out.resolve())):
    raise app.UsageError(f"--out={out} holds --workdir={_WORKDIR.value}; export somewhere else")
  try:
    if _WORKDIR.value:
      if not workdir.is_workdir(_WORKDIR.value):
        raise FileNotFoundError(f"--workdir={_WORKDIR.value}: no run.json or checkpoints/ there")
      model, params, tokenizer, info = workdir.load_model(_WORKDIR.value, _STEP.value)
      export.export_hf(model, params, tokenizer, info, out, dtype=_DTYPE.value,
                       overwrite=_OVERWRITE.value)
      logging.info("wrote %s", out)
      print(f"exported {_WORKDIR.value} -> {out}")
    elif not (out / "config.json").is_file():
      raise FileNotFoundError(f"--out={out}: no config.json to upload (give --workdir to export)")
  except (FileNotFoundError, FileExistsError) as e:
    raise app.UsageError(str(e)) from e
  if not _PUSH_TO_HUB.value:
    return None
  files = export.upload(out, _PUSH_TO_HUB.value, dry_run=_DRY_RUN.value, private=_PRIVATE.value)
  verb = "would upload" if _DRY_RUN.value else "uploaded"
  print(f"{verb} {len(files)} files ({sum(s for _, s in files):,} bytes) to "
        f"https://huggingface.co/{_PUSH_TO_HUB.value}:")
  for name, size in files:
    print(f"  {size:>14,}  {name}")
  return files


def _run(argv) -> None:
  cli.quiet_orbax()
  main(argv)


if __name__ == "__main__":
  app.run(_run, flags_parser=cli.app_parser(FLAGS, __doc__))
