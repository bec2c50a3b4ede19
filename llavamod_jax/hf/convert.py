"""The generic Hugging Face loader and saver, driven by the tables in `families`.

Loading checks every tensor name and shape against the model's abstract parameters using only the
safetensors headers, so a bad checkpoint fails before any weight is read; then tensors are streamed one
at a time from memory-mapped files, converted, and placed (optionally straight onto shardings, each
device reading only its slice). Saving writes into a temporary directory renamed into place at the end,
so a failure never leaves a half-written model.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import logging
import os
import re
import shutil
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from llavamod_jax import fileutil, models, sharding
from llavamod_jax.hf import families, original
from llavamod_jax.hf.safetensors_io import INDEX_NAME, SINGLE_NAME, Checkpoint, plan_shards, write_file
from llavamod_jax.models import scan
from llavamod_jax.models.configs import LlavaConfig, to_dtype

log = logging.getLogger(__name__)

# Files of a source model directory that an export carries over (tokenizer, processor, generation).
CARRIED_FILES = (
    "tokenizer*", "vocab.json", "vocab.txt", "merges.txt", "special_tokens_map.json",
    "added_tokens.json", "*.tiktoken", "spiece.model", "preprocessor_config.json",
    "processor_config.json", "chat_template.json", "chat_template.jinja", "generation_config.json",
)

_TO_FLAX = {
    "linear": lambda a: a.T,
    "conv": lambda a: a.transpose(2, 3, 1, 0),
    "copy": lambda a: a,
    # Stacked experts in transformers' fused layout: [E, out, in] -> [E, in, out] (gate_up split in two).
    "expert_linear": lambda a: a.transpose(0, 2, 1),
    "fused_gate": lambda a: a.transpose(0, 2, 1)[..., :a.shape[1] // 2],
    "fused_up": lambda a: a.transpose(0, 2, 1)[..., a.shape[1] // 2:],
}
_TO_TORCH = {
    "linear": lambda a: a.T,
    "conv": lambda a: a.transpose(3, 2, 0, 1),
    "copy": lambda a: a,
}


def _transformed_shape(shape: tuple[int, ...], kind: str) -> tuple[int, ...]:
  return tuple(_TO_FLAX[kind](np.empty(shape, np.uint8)).shape) if shape else shape


@dataclasses.dataclass(frozen=True)
class _Rule:
  hf: re.Pattern  # checkpoint key relative to its component
  flax: re.Pattern
  hf_template: str
  flax_template: str
  kind: str


def _compile(template: str) -> re.Pattern:
  pattern = re.escape(template).replace(re.escape("{i}"), r"(?P<i>\d+)")
  return re.compile("^" + pattern.replace(re.escape("{e}"), r"(?P<e>\d+)") + "$")


def _rules(layout: families.Layout) -> dict[str, list[_Rule]]:
  out = {}
  for comp, table in layout.tables.items():
    flax_prefix = f"{comp}/" if comp else ""
    out[comp] = [
        _Rule(_compile(hf), _compile(flax_prefix + fx), hf, flax_prefix + fx, kind)
        for hf, fx, kind in table
    ]
  return out


def _fill(template: str, i: str | None = None, e: int | None = None) -> str:
  if i is not None:
    template = template.replace("{i}", i)
  return template if e is None else template.replace("{e}", str(e))


def read_config(path: str | os.PathLike) -> dict:
  cfg_path = Path(path) / "config.json"
  if not cfg_path.exists():
    raise FileNotFoundError(f"{path}: no config.json (expected a Hugging Face model directory)")
  try:
    return json.loads(cfg_path.read_text())
  except json.JSONDecodeError as e:
    raise ValueError(f"{cfg_path}: invalid JSON: {e}") from None


def load_config(path: str | os.PathLike, *, dtype: str = "float32", param_dtype: str = "float32",
                vision_dir: str | os.PathLike | None = None):
  """Our model config for an HF directory (no weights read); `vision_dir`: the image tower's
  directory of an original-code LLaVA whose config names it by hub id (hf/original.py)."""
  d = read_config(path)
  where, source = str(Path(path) / "config.json"), str(Path(path).resolve())
  if original.is_original(d):
    return original.llava_config(d, where, dtype, param_dtype, source,
                                 os.fspath(vision_dir) if vision_dir else None)
  return families.config_from_hf(d, where, dtype, param_dtype, source=source)


def _plan(ckpt: Checkpoint, cfg, expected: dict, where: str):
  """Match every checkpoint key to parameters using headers only; raise on any mismatch.

  Returns ({param path: [(key, kind, expert index or None), ...]}, ignored keys).
  """
  lay = families.layout(cfg)
  rules = _rules(lay)
  ignored_re = [re.compile(p) for p in lay.ignored]
  plan, ignored, unexpected, problems = {}, [], [], []
  tied = getattr(getattr(cfg, "text", cfg), "tie_word_embeddings", False)
  for key in ckpt.keys():
    if lay.ignored_prefixes and key.startswith(lay.ignored_prefixes):
      ignored.append(key)
      continue
    routed = families.route(key, lay.routes)
    if routed is None:
      unexpected.append(key)
      continue
    comp, rel = routed
    if any(p.fullmatch(rel) for p in ignored_re) or (tied and rel == "lm_head.weight"):
      ignored.append(key)
      continue
    targets = [(rule, m) for rule in rules.get(comp, ()) if (m := rule.hf.match(rel))]
    targets = [(rule, m, _fill(rule.flax_template, m.group("i") if "{i}" in rule.hf_template else None))
               for rule, m in targets]
    if not targets or any(path not in expected for _, _, path in targets):
      unexpected.append(key)
      continue
    for rule, m, path in targets:
      e = int(m.group("e")) if "{e}" in rule.hf_template else None
      shape = _transformed_shape(ckpt.shape(key), rule.kind)
      want = tuple(expected[path].shape)
      if e is not None:  # one expert's slice of a stacked parameter
        if e >= want[0]:
          unexpected.append(key)
          continue
        want = want[1:]
      if shape != want:
        problems.append(f"tensor {key!r} has shape {tuple(ckpt.shape(key))} (-> {shape} for {path}), "
                        f"expected {want} from config.json")
        continue
      parts = plan.setdefault(path, [])
      if any(p[2] == e for p in parts):
        problems.append(f"{key}: parameter {path} is also given by {parts[0][0]!r}")
        continue
      parts.append((key, rule.kind, e))
  missing = []
  for path, spec in expected.items():
    parts = plan.get(path, [])
    if not parts:
      missing.append(path)
    elif parts[0][2] is not None and sorted(p[2] for p in parts) != list(range(spec.shape[0])):
      have = sorted(p[2] for p in parts)
      missing.append(f"{path} (experts present: {have}, expected 0..{spec.shape[0] - 1})")
  if unexpected or missing or problems:
    lines = [f"{where}: checkpoint does not match the model its config.json describes"]
    lines += [f"  shape mismatch: {p}" for p in problems]
    lines += [f"  unexpected tensor: {k}" for k in unexpected[:20]]
    if len(unexpected) > 20:
      lines.append(f"  ... and {len(unexpected) - 20} more unexpected tensors")
    lines += [f"  missing tensor for parameter: {p}" for p in sorted(missing)[:20]]
    if len(missing) > 20:
      lines.append(f"  ... and {len(missing) - 20} more missing parameters")
    raise ValueError("\n".join(lines))
  return plan, ignored


def _assemble(ckpt: Checkpoint, parts) -> np.ndarray:
  """A parameter's host array (a lazy memory-mapped view when it is a single tensor)."""
  if parts[0][2] is None:
    key, kind, _ = parts[0]
    return _TO_FLAX[kind](ckpt.get(key))
  return np.stack([_TO_FLAX[kind](ckpt.get(key)) for key, kind, _ in sorted(parts, key=lambda p: p[2])])


