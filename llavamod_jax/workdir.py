"""What a training run leaves behind, and one loader for it or for a Hugging Face directory.

    model, params, tokenizer, info = workdir.load_model("runs/mimic")      # a training workdir
    model, params, tokenizer, info = workdir.load_model("exports/student")  # or an HF directory

Layout of a workdir (written by the training loop):
  WORKDIR/checkpoints/<step>/   orbax; `checkpoint.restore_model(WORKDIR/checkpoints)` rebuilds the model
  WORKDIR/tokenizer/            the tokenizer, `save_pretrained` format
  WORKDIR/run.json              `RunInfo`: how the model reads its inputs (template, images, token ids)
  WORKDIR/metrics.jsonl         one JSON object per logged step

A workdir may be a gs:// URI (llavamod_jax/fileutil.py); an HF directory must be local.

An HF directory has no run.json; its `RunInfo` is inferred: template and image settings from the
`llavamod_jax.json` sidecar that `launch/export_hf.py` writes, else the template "qwen" and the image
settings of `preprocessor_config.json` (or the vision tower's own size); token ids from config.json and
the tokenizer.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

from llavamod_jax import fileutil

RUN_JSON = "run.json"
CHECKPOINTS = "checkpoints"
TOKENIZER = "tokenizer"
METRICS = "metrics.jsonl"
SIDECAR = "llavamod_jax.json"  # beside an exported HF model: the RunInfo fields that HF has no place for


@dataclasses.dataclass(frozen=True)
class ImageSettings:
  """Arguments of `data.image.preprocess`."""

  kind: str = "clip"  # clip | siglip
  size: int = 336
  aspect: str = "pad"  # pad | square | none


@dataclasses.dataclass(frozen=True)
class DataSettings:
  eval_files: tuple[str, ...] = ()
  image_root: str | None = None  # None: each file's own directory


@dataclasses.dataclass(frozen=True)
class RunInfo:
  """run.json: what a reader needs besides the weights to prompt the model the way it was trained."""

  template: str
  image: ImageSettings
  image_token_id: int
  num_image_tokens: int
  eos_token_id: int
  pad_token_id: int
  stage: str = ""
  teacher: str | None = None  # the teacher's HF directory, when the stage had one
  data: DataSettings = DataSettings()
  extra: dict[str, Any] = dataclasses.field(default_factory=dict)  # other run.json keys, kept

  def to_json(self) -> str:
    d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
    d["image"] = dataclasses.asdict(self.image)
    d["data"] = {"eval_files": list(self.data.eval_files), "image_root": self.data.image_root}
    return json.dumps({**self.extra, **d}, indent=2, sort_keys=True) + "\n"

  @classmethod
  def from_json(cls, text: str, where: str = RUN_JSON) -> "RunInfo":
    """Parse run.json text; `where` names the file in errors."""
    try:
      d = json.loads(text)
    except json.JSONDecodeError as e:
      raise ValueError(f"{where}: invalid JSON: {e}") from None
    if not isinstance(d, dict):
      raise ValueError(f"{where}: expected a JSON object, got {type(d).__name__}")
    required = ("template", "image", "image_token_id", "num_image_tokens", "eos_token_id",
                "pad_token_id")
    missing = [k for k in required if k not in d]
    if missing:
      raise ValueError(f"{where}: missing key(s) {missing} (a run.json needs {list(required)})")
    names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
    try:
      image = _image(d["image"])
      data = _data(d.get("data") or {})
      ints = {k: _int(d[k], k) for k in required[2:]}
    except ValueError as e:
      raise ValueError(f"{where}: {e}") from None
    return cls(template=str(d["template"]), image=image, stage=str(d.get("stage") or ""),
               teacher=d.get("teacher"), data=data, **ints,
               extra={k: v for k, v in d.items() if k not in names})

  def write(self, workdir: str | os.PathLike) -> fileutil.AnyPath:
    """Write WORKDIR/run.json so that a reader never sees half of it (locally: via a temporary
    file)."""
    path = fileutil.path(workdir) / RUN_JSON
    path.parent.mkdir(parents=True, exist_ok=True)
    if fileutil.is_remote(path):  # an object store shows an object whole or not at all
      path.write_text(self.to_json())
      return path
    tmp = path.with_name(f".{RUN_JSON}.tmp-{os.getpid()}")
    tmp.write_text(self.to_json())
    os.replace(tmp, path)
    return path

  @classmethod
  def read(cls, workdir: str | os.PathLike) -> "RunInfo":
    path = fileutil.path(workdir) / RUN_JSON
    if not path.is_file():
      raise FileNotFoundError(f"{path}: no run.json (a training workdir has one beside checkpoints/)")
    return cls.from_json(path.read_text(), str(path))


def _fields(cls, d: Any, key: str) -> dict[str, Any]:
  if not isinstance(d, dict):
    raise ValueError(f"'{key}' must be an object, got {d!r}")
  known = {f.name for f in dataclasses.fields(cls)}
  unknown = sorted(set(d) - known)
  if unknown:
    raise ValueError(f"'{key}' has unknown field(s) {unknown}; expected {sorted(known)}")
  return d


def _image(d: Any) -> ImageSettings:
  image = ImageSettings(**_fields(ImageSettings, d, "image"))
  _int(image.size, "image.size")
  if image.kind not in ("clip", "siglip") or image.aspect not in ("pad", "square", "none"):
    raise ValueError(f"'image' is {d}: kind must be clip|siglip, aspect pad|square|none")
  return image


def _data(d: Any) -> DataSettings:
  d = _fields(DataSettings, d, "data")
  files = d.get("eval_files") or []
  if not isinstance(files, list) or not all(isinstance(f, str) for f in files):
    raise ValueError(f"'data.eval_files' must be a list of paths, got {files!r}")
  root = d.get("image_root")
  if root is not None and not isinstance(root, str):
    raise ValueError(f"'data.image_root' must be a path or null, got {root!r}")
  return DataSettings(tuple(files), root)


def _int(value: Any, key: str) -> int:
  if isinstance(value, bool) or not isinstance(value, int):
    raise ValueError(f"'{key}' must be an integer, got {value!r}")
  return value


def read(workdir: str | os.PathLike) -> RunInfo:
  """WORKDIR/run.json as a RunInfo; the error names the file when it is missing or invalid."""
  return RunInfo.read(workdir)


def write(workdir: str | os.PathLike, info: RunInfo) -> fileutil.AnyPath:
  return info.write(workdir)


# ---------------------------------------------------------------------------------------------------
# Loading a model with everything needed to prompt it.


def is_workdir(path: str | os.PathLike) -> bool:
  p = fileutil.path(path)
  return (p / RUN_JSON).is_file() or (p / CHECKPOINTS).is_dir()


def load_model(path: str | os.PathLike, step: int | None = None):
  """(model, params, tokenizer, RunInfo) from a training workdir (checkpoint `step`, latest when None)
  or from a Hugging Face directory (config.json + safetensors + tokenizer files)."""
  import transformers

  from llavamod_jax import checkpoint, hf

  p = fileutil.path(path)
  if is_workdir(p):
    info = RunInfo.read(p)
    if not (p / TOKENIZER).is_dir():
      raise FileNotFoundError(f"{p / TOKENIZER}: no tokenizer directory in the workdir")
    model, params = checkpoint.restore_model(p / CHECKPOINTS, step)
    with fileutil.local_dir(p / TOKENIZER) as tokenizer_dir:
      tokenizer = transformers.AutoTokenizer.from_pretrained(str(tokenizer_dir))
    where = str(p / RUN_JSON)
  elif fileutil.is_remote(p):
    raise FileNotFoundError(f"{p}: not a training workdir (no {RUN_JSON}, no {CHECKPOINTS}/); a "
                            "Hugging Face model directory must be on local disk")
  elif (p / "config.json").is_file():
    if step is not None:
      raise ValueError(f"{p}: a Hugging Face directory has no steps (got step={step})")
    model, params = hf.load(p)
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(p))
    info = infer_hf_info(p, model.cfg, tokenizer)
    where = str(p)
  else:
    raise FileNotFoundError(f"{p}: neither a training workdir ({RUN_JSON}, {CHECKPOINTS}/) nor a "
                            "Hugging Face model directory (config.json)")
  check(info, model.cfg, where)
  return model, params, tokenizer, info


def check(info: RunInfo, cfg, where: str) -> None:
  """The run's token ids and image size must be those the model computes with."""
  from llavamod_jax import models

  if not isinstance(cfg, models.LlavaConfig):
    raise ValueError(f"{where}: expected a LLaVA model, got {type(cfg).__name__}")
  got = (info.image_token_id, info.num_image_tokens, info.image.size)
  want = (cfg.image_token_id, cfg.num_image_tokens, cfg.vision.image_size)
  if got != want:
    raise ValueError(f"{where}: (image_token_id, num_image_tokens, image.size) = {got}, but the "
                     f"model has {want}")


