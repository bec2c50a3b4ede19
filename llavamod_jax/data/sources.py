"""Random-access record sources: LLaVA JSON / JSONL files, weighted mixtures, prepared TFDS datasets.

Every source has `__len__` and `__getitem__(i) -> Record | Bad` (what `grain.MapDataset.source` needs)
and never raises for a bad record: it returns a `Bad` naming the reason, the record id and where the
record lives (`file:line`), and the pipeline counts, logs or (strict mode) raises it. Problems with a
whole file (missing, not JSON at all) raise at construction.

Accepted records (one per JSONL line, or the elements of a JSON list):
  conversation  {"id", "image": path | [paths] | absent, "conversations": [{"from", "value"}, ...]}
  preference    RLAIF-V style {"id", "image", "question", "chosen": str, "rejected": str}, or the
                original LLaVA-MoD style where "chosen" / "rejected" are conversation lists that share every turn
                but the last (the prompt) and end with the assistant turn being compared.
Roles: "human" / "user" -> user, "gpt" / "assistant" -> assistant, "system" -> system (first turn only;
it replaces the template's system prompt). The keys "role" / "content" are accepted for "from" /
"value" (OpenAI-style exports of the same data). A conversation must alternate user / assistant
(after an optional system turn), start with the user and end with the assistant; the original drops a
leading assistant turn silently, here that record is counted as "bad_turn_order".
Images: relative paths are joined to `image_root` (default: the data file's directory), absolute paths
and URIs are kept. The text must hold exactly one `<image>` per image, except in RLAIF-V style
records, whose question carries no placeholder by convention: there "<image>\\n" is prepended once
per image when the question has none.
Files: data files, image roots and images may be local paths or URIs (gs://..., any scheme
etils.epath reads); every process reads them where they are, nothing is copied.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Iterable, Mapping, Sequence, Union

import numpy as np

from llavamod_jax import fileutil
from llavamod_jax.data.templates import IMAGE_PLACEHOLDER

ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
         "system": "system"}
KINDS = ("conversation", "preference")

# Why a record is skipped (the keys of the pipeline's skip counters).
REASONS = (
    "malformed_json",        # a JSONL line that does not parse, or a record that is not an object
    "malformed_record",      # wrong field types (e.g. a non-string turn value)
    "wrong_kind",            # a preference record in a conversation pipeline or vice versa
    "empty_conversation",    # no turns at all
    "unknown_role",          # a role outside ROLES
    "bad_turn_order",        # turns that do not alternate user / assistant, or a system turn later on
    "no_assistant_turn",     # nothing to train on
    "empty_response",        # a preference response that is empty
    "preference_prompt_mismatch",  # chosen / rejected conversation lists with different prompts
    "image_count_mismatch",  # number of <image> placeholders != number of images
    "image_in_response",     # an <image> placeholder inside an assistant turn
    "too_many_images",       # more images than the pipeline's images per sample
    "missing_image",         # image file absent or unreadable
    "corrupt_image",         # image bytes that do not decode
    "truncated_no_target",   # truncation at max_length left no trained token
    "image_token_in_text",   # a text token has the image token id (the tokenizer and id disagree)
)


class DataError(ValueError):
  """A record or file that cannot be used, in strict mode or at file level. Names where it lives."""


@dataclasses.dataclass(frozen=True)
class Record:
  """A validated record. `messages` is the whole conversation, or the shared prompt of a preference
  pair (then `chosen` / `rejected` are the two final assistant responses). `images` are file paths
  (resolved) or encoded image bytes, in the order of the `<image>` placeholders."""

  id: str
  kind: str
  messages: tuple[tuple[str, str], ...]
  images: tuple[Union[str, bytes], ...] = ()
  chosen: str | None = None
  rejected: str | None = None
  origin: str = ""

  def to_json(self) -> str:
    """The record without its images (which TFDS stores as bytes beside it)."""
    return json.dumps({"id": self.id, "kind": self.kind, "messages": [list(m) for m in self.messages],
                       "chosen": self.chosen, "rejected": self.rejected, "origin": self.origin})

  @classmethod
  def from_json(cls, text: str | bytes, images: Sequence[Union[str, bytes]] = ()) -> "Record":
    d = json.loads(text)
    return cls(id=d["id"], kind=d["kind"], messages=tuple(tuple(m) for m in d["messages"]),
               images=tuple(images), chosen=d["chosen"], rejected=d["rejected"], origin=d["origin"])


@dataclasses.dataclass(frozen=True)
class Bad:
  """A record that cannot be used: `reason` is one of REASONS."""

  reason: str
  id: str
  origin: str
  detail: str = ""

  def message(self) -> str:
    return f"{self.origin}: record {self.id!r}: {self.reason}: {self.detail}"


# ---------------------------------------------------------------------------------------------------
# Parsing one record.
# ---------------------------------------------------------------------------------------------------

class _Invalid(Exception):

  def __init__(self, reason: str, detail: str):
    super().__init__(detail)
    self.reason = reason
    self.detail = detail


def _turns(turns: Any, field: str) -> list[tuple[str, str]]:
  if not isinstance(turns, list):
    raise _Invalid("malformed_record", f"{field!r} must be a list of turns, got {type(turns).__name__}")
  if not turns:
    raise _Invalid("empty_conversation", f"{field!r} holds no turns")
  out = []
  for j, turn in enumerate(turns):
    if not isinstance(turn, dict):
      raise _Invalid("malformed_record", f"{field}[{j}] must be an object, got {type(turn).__name__}")
    role = turn.get("from", turn.get("role"))
    value = turn.get("value", turn.get("content"))
    if role not in ROLES:
      raise _Invalid("unknown_role", f"{field}[{j}] has role {role!r}; expected one of {sorted(ROLES)}")
    if not isinstance(value, str):
      raise _Invalid("malformed_record", f"{field}[{j}] value must be a string, got "
                     f"{type(value).__name__}")
    out.append((ROLES[role], value))
  return out


def _check_order(messages: Sequence[tuple[str, str]], field: str):
  body = messages[1:] if messages and messages[0][0] == "system" else messages
  if not any(role == "assistant" for role, _ in body):
    raise _Invalid("no_assistant_turn", f"{field!r} has no assistant turn")
  for j, (role, _) in enumerate(body):
    expected = "user" if j % 2 == 0 else "assistant"
    if role != expected:
      raise _Invalid("bad_turn_order", f"{field!r} turn {j + (len(messages) - len(body))} is "
                     f"{role!r}, expected {expected!r} (turns alternate user/assistant, user first)")
  if body[-1][0] != "assistant":
    raise _Invalid("bad_turn_order", f"{field!r} ends with a user turn that has no answer")


def _images(raw: dict, image_root: str | None) -> tuple[str, ...]:
  image = raw.get("image")
  if image is None:
    return ()
  paths = [image] if isinstance(image, str) else image
  if not isinstance(paths, list) or not all(isinstance(p, str) and p for p in paths):
    raise _Invalid("malformed_record", f"'image' must be a path or a list of paths, got {image!r}")
  # A gs:// root joins as a local one does: URIs use "/" like POSIX paths.
  return tuple(p if fileutil.is_absolute(p) or image_root is None else os.path.join(image_root, p)
               for p in paths)


def _check_images(messages: Sequence[tuple[str, str]], responses: Sequence[str], num_images: int):
  for text in [t for role, t in messages if role == "assistant"] + list(responses):
    if IMAGE_PLACEHOLDER in text:
      raise _Invalid("image_in_response", f"an assistant turn holds {IMAGE_PLACEHOLDER}")
  count = sum(t.count(IMAGE_PLACEHOLDER) for _, t in messages)
  if count != num_images:
    raise _Invalid("image_count_mismatch", f"{num_images} image(s) but {count} {IMAGE_PLACEHOLDER} "
                   f"placeholder(s) in the text")


def _conversation(raw: dict, rid: str, origin: str, images: tuple) -> Record:
  messages = _turns(raw["conversations"], "conversations")
  _check_order(messages, "conversations")
  _check_images(messages, (), len(images))
  return Record(rid, "conversation", tuple(messages), images, origin=origin)


def _preference(raw: dict, rid: str, origin: str, images: tuple) -> Record:
  chosen, rejected = raw["chosen"], raw["rejected"]
  if isinstance(chosen, list) and isinstance(rejected, list):
    c, r = _turns(chosen, "chosen"), _turns(rejected, "rejected")
    _check_order(c, "chosen")
    _check_order(r, "rejected")
    if c[:-1] != r[:-1]:
      raise _Invalid("preference_prompt_mismatch", "'chosen' and 'rejected' differ before their last "
                     "turn (they must share the prompt)")
    messages, chosen, rejected = tuple(c[:-1]), c[-1][1], r[-1][1]
  elif isinstance(chosen, str) and isinstance(rejected, str):
    question = raw.get("question")
    if not isinstance(question, str):
      raise _Invalid("malformed_record", "'question' must be a string when 'chosen'/'rejected' are")
    if images and IMAGE_PLACEHOLDER not in question:
      question = (IMAGE_PLACEHOLDER + "\n") * len(images) + question
    messages = (("user", question),)
  else:
    raise _Invalid("malformed_record", "'chosen' and 'rejected' must both be strings or both be "
                   f"conversation lists, got {type(chosen).__name__} / {type(rejected).__name__}")
  if not chosen.strip() or not rejected.strip():
    raise _Invalid("empty_response", "'chosen' or 'rejected' is empty")
  _check_images(messages, (chosen, rejected), len(images))
  return Record(rid, "preference", messages, images, chosen, rejected, origin)


def parse(raw: Any, origin: str, image_root: str | None = None, kind: str | None = None) -> Record | Bad:
  """One raw record -> Record, or Bad. `kind` ("conversation" / "preference") rejects the other kind;
  None accepts both."""
  if not isinstance(raw, dict):
    return Bad("malformed_json", origin, origin,
               f"a record must be a JSON object, got {type(raw).__name__}")
  rid = str(raw.get("id", origin))
  try:
    if "conversations" in raw:
      found = "conversation"
    elif "chosen" in raw and "rejected" in raw:
      found = "preference"
    else:
      raise _Invalid("malformed_record", "neither 'conversations' nor 'chosen'/'rejected' present")
    if kind is not None and found != kind:
      raise _Invalid("wrong_kind", f"a {found} record where {kind} records are expected")
    images = _images(raw, image_root)
    return (_conversation if found == "conversation" else _preference)(raw, rid, origin, images)
  except _Invalid as e:
    return Bad(e.reason, rid, origin, e.detail)


def _checked(record: Record | Bad, kind: str | None) -> Record | Bad:
  if isinstance(record, Record) and kind is not None and record.kind != kind:
    return Bad("wrong_kind", record.id, record.origin,
               f"a {record.kind} record where {kind} records are expected")
  return record


# ---------------------------------------------------------------------------------------------------
# Sources.
# ---------------------------------------------------------------------------------------------------

class JsonSource:
  """A LLaVA JSON list or JSONL file. JSONL is indexed by line offsets and read lazily (large files
  stay on disk or in the bucket, and worker processes receive only the offsets); a JSON list is
  parsed once and each element is kept as compact JSON text. The format is detected from the first
  non-blank character."""

  def __init__(self, path: str | os.PathLike, *, image_root: str | os.PathLike | None = None,
               kind: str | None = None):
    if kind is not None and kind not in KINDS:
      raise ValueError(f"kind {kind!r}: expected one of {KINDS} or None")
    self.path = os.fspath(path)
    self.kind = kind
    root = os.path.dirname(fileutil.absolute(self.path)) if image_root is None else image_root
    self.image_root = os.fspath(root)
    if not fileutil.path(self.path).is_file():
      raise DataError(f"data file {self.path!r} does not exist")
    with fileutil.open_file(self.path, "rb") as f:
      first = b""
      while not first.strip():
        chunk = f.read(4096)
        if not chunk:
          break
        first = (first + chunk).lstrip()
      f.seek(0)
      if first[:1] == b"[":
        try:
          items = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
          raise DataError(f"{self.path}: not a valid JSON list ({e}); for line-by-line error recovery "
                          "use JSONL") from e
        self._items = [json.dumps(x, ensure_ascii=False) for x in items]
        self._offsets = self._lines = None
        return
      self._items = None
      starts, stops, lines, pos = [], [], [], 0
      for number, line in enumerate(f, 1):  # streamed: a large JSONL file is never held in memory
        if line.strip():
          starts.append(pos)
          stops.append(pos + len(line))
          lines.append(number)
        pos += len(line)
    self._offsets = np.stack([np.asarray(starts, np.int64), np.asarray(stops, np.int64)], axis=1)
    self._lines = np.asarray(lines, np.int64)

  def __len__(self) -> int:
    return len(self._items) if self._items is not None else len(self._lines)

  def __getitem__(self, i: int) -> Record | Bad:
    i = int(i)
    if not 0 <= i < len(self):
      raise IndexError(f"{self.path}: record index {i} out of range [0, {len(self)})")
    if self._items is not None:
      origin, text = f"{self.path}[{i}]", self._items[i]
    else:
      origin = f"{self.path}:{self._lines[i]}"
      start, stop = (int(x) for x in self._offsets[i])
      # One open per read: safe from reader threads and processes; a gs:// file is read from its
      # offset too, never copied.
      with fileutil.open_file(self.path, "rb") as f:
        f.seek(start)
        text = f.read(stop - start)
    try:
      raw = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
      return Bad("malformed_json", origin, origin, str(e))
    return parse(raw, origin, self.image_root, self.kind)

  def __repr__(self):
    return f"JsonSource({self.path!r}, {len(self)} records)"


class Mixture:
  """Several sources in one index space. `weights[i]` is a rate: one pass over the mixture holds
  `round(weights[i] * len(sources[i]))` records of source i — every record floor(w) times, plus a
  seeded random subset for the fraction. Weights 1 (the default) concatenate. Deterministic in `seed`;
  the pipeline shuffles the whole mixture."""

  def __init__(self, sources: Sequence[Any], weights: Sequence[float] | None = None, seed: int = 0):
    weights = [1.0] * len(sources) if weights is None else [float(w) for w in weights]
    if len(weights) != len(sources) or not sources:
      raise ValueError(f"Mixture: {len(sources)} sources but {len(weights)} weights")
    if any(w < 0 or not np.isfinite(w) for w in weights):
      raise ValueError(f"Mixture: weights must be finite and >= 0, got {weights}")
    self.sources, self.weights = list(sources), weights
    which, index = [], []
    for k, (source, w) in enumerate(zip(self.sources, weights)):
      n = len(source)
      total = int(round(w * n))
      full, rest = divmod(total, n) if n else (0, 0)
      picked = [np.arange(n, dtype=np.int64)] * full
      if rest:
        rng = np.random.default_rng([seed, k])
        picked.append(np.sort(rng.permutation(n)[:rest]).astype(np.int64))
      idx = np.concatenate(picked) if picked else np.zeros(0, np.int64)
      which.append(np.full(len(idx), k, np.int32))
      index.append(idx)
    self._which = np.concatenate(which)
    self._index = np.concatenate(index)

  def __len__(self) -> int:
    return len(self._index)

  def __getitem__(self, i: int) -> Record | Bad:
    i = int(i)
    return self.sources[int(self._which[i])][int(self._index[i])]

  def counts(self) -> list[int]:
    """Records per source in one pass."""
    return np.bincount(self._which, minlength=len(self.sources)).tolist()


class TfdsSource:
  """A dataset written by `tfds_builder.prepare`, read with `tfds.data_source` (no TensorFlow).

  `name_or_dir`: a prepared dataset directory (holding dataset_info.json), or a TFDS name such as
  "llava_records/mydata" found under `data_dir`."""

  def __init__(self, name_or_dir: str | os.PathLike, split: str = "train", *,
               data_dir: str | os.PathLike | None = None, kind: str | None = None):
    import tensorflow_datasets as tfds  # heavy; only sources that read TFDS pay for it

    # A gs:// directory is handed to TFDS as it is: TFDS reads its metadata through epath, and
    # array_record reads the shards from the bucket itself (its own GCS reader).
    self.name, self.split, self.kind = os.fspath(name_or_dir), split, kind
    if (fileutil.path(self.name) / "dataset_info.json").is_file():
      self._data = tfds.builder_from_directory(self.name).as_data_source(split=split)
    else:
      self._data = tfds.data_source(self.name, split=split, data_dir=data_dir)

  def __len__(self) -> int:
    return len(self._data)

  def __getitem__(self, i: int) -> Record | Bad:
    ex = self._data[int(i)]
    record = Record.from_json(ex["record"], tuple(bytes(b) for b in ex["images"]))
    return _checked(record, self.kind)

  def __repr__(self):
    return f"TfdsSource({self.name!r}, split={self.split!r}, {len(self)} records)"


def from_files(paths: Sequence[str | os.PathLike] | str, weights: Sequence[float] | None = None, *,
               image_root: str | os.PathLike | None = None, kind: str | None = None,
               seed: int = 0) -> JsonSource | Mixture:
  """One JSON/JSONL file, or a weighted Mixture of several (see `Mixture` for what weights mean)."""
  paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
  sources = [JsonSource(p, image_root=image_root, kind=kind) for p in paths]
  if len(sources) == 1 and (weights is None or list(weights) == [1.0]):
    return sources[0]
  return Mixture(sources, weights, seed)


def summarize(items: Iterable[Record | Bad]) -> Mapping[str, int]:
  """Counts of good records and of each skip reason (for reports and tests)."""
  counts: dict[str, int] = {}
  for item in items:
    key = "ok" if isinstance(item, Record) else item.reason
    counts[key] = counts.get(key, 0) + 1
  return counts
