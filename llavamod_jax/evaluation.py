"""Evaluation: answers generated for held-out records, scored per task; KL to a teacher.

    records = evaluation.read_records(["data/eval.jsonl"])
    metrics, predictions = evaluation.evaluate(model, params, tokenizer, info, records, batch_size=8,
                                               max_new_tokens=32)
    metrics["pope"]   # {"n", "accuracy", "precision", "recall", "f1", "yes_ratio"}
    metrics["color"]  # {"n", "exact_match"}

Records are LLaVA conversation records (JSONL or a JSON list); the last assistant turn is the reference
answer and everything before it the prompt. `"task"` names the metric group (absent: "vqa"); records of
task "pope" get the POPE metrics, every other task exact match. When POPE records come in several
`"category"` values (random, popular, adversarial), each also gets a group "pope/<category>". A POPE
record may give its yes/no in `"label"`, as POPE's own annotation files do; its reference answer can
then be a sentence ("A red circle is not in the image."). Without a label the answer must read yes/no.

Scoring (pure functions, below):
- `normalize`: lower case, punctuation removed, whitespace collapsed ("Left." == "left").
- exact match: normalized prediction == normalized reference.
- POPE: "yes" is the positive class. rule="first_word" (default) reads a prediction as "yes" when its
  first normalized word is "yes" and as "no" otherwise, so unreadable output never counts as a yes.
  rule="llava" is the original LLaVA `eval_pope.py`: keep the text before the first ".", drop commas,
  and answer "no" when the words contain "no", "No" or "not", else "yes" (anything else is a yes).
  precision = TP / predicted yes, recall = TP / reference yes, F1 their harmonic mean (0 when undefined),
  yes_ratio = predicted yes / n, as the POPE script reports them.

Generation is greedy by default and batched: prompts are left-padded to a multiple of
`length_multiple` and the last batch is filled up with copies of its last row, so a whole evaluation
compiles once per prompt-length bucket.

Benchmarks (`llavamod_jax.benchmarks`; launch/evaluate.py --benchmark): each `benchmarks.Question` is
asked as a one-question record (`benchmark_record`: "<image>\n" + its prompt, through the run's
template), and `answer_questions` answers them all:

    answers, skipped, stats = evaluation.answer_questions(model, params, tokenizer, info, questions,
                                                          batch_size=8, model_id="student")
    # answers: a benchmarks.Answer per question (None: skipped); skipped: {reason: [question ids]};
    # stats: GenerationStats (seconds in tokenisation, image decoding, generation)

The prompts are sorted by (max_new_tokens, images, length) before batching, so each batch pads to a
length bucket shared with its neighbours and generation compiles once per bucket, however the
questions are ordered. Images are decoded and preprocessed on worker threads a few batches ahead of
generation. A question whose image is missing or cannot be decoded, or whose prompt the template
cannot encode, is skipped (missing_image | unreadable_image | unencodable_prompt) and the rest go on.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import json
import logging
import os
import re
import string
import time
from typing import Any, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from llavamod_jax import benchmarks, fileutil
from llavamod_jax import generate as generate_lib
from llavamod_jax import losses, models
from llavamod_jax.data import image, pipeline, sources, templates

log = logging.getLogger(__name__)
POPE = "pope"
_PUNCT = re.compile(f"[{re.escape(string.punctuation)}]")


# ---------------------------------------------------------------------------------------------------
# Records.


@dataclasses.dataclass(frozen=True)
class EvalRecord:
  id: str
  task: str
  messages: tuple[tuple[str, str], ...]  # the whole conversation; the last turn is the reference
  images: tuple[str | bytes, ...] = ()
  category: str = ""
  origin: str = ""
  label: str = ""  # POPE: the reference's "yes" / "no" when the answer is a sentence

  @property
  def prompt(self) -> tuple[tuple[str, str], ...]:
    return self.messages[:-1]

  @property
  def answer(self) -> str:
    return self.messages[-1][1]

  def to_record(self) -> sources.Record:
    """As a data-pipeline record (for teacher KL batches)."""
    return sources.Record(self.id, "conversation", self.messages, self.images, origin=self.origin)


def question_record(question: str, images: Sequence[str | bytes] = (), system: str | None = None,
                    record_id: str = "chat") -> EvalRecord:
  """A one-question record for chat: `<image>\\n` is prepended per image unless the question
  already holds the placeholders."""
  if images and templates.IMAGE_PLACEHOLDER not in question:
    question = (templates.IMAGE_PLACEHOLDER + "\n") * len(images) + question
  found = question.count(templates.IMAGE_PLACEHOLDER)
  if found != len(images):
    raise ValueError(f"the question holds {found} {templates.IMAGE_PLACEHOLDER} placeholder(s) for "
                     f"{len(images)} image(s)")
  messages = ((("system", system),) if system is not None else ()) + (
      ("user", question), ("assistant", ""))
  return EvalRecord(record_id, "chat", messages, tuple(images))


def read_records(paths: str | os.PathLike | Sequence[str | os.PathLike], *,
                 image_root: str | os.PathLike | None = None,
                 limit: int | None = None) -> list[EvalRecord]:
  """Conversation records of JSONL / JSON-list files, in order (at most `limit`). Relative image
  paths are joined to `image_root` (default: each file's directory). A record that is not a valid
  conversation raises `sources.DataError` naming its file and line."""
  if isinstance(paths, (str, os.PathLike)):
    paths = [paths]
  out: list[EvalRecord] = []
  for path in paths:
    path = fileutil.path(path)
    if not path.is_file():
      raise sources.DataError(f"evaluation file {str(path)!r} does not exist")
    root = os.fspath(image_root) if image_root is not None else _directory(path)
    for origin, raw in _raw_records(path):
      if limit is not None and len(out) >= limit:
        return out
      rec = sources.parse(raw, origin, root, kind="conversation")
      if isinstance(rec, sources.Bad):
        raise sources.DataError(f"evaluation record unusable: {rec.message()}")
      out.append(EvalRecord(rec.id, str(raw.get("task") or "vqa"), rec.messages, rec.images,
                            str(raw.get("category") or ""), origin, str(raw.get("label") or "")))
  return out


def _directory(path: fileutil.AnyPath) -> str:
  """The absolute directory of a data file: a gs:// file's parent as it is (epath's `resolve()`
  would make it local), a local file's with symlinks resolved."""
  return str(path.parent) if fileutil.is_remote(path) else str(path.resolve().parent)