def load(path: str | os.PathLike, *, dtype: str = "float32", param_dtype: str = "float32",
         mesh=None, rules=None, shardings=None, remat: bool = False,
         vision_dir: str | os.PathLike | None = None):
  """Load an HF model directory -> (flax module, params).

  Args:
    path: a directory with config.json and model.safetensors (or a sharded index, or
      pytorch_model*.bin): transformers' layout, or the original LLaVA-MoD / LLaVA-1.5 code's.
    vision_dir: an original-code LLaVA's image tower directory (CLIP), when its config names the
      tower by hub id; its weights are read from there when the checkpoint lacks them.
    dtype: compute dtype of the module. param_dtype: dtype the weights are stored in.
    mesh, rules: place each parameter by its logical axes (default rules: `sharding.DEFAULT_RULES`).
    shardings: or an explicit tree of `jax.sharding.Sharding`, same structure as the params.
    remat: rematerialise decoder/encoder layers in the backward pass.
  """
  cfg = load_config(path, dtype=dtype, param_dtype=param_dtype, vision_dir=vision_dir)
  if remat:
    cfg = _with_remat(cfg)
  model = models.build(cfg)
  boxed = models.abstract_params(model)
  expected = traverse_util.flatten_dict(nn.unbox(boxed), sep="/")
  if shardings is None and mesh is not None:
    shardings = sharding.param_shardings(boxed, mesh, rules or sharding.DEFAULT_RULES)
  flat_shardings = traverse_util.flatten_dict(shardings, sep="/") if shardings is not None else {}

  ckpt = Checkpoint(path)
  pdtype = to_dtype(param_dtype)
  tower = _separate_tower(ckpt, cfg, vision_dir, str(path), param_dtype)
  if tower is not None:  # LLaVA-1.5 saves no tower: its weights are the CLIP directory's
    expected = {k: v for k, v in expected.items() if not k.startswith("vision_tower/")}
  plan, ignored = _plan(ckpt, cfg, expected, str(path))
  if ignored:
    log.info("%s: skipped %d tensors that are not parameters of this model: %s", path, len(ignored),
             ", ".join(ignored[:5]) + (" ..." if len(ignored) > 5 else ""))
  flat = {}
  for p, parts in plan.items():
    host = _assemble(ckpt, parts)
    if p in flat_shardings:
      flat[p] = jax.make_array_from_callback(
          host.shape, flat_shardings[p], lambda idx, a=host: np.asarray(a[idx]).astype(pdtype))
    else:
      flat[p] = jnp.asarray(np.asarray(host).astype(pdtype))
  params = traverse_util.unflatten_dict(flat, sep="/")
  if tower is not None:
    params["vision_tower"] = tower
  return model, params


