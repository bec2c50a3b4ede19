"""Writing JSONL fixtures for the data tests."""

import json


def write_jsonl(path, records, extra_lines=()):
  """One JSON object per line, then `extra_lines` verbatim (e.g. malformed lines); returns str(path)."""
  with open(path, "w") as f:
    for r in records:
      f.write(json.dumps(r) + "\n")
    for line in extra_lines:
      f.write(line + "\n")
  return str(path)
