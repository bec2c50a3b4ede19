"""Chat templates: messages -> token ids and labels, with `<image>` expanded to image-token ids.

Label convention (the project's, see `losses`): `labels` has the length of `input_ids`;
`labels[t] = input_ids[t]` where token t is trained and IGNORE (-100) elsewhere. The next-token shift
happens in the loss (`logits[:, :-1]` against `labels[:, 1:]`).

Templates (the fields of `Template` are the knobs; `dataclasses.replace` corrects any of them):
- "qwen", the original LLaVA-MoD's (its `conv_templates["qwen"]`, a SeparatorStyle.TWO template):
      {system} USER: {q1} ASSISTANT: {a1}<|endoftext|>USER: {q2} ASSISTANT: {a2}<|endoftext|>
  Trained: " {a}<|endoftext|>" of every assistant turn. The space after "ASSISTANT:" belongs to the
  answer: byte-level BPE glues a space to the word after it, so in the original's full-string
  tokenization the first answer token is " a..."; the original masks the prompt's tokens up to
  "ASSISTANT:" (its `instruction_len - 1`), and at inference its prompt ends with "ASSISTANT:".
- "chatml" (Qwen2-Instruct):
      <|im_start|>system\\n{system}<|im_end|>\\n<|im_start|>user\\n{q}<|im_end|>\\n
      <|im_start|>assistant\\n{a}<|im_end|>\\n
  Trained: "{a}<|im_end|>"; the "\\n" after it belongs to the next prompt.
- "plain" (captions, stage 0): the user turn contributes only its `<image>` placeholders (its text is
  dropped, as the original's `preprocess_plain`), then "{caption}<|endoftext|>"; the caption and the end
  token are trained. (The original ends captions with "\\n"; set `assistant_end` to match it.)

Tokenization: untrained text between two trained spans is tokenized as one string (as the original
tokenizes a whole round), split only at `<image>` and at the template's special tokens. Special tokens
are inserted by id; `<image>` becomes `num_image_tokens` copies of `image_token_id` (teacher and student
may differ), never BPE-tokenized text. Special-token strings inside user text become those special
tokens, as with the original and Hugging Face tokenizers.
Truncation keeps the first `max_length` tokens; a cut inside an image's token run moves to the start of
that run (the image is dropped with it: `Encoded.num_images` tells how many images remain).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Sequence

import numpy as np

IGNORE = -100
IMAGE_PLACEHOLDER = "<image>"
LLAVA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
                "The assistant gives helpful, detailed, and polite answers to the user's questions.")


class TemplateError(ValueError):
  """A conversation the template cannot encode; `reason` is a `sources.REASONS` key."""

  def __init__(self, reason: str, message: str):
    super().__init__(message)
    self.reason = reason


@dataclasses.dataclass(frozen=True)
class Template:
  """`{system}` / `{content}` are replaced; every other character is literal text or, for strings in
  `specials`, a special token inserted by id."""

  name: str
  system: str                 # default system prompt; a leading "system" message replaces it
  system_format: str          # rendered only when the system prompt is non-empty
  user_format: str            # everything from the user turn up to where the answer starts
  assistant_format: str       # the trained answer, without its end token
  assistant_end: str          # trained end-of-answer token (a special token)
  turn_sep: str = ""          # untrained text after each answer
  user_text: bool = True      # False: a user turn contributes only its <image> placeholders
  specials: tuple[str, ...] = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")


TEMPLATES = {
    "qwen": Template(
        name="qwen", system=LLAVA_SYSTEM, system_format="{system} ",
        user_format="USER: {content} ASSISTANT:", assistant_format=" {content}",
        assistant_end="<|endoftext|>"),
    "chatml": Template(
        name="chatml", system="You are a helpful assistant.",
        system_format="<|im_start|>system\n{system}<|im_end|>\n",
        user_format="<|im_start|>user\n{content}<|im_end|>\n<|im_start|>assistant\n",
        assistant_format="{content}", assistant_end="<|im_end|>", turn_sep="\n"),
    "plain": Template(
        name="plain", system="", system_format="", user_format="{content}",
        assistant_format="{content}", assistant_end="<|endoftext|>", user_text=False),
}


def get(template: str | Template) -> Template:
  if isinstance(template, Template):
    return template
  if template not in TEMPLATES:
    raise ValueError(f"unknown template {template!r}; expected one of {sorted(TEMPLATES)}")
  return TEMPLATES[template]


@dataclasses.dataclass(frozen=True)
class Encoded:
  input_ids: np.ndarray  # [length] int32
  labels: np.ndarray     # [length] int32, IGNORE where not trained
  num_images: int        # images whose tokens are in input_ids (after truncation)
  truncated: bool


class Encoder:
  """A template bound to a tokenizer: special-token ids are looked up (and checked) once."""

  def __init__(self, tokenizer: Any, template: str | Template):
    self.tokenizer = tokenizer
    self.template = get(template)
    t = self.template
    used = [s for s in t.specials
            if s in t.system_format + t.user_format + t.assistant_format + t.assistant_end + t.turn_sep]
    if t.assistant_end and t.assistant_end not in t.specials:
      raise ValueError(f"template {t.name!r}: assistant_end {t.assistant_end!r} is not in specials")
    self.special_ids = {}
    for s in t.specials:
      token_id = tokenizer.convert_tokens_to_ids(s)
      valid = isinstance(token_id, int) and tokenizer.convert_ids_to_tokens(token_id) == s
      if valid:
        self.special_ids[s] = token_id
      elif s in used:
        raise ValueError(f"template {t.name!r} needs the special token {s!r}, which the tokenizer "
                         f"({type(tokenizer).__name__}) does not have as a single token")
    pieces = sorted(self.special_ids, key=len, reverse=True) + [IMAGE_PLACEHOLDER]
    self._split = re.compile("(" + "|".join(re.escape(p) for p in pieces) + ")")

  # --- rendering: messages -> [(text, trained)] ---------------------------------------------------

  def _spans(self, messages: Sequence[tuple[str, str]], train: str,
             generation_prompt: bool = False) -> list[tuple[str, bool]]:
    t = self.template
    messages = list(messages)
    system = t.system
    if messages and messages[0][0] == "system":
      system = messages.pop(0)[1]
    spans = [(t.system_format.format(system=system), False)] if system and t.system_format else []
    last = max((j for j, (role, _) in enumerate(messages) if role == "assistant"), default=-1)
    for j, (role, content) in enumerate(messages):
      if role == "user":
        if not t.user_text:
          content = IMAGE_PLACEHOLDER * content.count(IMAGE_PLACEHOLDER)
        spans.append((t.user_format.format(content=content), False))
      elif role == "assistant":
        if IMAGE_PLACEHOLDER in content:
          raise TemplateError("image_in_response", f"assistant turn {j} holds {IMAGE_PLACEHOLDER}")
        trained = train == "all" or (train == "last" and j == last)
        spans.append((t.assistant_format.format(content=content) + t.assistant_end, trained))
        spans.append((t.turn_sep, False))
      else:
        raise TemplateError("bad_turn_order",
                            f"turn {j} has role {role!r} (a system turn must be first)")
    if generation_prompt and (not messages or messages[-1][0] != "user"):
      raise ValueError("a generation prompt must end with a user turn")
    merged: list[tuple[str, bool]] = []
    for text, trained in spans:
      if merged and merged[-1][1] == trained:
        merged[-1] = (merged[-1][0] + text, trained)
      elif text:
        merged.append((text, trained))
    return merged

  # --- tokenization -------------------------------------------------------------------------------

  def _tokenize(self, text: str) -> list[int]:
    return list(self.tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []

  def _ids(self, spans, image_token_id: int, num_image_tokens: int):
    """-> ids [n], trained [n] bool, image [n] (index of the image a token belongs to, else -1)."""
    if num_image_tokens < 1:
      raise ValueError(f"num_image_tokens must be >= 1, got {num_image_tokens}")
    ids, trained, image, count = [], [], [], 0
    for text, is_trained in spans:
      for piece in self._split.split(text):
        if not piece:
          continue
        if piece == IMAGE_PLACEHOLDER:
          if is_trained:
            raise TemplateError("image_in_response", f"{IMAGE_PLACEHOLDER} in a trained span")
          chunk, which = [image_token_id] * num_image_tokens, count
          count += 1
        elif piece in self.special_ids:
          chunk, which = [self.special_ids[piece]], -1
        else:
          chunk, which = self._tokenize(piece), -1
          if image_token_id in chunk:
            raise TemplateError("image_token_in_text", f"text {piece[:40]!r} tokenizes to the image "
                                f"token id {image_token_id}")
        ids += chunk
        trained += [is_trained] * len(chunk)
        image += [which] * len(chunk)
    return np.asarray(ids, np.int32), np.asarray(trained, bool), np.asarray(image, np.int32)

  # --- public -------------------------------------------------------------------------------------

  def encode(self, messages: Sequence[tuple[str, str]], *, image_token_id: int,
             num_image_tokens: int, max_length: int | None = None, num_images: int | None = None,
             train: str = "all") -> Encoded:
    """A conversation -> Encoded. train="all" trains every assistant turn (instruction tuning),
    "last" only the final one (preference responses). `num_images`, when given, must equal the
    number of `<image>` placeholders."""
    if train not in ("all", "last"):
      raise ValueError(f"train={train!r}: expected 'all' or 'last'")
    spans = self._spans(messages, train)
    ids, trained, image = self._ids(spans, image_token_id, num_image_tokens)
    found = int(image.max(initial=-1)) + 1
    if num_images is not None and found != num_images:
      raise TemplateError("image_count_mismatch", f"{num_images} image(s) but {found} "
                          f"{IMAGE_PLACEHOLDER} placeholder(s) in the text")
    truncated = max_length is not None and ids.size > max_length
    if truncated:
      cut = max_length
      while cut > 0 and image[cut - 1] >= 0 and image[cut - 1] == image[cut]:
        cut -= 1  # never keep part of an image's tokens
      ids, trained, image = ids[:cut], trained[:cut], image[:cut]
    if not trained.any():
      reason = "truncated_no_target" if truncated else "no_assistant_turn"
      raise TemplateError(reason, f"no trained token left ({ids.size} tokens"
                          f"{f', cut at max_length={max_length}' if truncated else ''})")
    labels = np.where(trained, ids, IGNORE).astype(np.int32)
    return Encoded(ids, labels, int(image.max(initial=-1)) + 1, truncated)

  def encode_preference(self, messages: Sequence[tuple[str, str]], chosen: str, rejected: str,
                        **kwargs) -> tuple[Encoded, Encoded]:
    """Prompt + chosen and prompt + rejected; the prompt (identical ids in both) is not trained."""
    return (self.encode(list(messages) + [("assistant", chosen)], train="last", **kwargs),
            self.encode(list(messages) + [("assistant", rejected)], train="last", **kwargs))

  def encode_prompt(self, messages: Sequence[tuple[str, str]], *, image_token_id: int,
                    num_image_tokens: int) -> np.ndarray:
    """The ids a model generates from: the conversation so far (ending with a user turn) and the
    assistant header ("... ASSISTANT:" / "<|im_start|>assistant\\n")."""
    spans = self._spans(messages, "none", generation_prompt=True)
    return self._ids(spans, image_token_id, num_image_tokens)[0]