def _raw_records(path: fileutil.AnyPath) -> Iterable[tuple[str, Any]]:
  text = path.read_text()
  if text.lstrip().startswith("["):
    try:
      items = json.loads(text)
    except json.JSONDecodeError as e:
      raise sources.DataError(f"{path}: not a valid JSON list: {e}") from None
    yield from ((f"{path}[{i}]", item) for i, item in enumerate(items))
    return
  for number, line in enumerate(text.splitlines(), 1):
    if line.strip():
      try:
        yield f"{path}:{number}", json.loads(line)
      except json.JSONDecodeError as e:
        raise sources.DataError(f"{path}:{number}: invalid JSON: {e}") from None


# ---------------------------------------------------------------------------------------------------
# Metrics (pure).


def normalize(text: str) -> str:
  """Lower case, ASCII punctuation removed, whitespace collapsed."""
  return " ".join(_PUNCT.sub("", text.lower()).split())


def yes_no(text: str, rule: str = "first_word") -> str:
  """A POPE prediction as "yes" or "no" (the rules are in the module docstring)."""
  if rule == "first_word":
    words = normalize(text).split()
    return "yes" if words and words[0] == "yes" else "no"
  if rule == "llava":
    words = text.split(".")[0].replace(",", "").split(" ")
    return "no" if {"no", "No", "not"} & set(words) else "yes"
  raise ValueError(f"POPE rule {rule!r}: expected 'first_word' or 'llava'")


def _check_lengths(predictions: Sequence[str], answers: Sequence[str]) -> None:
  if len(predictions) != len(answers):
    raise ValueError(f"{len(predictions)} predictions for {len(answers)} answers")
  if not answers:
    raise ValueError("no predictions to score")


def exact_match(predictions: Sequence[str], answers: Sequence[str]) -> float:
  """Fraction of predictions equal to their reference after `normalize`."""
  _check_lengths(predictions, answers)
  return sum(normalize(p) == normalize(a) for p, a in zip(predictions, answers)) / len(answers)


