"""MMBench (dev, 20230712), as LLaVA-1.5 asks it (llava/eval/model_vqa_mmbench.py
--single-pred-prompt) and as MMBench scores it: circular evaluation with VLMEvalKit's rule-based
answer matching.

Questions and truth: one TSV, `mmbench_dev_20230712.tsv`, columns index, question, hint, A, B, C, D,
answer, category, l2-category, image (base64), source, comment, split. A cell is missing as pandas
reads it (empty, "nan", "None", "NA", "N/A", "null", ...) or as LLaVA's is_none adds ("nan"/"none" in
any case). The options are A, B, C, D up to the first missing one. The prompt: the hint (when present)
+ "\\n" + question, then "\\n<letter>. <option>" per option, then "\\nAnswer with the option's letter
from the given choices directly."; LLaVA's answer file records it without that last line.

Circular evaluation. MMBench's TSVs hold each question several times with its options rotated: rows
index + k * 1e6 are the rotations of row `index` (< 1e6), each with its own answer letter; a row's
image may be the index of the row whose image it shares. model_vqa_mmbench.py --all-rounds asks every
row once per rotation as well ("round_id" r: options[r:] + options[:r], lettered A, B, ... again).
read_questions(all_rounds=None) rotates in code only when the TSV holds no rotated rows, so every
question is asked in every rotation either way. A question counts in "circular_accuracy" when every
row and round of it is answered right (VLMEvalKit's mcq_circular_eval under exact matching: one
unreadable answer fails the question); "accuracy" is the first pass, its rows < 1e6 at round 0.

Reading an answer (VLMEvalKit's can_infer): an option letter standing alone once among the words
(after .()[],:;!*#{} become spaces) and among the last four; else "Z" (refusal) when no letter but a
"Z" stands alone; else the letter of "[correct ]answer is X"; else the one option whose text the
answer contains (when the answer is at most twice as long as all options together); else none.

write_submission writes the test-split file that convert_mmbench_for_submission.py makes: the TSV's
columns less hint, category, source, image, comment and l2-category, with "prediction" (the raw answer
text) in the seventh place; as .xlsx (written here, no openpyxl needed) or, for any other suffix, TSV.
"""

from __future__ import annotations

import base64
import binascii
import csv
import os
import re
import zipfile
from xml.sax.saxutils import escape

from llavamod_jax.benchmarks import common

NAME = "mmbench"
QUESTION_FILE = "an MMBench TSV, e.g. mmbench_dev_20230712.tsv (index, question, hint, A-D, ...)"
MAX_NEW_TOKENS = common.LONG_MAX_NEW_TOKENS
LETTERS = ("A", "B", "C", "D")
ROTATION = 1_000_000  # rows index + k * ROTATION are rotations of row index
# pandas.read_table's default missing-value strings; LLaVA's is_none adds "nan"/"none" in any case.
_MISSING = {"", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND", "1.#QNAN",
            "<NA>", "N/A", "NA", "NULL", "NaN", "None", "n/a", "nan", "null"}
_NOT_SUBMITTED = ("hint", "category", "source", "image", "comment", "l2-category")
_REFUSALS = ("Sorry, I can't help with images of people yet.", "I can't process this file.",
             "I'm sorry, but without the image provided", "Cannot determine the answer")
_SAYS = re.compile(r"(?i)(?:correct\s+)?answer\s+is\s+\**([ABCD])\**")


def missing(value) -> bool:
  return value is None or value in _MISSING or value.lower() in ("nan", "none")


def read_table(path) -> tuple[list[str], list[dict]]:
  """(header, rows as {column: text}) of an MMBench TSV."""
  common.check_question_file(path, NAME, QUESTION_FILE)
  csv.field_size_limit(2**31 - 1)  # base64 images are long cells
  with open(path, encoding="utf-8-sig", newline="") as f:
    reader = csv.reader(f, delimiter="\t")
    header = next(reader)
    rows = [dict(zip(header, cells)) for cells in reader if cells]
  return header, rows


def _index(value: str):
  return int(value) if value.strip().lstrip("-").isdigit() else value


def _group(index) -> str:
  return common.key(index % ROTATION if isinstance(index, int) else index)


def options(row: dict) -> list[str]:
  out = []
  for letter in LETTERS:
    if missing(row.get(letter)):
      break
    out.append(row[letter])
  return out


def _truth(row: dict, n: int, round_id: int) -> str | None:
  """The answer letter once the options are rotated by `round_id`."""
  answer = row.get("answer")
  if answer not in LETTERS[:n]:
    return None
  return LETTERS[(LETTERS.index(answer) - round_id) % n]


def _image(row: dict, by_index: dict) -> bytes | None:
  image = row.get("image", "")
  if len(image) <= 64 and image in by_index:  # a reference to the row it shares its image with
    image = by_index[image].get("image", "")
  try:
    return base64.b64decode(image, validate=True) if image else None
  except (binascii.Error, ValueError):
    return None


