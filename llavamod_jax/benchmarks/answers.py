"""LLaVA's answer files: JSON lines {"question_id", "prompt", "text", "answer_id", "model_id",
"metadata"}.

model_vqa_loader.py, model_vqa_science.py and model_vqa_mmbench.py all write this shape (the last adds
"round_id", "options" and "option_char"), so one reader serves the answers of any model: ours, the
original's, or one run through transformers.
"""

from __future__ import annotations

import dataclasses
import json
import os
import uuid
from typing import Any, Iterable

from llavamod_jax.benchmarks import common

_FIELDS = ("question_id", "prompt", "text", "answer_id", "model_id", "metadata")


@dataclasses.dataclass
class Answer:
  question_id: Any
  text: str
  prompt: str = ""
  answer_id: str = ""
  model_id: str = ""
  metadata: dict = dataclasses.field(default_factory=dict)
  extra: dict = dataclasses.field(default_factory=dict)  # other top-level keys, kept as read

  def get(self, name: str, default=None):
    """A field that may sit at the top level (LLaVA's "round_id") or in metadata (ours)."""
    if name in self.extra:
      return self.extra[name]
    return self.metadata.get(name, default)

  def to_json(self) -> dict:
    out = {"question_id": self.question_id, "prompt": self.prompt, "text": self.text,
           "answer_id": self.answer_id, "model_id": self.model_id, "metadata": self.metadata}
    out.update({k: v for k, v in self.extra.items() if k not in out})
    return out


class Answers(list):
  """A list of Answer that also remembers the lines it could not read ("line 7", ...)."""

  def __init__(self, items: Iterable[Answer] = (), unreadable: Iterable[str] = ()):
    super().__init__(items)
    self.unreadable = list(unreadable)


def answer_for(question: common.Question, text: str, model_id: str = "") -> Answer:
  """The answer record of `question`, as LLaVA's scripts write it (MMBench's round at the top)."""
  extra = {}
  if "round_id" in question.metadata:
    extra = {k: question.metadata[k] for k in ("round_id", "options", "option_char")
             if k in question.metadata}
  return Answer(question.question_id, text, prompt=question.answer_prompt or question.prompt,
                answer_id=uuid.uuid4().hex[:22], model_id=model_id,
                metadata=dict(question.metadata), extra=extra)


def write_answers(path: str | os.PathLike, answers: Iterable[Answer]) -> None:
  with open(path, "w", encoding="utf-8") as f:
    for a in answers:
      f.write(json.dumps(a.to_json(), ensure_ascii=False) + "\n")


def read_answers(path: str | os.PathLike) -> Answers:
  """Every readable answer; a line that is not JSON, lacks "question_id" or has a non-string "text" is
  counted in `.unreadable` and the rest are kept."""
  items, unreadable = [], []
  with open(path, encoding="utf-8", errors="replace") as f:
    for i, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        r = json.loads(line)
      except json.JSONDecodeError:
        unreadable.append(f"line {i}")
        continue
      if (not isinstance(r, dict) or "question_id" not in r or not isinstance(r.get("text"), str)
          or isinstance(r["question_id"], (dict, list))):
        unreadable.append(f"line {i}")
        continue
      metadata, prompt = r.get("metadata"), r.get("prompt")
      items.append(Answer(
          r["question_id"], r["text"], prompt=prompt if isinstance(prompt, str) else "",
          answer_id=str(r.get("answer_id", "")), model_id=str(r.get("model_id", "")),
          metadata=metadata if isinstance(metadata, dict) else {},
          extra={k: v for k, v in r.items() if k not in _FIELDS}))
  return Answers(items, unreadable)