def pope_metrics(predictions: Sequence[str], answers: Sequence[str],
                 rule: str = "first_word") -> dict[str, float]:
  """POPE accuracy / precision / recall / F1 / yes_ratio with "yes" as the positive class.

  References must read "yes" or "no" after `normalize`; predictions are read by `yes_no(rule)`."""
  _check_lengths(predictions, answers)
  truth = [normalize(a) for a in answers]
  bad = [i for i, a in enumerate(truth) if a not in ("yes", "no")]
  if bad:
    raise ValueError(f"POPE reference answers must be yes/no; answer {bad[0]} is {answers[bad[0]]!r}")
  pred = [yes_no(p, rule) == "yes" for p in predictions]
  gold = [a == "yes" for a in truth]
  tp = sum(p and g for p, g in zip(pred, gold))
  fp = sum(p and not g for p, g in zip(pred, gold))
  fn = sum(g and not p for p, g in zip(pred, gold))
  tn = len(gold) - tp - fp - fn
  precision = tp / (tp + fp) if tp + fp else 0.0
  recall = tp / (tp + fn) if tp + fn else 0.0
  f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
  return {"n": len(gold), "accuracy": (tp + tn) / len(gold), "precision": precision,
          "recall": recall, "f1": f1, "yes_ratio": sum(pred) / len(gold)}


def score(records: Sequence[EvalRecord], predictions: Sequence[str],
          pope_rule: str = "first_word") -> dict[str, dict[str, float]]:
  """Metrics per task (and per POPE category), plus "all": exact match over every record."""
  _check_lengths(predictions, records)
  groups: dict[str, list[int]] = {}
  categories = {r.category for r in records if r.task == POPE}
  for i, r in enumerate(records):
    groups.setdefault(r.task, []).append(i)
    if r.task == POPE and len(categories) > 1:
      groups.setdefault(f"{POPE}/{r.category or 'none'}", []).append(i)
  out = {}
  for name, idx in sorted(groups.items()):
    preds, answers = [predictions[i] for i in idx], [records[i].answer for i in idx]
    if name == POPE or name.startswith(POPE + "/"):
      labels = [records[i].label or records[i].answer for i in idx]
      out[name] = pope_metrics(preds, labels, pope_rule)
    else:
      out[name] = {"n": len(idx), "exact_match": exact_match(preds, answers)}
  out["all"] = {"n": len(records), "exact_match": exact_match(predictions,
                                                              [r.answer for r in records])}
  return out


# ---------------------------------------------------------------------------------------------------
# Prompts and generation.