def read_questions(path, image_root="", annotations=(), all_rounds: bool | None = None):
  """-> (questions, skipped {reason: [ids]}); one Question per row and round (`round_id` in
  metadata). all_rounds: ask every rotation of each row (None: only when the TSV has no rotated
  rows)."""
  del image_root, annotations  # the images are inside the TSV
  _, rows = read_table(path)
  by_index = {r.get("index", ""): r for r in rows}
  if all_rounds is None:
    all_rounds = not any(isinstance(i, int) and i >= ROTATION for i in map(_index, by_index))
  skips = common.Skips()
  questions = []
  for row in rows:
    index = _index(row.get("index", ""))
    opts = options(row)
    image = _image(row, by_index)
    if missing(row.get("question")) or not opts:
      skips.add("incomplete_record", index)
      continue
    if image is None:
      skips.add("missing_image", index)
      continue
    base = row["question"] if missing(row.get("hint")) else row["hint"] + "\n" + row["question"]
    for r in range(len(opts) if all_rounds else 1):
      rotated, letters = opts[r:] + opts[:r], list(LETTERS[r:len(opts)] + LETTERS[:r])
      text = base + "".join(f"\n{c}. {o}" for c, o in zip(LETTERS, rotated))
      questions.append(common.Question(
          index, image, text + "\n" + common.OPTION_LETTER, category=row.get("category", ""),
          max_new_tokens=MAX_NEW_TOKENS, answer_prompt=text, reference=_truth(row, len(opts), r),
          metadata={"round_id": r, "options": rotated, "option_char": letters,
                    "category": row.get("category", ""), "l2-category": row.get("l2-category", "")}))
  return questions, skips.ids


def infer_option(text: str, choices: dict[str, str]) -> str | None:
  """VLMEvalKit's can_infer: the option letter an answer gives, "Z" for a refusal, else None."""
  if "Failed to obtain answer via API" in text:
    return None
  if any(r in text for r in _REFUSALS):
    return "Z"
  words = re.sub(r"[.()\[\],:;!*#{}]", " ", text).split()
  present = [c for c in choices if c in words]
  if len(present) == 1 and words.index(present[0]) > len(words) - 5:
    return present[0]
  if not present and "Z" in words:
    return "Z"
  m = _SAYS.search(text)
  if m and m.group(1).upper() in choices:
    return m.group(1).upper()
  lower = text.lower()
  if len(lower) > 2 * sum(len(v) for v in choices.values()):
    return None
  found = [c for c, v in choices.items() if v.lower() in lower]
  return found[0] if len(found) == 1 else None


def _round(answer) -> int:
  try:
    return int(answer.get("round_id", 0) or 0)
  except (TypeError, ValueError):
    return -1  # matches no round: counted as not_in_labels


def score(questions, answers, annotations) -> dict:
  """annotations: [the TSV] (the same file as the questions); without it, the questions' truth."""
  if annotations:
    rows = {}
    for path in annotations:
      header, table = read_table(path)
      if "answer" not in header:
        raise ValueError(f"{path}: has no answer column (a test split?): score the dev split, or "
                         "write a submission with mmbench.write_submission")
      rows.update({common.key(_index(r["index"])): r for r in table})
  elif questions is not None:
    rows = {}
    for q in questions:
      r = rows.setdefault(common.key(q.question_id), {"index": common.key(q.question_id)})
      opts = q.metadata["options"]
      shift = q.metadata["round_id"]
      unrotated = opts[-shift:] + opts[:-shift] if shift else opts
      r.update(dict(zip(LETTERS, unrotated)))
      if q.reference is not None:
        r["answer"] = LETTERS[(LETTERS.index(q.reference) + shift) % len(opts)]
  else:
    raise ValueError("MMBench scores against its TSV: pass it as annotations")

  skips = common.answer_skips(answers)
  hits: dict[tuple[str, int], bool] = {}
  for a in common.first_answers(answers, skips, lambda a: (common.key(a.question_id), _round(a))):
    row = rows.get(common.key(a.question_id))
    opts = options(row) if row else []
    r = _round(a)
    truth = _truth(row, len(opts), r) if row and 0 <= r < len(opts) else None
    if truth is None:
      skips.add("not_in_labels", a.question_id)
      continue
    rotated = opts[r:] + opts[:r]
    hits[common.key(a.question_id), r] = infer_option(a.text, dict(zip(LETTERS, rotated))) == truth

  rounds_asked = any(r > 0 for _, r in hits)
  groups: dict[str, list] = {}
  for k, row in rows.items():
    n = len(options(row))
    if _truth(row, n, 0) is None:
      continue
    members = [(k, r) for r in (range(n) if rounds_asked else [0])]
    groups.setdefault(_group(_index(k)), []).extend(members)
  first = [hits[k, 0] for k, row in rows.items() if _group(_index(k)) == k and (k, 0) in hits]
  circular = []
  for g, members in groups.items():
    answered = [m for m in members if m in hits]
    if len(answered) == len(members):
      circular.append(all(hits[m] for m in members))
    elif answered:
      skips.add("circular_incomplete", _index(g))
    for m in members:
      if m not in hits:
        skips.add("unanswered", f"{m[0]}" + (f"/round {m[1]}" if rounds_asked else ""))
  metrics = {"accuracy": common.ratio(sum(first), len(first)), "n_first_pass": len(first),
             "circular_accuracy": common.ratio(sum(circular), len(circular)),
             "n_circular": len(circular)}
  return common.result(NAME, len(hits), skips, metrics)


