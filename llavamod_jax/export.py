"""A trained model as a Hugging Face directory that plain `transformers` uses, and its upload to the hub.

    out = export.export_hf(model, params, tokenizer, info, "exports/student", dtype="bfloat16")
    export.upload(out, "org/name", dry_run=True)  # [(file, bytes), ...]; no network call

The directory holds, besides `hf.save`'s config.json and safetensors (a dense LLaVA or one with a
Qwen2-MoE language model):
  tokenizer files           the run's tokenizer, with a chat template that renders the run's template
  preprocessor_config.json  CLIPImageProcessor / SiglipImageProcessor at the run's image size
  processor_config.json     LlavaProcessor (expands `<image>` to the model's image-token count)
  generation_config.json    the run's EOS ids and pad id
  llavamod_jax.json         `workdir.sidecar(info)`: template and image settings for `workdir.load_model`
Image aspect "pad" (the original LLaVA's pad-to-square) has no processor option: a transformers user pads
non-square images to a square of the mean colour first (`data.image.expand_to_square`).
Tokenizer and processor files of the directory the weights originally came from are not carried over:
the run's own are authoritative.
"""

from __future__ import annotations

import copy
import json
import logging
import os
from pathlib import Path

from llavamod_jax import evaluation, fileutil, hf, models, workdir
from llavamod_jax.data import image as image_lib
from llavamod_jax.data import templates
from llavamod_jax.models import configs

log = logging.getLogger(__name__)


def chat_template(template: str | templates.Template) -> str:
  """A Jinja chat template rendering `templates.Encoder`'s text for string contents or HF content
  lists ({"type": "image"} -> "<image>\\n", {"type": "text", "text": ...}); the generation prompt is
  the user turn's own tail ("... ASSISTANT:")."""
  t = templates.get(template)
  lit = json.dumps
  sys_pre, sys_post = t.system_format.split("{system}") if t.system_format else ("", "")
  user_pre, user_post = t.user_format.split("{content}")
  asst_pre, asst_post = t.assistant_format.split("{content}")
  image = lit(templates.IMAGE_PLACEHOLDER + "\n")
  system_block = ("{%- if system -%}{{ " + lit(sys_pre) + " }}{{ system }}{{ " + lit(sys_post)
                  + " }}{%- endif -%}") if t.system_format else ""
  user_body = ("{{ render(m['content']) }}" if t.user_text else
               "{{ (" + lit(templates.IMAGE_PLACEHOLDER) + " * render(m['content']).count("
               + lit(templates.IMAGE_PLACEHOLDER) + ")) }}")
  return (
      "{%- macro render(content) -%}{%- if content is string -%}{{ content }}{%- else -%}"
      "{%- for c in content -%}{%- if c['type'] == 'image' -%}{{ " + image + " }}"
      "{%- elif c['type'] == 'text' -%}{{ c['text'] }}{%- endif -%}{%- endfor -%}{%- endif -%}"
      "{%- endmacro -%}"
      "{%- if messages and messages[0]['role'] == 'system' -%}"
      "{%- set system = render(messages[0]['content']) -%}{%- set turns = messages[1:] -%}"
      "{%- else -%}{%- set system = " + lit(t.system) + " -%}{%- set turns = messages -%}{%- endif -%}"
      + system_block +
      "{%- for m in turns -%}"
      "{%- if m['role'] == 'user' -%}{{ " + lit(user_pre) + " }}" + user_body
      + "{{ " + lit(user_post) + " }}"
      "{%- elif m['role'] == 'assistant' -%}{{ " + lit(asst_pre) + " }}{{ render(m['content']) }}"
      "{{ " + lit(asst_post + t.assistant_end + t.turn_sep) + " }}"
      "{%- endif -%}{%- endfor -%}")


def image_processor(info: workdir.RunInfo):
  """The transformers image processor that computes `data.image.preprocess` for square images."""
  import transformers

  size, mean, std = info.image.size, *image_lib.DEFAULTS[info.image.kind]
  common = dict(do_resize=True, resample=3, do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
                image_mean=list(mean), image_std=list(std), do_convert_rgb=True)
  if info.image.kind == "clip":
    cls = getattr(transformers, "CLIPImageProcessorPil", transformers.CLIPImageProcessor)
    return cls(size={"shortest_edge": size}, crop_size={"height": size, "width": size},
               do_center_crop=True, **common)
  cls = getattr(transformers, "SiglipImageProcessorPil", transformers.SiglipImageProcessor)
  return cls(size={"height": size, "width": size}, **common)


