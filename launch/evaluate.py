r"""Evaluate a model (training workdir or HF directory) on held-out records, and its KL to a teacher;
or on one of the paper's benchmarks, from its own files, scored as LLaVA-1.5 scores it.

  python launch/evaluate.py --workdir=runs/mimic                       # run.json's eval files
  python launch/evaluate.py --hf_dir=exports/student --data=shapes/eval.jsonl \
      --data=shapes/pope_eval.jsonl
  python launch/evaluate.py --workdir=runs/mimic --teacher_hf_dir=teacher/ --out=eval.json

Prints one row per task (POPE: accuracy/precision/recall/F1/yes_ratio; other tasks: exact match after
normalisation; see llavamod_jax/evaluation.py) and, with a teacher, the mean KL(teacher || student) over
the reference answers' tokens. --out writes the metrics and every prediction as JSON. --workdir and
--out may be gs:// URIs.

Benchmarks (pope | mme | textvqa | gqa | scienceqa | mmbench; docs/evaluation.md: the files and one
command each):

  E=playground/data/eval
  python launch/evaluate.py --benchmark=pope --questions=$E/pope/llava_pope_test.jsonl \
      --image_root=$E/pope/val2014 --annotations=$E/pope/coco --hf_dir=exports/student \
      --out=results/pope.json
  python launch/evaluate.py --benchmark=pope --answers=results/pope.answers.jsonl \
      --annotations=$E/pope/coco --out=results/pope_rescored.json   # score answers, no model

Answers are greedy, written as LLaVA's answer JSONL (--answers_out, default beside --out); --out gets
{"benchmark", "n", "skipped": {reason: count}, "skipped_examples", "metrics", ...}. A question whose
image is missing or unreadable is skipped and counted, never stopping the rest. Benchmark files are
local paths.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time

from absl import app, flags, logging

from llavamod_jax import benchmarks, cli
from llavamod_jax.benchmarks.common import EXAMPLES

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
                                  "directory; --benchmark: the question file's image folder).",
                                  flag_values=FLAGS)
_TEACHER_HF_DIR = flags.DEFINE_string("teacher_hf_dir", None, "Teacher HF directory, for the KL.",
                                      flag_values=FLAGS)
_TEACHER_WORKDIR = flags.DEFINE_string("teacher_workdir", None, "Or: teacher training workdir.",
                                       flag_values=FLAGS)
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 8, "Prompts per generation batch.", lower_bound=1,
                                   flag_values=FLAGS)
_MAX_NEW_TOKENS = flags.DEFINE_integer("max_new_tokens", None, "Tokens generated per answer "
                                       "(default: 32; with --benchmark, the benchmark's: 128, "
                                       "ScienceQA and MMBench 1024).", lower_bound=1,
                                       flag_values=FLAGS)
_MAX_LENGTH = flags.DEFINE_integer("max_length", 2048, "KL: longest conversation in tokens.",
                                   lower_bound=1, flag_values=FLAGS)
_LIMIT = flags.DEFINE_integer("limit", None, "Evaluate only the first N records (--benchmark: "
                              "questions).", lower_bound=1, flag_values=FLAGS)
_POPE_RULE = flags.DEFINE_enum("pope_rule", "first_word", ["first_word", "llava"],
                               "How a POPE answer is read as yes/no.", flag_values=FLAGS)
_OUT = flags.DEFINE_string("out", None, "Write metrics and predictions to this JSON file "
                           "(--benchmark: the scores; required).", flag_values=FLAGS)
# Benchmarks.
_BENCHMARK = flags.DEFINE_enum("benchmark", None, list(benchmarks.NAMES),
                               "Evaluate on this benchmark's own files instead.", flag_values=FLAGS)
_QUESTIONS = flags.DEFINE_string("questions", None, "--benchmark: its question file (MMBench: the "
                                 "TSV).", flag_values=FLAGS)
_ANNOTATIONS = flags.DEFINE_multi_string("annotations", [], "--benchmark: a ground-truth file or "
                                         "folder (repeatable; docs/evaluation.md).",
                                         flag_values=FLAGS)
_ANSWERS = flags.DEFINE_string("answers", None, "--benchmark: score this LLaVA answer JSONL; no model "
                               "is loaded.", flag_values=FLAGS)
_ANSWERS_OUT = flags.DEFINE_string("answers_out", None, "--benchmark: write the answers here "
                                   "(default: --out with the suffix .answers.jsonl).",
                                   flag_values=FLAGS)
_MODEL_ID = flags.DEFINE_string("model_id", None, "--benchmark: the answers' model_id (default: the "
                                "model directory's name).", flag_values=FLAGS)
_LENGTH_MULTIPLE = flags.DEFINE_integer("length_multiple", 16, "--benchmark: prompts are padded to a "
                                        "multiple of this; one compile per padded length.",
                                        lower_bound=1, flag_values=FLAGS)
_IMAGE_WORKERS = flags.DEFINE_integer("image_workers", min(4, os.cpu_count() or 1),
                                      "--benchmark: threads decoding images ahead of generation.",
                                      lower_bound=1, flag_values=FLAGS)

# Flags of one mode only, checked so that a mistyped command fails before any work.
_RECORDS_ONLY = ("data", "teacher_hf_dir", "teacher_workdir", "max_length", "pope_rule")
_BENCHMARK_ONLY = ("questions", "annotations", "answers", "answers_out", "model_id",
                   "length_multiple", "image_workers")


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
  mode_flags = _RECORDS_ONLY if _BENCHMARK.value else _BENCHMARK_ONLY
  given = [f"--{name}" for name in mode_flags if FLAGS[name].present]
  if given:
    raise app.UsageError(f"{', '.join(given)} "
                         + ("do not apply with --benchmark" if _BENCHMARK.value
                            else "apply to --benchmark only"))
  if _BENCHMARK.value:
    return _benchmark()
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
      max_new_tokens=_MAX_NEW_TOKENS.value or 32, pope_rule=_POPE_RULE.value,
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


# ---------------------------------------------------------------------------------------------------
# Benchmarks.


def _benchmark() -> dict:
  bench = benchmarks.get(_BENCHMARK.value)
  if not _OUT.value:
    raise app.UsageError("--benchmark needs --out (the scores JSON)")
  if not (_QUESTIONS.value or _ANSWERS.value):
    raise app.UsageError("--benchmark needs --questions, or --answers to score an answer file")
  if _ANSWERS.value and (_WORKDIR.value or _HF_DIR.value):
    raise app.UsageError("--answers scores an answer file: give no --workdir / --hf_dir")
  model_path = None if _ANSWERS.value else _one(_WORKDIR.value, _HF_DIR.value,
                                                "--workdir / --hf_dir")
  if _STEP.value is not None and not _WORKDIR.value:
    raise app.UsageError("--step applies to --workdir only")
  annotations = list(_ANNOTATIONS.value)
  questions, skipped = None, {}
  try:
    if _QUESTIONS.value:
      # Scoring an answer file needs the questions, not their images.
      unchecked = benchmarks.images_unchecked() if _ANSWERS.value else contextlib.nullcontext()
      with unchecked:
        questions, skipped = bench.read_questions(_QUESTIONS.value,
                                                  image_root=_IMAGE_ROOT.value or "")
      questions = questions[:_LIMIT.value]
    bench.score(questions, benchmarks.Answers(), annotations)  # bad annotations fail before the model
  except (OSError, ValueError) as e:
    raise app.UsageError(str(e)) from e

  result = {"model": None, "questions": _QUESTIONS.value, "annotations": annotations}
  if _ANSWERS.value:
    try:
      answers = benchmarks.read_answers(_ANSWERS.value)
    except OSError as e:
      raise app.UsageError(f"--answers: {e}") from e
    result["answers"] = _ANSWERS.value
  else:
    answered, skipped_now, stats = _generate(bench, questions, model_path)
    for reason, ids in skipped_now.items():
      skipped.setdefault(reason, []).extend(ids)
    # The questions skipped are counted above, not again as unanswered.
    questions = [q for q, a in zip(questions, answered) if a is not None]
    answers = [a for a in answered if a is not None]
    result.update(model=model_path, answers=_answers_path(),
                  seconds=stats.total_s, questions_per_second=stats.to_json()["questions_per_second"],
                  generation=stats.to_json())

  from llavamod_jax import fileutil

  scores = _with_skips(bench.score(questions, answers, annotations), skipped)
  scores.update(result)
  print(json.dumps({k: scores[k] for k in ("benchmark", "n", "skipped", "metrics")}, indent=1))
  out = fileutil.path(_OUT.value)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps(scores, indent=1) + "\n")
  logging.info("wrote %s", out)
  return scores


def _with_skips(scores: dict, skipped: dict[str, list]) -> dict:
  """The score dict with the questions never asked ({reason: ids}) counted before the scorer's
  own skips."""
  counts = {reason: len(ids) for reason, ids in skipped.items()}
  examples = {reason: list(ids[:EXAMPLES]) for reason, ids in skipped.items()}
  for reason, n in scores["skipped"].items():
    counts[reason] = counts.get(reason, 0) + n
    examples[reason] = (examples.get(reason, []) + scores["skipped_examples"][reason])[:EXAMPLES]
  return {**scores, "skipped": counts, "skipped_examples": examples}


def _answers_path() -> str:
  if _ANSWERS_OUT.value:
    return _ANSWERS_OUT.value
  root, _ = os.path.splitext(_OUT.value)
  return root + ".answers.jsonl"


def _generate(bench, questions, model_path: str):
  """Answers the questions with the model and writes them (LLaVA's answer JSONL)."""
  from llavamod_jax import evaluation, workdir

  try:
    model, params, tokenizer, info = workdir.load_model(model_path, _STEP.value)
  except FileNotFoundError as e:
    raise app.UsageError(str(e)) from e
  model_id = _MODEL_ID.value or os.path.basename(os.path.normpath(model_path))
  logging.info("asking %s %d %s questions", model_path, len(questions), bench.NAME)
  answers, skipped, stats = evaluation.answer_questions(
      model, params, tokenizer, info, questions, max_new_tokens=_MAX_NEW_TOKENS.value,
      model_id=model_id, batch_size=_BATCH_SIZE.value, length_multiple=_LENGTH_MULTIPLE.value,
      workers=_IMAGE_WORKERS.value,
      progress=lambda done, total: logging.info("answered %d/%d questions", done, total))
  path = _answers_path()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  benchmarks.write_answers(path, [a for a in answers if a is not None])
  logging.info("%d answers in %.1f s (%.2f questions/s; %d batch shapes), written to %s",
               stats.questions, stats.total_s, stats.to_json()["questions_per_second"], stats.shapes,
               path)
  return answers, skipped, stats


def _run(argv) -> None:
  cli.quiet_orbax()
  try:
    main(argv)
  except app.UsageError as e:  # one line, not the module docstring and every flag
    sys.stderr.write(f"FATAL {e}\nPass --help to see help on flags.\n")
    sys.exit(e.exitcode)


if __name__ == "__main__":
  app.run(_run, flags_parser=cli.app_parser(FLAGS, __doc__))
