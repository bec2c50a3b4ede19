"""evaluation: metric functions against hand-computed numbers; prompts, batching and KL plumbing."""

import dataclasses
import json

import jax
import numpy as np
import pytest

import tiny_run
from llavamod_jax import evaluation, models
from llavamod_jax.data import image, sources, templates
from llavamod_jax.demo import synthetic

# --- pure metrics ------------------------------------------------------------------------------------


@pytest.mark.parametrize("text, want", [
    ("Left.", "left"), ("  Yes,  there IS!", "yes there is"), ("3", "3"),
    ("A red circle, a blue square.", "a red circle a blue square"), ("", ""),
])
def test_normalize(text, want):
  assert evaluation.normalize(text) == want


@pytest.mark.parametrize("text, first_word, llava", [
    ("Yes", "yes", "yes"), ("yes.", "yes", "yes"), ("YES, there is", "yes", "yes"),
    ("No", "no", "no"), ("No, there is not.", "no", "no"), ("There is not a cat", "no", "no"),
    ("maybe yes", "no", "yes"), ("", "no", "yes"), ("yesterday", "no", "yes"),
    ("Yes. No.", "yes", "yes"), ("The answer is yes", "no", "yes"),
])
def test_yes_no_rules(text, first_word, llava):
  assert evaluation.yes_no(text) == first_word
  assert evaluation.yes_no(text, "llava") == llava


PREDICTIONS = ["Yes", "no", "yes.", "No, there is not", "maybe yes", "YES, there is"]
ANSWERS = ["yes", "yes", "no", "no", "yes", "Yes"]


def test_pope_metrics_by_hand():
  # first_word: predicted yes = [1, 0, 1, 0, 0, 1], truth = [1, 1, 0, 0, 1, 1]
  # TP = 2 (rows 0, 5), FP = 1 (row 2), FN = 2 (rows 1, 4), TN = 1 (row 3)
  got = evaluation.pope_metrics(PREDICTIONS, ANSWERS)
  p, r = 2 / 3, 2 / 4
  assert got == pytest.approx({"n": 6, "accuracy": 3 / 6, "precision": p, "recall": r,
                               "f1": 2 * p * r / (p + r), "yes_ratio": 3 / 6})
  # llava rule: "maybe yes" turns into a yes -> TP = 3, FP = 1, FN = 1, TN = 1
  got = evaluation.pope_metrics(PREDICTIONS, ANSWERS, rule="llava")
  assert got == pytest.approx({"n": 6, "accuracy": 4 / 6, "precision": 3 / 4, "recall": 3 / 4,
                               "f1": 3 / 4, "yes_ratio": 4 / 6})


def test_pope_metrics_without_predicted_yes():
  got = evaluation.pope_metrics(["no", "garbage", "No."], ["yes", "no", "no"])
  assert got == pytest.approx({"n": 3, "accuracy": 2 / 3, "precision": 0.0, "recall": 0.0,
                               "f1": 0.0, "yes_ratio": 0.0})


def test_pope_metrics_errors():
  with pytest.raises(ValueError, match="answer 1 is 'maybe'"):
    evaluation.pope_metrics(["yes", "no"], ["yes", "maybe"])
  with pytest.raises(ValueError, match="2 predictions for 1 answers"):
    evaluation.pope_metrics(["yes", "no"], ["yes"])
  with pytest.raises(ValueError, match="no predictions"):
    evaluation.exact_match([], [])
  with pytest.raises(ValueError, match="rule 'vqa'"):
    evaluation.yes_no("yes", "vqa")


def test_exact_match_by_hand():
  preds = ["Red.", "3", "left side", "A red circle, a blue square.", "BLUE"]
  answers = ["red", "three", "left", "A red circle, a blue square.", "blue"]
  assert evaluation.exact_match(preds, answers) == pytest.approx(3 / 5)


def _record(task, answer, category=""):
  return evaluation.EvalRecord(f"{task}-{answer}", task, (("user", "q"), ("assistant", answer)),
                               category=category)


def test_score_groups_tasks_and_pope_categories():
  records = [_record("pope", "yes", "random"), _record("pope", "no", "random"),
             _record("pope", "yes", "adversarial"), _record("pope", "no", "adversarial"),
             _record("color", "red"), _record("color", "blue"), _record("vqa", "3")]
  preds = ["yes", "yes", "no", "no", "red", "green", "3"]
  got = evaluation.score(records, preds)
  assert list(got) == ["color", "pope", "pope/adversarial", "pope/random", "vqa", "all"]
  assert got["color"] == {"n": 2, "exact_match": 0.5}
  assert got["vqa"] == {"n": 1, "exact_match": 1.0}
  # pope: TP = 1, FP = 1, FN = 1, TN = 1
  assert got["pope"] == pytest.approx({"n": 4, "accuracy": 0.5, "precision": 0.5, "recall": 0.5,
                                       "f1": 0.5, "yes_ratio": 0.5})
  assert got["pope/random"]["yes_ratio"] == 1.0 and got["pope/adversarial"]["accuracy"] == 0.5
  assert got["all"] == {"n": 7, "exact_match": pytest.approx(4 / 7)}  # rows 0, 3, 4, 6
  # a single category adds no group
  assert list(evaluation.score(records[:2], preds[:2])) == ["pope", "all"]
  text = evaluation.table(got)
  assert "pope/random" in text and "f1=0.5000" in text and "exact_match=0.5000" in text


