"""TextVQA (val, v0.5.1), as LLaVA-1.5 asks it and scores it (llava/eval/eval_textvqa.py with
m4c_evaluator.TextVQAAccuracyEvaluator, i.e. EvalAI's VQA accuracy).

Questions: `llava_textvqa_val_v051_ocr.jsonl`, lines {"question_id", "image", "text"} whose
question_id is the TextVQA image id and whose text is "<question>\\nReference OCR token: <tokens,
comma separated>\\nAnswer the question using a single word or phrase." (no OCR line when there are
no tokens); asked as it is. Annotations: `TextVQA_0.5.1_val.json`, {"data": [{"question_id",
"image_id", "question", "answers": [10 strings], ...}]}.

eval_textvqa.py finds an answer's annotation by (answer question_id, question read back from the
answer's prompt, lower-cased) == (image_id, question lower-cased): the question is the prompt's first
line, or its second when the prompt starts with the OCR line. We do the same, then fall back to
TextVQA's own question_id for files that use it.

Accuracy of a prediction: both sides normalised as EvalAI does (`normalize`), then for each of the
human answers left out in turn, min(1, matches among the others / 3), averaged over the answers.
"""

from __future__ import annotations

import re

from llavamod_jax.benchmarks import common

NAME = "textvqa"
QUESTION_FILE = "LLaVA's llava_textvqa_val_v051_ocr.jsonl (question_id, image, text per line)"
MAX_NEW_TOKENS = common.SHORT_MAX_NEW_TOKENS
_OCR = "Reference OCR token: "


def read_questions(path, image_root="", annotations=()):
  """-> (questions, skipped {reason: [ids]})."""
  del annotations
  common.check_question_file(path, NAME, QUESTION_FILE)
  skips = common.Skips()
  questions = []
  for r in common.read_jsonl(path, skips):
    if not common.complete(r, "image", "text"):
      skips.add("incomplete_record", r.get("question_id"))
      continue
    questions.append(common.Question(
        r["question_id"], common.image_path(image_root, r["image"]), r["text"],
        category=r.get("category", ""), max_new_tokens=MAX_NEW_TOKENS))
  return common.check_images(questions, skips), skips.ids


def prompt_question(prompt: str) -> str | None:
  """eval_textvqa.py's reading of the question in an answer's prompt (lower case); None where its
  script gives up."""
  if prompt.startswith("OCR tokens: "):
    m = re.search(r"Question: (.*?) Short answer:", prompt, re.DOTALL)
    return m.group(1).lower() if m else None
  lines = prompt.split("\n")
  if _OCR in prompt and len(lines) == 3:
    return (lines[1] if prompt.startswith(_OCR.rstrip()) else lines[0]).lower()
  if len(lines) == 2:
    return lines[0].lower()
  return None


# --- EvalAI's answer normalisation (the MMF copy in LLaVA's m4c_evaluator.py) ----------------------

_NUMBERS = dict(none="0", zero="0", one="1", two="2", three="3", four="4", five="5", six="6",
                seven="7", eight="8", nine="9", ten="10")
_ARTICLES = {"a", "an", "the"}
# The punctuation it spaces or drops; "." and "'" are handled apart, ":" and others are kept.
_PUNCT = ";/[]\"{}()=+\\_-><@`,?!"
_PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")  # sic: a lookahead, so every "." not before a digit
_DIGIT_COMMA = re.compile(r"(?<=\d)(\,)+(?=\d)")
# Written bare -> with its apostrophe; "somebody'd" -> "somebodyd" is in the original table too.
_CONTRACTIONS = dict(pair.split(">") for pair in """
aint>ain't arent>aren't cant>can't couldve>could've couldnt>couldn't couldn'tve>couldn't've
couldnt've>couldn't've didnt>didn't doesnt>doesn't dont>don't hadnt>hadn't hadnt've>hadn't've
hadn'tve>hadn't've hasnt>hasn't havent>haven't hed>he'd hed've>he'd've he'dve>he'd've hes>he's
howd>how'd howll>how'll hows>how's Id've>I'd've I'dve>I'd've Im>I'm Ive>I've isnt>isn't itd>it'd
itd've>it'd've it'dve>it'd've itll>it'll let's>let's maam>ma'am mightnt>mightn't
mightnt've>mightn't've mightn'tve>mightn't've mightve>might've mustnt>mustn't mustve>must've
neednt>needn't notve>not've oclock>o'clock oughtnt>oughtn't ow's'at>'ow's'at 'ows'at>'ow's'at
'ow'sat>'ow's'at shant>shan't shed've>she'd've she'dve>she'd've she's>she's shouldve>should've
shouldnt>shouldn't shouldnt've>shouldn't've shouldn'tve>shouldn't've somebody'd>somebodyd
somebodyd've>somebody'd've somebody'dve>somebody'd've somebodyll>somebody'll somebodys>somebody's
someoned>someone'd someoned've>someone'd've someone'dve>someone'd've someonell>someone'll
someones>someone's somethingd>something'd somethingd've>something'd've
something'dve>something'd've somethingll>something'll thats>that's thered>there'd
thered've>there'd've there'dve>there'd've therere>there're theres>there's theyd>they'd
theyd've>they'd've they'dve>they'd've theyll>they'll theyre>they're theyve>they've twas>'twas
wasnt>wasn't wed've>we'd've we'dve>we'd've weve>we've werent>weren't whatll>what'll whatre>what're
whats>what's whatve>what've whens>when's whered>where'd wheres>where's whereve>where've whod>who'd
whod've>who'd've who'dve>who'd've wholl>who'll whos>who's whove>who've whyll>why'll whyre>why're
whys>why's wont>won't wouldve>would've wouldnt>wouldn't wouldnt've>wouldn't've
wouldn'tve>wouldn't've yall>y'all yall'll>y'all'll y'allll>y'all'll yall'd've>y'all'd've
y'alld've>y'all'd've y'all'dve>y'all'd've youd>you'd youd've>you'd've you'dve>you'd've
youll>you'll youre>you're youve>you've
""".split())