def _separate_tower(ckpt: Checkpoint, cfg, vision_dir, where: str, param_dtype: str):
  """The tower parameters of an original-code LLaVA whose checkpoint holds none of its tower
  (read from its CLIP directory), else None."""
  if not isinstance(cfg, LlavaConfig) or "original_model_type" not in json.loads(cfg.hf_extra):
    return None
  routes = families.LLAVA_ROUTES
  if any((families.route(k, routes) or ("",))[0] == "vision_tower" for k in ckpt.keys()):
    return None
  directory = original.vision_dir_of(cfg, os.fspath(vision_dir) if vision_dir else None)
  if directory is None:
    raise ValueError(f"{where}: the checkpoint holds no image tower weights and its config names "
                     f"the tower {json.loads(cfg.hf_extra).get('image_tower')!r}: give the tower's "
                     "directory (hf.load(..., vision_dir=DIR); in a run config, vision_hf_dir)")
  vmodel, vparams = load(directory, param_dtype=param_dtype)
  tower = vparams["vision_tower"] if isinstance(vmodel.cfg, LlavaConfig) else vparams
  got = jax.tree.map(lambda x: x.shape, tower)
  want = jax.tree.map(lambda x: x.shape, nn.unbox(models.abstract_params(models.build(cfg)))[
      "vision_tower"])
  if got != want:
    raise ValueError(f"{where}: the tower in {directory} does not have the shapes its config implies")
  return tower