# ---------------------------------------------------------------------------------------------------
# The submission file.


def write_submission(path, table_path, answers) -> None:
  """convert_mmbench_for_submission.py's file (module docstring) for the TSV at `table_path`. Each
  row's prediction is its round-0 answer (the script keeps whichever round it read last)."""
  header, rows = read_table(table_path)
  columns = [c for c in header if c not in _NOT_SUBMITTED]
  columns.insert(min(6, len(columns)), "prediction")
  predictions = {}
  for a in answers:
    if _round(a) == 0:
      predictions.setdefault(common.key(a.question_id), a.text)
  table = [[predictions.get(common.key(_index(r["index"])), "") if c == "prediction" else
            ("" if r.get(c) in _MISSING else r.get(c, "")) for c in columns] for r in rows]
  if str(path).endswith(".xlsx"):
    _write_xlsx(path, columns, table)
  else:
    with open(path, "w", encoding="utf-8", newline="") as f:
      writer = csv.writer(f, delimiter="\t", lineterminator="\n")
      writer.writerow(columns)
      writer.writerows(table)


_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f]")  # not allowed in XML
_NS = "http://schemas.openxmlformats.org"


def _column(i: int) -> str:
  name = ""
  i += 1
  while i:
    i, rest = divmod(i - 1, 26)
    name = chr(65 + rest) + name
  return name


def _cell(ref: str, value: str, number: bool) -> str:
  if number and re.fullmatch(r"-?\d{1,15}", value):
    return f'<c r="{ref}"><v>{value}</v></c>'
  if not value:
    return ""
  text = escape(_CONTROL.sub("", value))
  return f'<c r="{ref}" t="inlineStr"><is><t xml:space="preserve">{text}</t></is></c>'


def _write_xlsx(path, columns: list[str], table: list[list[str]]) -> None:
  """A one-sheet workbook with inline strings: what pandas.read_excel and Excel read back."""
  rows = []
  for i, values in enumerate([columns] + table, 1):
    cells = "".join(_cell(f"{_column(j)}{i}", v, columns[j] == "index")
                    for j, v in enumerate(values))
    rows.append(f'<row r="{i}">{cells}</row>')
  head = '<?xml version="1.0" encoding="UTF-8" standalone="yes"?>\n'
  rel = f"{_NS}/officeDocument/2006/relationships"
  parts = {
      "[Content_Types].xml": (
          f'<Types xmlns="{_NS}/package/2006/content-types">'
          '<Default Extension="rels" ContentType="application/vnd.openxmlformats-package.'
          'relationships+xml"/><Default Extension="xml" ContentType="application/xml"/>'
          '<Override PartName="/xl/workbook.xml" ContentType="application/vnd.openxmlformats-'
          'officedocument.spreadsheetml.sheet.main+xml"/><Override PartName="/xl/worksheets/'
          'sheet1.xml" ContentType="application/vnd.openxmlformats-officedocument.spreadsheetml.'
          'worksheet+xml"/></Types>'),
      "_rels/.rels": (
          f'<Relationships xmlns="{_NS}/package/2006/relationships"><Relationship Id="rId1" '
          f'Type="{rel}/officeDocument" Target="xl/workbook.xml"/></Relationships>'),
      "xl/workbook.xml": (
          f'<workbook xmlns="{_NS}/spreadsheetml/2006/main" xmlns:r="{rel}"><sheets>'
          '<sheet name="Sheet1" sheetId="1" r:id="rId1"/></sheets></workbook>'),
      "xl/_rels/workbook.xml.rels": (
          f'<Relationships xmlns="{_NS}/package/2006/relationships"><Relationship Id="rId1" '
          f'Type="{rel}/worksheet" Target="worksheets/sheet1.xml"/></Relationships>'),
      "xl/worksheets/sheet1.xml": (
          f'<worksheet xmlns="{_NS}/spreadsheetml/2006/main"><sheetData>{"".join(rows)}'
          '</sheetData></worksheet>'),
  }
  with zipfile.ZipFile(os.fspath(path), "w", zipfile.ZIP_DEFLATED) as z:
    for name, xml in parts.items():
      z.writestr(name, head + xml)
