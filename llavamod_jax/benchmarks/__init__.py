"""The paper's benchmarks read from their own files and scored as LLaVA-1.5's evaluation scores them.

Pure Python (no jax, no model): question files in, prompts out; LLaVA answer files in, scores out.

    from llavamod_jax import benchmarks
    bench = benchmarks.get("pope")         # pope | mme | textvqa | gqa | scienceqa | mmbench
    questions, skipped = bench.read_questions("llava_pope_test.jsonl", image_root="val2014")
    # questions: [benchmarks.Question]: question_id (as in the file), image (a path under
    # image_root; bytes for MMBench; None for a text-only ScienceQA problem), prompt (the text to ask,
    # LLaVA's suffix included, no image token), category, max_new_tokens, metadata.
    # skipped: {reason: [ids]}, e.g. {"missing_image": [...]}.
    answers = [benchmarks.answer_for(q, generate(q), model_id="student") for q in questions]
    benchmarks.write_answers("answers.jsonl", answers)

    answers = benchmarks.read_answers("answers.jsonl")   # ours, LLaVA's or anyone's
    scores = bench.score(questions_or_None, answers, annotations=["coco/coco_pope_random.json", ...])
    # {"benchmark", "n", "skipped": {reason: count}, "skipped_examples": {reason: [first ids]},
    #  "metrics": {...}}

Each module says which files it reads, what it asks, and which official script's rules it follows.
`score` needs no question file where the answers carry what it needs (POPE: LLaVA's own answer
files carry neither category nor image, so pass its questions or our answers, whose metadata does).
What `annotations` holds:
- pope: the coco_pope_{adversarial,popular,random}.json label files, or their folder.
- mme: MME_Benchmark_release_version/ (or a subtask folder of it), or eval_tool's <subtask>.txt files.
- textvqa: TextVQA_0.5.1_val.json.          - gqa: testdev_balanced_questions.json.
- scienceqa: problems.json [+ pid_splits.json]; without them the question file's own answers.
- mmbench: the dev TSV itself (mmbench.write_submission writes the test split's upload file).
Metrics (fractions in [0, 1], MME's scores on MME's scale):
- pope: metrics[category] and metrics["overall"] = {"n", "accuracy", "precision", "recall", "f1",
  "yes_ratio"}.
- mme: metrics[subtask] = {"acc", "acc_plus", "score"}, metrics["perception"], metrics["cognition"].
- textvqa, gqa, scienceqa: metrics["accuracy"] (ScienceQA: the IMG subset).
- mmbench: metrics["accuracy"] (first pass) and metrics["circular_accuracy"].
"n" counts the answers scored. Bad records never stop a score: they are counted in "skipped" by
reason (unreadable_answer_line, duplicate_answer, not_in_questions, not_in_labels, unanswered, ...).
A question file of another benchmark is a ValueError that names the file and what was expected.
"""

from __future__ import annotations

from types import ModuleType

from llavamod_jax.benchmarks import gqa, mmbench, mme, pope, scienceqa, textvqa
from llavamod_jax.benchmarks.answers import Answer, Answers, answer_for, read_answers, write_answers
from llavamod_jax.benchmarks.common import Question, images_unchecked

BENCHMARKS: dict[str, ModuleType] = {m.NAME: m for m in (pope, mme, textvqa, gqa, scienceqa, mmbench)}
NAMES = tuple(BENCHMARKS)


def get(name: str) -> ModuleType:
  """The benchmark's module: NAME, QUESTION_FILE, MAX_NEW_TOKENS, read_questions(path, image_root="",
  annotations=()) and score(questions_or_None, answers, annotations)."""
  if name not in BENCHMARKS:
    raise ValueError(f"unknown benchmark {name!r}; expected one of {', '.join(NAMES)}")
  return BENCHMARKS[name]


__all__ = ["Answer", "Answers", "BENCHMARKS", "NAMES", "Question", "answer_for", "get",
           "images_unchecked", "read_answers", "write_answers"]