def left_pad(sequences: Sequence[np.ndarray], pad_id: int, *, rows: int | None = None,
             length_multiple: int = 1) -> tuple[np.ndarray, np.ndarray]:
  """Left-padded ids and attention mask [rows, length] (int32). Rows beyond the sequences repeat the
  last one; length is the longest sequence rounded up to `length_multiple`."""
  if not sequences:
    raise ValueError("no sequences to pad")
  rows = rows or len(sequences)
  if rows < len(sequences):
    raise ValueError(f"{len(sequences)} sequences do not fit in {rows} rows")
  longest = max(len(s) for s in sequences)
  length = -(-longest // length_multiple) * length_multiple
  ids = np.full((rows, length), pad_id, np.int32)
  mask = np.zeros((rows, length), np.int32)
  for r in range(rows):
    seq = np.asarray(sequences[min(r, len(sequences) - 1)], np.int32)
    ids[r, length - len(seq):] = seq
    mask[r, length - len(seq):] = 1
  return ids, mask


def stop_ids(tokenizer, info) -> list[int]:
  """EOS of the run plus the template's end-of-answer token, when the tokenizer has it."""
  ids = [info.eos_token_id]
  end = templates.get(info.template).assistant_end
  end_id = tokenizer.convert_tokens_to_ids(end)
  if isinstance(end_id, int) and tokenizer.convert_ids_to_tokens(end_id) == end:
    ids.append(end_id)
  return sorted(set(ids))


def _pixels(record: EvalRecord, info) -> list[np.ndarray]:
  return [image.preprocess(image.load_image(src, name=f"{record.origin or record.id} image"),
                           kind=info.image.kind, size=info.image.size, aspect=info.image.aspect)
          for src in record.images]


def _generate_batch(model, params, info, prompts: Sequence[np.ndarray],
                    pixels: Sequence[Sequence[np.ndarray]], *, rows: int, length_multiple: int,
                    max_new_tokens: int, eos: Sequence[int], temperature: float = 0.0,
                    top_p: float = 1.0, rng=None) -> list[list[int]]:
  """The tokens generated for each prompt of one batch (`pixels`: each prompt's images); the batch
  is filled up to `rows` with copies of its last prompt, so its shape depends on `rows` only."""
  ids, mask = left_pad(prompts, info.pad_token_id, rows=rows, length_multiple=length_multiple)
  per_row = list(pixels) + [pixels[-1]] * (rows - len(prompts))
  flat = [px for row in per_row for px in row]  # the batch's images in row order
  out = generate_lib.generate(
      model, params, ids, mask, np.stack(flat) if flat else None, max_new_tokens=max_new_tokens,
      temperature=temperature, top_p=top_p, eos_token_id=eos, pad_token_id=info.pad_token_id,
      rng=rng)
  tokens, lengths = np.asarray(out.tokens), np.asarray(out.lengths)
  return [tokens[i, :lengths[i]].tolist() for i in range(len(prompts))]


def generate_answers(model, params, tokenizer, info, records: Sequence[EvalRecord], *,
                     batch_size: int = 8, max_new_tokens: int = 32, temperature: float = 0.0,
                     top_p: float = 1.0, seed: int = 0, length_multiple: int = 16,
                     progress=None) -> list[str]:
  """The model's answer to each record's prompt (decoded, special tokens dropped, stripped).
  `progress(done, total)` is called after each batch."""
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  encoder = templates.Encoder(tokenizer, info.template)
  eos = stop_ids(tokenizer, info)
  answers: list[str] = []
  for start in range(0, len(records), batch_size):
    batch = list(records[start:start + batch_size])
    prompts = [encoder.encode_prompt(r.prompt, image_token_id=info.image_token_id,
                                     num_image_tokens=info.num_image_tokens) for r in batch]
    tokens = _generate_batch(
        model, params, info, prompts, [_pixels(r, info) for r in batch], rows=batch_size,
        length_multiple=length_multiple, max_new_tokens=max_new_tokens, eos=eos,
        temperature=temperature, top_p=top_p, rng=jax.random.PRNGKey(seed + start))
    answers += [tokenizer.decode(t, skip_special_tokens=True).strip() for t in tokens]
    if progress is not None:
      progress(len(answers), len(records))
  return answers


def evaluate(model, params, tokenizer, info, records: Sequence[EvalRecord], *, batch_size: int = 8,
             max_new_tokens: int = 32, pope_rule: str = "first_word", progress=None):
  """Greedy answers to `records`, scored -> (metrics per task, predictions as JSON-able dicts)."""
  answers = generate_answers(model, params, tokenizer, info, records, batch_size=batch_size,
                             max_new_tokens=max_new_tokens, progress=progress)
  predictions = [{"id": r.id, "task": r.task, "prediction": a, "answer": r.answer}
                 for r, a in zip(records, answers)]
  return score(records, answers, pope_rule), predictions


# ---------------------------------------------------------------------------------------------------
# Benchmarks: questions answered in length buckets, images decoded ahead of generation.


def benchmark_record(question: benchmarks.Question) -> EvalRecord:
  """A benchmark question as a one-question record: "<image>\\n" + its prompt, as LLaVA asks it."""
  images = () if question.image is None else (question.image,)
  record = question_record(question.prompt, images, record_id=str(question.question_id))
  return dataclasses.replace(record, task="benchmark", category=question.category)


def length_batches(keys: Sequence[tuple], batch_size: int) -> list[list[int]]:
  """Indices of `keys` (e.g. (max_new_tokens, images, prompt length)) in batches of at most
  `batch_size`, sorted by key; a batch never mixes the first two fields of its keys."""
  order = sorted(range(len(keys)), key=lambda i: (keys[i], i))
  batches: list[list[int]] = []
  for i in order:
    last = batches[-1] if batches else None
    if last and len(last) < batch_size and keys[last[0]][:2] == keys[i][:2]:
      last.append(i)
    else:
      batches.append([i])
  return batches


@dataclasses.dataclass
class GenerationStats:
  """Where `answer_records`' time went, in seconds. Images are decoded on worker threads while the
  model generates: `image_s` sums the workers' time, `image_wait_s` is what generation waited."""
  questions: int = 0  # answered
  tokens: int = 0  # generated, EOS included
  batches: int = 0
  shapes: int = 0  # distinct batch shapes: generation compiles once for each
  tokenize_s: float = 0.0
  image_s: float = 0.0
  image_wait_s: float = 0.0
  generate_s: float = 0.0
  total_s: float = 0.0

  def to_json(self) -> dict[str, float]:
    total = max(self.total_s, 1e-9)
    return {**dataclasses.asdict(self), "questions_per_second": self.questions / total,
            "generate_share": self.generate_s / total,
            "preprocess_share": (self.tokenize_s + self.image_wait_s) / total}


_IMAGE_SKIPS = {"missing": "missing_image", "corrupt": "unreadable_image"}  # ImageError.reason


def _timed_pixels(record: EvalRecord, info):
  """(pixels or None, skip reason or None, seconds, message). Never raises: one bad image must not
  stop an evaluation, and PIL meets bad data with many kinds of errors."""
  start = time.perf_counter()
  try:
    pixels, reason, message = _pixels(record, info), None, ""
  except image.ImageError as e:
    pixels, reason, message = None, _IMAGE_SKIPS.get(e.reason, "unreadable_image"), str(e)
  except Exception as e:  # decodable, but not as an RGB image
    pixels, reason, message = None, "unreadable_image", f"{record.id}: {type(e).__name__}: {e}"
  return pixels, reason, time.perf_counter() - start, message


def _decode_ahead(records, info, batches: list[list[int]], workers: int, prefetch: int):
  """Yields (batch, its images as `_timed_pixels` returns them, seconds waited for them) batch by
  batch, while `workers` threads decode the images of the next `prefetch` batches."""
  with concurrent.futures.ThreadPoolExecutor(workers) as pool:
    pending, submitted = {}, 0
    for b, batch in enumerate(batches):
      while submitted < min(b + 1 + prefetch, len(batches)):
        pending[submitted] = [pool.submit(_timed_pixels, records[i], info)
                              for i in batches[submitted]]
        submitted += 1
      start = time.perf_counter()
      decoded = [f.result() for f in pending.pop(b)]
      yield batch, decoded, time.perf_counter() - start


def answer_records(model, params, tokenizer, info, records: Sequence[EvalRecord], *,
                   max_new_tokens: int | Sequence[int], batch_size: int = 8,
                   length_multiple: int = 16, workers: int = 4, prefetch: int | None = None,
                   progress=None):
  """Greedy answers to `records` (module docstring: length buckets, images ahead, skips) ->
  (answers {record index: text}, skipped {record index: reason}, GenerationStats).
  max_new_tokens: one for all, or one per record. prefetch: batches whose images are decoded ahead
  (default: enough to keep `workers` busy). `progress(done, total)` runs after each batch."""
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  workers = max(1, workers)
  prefetch = max(1, -(-2 * workers // batch_size)) if prefetch is None else prefetch
  start = time.perf_counter()
  stats = GenerationStats()
  limits = ([max_new_tokens] * len(records) if isinstance(max_new_tokens, int)
            else list(max_new_tokens))
  encoder = templates.Encoder(tokenizer, info.template)
  eos = stop_ids(tokenizer, info)
  prompts, skipped, keys = {}, {}, {}
  for i, r in enumerate(records):
    try:
      prompts[i] = encoder.encode_prompt(r.prompt, image_token_id=info.image_token_id,
                                         num_image_tokens=info.num_image_tokens)
      keys[i] = (limits[i], len(r.images), len(prompts[i]))
    except templates.TemplateError as e:
      skipped[i] = "unencodable_prompt"
      log.warning("skipping %s: %s", r.id, e)
  stats.tokenize_s = time.perf_counter() - start
  todo = list(keys)
  batches = [[todo[j] for j in b] for b in length_batches([keys[i] for i in todo], batch_size)]

  answers: dict[int, str] = {}
  shapes, warned = set(), set()
  for batch, decoded, waited in _decode_ahead(records, info, batches, workers, prefetch):
    stats.image_wait_s += waited
    ready = []
    for i, (pixels, reason, seconds, message) in zip(batch, decoded):
      stats.image_s += seconds
      if reason is None:
        ready.append((i, pixels))
        continue
      skipped[i] = reason
      if reason not in warned:  # the first of each kind; the caller counts them all
        warned.add(reason)
        log.warning("skipping %s (%s): %s", records[i].id, reason, message)
    if ready:
      t = time.perf_counter()
      tokens = _generate_batch(
          model, params, info, [prompts[i] for i, _ in ready], [px for _, px in ready],
          rows=batch_size, length_multiple=length_multiple, max_new_tokens=limits[batch[0]],
          eos=eos)
      stats.generate_s += time.perf_counter() - t
      stats.tokens += sum(len(tok) for tok in tokens)
      stats.batches += 1
      answers.update({i: tokenizer.decode(tok, skip_special_tokens=True).strip()
                      for (i, _), tok in zip(ready, tokens)})
      longest = max(len(prompts[i]) for i, _ in ready)
      shapes.add((keys[batch[0]][:2], -(-longest // length_multiple)))
    if progress is not None:
      progress(len(answers) + len(skipped), len(records))
  stats.questions, stats.shapes = len(answers), len(shapes)
  stats.total_s = time.perf_counter() - start
  return answers, skipped, stats


def answer_questions(model, params, tokenizer, info, questions: Sequence[benchmarks.Question], *,
                     max_new_tokens: int | None = None, model_id: str = "", **kwargs):
  """LLaVA answer records of `benchmarks.Question`s -> (one benchmarks.Answer per question, None
  where it was skipped; skipped {reason: [question ids]}; GenerationStats). max_new_tokens: None ->
  each question's own; other keyword arguments go to `answer_records`."""
  records = [benchmark_record(q) for q in questions]
  limits = [q.max_new_tokens for q in questions] if max_new_tokens is None else max_new_tokens
  texts, skipped, stats = answer_records(model, params, tokenizer, info, records,
                                         max_new_tokens=limits, **kwargs)
  answers = [benchmarks.answer_for(q, texts[i], model_id) if i in texts else None
             for i, q in enumerate(questions)]
  by_reason: dict[str, list] = {}
  for i in sorted(skipped):
    by_reason.setdefault(skipped[i], []).append(questions[i].question_id)
  return answers, by_reason, stats


# ---------------------------------------------------------------------------------------------------
# KL to the teacher.


def kl_batches(tokenizer, info, teacher_info, records: Sequence[EvalRecord], *, batch_size: int = 8,
               max_length: int = 2048):
  """Batches of whole conversations as the mimic stage sees them: the student's arrays and the
  teacher's under the prefix "teacher_" (each with its own image tokens and preprocessing)."""
  def view(i, prefix=""):
    return pipeline.View(i.num_image_tokens, i.image_token_id, i.image.kind, i.image.size,
                         i.image.aspect, prefix)

  buckets = [2 ** k for k in range(6, 20) if 2 ** k < max_length]
  pipe = pipeline.Pipeline([r.to_record() for r in records], tokenizer,
                           views=[view(info), view(teacher_info, "teacher_")],
                           batch_size=batch_size, max_length=max_length, template=info.template,
                           length_buckets=buckets, shuffle=False, num_epochs=1, shard_index=0,
                           shard_count=1, drop_remainder=False, strict=True)
  return iter(pipe)


def kl_to_teacher(student, student_params, teacher, teacher_params,
                  batches: Iterable[dict[str, np.ndarray]]) -> dict[str, float]:
  """Mean KL(teacher || student) over every response token of `batches` (temperature 1), the mimic
  loss without its per-batch averaging -> {"kl", "tokens"}. Batches as `kl_batches` makes them; without
  "teacher_" arrays the teacher reads the student's."""
  total, tokens = 0.0, 0
  for batch in batches:
    kl_sum, n = _kl_sum(student, student_params, teacher, teacher_params, dict(batch))
    total += float(kl_sum)
    tokens += int(n)
  if not tokens:
    raise ValueError("no response tokens in the KL batches")
  return {"kl": total / tokens, "tokens": tokens}


@functools.partial(jax.jit, static_argnums=(0, 2))
def _kl_sum(student, student_params, teacher, teacher_params, batch):
  s_logits = models.forward(student, student_params, batch)[0].logits
  t_logits = models.forward(teacher, teacher_params, batch, "teacher_")[0].logits
  mask = losses.distill_mask(batch["labels"])
  if "teacher_labels" in batch:  # image tokens may differ in number: pair response positions in order
    s_logits, t_logits, mask = losses.pair_positions(
        s_logits, mask, t_logits, losses.distill_mask(batch["teacher_labels"]))
  count = jnp.sum(mask)
  return losses.kl_distillation(s_logits, t_logits, mask) * count, count


# ---------------------------------------------------------------------------------------------------
# Reporting.


def table(metrics: dict[str, dict[str, float]]) -> str:
  """Metrics as aligned text rows: task, n, then name=value for the rest."""
  rows = [("task", "n", "metrics")]
  for task, values in metrics.items():
    rest = "  ".join(f"{k}={v:.4f}" for k, v in values.items() if k not in ("n", "tokens"))
    rows.append((task, str(values.get("n", values.get("tokens", ""))), rest))
  w0, w1 = (max(len(r[i]) for r in rows) for i in range(2))
  return "\n".join(f"{a:<{w0}}  {b:>{w1}}  {c}" for a, b, c in rows)