def llava_processor(model, tokenizer, info: workdir.RunInfo, chat: str):
  """LlavaProcessor over the run's tokenizer and image processor, or None (logged) when transformers
  cannot build one, e.g. when the image token id is no token of the tokenizer."""
  import transformers

  cfg = model.cfg
  token = tokenizer.convert_ids_to_tokens(info.image_token_id)
  if not isinstance(token, str) or tokenizer.convert_tokens_to_ids(token) != info.image_token_id:
    log.warning("no processor_config.json: image token id %d is not a token of the tokenizer",
                info.image_token_id)
    return None
  try:
    proc = transformers.LlavaProcessor(
        image_processor=image_processor(info), tokenizer=tokenizer, patch_size=cfg.vision.patch_size,
        vision_feature_select_strategy=cfg.vision_feature_select_strategy, image_token=token,
        num_additional_image_tokens=1 if cfg.vision.is_clip else 0, chat_template=chat)
  except Exception as e:  # noqa: BLE001 (transformers raises many kinds; the export goes on without)
    log.warning("no processor_config.json: transformers.LlavaProcessor failed: %s", e)
    return None
  return proc


def export_hf(model, params, tokenizer, info: workdir.RunInfo, out_dir: str | os.PathLike, *,
              dtype: str | None = None, overwrite: bool = False) -> Path:
  """Write the HF directory (contents in the module docstring) atomically; returns its path."""
  import transformers

  out = Path(out_dir)
  if out.exists() and any(out.iterdir()) and not overwrite:
    raise FileExistsError(f"{out} exists and is not empty (pass overwrite to replace it)")
  workdir.check(info, model.cfg, "export")
  extra = configs.extra(model.cfg)
  extra.pop("_name_or_path", None)  # hf.save would carry the source's tokenizer/processor files
  model = models.build(model.cfg.replace(hf_extra=json.dumps(extra)))

  with fileutil.atomic_directory(out, "export") as tmp:
    hf.save(model, params, tmp, dtype=dtype)
    chat = chat_template(info.template)
    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.chat_template = chat
    tokenizer.save_pretrained(tmp)
    image_processor(info).save_pretrained(tmp)
    proc = llava_processor(model, tokenizer, info, chat)
    if proc is not None:
      proc.save_pretrained(tmp)
    transformers.GenerationConfig(
        eos_token_id=evaluation.stop_ids(tokenizer, info), pad_token_id=info.pad_token_id,
        do_sample=False).save_pretrained(tmp)
    (tmp / workdir.SIDECAR).write_text(json.dumps(workdir.sidecar(info), indent=2) + "\n")
  return out


def folder_files(folder: str | os.PathLike) -> list[tuple[str, int]]:
  """(path relative to `folder`, bytes) of every file below it, sorted."""
  root = Path(folder)
  return sorted((p.relative_to(root).as_posix(), p.stat().st_size)
                for p in root.rglob("*") if p.is_file())


def upload(folder: str | os.PathLike, repo_id: str, *, dry_run: bool = False, private: bool = False,
           commit_message: str = "Upload LLaVA-MoD student (llavamod_jax)") -> list[tuple[str, int]]:
  """Upload `folder` to the hub model repo `repo_id` (created if missing) with huggingface_hub; the
  credentials are huggingface_hub's own (HF_TOKEN or `hf auth login`). dry_run: no network call.
  Returns the files sent (or that would be)."""
  files = folder_files(folder)
  if not files:
    raise FileNotFoundError(f"{folder}: nothing to upload")
  if "/" not in repo_id:
    raise ValueError(f"repo id {repo_id!r}: expected ORG/NAME")
  if dry_run:
    return files
  from huggingface_hub import HfApi

  api = HfApi()
  api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
  api.upload_folder(folder_path=os.fspath(folder), repo_id=repo_id, repo_type="model",
                    commit_message=commit_message)
  return files
