"""benchmarks.mmbench: the TSV, LLaVA's prompt, VLMEvalKit's answer matching, circular evaluation,
and the submission file."""

import base64
import csv
import zipfile
from xml.etree import ElementTree

import pytest

from llavamod_jax import benchmarks
from llavamod_jax.benchmarks import mmbench

HEADER = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "image", "source",
          "l2-category", "comment", "split"]
SUFFIX = "\nAnswer with the option's letter from the given choices directly."
# index -> (question, hint, options, answer letter)
MAIN = {
    0: ("What animal is shown?", "A farm photo.", ["cat", "dog", "cow", "horse"], "B"),
    1: ("Which colour dominates?", "nan", ["red", "green", "blue"], "C"),
    2: ("Is it day?", "None", ["yes", "no"], "A"),
}


def _rotations(index):
  """MMBench's circular copies: options shifted by k, each with its own answer letter."""
  question, hint, options, answer = MAIN[index]
  n = len(options)
  for k in range(n):
    shifted = options[k:] + options[:k]
    yield index + k * 1_000_000, shifted, "ABCD"[shifted.index(options["ABCD".index(answer)])]


def _write_tsv(path, circular=True, with_answer=True):
  header = HEADER if with_answer else [h for h in HEADER if h != "answer"]
  rows = []
  for index, (question, hint, _, _) in MAIN.items():
    for row_index, options, answer in (_rotations(index) if circular else [
        (index, MAIN[index][2], MAIN[index][3])]):
      image = base64.b64encode(f"image{index}".encode()).decode()
      if row_index != index and index == 0:
        image = "0"  # a rotated row may point at the row whose image it shares
      cells = dict(index=str(row_index), question=question, hint=hint, answer=answer,
                   category="attribute", image=image, source="src", comment="", split="dev",
                   **{"l2-category": "fine"})
      cells.update({"ABCD"[i]: (options[i] if i < len(options) else "") for i in range(4)})
      rows.append([cells[h] for h in header])
  with open(path, "w", newline="") as f:
    writer = csv.writer(f, delimiter="\t", lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
  return path


def reference_circular(hits):
  """hits: {(question, rotation): right}; a question counts when all its rotations are right."""
  by_question = {}
  for (question, _), right in hits.items():
    by_question.setdefault(question, []).append(right)
  return sum(all(r) for r in by_question.values()) / len(by_question)


def test_read_questions_and_prompt(tmp_path):
  path = _write_tsv(tmp_path / "mmbench_dev_20230712.tsv")
  questions, skipped = benchmarks.get("mmbench").read_questions(path)
  assert skipped == {}
  assert len(questions) == 9  # the TSV already holds every rotation: no rounds added
  q = questions[0]
  assert q.question_id == 0 and q.image == b"image0" and q.max_new_tokens == 1024
  assert q.prompt == ("A farm photo.\nWhat animal is shown?\nA. cat\nB. dog\nC. cow\nD. horse"
                      + SUFFIX)
  assert q.answer_prompt == q.prompt[:-len(SUFFIX)]  # LLaVA's answer file has no suffix
  assert q.reference == "B" and q.category == "attribute"
  rotated = {q.question_id: q for q in questions}[1_000_000]
  assert rotated.image == b"image0"  # resolved through the row it points at
  assert rotated.prompt.startswith("A farm photo.\nWhat animal is shown?\nA. dog\nB. cow")
  assert rotated.reference == "A"
  assert {q.question_id: q for q in questions}[1].prompt == (
      "Which colour dominates?\nA. red\nB. green\nC. blue" + SUFFIX)  # "nan" hint, no option D


def test_rounds_when_the_tsv_has_no_rotations(tmp_path):
  path = _write_tsv(tmp_path / "plain.tsv", circular=False)
  questions, _ = mmbench.read_questions(path)
  assert [(q.question_id, q.metadata["round_id"]) for q in questions] == [
      (0, 0), (0, 1), (0, 2), (0, 3), (1, 0), (1, 1), (1, 2), (2, 0), (2, 1)]
  q = questions[1]  # model_vqa_mmbench.py --all-rounds, round 1
  assert q.prompt == ("A farm photo.\nWhat animal is shown?\nA. dog\nB. cow\nC. horse\nD. cat"
                      + SUFFIX)
  assert q.metadata["options"] == ["dog", "cow", "horse", "cat"]
  assert q.metadata["option_char"] == ["B", "C", "D", "A"] and q.reference == "A"
  assert len(mmbench.read_questions(path, all_rounds=False)[0]) == 3


@pytest.mark.parametrize("text, choices, want", [
    ("B", "ABCD", "B"), ("B. dog", "ABCD", "B"), ("The answer is B.", "ABCD", "B"),
    ("(C)", "ABCD", "C"), ("I think it is A or B", "ABCD", None), ("a cute dog", "ABCD", "B"),
    ("Cannot determine the answer", "ABCD", "Z"), ("Z", "ABCD", "Z"), ("D", "ABC", None),
    ("The correct answer is **C**, because the picture shows a cow standing in a field", "ABCD", "C"),
    ("cat or dog", "ABCD", None),
])
def test_infer_option(text, choices, want):
  options = dict(zip("ABCD", ["cat", "dog", "cow", "horse"]))
  assert mmbench.infer_option(text, {c: options[c] for c in choices}) == want


def test_score_circular_rows(tmp_path):
  path = _write_tsv(tmp_path / "dev.tsv")
  said = {}  # row index -> answer text
  for index in MAIN:
    for row_index, _, answer in _rotations(index):
      said[row_index] = answer
  said[2_000_000] = "A"  # question 0, rotation 2: wrong (its answer is D)
  said[1] = "C. blue"
  said[1_000_002] = "The answer is B."
  answers = [benchmarks.Answer(i, t) for i, t in said.items()]
  answers += [benchmarks.Answer(7, "A"), benchmarks.Answer(0, "C")]  # unknown; a repeat
  scores = mmbench.score(None, benchmarks.Answers(answers, ["line 3"]), [path])

  truth = {row: answer for index in MAIN for row, _, answer in _rotations(index)}
  hits = {(row % 1_000_000, row // 1_000_000): said[row][0] == truth[row] or
          (said[row].startswith("The answer is ") and said[row][14] == truth[row])
          for row in truth}
  assert scores["metrics"] == pytest.approx({
      "accuracy": sum(hits[q, 0] for q in MAIN) / 3, "n_first_pass": 3,
      "circular_accuracy": reference_circular(hits), "n_circular": 3})
  assert scores["metrics"]["circular_accuracy"] == pytest.approx(2 / 3)
  assert scores["n"] == 9
  assert scores["skipped"] == {"unreadable_answer_line": 1, "duplicate_answer": 1,
                               "not_in_labels": 1}


def test_score_rounds_from_our_answer_files(tmp_path):
  path = _write_tsv(tmp_path / "plain.tsv", circular=False)
  questions, _ = mmbench.read_questions(path)
  wrong = (1, 2)  # question 1 at round 2 answered wrong
  texts = [("A" if q.reference == "B" else "B") if (q.question_id, q.metadata["round_id"]) == wrong
           else q.reference for q in questions]
  answers = [benchmarks.answer_for(q, t, "m") for q, t in zip(questions, texts)]
  assert answers[1].extra == {"round_id": 1, "options": ["dog", "cow", "horse", "cat"],
                              "option_char": ["B", "C", "D", "A"]}  # as model_vqa_mmbench.py writes
  benchmarks.write_answers(tmp_path / "a.jsonl", answers[:-1])  # question 2's last round missing
  read = benchmarks.read_answers(tmp_path / "a.jsonl")
  scores = mmbench.score(None, read, [path])
  assert scores["metrics"]["accuracy"] == 1.0
  assert scores["metrics"]["circular_accuracy"] == pytest.approx(1 / 2)  # 0 right, 1 wrong, 2 open
  assert scores["skipped"] == {"circular_incomplete": 1, "unanswered": 1}
  assert scores["skipped_examples"]["unanswered"] == ["2/round 1"]
  # the truth from the questions themselves, without the TSV
  assert mmbench.score(questions, read, [])["metrics"] == scores["metrics"]


def _read_xlsx(path):
  ns = {"m": "http://schemas.openxmlformats.org/spreadsheetml/2006/main"}
  with zipfile.ZipFile(path) as z:
    assert "[Content_Types].xml" in z.namelist() and "xl/workbook.xml" in z.namelist()
    sheet = ElementTree.fromstring(z.read("xl/worksheets/sheet1.xml"))
  rows = []
  for row in sheet.iterfind(".//m:row", ns):
    cells = {}
    for c in row.iterfind("m:c", ns):
      column = c.get("r").rstrip("0123456789")
      text = c.find("m:is/m:t", ns) if c.get("t") == "inlineStr" else c.find("m:v", ns)
      cells[column] = int(text.text) if c.get("t") != "inlineStr" else text.text
    rows.append(cells)
  return rows


def test_submission_files(tmp_path):
  path = _write_tsv(tmp_path / "mmbench_test_20230712.tsv", circular=False, with_answer=False)
  with pytest.raises(ValueError, match="no answer column"):
    mmbench.score(None, [], [path])
  answers = [benchmarks.Answer(0, "B"), benchmarks.Answer(2, "A & <b>"),
             benchmarks.Answer(0, "C", extra={"round_id": 1})]  # only round 0 is submitted
  mmbench.write_submission(tmp_path / "upload.tsv", path, answers)
  with open(tmp_path / "upload.tsv", newline="") as f:
    table = list(csv.reader(f, delimiter="\t"))
  assert table[0] == ["index", "question", "A", "B", "C", "D", "prediction", "split"]
  assert table[1] == ["0", "What animal is shown?", "cat", "dog", "cow", "horse", "B", "dev"]
  assert table[2][6] == "" and table[2][5] == ""  # no answer; no option D
  assert table[3][6] == "A & <b>"

  mmbench.write_submission(tmp_path / "upload.xlsx", path, answers)
  rows = _read_xlsx(tmp_path / "upload.xlsx")
  assert [rows[0][c] for c in "ABCDEFGH"] == table[0]
  assert rows[1] == {"A": 0, "B": "What animal is shown?", "C": "cat", "D": "dog", "E": "cow",
                     "F": "horse", "G": "B", "H": "dev"}
  assert rows[3]["G"] == "A & <b>" and "F" not in rows[2]