def normalize(text: str) -> str:
  """EvalAI's answer processing, quirks included (e.g. at most 32 periods are removed)."""
  text = text.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
  text = text.replace("\n", " ").replace("\t", " ").strip()
  drop_all = _DIGIT_COMMA.search(text) is not None
  out = text
  for p in _PUNCT:
    out = out.replace(p, "" if drop_all or p + " " in text or " " + p in text else " ")
  out = _PERIOD.sub("", out, 32)  # the original passes re.UNICODE (32) as the count
  words = [_NUMBERS.get(w, w) for w in out.lower().split()]
  return " ".join(_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES)


def accuracy(prediction: str, human_answers: list[str]) -> float:
  """VQA accuracy of one prediction against the human answers (leave-one-out, min(1, matches / 3))."""
  pred = normalize(prediction)
  humans = [normalize(h) for h in human_answers]
  if not humans:
    return 0.0
  scores = [min(1.0, sum(h == pred for j, h in enumerate(humans) if j != i) / 3)
            for i in range(len(humans))]
  return sum(scores) / len(scores)


def read_annotations(paths):
  """-> ({(image_id, question lower): record}, {question_id: record}) from TextVQA_0.5.1_val.json."""
  by_question, by_id = {}, {}
  for path in map(str, paths):
    data = common.read_json(path, "TextVQA_0.5.1_val.json")
    records = data.get("data") if isinstance(data, dict) else None
    if not isinstance(records, list) or (records and not {"image_id", "question", "answers"}
                                         <= set(records[0])):
      raise ValueError(f"{path}: not TextVQA annotations; expected TextVQA_0.5.1_val.json "
                       "({\"data\": [{\"question_id\", \"image_id\", \"question\", \"answers\"}]})")
    for r in records:
      by_question[str(r["image_id"]), r["question"].lower()] = r
      by_id[str(r.get("question_id"))] = r
  if not by_question:
    raise ValueError("TextVQA needs TextVQA_0.5.1_val.json as annotations")
  return by_question, by_id


def score(questions, answers, annotations) -> dict:
  by_question, by_id = read_annotations(annotations)
  asked = None
  if questions is not None:  # LLaVA's question ids name the image: questions may share one
    asked = {}
    for q in questions:
      asked.setdefault(common.key(q.question_id), []).append(q)
  skips = common.answer_skips(answers)
  scores, matched = [], set()
  for a in common.first_answers(answers, skips, lambda a: (common.key(a.question_id), a.prompt)):
    prompt = a.prompt
    if asked is not None:
      same_image = asked.get(common.key(a.question_id))
      if not same_image:
        skips.add("not_in_questions", a.question_id)
        continue
      if not prompt and len(same_image) == 1:
        prompt = same_image[0].prompt
    question = prompt_question(prompt)
    record = by_question.get((common.key(a.question_id), question)) if question is not None else None
    record = record or by_id.get(common.key(a.question_id))
    if record is None:
      skips.add("not_in_labels" if question is not None else "unreadable_prompt", a.question_id)
      continue
    if id(record) in matched:
      skips.add("duplicate_answer", a.question_id)
      continue
    matched.add(id(record))
    scores.append(accuracy(a.text, record["answers"]))
  for r in by_id.values():
    if id(r) not in matched:
      skips.add("unanswered", r.get("question_id"))
  return common.result(NAME, len(scores), skips,
                       {"accuracy": common.ratio(sum(scores), len(scores))})
