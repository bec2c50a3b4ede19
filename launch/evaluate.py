r"""Evaluate a model (training workdir or HF directory) on held-out records, and its KL to a teacher.

  python launch/evaluate.py --workdir=runs/mimic                       # run.json's eval files
  python launch/evaluate.py --hf_dir=exports/student --data=shapes/eval.jsonl \
      --data=shapes/pope_eval.jsonl
  python launch/evaluate.py --workdir=runs/mimic --teacher_hf_dir=teacher/ --out=eval.json

Prints one row per task (POPE: accuracy/precision/recall/F1/yes_ratio; other tasks: exact match after
normalisation; see llavamod_jax/evaluation.py) and, with a teacher, the mean KL(teacher || student) over
the reference answers' tokens. --out writes the metrics and every prediction as JSON. --workdir and
--out may be gs:// URIs.
"""

from __future__ import annotations

import json
import time

from absl import app, flags, logging

from llavamod_jax import cli

FLAGS = flags.FlagValues()
_WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir to evaluate.", flag_values=FLAGS)
_HF_DIR = flags.DEFINE_string("hf_dir", None, "Or: Hugging Face directory to evaluate.",
                              flag_values=FLAGS)
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step of --workdir (default: latest).",
                             flag_values=FLAGS)
_DATA = flags.DEFINE_multi_string("data", [], "Evaluation JSONL/JSON file(s) (repeatable; default: "
                                  "run.json's data.eval_files).", flag_values=FLAGS)
_IMAGE_ROOT = flags.DEFINE_string("image_root", None, "Root of relative image paths (default: "
                                  "run.json's data.image_root for its files, else each file's "
                                  "directory).", flag_values=FLAGS)
_TEACHER_HF_DIR = flags.DEFINE_string("teacher_hf_dir", None, "Teacher HF directory, for the KL.",
                                      flag_values=FLAGS)
_TEACHER_WORKDIR = flags.DEFINE_string("teacher_workdir", None, "Or: teacher training workdir.",
                                       flag_values=FLAGS)
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 8, "Prompts per generation batch.", lower_bound=1,
                                   flag_values=FLAGS)
_MAX_NEW_TOKENS = flags.DEFINE_integer("max_new_tokens", 32, "Tokens generated per answer.",
                                       lower_bound=1, flag_values=FLAGS)
_MAX_LENGTH = flags.DEFINE_integer("max_length", 2048, "KL: longest conversation in tokens.",
                                   lower_bound=1, flag_values=FLAGS)
_LIMIT = flags.DEFINE_integer("limit", None, "Evaluate only the first N records.", lower_bound=1,
                              flag_values=FLAGS)
_POPE_RULE = flags.DEFINE_enum("pope_rule", "first_word", ["first_word", "llava"],
                               "How a POPE answer is read as yes/no.", flag_values=FLAGS)
_OUT = flags.DEFINE_string("out", None, "Write metrics and predictions to this JSON file.",
                           flag_values=FLAGS)


def parse(argv):
  return cli.parse(FLAGS, argv, __doc__)


def _one(a: str | None, b: str | None, names: str, required: bool = True) -> str | None:
  if a and b:
    raise app.UsageError(f"give only one of {names}")
  if required and not (a or b):
    raise app.UsageError(f"give one of {names}")
  return a or b


def main(argv) -> dict:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  model_path = _one(_WORKDIR.value, _HF_DIR.value, "--workdir / --hf_dir")
  teacher_path = _one(_TEACHER_WORKDIR.value, _TEACHER_HF_DIR.value,
                      "--teacher_workdir / --teacher_hf_dir", required=False)
  if _STEP.value is not None and not _WORKDIR.value:
    raise app.UsageError("--step applies to --workdir only")

  from llavamod_jax import evaluation, fileutil, workdir

  try:
    model, params, tokenizer, info = workdir.load_model(model_path, _STEP.value)
  except FileNotFoundError as e:
    raise app.UsageError(str(e)) from e
  files, image_root = list(_DATA.value), _IMAGE_ROOT.value
  if not files:
    files = list(info.data.eval_files)
    image_root = image_root or info.data.image_root
    if not files:
      raise app.UsageError(f"{model_path} names no eval files (run.json data.eval_files); pass --data")
  records = evaluation.read_records(files, image_root=image_root, limit=_LIMIT.value)
  logging.info("evaluating %s on %d records of %s", model_path, len(records), ", ".join(files))

  start = time.time()
  metrics, predictions = evaluation.evaluate(
      model, params, tokenizer, info, records, batch_size=_BATCH_SIZE.value,
      max_new_tokens=_MAX_NEW_TOKENS.value, pope_rule=_POPE_RULE.value,
      progress=lambda done, total: logging.info("generated %d/%d answers", done, total))
  logging.info("generation took %.1f s", time.time() - start)

  if teacher_path:
    t_model, t_params, t_tokenizer, t_info = workdir.load_model(teacher_path)
    if t_tokenizer.get_vocab() != tokenizer.get_vocab():
      raise app.UsageError(f"teacher {teacher_path} and student {model_path} have different "
                           "tokenizers; the KL needs a shared vocabulary")
    batches = evaluation.kl_batches(tokenizer, info, t_info, records, batch_size=_BATCH_SIZE.value,
                                    max_length=_MAX_LENGTH.value)
    metrics["kl_to_teacher"] = evaluation.kl_to_teacher(model, params, t_model, t_params, batches)

  print(evaluation.table(metrics))
  result = {"model": str(model_path), "step": _STEP.value, "teacher": teacher_path, "data": files,
            "metrics": metrics, "predictions": predictions}
  if _OUT.value:
    out = fileutil.path(_OUT.value)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    logging.info("wrote %s", out)
  return result


def _run(argv) -> None:
  cli.quiet_orbax()
  main(argv)


if __name__ == "__main__":
  app.run(_run, flags_parser=cli.app_parser(FLAGS, __doc__))