def _with_remat(cfg):
  if isinstance(cfg, models.LlavaConfig):
    return cfg.replace(text=cfg.text.replace(remat=True), vision=cfg.vision.replace(remat=True))
  return cfg.replace(remat=True)


def _hf_names(path: str, shape, rules: dict[str, list[_Rule]],
              lay: families.Layout) -> list[tuple[str, str, int | None]]:
  """[(checkpoint key, kind, expert index or None)] a parameter is written as (first matching row)."""
  comp = next((c for c in rules if c and path.startswith(c + "/")), "")
  for rule in rules[comp]:
    m = rule.flax.match(path)
    if m and rule.kind in _TO_TORCH:
      i = m.group("i") if "{i}" in rule.flax_template else None
      prefix = lay.save_prefix[comp]
      if "{e}" in rule.hf_template:
        return [(prefix + _fill(rule.hf_template, i, e), rule.kind, e) for e in range(shape[0])]
      return [(prefix + _fill(rule.hf_template, i), rule.kind, None)]
  raise ValueError(f"parameter {path} has no Hugging Face name in the tables of families.py")


def save(model, params, out_dir: str | os.PathLike, *, dtype: str | None = None,
         max_shard_size: int = 5 * 1024**3, overwrite: bool = False) -> Path:
  """Write `model`/`params` as an HF directory transformers loads without custom code.

  dtype: "float32" | "bfloat16" | "float16" for the stored tensors (default: the params' own dtype).
  Tokenizer and processor files of the directory the model was loaded from are carried over.
  """
  out_dir = Path(out_dir)
  if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
    raise FileExistsError(f"{out_dir} exists and is not empty (pass overwrite=True to replace it)")
  model, params = scan.unrolled(model, nn.unbox(params), host=sharding.to_host)  # HF names every layer
  cfg = model.cfg
  lay = families.layout(cfg)
  rules = _rules(lay)
  flat = traverse_util.flatten_dict(nn.unbox(params), sep="/")
  boxed = models.abstract_params(model)
  expected = traverse_util.flatten_dict(nn.unbox(boxed), sep="/")
  if set(flat) != set(expected):
    raise ValueError(f"params do not match the model: missing {sorted(set(expected) - set(flat))[:5]}, "
                     f"unexpected {sorted(set(flat) - set(expected))[:5]}")
  names = {p: _hf_names(p, v.shape, rules, lay) for p, v in flat.items()}  # fails before any write
  store_dtype = np.dtype(to_dtype(dtype)) if dtype else None
  dtype_name = dtype or str(jnp.dtype(next(iter(flat.values())).dtype))

  hf_config = families.config_to_hf(cfg, dtype_name)
  with fileutil.atomic_directory(out_dir) as tmp:
    _write_config(hf_config, tmp)
    extra = {k: v.astype(store_dtype or np.float32) for k, v in families.extra_tensors(cfg).items()}
    sizes = [(p, int(np.prod(v.shape)) * (store_dtype or np.dtype(v.dtype)).itemsize)
             for p, v in flat.items()] + [(k, v.nbytes) for k, v in extra.items()]
    shards = plan_shards(iter(sizes), max_shard_size)
    weight_map, total = {}, sum(s for _, s in sizes)
    for n, shard in enumerate(shards, 1):
      fname = SINGLE_NAME if len(shards) == 1 else f"model-{n:05d}-of-{len(shards):05d}.safetensors"
      tensors = []
      for p in shard:
        if p in extra:
          tensors.append((p, extra[p]))
          continue
        arr = sharding.to_host(flat[p])
        arr = arr.astype(store_dtype) if store_dtype else arr
        for key, kind, e in names[p]:
          tensors.append((key, np.ascontiguousarray(_TO_TORCH[kind](arr if e is None else arr[e]))))
      weight_map.update({key: fname for key, _ in tensors})
      write_file(tmp / fname, tensors)
    if len(shards) > 1:
      (tmp / INDEX_NAME).write_text(json.dumps(
          {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, indent=2))
    _carry_files(families.source_dir(cfg), tmp)
  return out_dir


def _write_config(d: dict, directory: Path) -> None:
  import transformers

  config = transformers.AutoConfig.for_model(**d)
  config.architectures = d.get("architectures")
  config.save_pretrained(directory)


def _carry_files(source: str, dest: Path) -> None:
  if not source:
    return
  if not Path(source).is_dir():
    log.warning("tokenizer/processor files not carried over: the source directory %s is gone; "
                "copy them into %s by hand", source, dest.name)
    return
  for f in sorted(Path(source).iterdir()):
    if f.is_file() and any(fnmatch.fnmatch(f.name, pat) for pat in CARRIED_FILES):
      shutil.copy2(f, dest / f.name)


def from_original(src: str | os.PathLike, out_dir: str | os.PathLike, *,
                    vision_dir: str | os.PathLike | None = None, dtype: str | None = None,
                    overwrite: bool = False) -> Path:
  """An original-code checkpoint written as a plain transformers LLaVA (a `qwen2_moe` text config
  for an MoE student) that `from_pretrained` loads without custom code or DeepSpeed.

  `<image>` becomes a token of the tokenizer (an added special token, as the llava-hf conversions
  do); when its id falls past the embedding rows, the embeddings (and an untied LM head) grow to
  the next multiple of 64 rows, new rows the mean of the old. The tokenizer (with `<image>`) and the
  image processor (from the checkpoint or its tower's directory) are written beside the weights."""
  import transformers  # noqa: PLC0415

  model, params = load(src, vision_dir=vision_dir)
  cfg = model.cfg
  try:
    tokenizer = transformers.AutoTokenizer.from_pretrained(src)
  except (OSError, ValueError):
    tokenizer = None  # no tokenizer files: the image token takes the first row past the vocabulary
  if tokenizer is not None:
    if "<image>" not in tokenizer.get_vocab():
      tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    image_id = tokenizer.convert_tokens_to_ids("<image>")
  else:
    image_id = cfg.text.vocab_size
  vocab = cfg.text.vocab_size
  if image_id >= vocab:
    vocab = -(-(image_id + 1) // 64) * 64
    lm = params["language_model"]
    emb = lm["embed_tokens"]["embedding"]
    grow = jnp.broadcast_to(emb.mean(0, keepdims=True), (vocab - emb.shape[0], emb.shape[1]))
    lm["embed_tokens"]["embedding"] = jnp.concatenate([emb, grow.astype(emb.dtype)])
    if "lm_head" in lm:
      head = lm["lm_head"]["kernel"]
      grow = jnp.broadcast_to(head.mean(1, keepdims=True), (head.shape[0], vocab - head.shape[1]))
      lm["lm_head"]["kernel"] = jnp.concatenate([head, grow.astype(head.dtype)], axis=1)
  extra = {"_name_or_path": json.loads(cfg.hf_extra).get("_name_or_path", "")}
  cfg = cfg.replace(image_token_id=int(image_id), text=cfg.text.replace(vocab_size=vocab),
                    hf_extra=json.dumps(extra))
  out = Path(save(models.build(cfg), params, out_dir, dtype=dtype, overwrite=overwrite))
  if tokenizer is not None:
    tokenizer.save_pretrained(out)
  tower = original.vision_dir_of(model.cfg, os.fspath(vision_dir) if vision_dir else None)
  processor = Path(tower or "") / "preprocessor_config.json"
  if not (out / "preprocessor_config.json").exists() and tower and processor.exists():
    shutil.copy(processor, out / "preprocessor_config.json")
  return out