def test_score_reads_pope_sentences_by_their_label():
  # Sentence references carry their yes/no in `label`; predictions are read by the rule given.
  def rec(answer, label):
    return evaluation.EvalRecord(answer, "pope", (("user", "q"), ("assistant", answer)), label=label)
  records = [rec("A red circle is in the image.", "yes"), rec("A red circle is not in the image.", "no"),
             rec("A blue square is in the image.", "yes"), rec("A green square is not in the image.", "no")]
  preds = ["A red circle is in the image.", "A red circle is in the image.",
           "A blue square is not in the image.", "A green square is not in the image."]
  # llava rule: predicted yes = [1, 1, 0, 0], truth = [1, 0, 1, 0] -> TP 1, FP 1, FN 1, TN 1
  got = evaluation.score(records, preds, pope_rule="llava")["pope"]
  assert got == pytest.approx({"n": 4, "accuracy": 0.5, "precision": 0.5, "recall": 0.5, "f1": 0.5,
                               "yes_ratio": 0.5})
  # exact match still compares the sentences themselves
  assert evaluation.score(records, preds, pope_rule="llava")["all"]["exact_match"] == 0.5
  with pytest.raises(ValueError, match="must be yes/no"):  # a sentence without a label
    evaluation.score([dataclasses.replace(records[0], label="")], preds[:1], pope_rule="llava")


def test_left_pad():
  ids, mask = evaluation.left_pad([np.array([5, 6, 7]), np.array([8])], pad_id=0, rows=3,
                                  length_multiple=4)
  np.testing.assert_array_equal(ids, [[0, 5, 6, 7], [0, 0, 0, 8], [0, 0, 0, 8]])
  np.testing.assert_array_equal(mask, [[0, 1, 1, 1], [0, 0, 0, 1], [0, 0, 0, 1]])
  assert ids.dtype == mask.dtype == np.int32


# --- records ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
  root = tmp_path_factory.mktemp("shapes")
  synthetic.build(root, num_train=0, num_eval=2, image_size=64)
  return root


def test_read_records_of_the_synthetic_set(shapes):
  records = evaluation.read_records([shapes / "eval.jsonl", shapes / "pope_eval.jsonl"])
  raw = [json.loads(line) for f in ("eval.jsonl", "pope_eval.jsonl")
         for line in (shapes / f).read_text().splitlines()]
  assert [r.id for r in records] == [d["id"] for d in raw]
  assert [r.task for r in records] == [d["task"] for d in raw]
  assert [r.answer for r in records] == [d["conversations"][-1]["value"] for d in raw]
  assert [r.category for r in records] == [d.get("category", "") for d in raw]
  assert [r.label for r in records] == [""] * len(raw)  # one-word answers need no label
  assert records[0].images == (str(shapes / raw[0]["image"]),)
  assert records[0].prompt == (("user", raw[0]["conversations"][0]["value"]),)
  assert len(evaluation.read_records(shapes / "eval.jsonl", limit=3)) == 3


def test_read_records_take_the_pope_label(tmp_path):
  # POPE annotation files give the yes/no in "label"; the reference answer may then be a sentence.
  path = tmp_path / "pope.jsonl"
  rows = [("A red circle is in the image.", "yes"), ("A red circle is not in the image.", "no")]
  path.write_text("".join(json.dumps({
      "id": f"p{i}", "task": "pope", "label": label,
      "conversations": [{"from": "human", "value": "Is there a red circle in the image?"},
                        {"from": "gpt", "value": answer}]}) + "\n" for i, (answer, label) in enumerate(rows)))
  records = evaluation.read_records(path)
  assert [(r.answer, r.label) for r in records] == rows
  got = evaluation.score(records, ["Yes, there is.", "No"], pope_rule="llava")
  assert got["pope"]["accuracy"] == 1.0 and got["all"]["exact_match"] == 0.0


def test_read_records_errors_name_the_record(tmp_path):
  path = tmp_path / "bad.jsonl"
  path.write_text(json.dumps({"id": "a", "conversations": [{"from": "human", "value": "q"},
                                                           {"from": "gpt", "value": "x"}]})
                  + "\n" + json.dumps({"id": "b", "conversations": []}) + "\n")
  with pytest.raises(sources.DataError, match=f"{path}:2: record 'b': empty_conversation"):
    evaluation.read_records(path)
  with pytest.raises(sources.DataError, match="does not exist"):
    evaluation.read_records(tmp_path / "missing.jsonl")


