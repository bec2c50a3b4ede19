"""doc_to_text / doc_to_visual of the test tasks: a doc is {"question", "image" (a path relative to
the working directory, or "" for a text-only doc), "answer", "choices", "gold"}."""

from PIL import Image


def doc_to_visual(doc):
  return [Image.open(doc["image"]).convert("RGB")] if doc["image"] else []


def doc_to_text(doc):
  return doc["question"]
