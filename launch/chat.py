r"""Ask a trained model (training workdir or HF directory) a question about an image; prints the answer.

  python launch/chat.py --workdir=runs/mimic --image=photo.png --question="What color is the circle?"
  python launch/chat.py --hf_dir=exports/student --image=photo.png --question="Describe the image." \
      --temperature=0.7 --top_p=0.9 --max_new_tokens=64

The prompt is the run's template ("<image>\n" is put before the question unless it holds "<image>");
the image is preprocessed with the run's settings. Greedy unless --temperature > 0.
"""

from __future__ import annotations

from absl import app, flags

from llavamod_jax import cli

FLAGS = flags.FlagValues()
_WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir.", flag_values=FLAGS)
_HF_DIR = flags.DEFINE_string("hf_dir", None, "Or: Hugging Face directory.", flag_values=FLAGS)
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step of --workdir (default: latest).",
                             flag_values=FLAGS)
_IMAGE = flags.DEFINE_string("image", None, "Image file (omit for a text-only question).",
                             flag_values=FLAGS)
_QUESTION = flags.DEFINE_string("question", None, "The question.", flag_values=FLAGS)
_SYSTEM = flags.DEFINE_string("system", None, "System prompt (default: the template's).",
                              flag_values=FLAGS)
_TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "0: greedy.", lower_bound=0.0,
                                  flag_values=FLAGS)
_TOP_P = flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass (with --temperature > 0).",
                            lower_bound=0.0, upper_bound=1.0, flag_values=FLAGS)
_MAX_NEW_TOKENS = flags.DEFINE_integer("max_new_tokens", 128, "Longest answer in tokens.",
                                       lower_bound=1, flag_values=FLAGS)
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.", flag_values=FLAGS)


def parse(argv):
  return cli.parse(FLAGS, argv, __doc__)


def main(argv) -> str:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if bool(_WORKDIR.value) == bool(_HF_DIR.value):
    raise app.UsageError("give exactly one of --workdir / --hf_dir")
  if not _QUESTION.value:
    raise app.UsageError("--question is required")

  from llavamod_jax import evaluation, workdir

  try:
    model, params, tokenizer, info = workdir.load_model(_WORKDIR.value or _HF_DIR.value, _STEP.value)
    record = evaluation.question_record(_QUESTION.value, [_IMAGE.value] if _IMAGE.value else [],
                                        system=_SYSTEM.value)
    [answer] = evaluation.generate_answers(
        model, params, tokenizer, info, [record], batch_size=1,
        max_new_tokens=_MAX_NEW_TOKENS.value, temperature=_TEMPERATURE.value, top_p=_TOP_P.value,
        seed=_SEED.value)
  except (FileNotFoundError, ValueError) as e:  # missing files, bad images, placeholder count
    raise app.UsageError(str(e)) from e
  print(answer)
  return answer


def _run(argv) -> None:
  cli.quiet_orbax()
  main(argv)


if __name__ == "__main__":
  app.run(_run, flags_parser=cli.app_parser(FLAGS, __doc__))