def test_question_record():
  r = evaluation.question_record("What is it?", ["a.png"])
  assert r.prompt == (("user", "<image>\nWhat is it?"),) and r.images == ("a.png",)
  assert evaluation.question_record("Hi", system="Be brief.").prompt == (
      ("system", "Be brief."), ("user", "Hi"))
  with pytest.raises(ValueError, match="2 <image> placeholder"):
    evaluation.question_record("<image><image>", ["a.png"])


# --- generation and KL plumbing ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def student():
  model, params = tiny_run.student()
  return model, params, tiny_run.tokenizer(), tiny_run.run_info(model)


def test_evaluate_plumbing(student, shapes):
  from llavamod_jax import generate

  model, params, tok, info = student
  first = {}
  for r in evaluation.read_records(shapes / "eval.jsonl"):
    first.setdefault(r.task, r)
  records = list(first.values())  # one record per task, 5 in all
  metrics, predictions = evaluation.evaluate(model, params, tok, info, records, batch_size=4,
                                             max_new_tokens=4)
  assert set(metrics) == {"caption", "color", "count", "position", "pope", "all"}
  assert set(metrics["pope"]) == {"n", "accuracy", "precision", "recall", "f1", "yes_ratio"}
  assert set(metrics["color"]) == {"n", "exact_match"} and metrics["all"]["n"] == 5
  assert [p["id"] for p in predictions] == [r.id for r in records]
  assert [p["answer"] for p in predictions] == [r.answer for r in records]

  # The shortest prompt of the first batch (left-padded there) answered alone, and by hand.
  enc = templates.Encoder(tok, "qwen")
  prompts = [enc.encode_prompt(r.prompt, image_token_id=info.image_token_id,
                               num_image_tokens=info.num_image_tokens) for r in records[:4]]
  k = int(np.argmin([p.size for p in prompts]))
  assert prompts[k].size < max(p.size for p in prompts)
  alone = evaluation.generate_answers(model, params, tok, info, [records[k]], batch_size=1,
                                      max_new_tokens=4)
  ids, mask = evaluation.left_pad([prompts[k]], 0, length_multiple=16)
  pixels = image.preprocess(image.load_image(records[k].images[0]), "clip", 28, "pad")
  out = generate.generate(model, params, ids, mask, pixels[None], max_new_tokens=4,
                          eos_token_id=[0], pad_token_id=0)
  by_hand = tok.decode(np.asarray(out.tokens)[0, :int(out.lengths[0])],
                       skip_special_tokens=True).strip()
  assert alone == [by_hand] == [predictions[k]["prediction"]]


def _teacher():
  """A dense teacher that sees each image as 4 tokens (patch 14) where the student sees 16."""
  cfg = tiny_run.llava_config()
  cfg = cfg.replace(vision=cfg.vision.replace(patch_size=14))
  model = models.build(cfg)
  return model, tiny_run.random_params(model, seed=7)


def _reference_kl(student, teacher, tok, records):
  """Token-weighted mean KL(teacher || student) over answer tokens, one record at a time, in numpy.

  Each record is right-padded to one length with no attention mask: causal attention keeps the
  padding out of the real positions, and one shape compiles once."""
  enc = templates.Encoder(tok, "qwen")
  forward = {id(m): jax.jit(lambda p, ids, px, m=m: m.apply({"params": p}, ids, px).logits[0])
             for m, _ in (student, teacher)}
  total, count = 0.0, 0
  for r in records:
    logps = []
    for model, params in (student, teacher):
      cfg = model.cfg
      e = enc.encode(r.messages, image_token_id=cfg.image_token_id,
                     num_image_tokens=cfg.num_image_tokens)
      ids = np.zeros((1, 160), np.int32)
      ids[0, :e.input_ids.size] = e.input_ids
      px = image.preprocess(image.load_image(r.images[0]), "clip", 28, "pad")[None]
      logits = np.asarray(forward[id(model)](params, ids, px), np.float64)
      predicts_answer = np.flatnonzero(e.labels[1:] != templates.IGNORE)  # logits t -> token t+1
      x = logits[predicts_answer]
      logps.append(x - np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1, keepdims=True))
                   - x.max(-1, keepdims=True))
    s, t = logps
    total += float(np.sum(np.exp(t) * (t - s)))
    count += s.shape[0]
  return total / count, count


def test_kl_to_teacher_against_a_plain_loop(student, shapes):
  model, params, tok, info = student
  t_model, t_params = _teacher()
  t_info = tiny_run.run_info(t_model)
  assert (t_info.num_image_tokens, info.num_image_tokens) == (4, 16)
  records = evaluation.read_records(shapes / "eval.jsonl")[:5]
  batches = evaluation.kl_batches(tok, info, t_info, records, batch_size=2, max_length=256)
  got = evaluation.kl_to_teacher(model, params, t_model, t_params, batches)
  want, tokens = _reference_kl((model, params), (t_model, t_params), tok, records)
  assert got["tokens"] == tokens
  assert got["kl"] == pytest.approx(want, rel=1e-4)

  same = evaluation.kl_batches(tok, info, info, records[:2], batch_size=2, max_length=256)
  assert evaluation.kl_to_teacher(model, params, model, params, same)["kl"] == pytest.approx(0, abs=1e-6)