def infer_hf_info(path: str | os.PathLike, cfg, tokenizer) -> RunInfo:
  """The RunInfo of an HF directory (see the module docstring)."""
  from llavamod_jax.data import templates

  p = Path(path)
  sidecar = {}
  if (p / SIDECAR).is_file():
    try:
      sidecar = json.loads((p / SIDECAR).read_text())
    except json.JSONDecodeError as e:
      raise ValueError(f"{p / SIDECAR}: invalid JSON: {e}") from None
  kind = "clip" if cfg.vision.is_clip else "siglip"
  size = cfg.vision.image_size
  if (p / "preprocessor_config.json").is_file():
    size = _processor_size(json.loads((p / "preprocessor_config.json").read_text()), size)
  image = {"kind": kind, "size": size, "aspect": "pad", **sidecar.get("image", {})}
  template = sidecar.get("template", "qwen")
  end = templates.get(template).assistant_end
  end_id = tokenizer.convert_tokens_to_ids(end)
  eos = sidecar.get("eos_token_id")
  if eos is None:
    eos = end_id if tokenizer.convert_ids_to_tokens(end_id) == end else tokenizer.eos_token_id
  pad = sidecar.get("pad_token_id", tokenizer.pad_token_id if tokenizer.pad_token_id is not None
                    else eos)
  d = {**sidecar, "template": template, "image": image, "image_token_id": cfg.image_token_id,
       "num_image_tokens": cfg.num_image_tokens, "eos_token_id": eos, "pad_token_id": pad}
  return RunInfo.from_json(json.dumps(d), str(p / SIDECAR) if sidecar else str(p))


def _processor_size(d: dict, default: int) -> int:
  """The square side an image processor config produces: crop_size, else size."""
  if "image_processor" in d:  # processor_config.json nests it
    d = d["image_processor"]
  for key in ("crop_size", "size"):
    v = d.get(key)
    if isinstance(v, int):
      return v
    if isinstance(v, dict):
      for k in ("height", "shortest_edge"):
        if isinstance(v.get(k), int):
          return v[k]
  return default


def sidecar(info: RunInfo) -> dict[str, Any]:
  """The RunInfo fields an exported HF directory keeps in SIDECAR (the rest lives in config.json)."""
  return {"template": info.template, "image": dataclasses.asdict(info.image), "stage": info.stage,
          "eos_token_id": info.eos_token_id, "pad_token_id": info.pad_token_id}
