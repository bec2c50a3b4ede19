"""Pack LLaVA records into a TFDS ArrayRecord dataset (images inside, as their encoded file bytes).

    path, counts = tfds_builder.prepare({"train": source}, data_dir, name="mydata")
    source = sources.TfdsSource(path, split="train")      # or TfdsSource("llava_records/mydata",
                                                           #   data_dir=data_dir)

Written and read without TensorFlow: features are plain `Text` and object `Tensor`s (bytes), which
tensorflow-datasets encodes and decodes in numpy; `tfds.features.Image` would re-encode the images
and decode them to arrays with its own colour handling, so the original bytes are stored instead and
`data.image.load_image` decodes them exactly as it decodes files. Examples keep the source order
(`disable_shuffling`), so a prepared dataset reads like its JSON source. Each example holds:
  id      the record id
  record  `sources.Record.to_json()`: kind, messages, chosen / rejected, origin (file:line)
  images  the encoded bytes of each image, in placeholder order
Records the source marks bad, and records whose image files are missing, are not written; they are
counted per reason (returned, and stored in the dataset's metadata under "skipped"), and
`strict=True` raises at the first. Image bytes are not decoded here: a corrupt image is caught when
the pipeline reads it.

On a bucket: records and images are read from gs:// as `sources` reads them, and a gs:// `data_dir`
is written through a local staging directory (array_record reads gs:// shards itself but writes
local files only), then uploaded; `sources.TfdsSource` reads the uploaded directory in place.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import tensorflow_datasets as tfds

from llavamod_jax import fileutil
from llavamod_jax.data import sources as sources_lib

log = logging.getLogger(__name__)
VERSION = "1.0.0"


def _read_image(path_or_bytes: str | bytes) -> bytes:
  if isinstance(path_or_bytes, bytes):
    return path_or_bytes
  with fileutil.open_file(path_or_bytes, "rb") as f:
    return f.read()


class LlavaRecords(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Builder of prepared LLaVA data. The config name is the dataset's name: its files live in
  `data_dir/llava_records/<name>/<version>/`."""

  VERSION = tfds.core.Version(VERSION)
  # No checksums or code files: TFDS's lookup of them inside an installed package needs the
  # `importlib_resources` backport, which is not a dependency.
  code_path = None

  def __init__(self, *, splits: Mapping[str, Any], name: str, strict: bool = False, **kwargs):
    self._splits, self._strict = dict(splits), strict
    self.counts: dict[str, dict[str, int]] = {split: {} for split in self._splits}
    super().__init__(config=tfds.core.BuilderConfig(name=name), file_format="array_record", **kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self, disable_shuffling=True, metadata=tfds.core.MetadataDict(),
        description="LLaVA conversation / preference records with encoded image bytes.",
        features=tfds.features.FeaturesDict({
            "id": tfds.features.Text(),
            "record": tfds.features.Text(),
            "images": tfds.features.Sequence(tfds.features.Tensor(shape=(), dtype=np.object_)),
        }))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {split: self._generate_examples(split, source) for split, source in self._splits.items()}

  def _skip(self, split: str, bad: sources_lib.Bad):
    if self._strict:
      raise sources_lib.DataError(f"strict data mode: {bad.message()}")
    counts = self.counts[split]
    counts[bad.reason] = counts.get(bad.reason, 0) + 1
    log.warning("tfds %s/%s: skipped %s", self.builder_config.name, split, bad.message())

  def _generate_examples(self, split: str, source):
    counts = self.counts[split]
    for i in range(len(source)):
      item = source[i]
      if isinstance(item, sources_lib.Bad):
        self._skip(split, item)
        continue
      try:
        images = [_read_image(src) for src in item.images]
      except OSError as e:
        self._skip(split, sources_lib.Bad("missing_image", item.id, item.origin, str(e)))
        continue
      counts["written"] = counts.get("written", 0) + 1
      yield i, {"id": item.id, "record": item.to_json(), "images": images}

  def _download_and_prepare(self, dl_manager, download_config=None):
    super()._download_and_prepare(dl_manager, download_config)
    self.info.metadata["skipped"] = {split: {k: v for k, v in c.items() if k != "written"}
                                     for split, c in self.counts.items()}


def prepare(splits: Mapping[str, Any], data_dir: str | os.PathLike, *, name: str = "default",
            strict: bool = False) -> tuple[str, dict[str, dict[str, int]]]:
  """Writes `splits` (split name -> random-access source of Record | Bad, e.g. `sources.JsonSource`)
  as the TFDS dataset `llava_records/<name>` under `data_dir`. Returns the dataset directory (what
  `sources.TfdsSource` opens) and per split the counts of written and skipped records per reason.
  An existing prepared dataset of that name and version is reused as it is."""
  if fileutil.is_remote(data_dir):
    return _prepare_remote(splits, os.fspath(data_dir), name=name, strict=strict)
  builder = LlavaRecords(splits=splits, name=name, strict=strict, data_dir=os.fspath(data_dir))
  builder.download_and_prepare()
  for split, counts in builder.counts.items():
    if counts:
      log.info("tfds %s/%s: %s", name, split, counts)
  return os.fspath(builder.data_dir), builder.counts


def _prepare_remote(splits: Mapping[str, Any], data_dir: str, *, name: str,
                    strict: bool) -> tuple[str, dict[str, dict[str, int]]]:
  """`prepare` into a URI: built in a local temporary directory, then uploaded with
  dataset_info.json last, so an interrupted upload is never taken for a prepared dataset."""
  remote = fileutil.path(data_dir) / LlavaRecords.name / name / VERSION
  if (remote / "dataset_info.json").is_file():
    return os.fspath(remote), {split: {} for split in splits}
  with tempfile.TemporaryDirectory() as tmp:
    local, counts = prepare(splits, tmp, name=name, strict=strict)
    files = sorted(Path(local).iterdir(), key=lambda f: f.name == "dataset_info.json")
    remote.mkdir(parents=True, exist_ok=True)
    for f in files:  # the builder writes a flat directory of shards and metadata
      with f.open("rb") as src, (remote / f.name).open("wb") as dst:
        shutil.copyfileobj(src, dst)  # streamed: a shard need not fit in memory
  return os.fspath(remote), counts
