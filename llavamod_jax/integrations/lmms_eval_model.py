"""llavamod_jax as an lmms-eval model: lmms-eval's benchmarks on a training workdir or HF directory.

    pip install -e ".[eval]"
    python -m lmms_eval --model llavamod_jax \\
        --model_args workdir=runs/mimic,step=3000,batch_size=8 --tasks pope,mme \\
        --output_path results/ --log_samples
    python -m lmms_eval --model llavamod_jax --model_args hf_dir=exports/student,dtype=bfloat16 ...

Model args (`--model_args k=v,...`): `workdir` (local or gs://) or `hf_dir`; `step` (a workdir's
checkpoint, default the latest); `batch_size` (default 8; lmms-eval always passes its own
`--batch_size`, default 1, which a `batch_size` here overrides); `max_new_tokens` (default 128, for
tasks whose generation_kwargs give none); `dtype` (compute and parameter dtype: float32 | bfloat16 |
float16; default: the checkpoint's); `seed` (sampling); `length_multiple` (prompts are padded to a
multiple of it, so a run compiles once per length bucket). lmms-eval's `--device` is ignored: JAX
runs on its default backend (JAX_PLATFORMS chooses), the parameters on its first device, in one
process (python -m lmms_eval, not `accelerate launch`).

Registration: pyproject.toml's entry point in lmms-eval's group "lmms_eval.models" names
`llavamod_jax.integrations.lmms_eval_models`, which names this class.

Prompts are rendered as `evaluation` and launch/chat.py render them: a request's context is the user
turn of the run's template (run.json, or the HF directory's sidecar), with `<image>\\n` prepended
per image unless the context holds the placeholders; images are preprocessed with the run's
settings. `doc_to_visual` gives PIL images (paths and encoded bytes are read too); no video.

- `generate_until`: batched KV-cache generation (`generate.generate`), greedy unless the task's
  generation_kwargs set a temperature > 0 (and not do_sample false); the text is cut at the first
  of the task's `until` strings, then stripped. Beam search is refused.
- `loglikelihood` -> (value, is_greedy), value = -sum log p(continuation tokens | context): the
  negative log-likelihood, because lmms-eval 0.7 ranks multiple-choice continuations by argmin (its
  built-in models return their mean token loss); `-value` is the log-probability its API docstring
  names. The continuation is the assistant's answer as the template renders it, without the
  end-of-answer token; its leading whitespace is dropped, since lmms-eval's `target_delimiter` " "
  is the template's job here. is_greedy: every continuation token is the argmax.
- `loglikelihood_rolling`, `generate_until_multi_round`: not implemented (NotImplementedError).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from lmms_eval import utils as lmms_utils
from lmms_eval.api.instance import GenerationResult
from lmms_eval.api.model import lmms
from PIL import Image
from tqdm import tqdm

from llavamod_jax import evaluation, generate, losses, models
from llavamod_jax import workdir as workdir_lib
from llavamod_jax.data import image, templates
from llavamod_jax.models import configs

IGNORED_ARGS = ("device", "max_batch_size")  # lmms-eval passes them to every model


# ---------------------------------------------------------------------------------------------------
# Pure helpers: generation settings, stop strings.


@dataclasses.dataclass(frozen=True)
class Generation:
  """How one group of requests is generated (from a task's generation_kwargs)."""

  max_new_tokens: int
  temperature: float = 0.0
  top_p: float = 1.0
  until: tuple[str, ...] = ()


def generation_settings(gen_kwargs: dict[str, Any] | None, max_new_tokens: int) -> Generation:
  """A task's generation_kwargs -> Generation; `max_new_tokens` is the default when they give none.

  Sampling as lmms-eval's Hugging Face models do it: only with temperature > 0, and never when
  do_sample is false. Keys other than these are ignored."""
  kw = dict(gen_kwargs or {})
  until = kw.get("until") or ()
  until = (until,) if isinstance(until, str) else tuple(until)
  beams = kw.get("num_beams") or 1
  if int(beams) != 1:
    raise ValueError(f"generation_kwargs num_beams={beams}: llavamod_jax has no beam search "
                     "(set num_beams: 1, or --gen_kwargs num_beams=1)")
  temperature = float(kw.get("temperature") or 0.0)
  if kw.get("do_sample") is False or temperature < 0:
    temperature = 0.0
  top_p = kw.get("top_p")
  return Generation(max_new_tokens=int(kw.get("max_new_tokens") or max_new_tokens),
                    temperature=temperature, top_p=1.0 if top_p is None else float(top_p),
                    until=tuple(s for s in until if s))


def cut_at_stop(text: str, until: Sequence[str]) -> str:
  """`text` up to the first occurrence of any stop string (the stop string itself dropped)."""
  return text[:min((i for s in until if s and (i := text.find(s)) >= 0), default=len(text))]


def _round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


# ---------------------------------------------------------------------------------------------------
# The model.


class LlavaModJax(lmms):
  """An lmms-eval "simple" model (string contexts, images from doc_to_visual); see the module
  docstring."""

  is_simple = True

  def __init__(self, workdir: str | None = None, hf_dir: str | None = None, step: int | None = None,
               batch_size: int | str = 8, max_new_tokens: int = 128, dtype: str | None = None,
               seed: int = 0, length_multiple: int = 16, **kwargs) -> None:
    super().__init__()
    unknown = sorted(k for k in kwargs if k not in IGNORED_ARGS)
    if unknown:
      raise TypeError(f"llavamod_jax: unknown model arg(s) {unknown}; expected workdir or hf_dir, "
                      "step, batch_size, max_new_tokens, dtype, seed, length_multiple")
    if (workdir is None) == (hf_dir is None):
      raise ValueError("llavamod_jax: give exactly one of workdir=PATH (a training workdir) or "
                       f"hf_dir=PATH (a Hugging Face directory); got workdir={workdir!r}, "
                       f"hf_dir={hf_dir!r}")
    self.batch_size = _positive_int(batch_size, "batch_size")
    self.max_new_tokens = _positive_int(max_new_tokens, "max_new_tokens")
    self.length_multiple = _positive_int(length_multiple, "length_multiple")
    self.seed = int(seed)
    path = workdir if workdir is not None else hf_dir
    step = None if step is None else int(step)
    self.model, self.params, self.tokenizer, self.info = workdir_lib.load_model(path, step)
    if dtype is not None:
      self.model, self.params = with_dtype(self.model, self.params, str(dtype))
    self.encoder = templates.Encoder(self.tokenizer, self.info.template)
    self.stop_ids = evaluation.stop_ids(self.tokenizer, self.info)

  @classmethod
  def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None):
    """As lmms-eval's, except that an arg in --model_args wins over the same one from lmms-eval's
    own flags (lmms-eval always passes --batch_size, default 1)."""
    args = lmms_utils.simple_parse_args_string(arg_string)
    extra = {k: v for k, v in (additional_config or {}).items() if v is not None and k not in args}
    return cls(**args, **extra)

  # --- requests -> prompts ------------------------------------------------------------------------

  def _doc(self, task: str, split: str, doc_id: int):
    return self.task_dict[task][split][doc_id]

  def _pixels(self, visuals, where: str) -> list[np.ndarray]:
    """doc_to_visual's output -> preprocessed images [H, W, 3] (float32)."""
    if visuals is None:
      return []
    if not isinstance(visuals, (list, tuple)):
      visuals = [visuals]
    out = []
    for v in visuals:
      if isinstance(v, dict) and ("bytes" in v or "path" in v):  # an undecoded datasets Image
        v = v.get("bytes") or v.get("path")
      if isinstance(v, (str, bytes)):
        v = image.load_image(v, name=where)
      if not isinstance(v, Image.Image):
        raise TypeError(f"{where}: doc_to_visual gave a {type(v).__name__}; llavamod_jax takes "
                        "images (PIL, a path or encoded bytes), not video or audio")
      out.append(image.preprocess(v, kind=self.info.image.kind, size=self.info.image.size,
                                  aspect=self.info.image.aspect))
    return out

  def _visual_prompt(self, context: str, doc_to_visual, task: str, split: str, doc_id: int):
    """(user turn messages, pixels) of one request."""
    where = f"task {task!r} doc {doc_id}"
    pixels = [] if doc_to_visual is None else self._pixels(
        doc_to_visual(self._doc(task, split, doc_id)), where)
    try:
      # The record's images only count placeholders here; the pixels are already made.
      prompt = evaluation.question_record(context, images=[where] * len(pixels)).prompt
    except ValueError as e:
      raise ValueError(f"{where}: {e}") from None
    return prompt, pixels

  def _encode_prompt(self, prompt) -> np.ndarray:
    return self.encoder.encode_prompt(prompt, image_token_id=self.info.image_token_id,
                                      num_image_tokens=self.info.num_image_tokens)

  # --- generate_until -----------------------------------------------------------------------------

  def generate_until(self, requests) -> list[str]:
    """Answers in request order; requests are grouped by their generation_kwargs and, within a
    group, batched by context length (images are read one batch at a time)."""
    answers: list[str | None] = [None] * len(requests)
    groups: dict[str, list[int]] = {}
    for i, req in enumerate(requests):
      groups.setdefault(repr(sorted(req.args[1].items())) if req.args[1] else "", []).append(i)
    bar = tqdm(total=len(requests), disable=self.rank != 0, desc="llavamod_jax generate_until")
    batches = 0
    for idx in groups.values():
      settings = generation_settings(requests[idx[0]].args[1], self.max_new_tokens)
      idx = sorted(idx, key=lambda i: len(requests[i].args[0]))
      for start in range(0, len(idx), self.batch_size):
        rows = idx[start:start + self.batch_size]
        prompts, pixels = [], []
        for i in rows:
          context, _, doc_to_visual, doc_id, task, split = requests[i].args
          prompt, px = self._visual_prompt(context, doc_to_visual, task, split, doc_id)
          prompts.append(self._encode_prompt(prompt))
          pixels.append(px)
        texts = self._generate(prompts, pixels, settings, self.seed + batches)
        batches += 1
        for i, text in zip(rows, texts):
          answers[i] = text
          self.cache_hook.add_partial("generate_until", requests[i].args[:2], text)
        bar.update(len(rows))
    bar.close()
    return answers

  def _generate(self, prompts: list[np.ndarray], pixels: list[list[np.ndarray]],
                settings: Generation, seed: int) -> list[str]:
    """One batch, its last row repeated up to batch_size rows (one compiled shape per bucket)."""
    n = len(prompts)
    ids, mask = evaluation.left_pad(prompts, self.info.pad_token_id, rows=self.batch_size,
                                    length_multiple=self.length_multiple)
    images = [px for row in pixels + [pixels[-1]] * (self.batch_size - n) for px in row]
    out = generate.generate(
        self.model, self.params, ids, mask, np.stack(images) if images else None,
        max_new_tokens=settings.max_new_tokens, temperature=settings.temperature,
        top_p=settings.top_p, eos_token_id=self.stop_ids, pad_token_id=self.info.pad_token_id,
        rng=jax.random.PRNGKey(seed))
    tokens, lengths = np.asarray(out.tokens), np.asarray(out.lengths)
    return [cut_at_stop(self.tokenizer.decode(tokens[r, :lengths[r]].tolist(),
                                              skip_special_tokens=True), settings.until).strip()
            for r in range(n)]

  # --- loglikelihood ------------------------------------------------------------------------------

  def _continuation(self, req) -> tuple[np.ndarray, int, list[np.ndarray]]:
    """(ids of prompt + continuation, continuation length, pixels) of a loglikelihood request:
    (context, continuation or doc_to_target, doc_to_visual, doc_id, task, split), or
    (context, continuation) without images (lmms-eval's unconditional requests)."""
    if len(req.args) == 2:
      (context, continuation), pixels = req.args, []
      prompt = evaluation.question_record(context).prompt
    else:
      context, continuation, doc_to_visual, doc_id, task, split = req.args
      if callable(continuation):
        continuation = continuation(self._doc(task, split, doc_id))
      prompt, pixels = self._visual_prompt(context, doc_to_visual, task, split, doc_id)
    enc = self.encoder.encode(list(prompt) + [("assistant", str(continuation).lstrip())],
                              image_token_id=self.info.image_token_id,
                              num_image_tokens=self.info.num_image_tokens, train="last")
    trained = np.flatnonzero(enc.labels != templates.IGNORE)
    # The last trained token is the template's end of answer: not part of the continuation.
    return enc.input_ids[:trained[-1]], len(trained) - 1, pixels

  def loglikelihood(self, requests) -> list[GenerationResult]:
    """(negative log-likelihood of each continuation, whether greedy decoding gives it), batched by
    length; see the module docstring for the sign. Each pair comes as the `text` of a
    GenerationResult: lmms-eval 0.7.3's evaluator passes model outputs through
    `unwrap_generation_output`, which turns any other non-string (a plain tuple too) into its
    str()."""
    items = [self._continuation(req) for req in requests]
    results: list[tuple[float, bool] | None] = [None] * len(requests)
    order = sorted(range(len(items)), key=lambda i: len(items[i][0]))
    bar = tqdm(total=len(requests), disable=self.rank != 0, desc="llavamod_jax loglikelihood")
    for start in range(0, len(order), self.batch_size):
      rows = [i for i in order[start:start + self.batch_size] if items[i][1] > 0]
      for i in order[start:start + self.batch_size]:
        if items[i][1] == 0:  # an empty continuation is certain, and what greedy decoding "gives"
          results[i] = (0.0, True)
      if rows:
        logps, greedy = jax.device_get(_continuation_logps(
            self.model, self.params, self._ll_batch([items[i] for i in rows])))
        for r, i in enumerate(rows):
          results[i] = (-float(logps[r]), bool(greedy[r]))
      for i in order[start:start + self.batch_size]:
        self.cache_hook.add_partial("loglikelihood", requests[i].args[:2], results[i])
      bar.update(len(order[start:start + self.batch_size]))
    bar.close()
    return [GenerationResult(text=r) for r in results]

  def _ll_batch(self, items) -> dict[str, np.ndarray]:
    """Right-padded sequences [batch_size, length] (filler rows repeat the last) and, per row, the
    positions whose logits predict the continuation, its tokens and their mask
    [batch_size, answer]."""
    items = items + [items[-1]] * (self.batch_size - len(items))
    length = _round_up(max(len(ids) for ids, _, _ in items), self.length_multiple)
    width = _round_up(max(n for _, n, _ in items), 8)
    b = len(items)
    batch = {"input_ids": np.full((b, length), self.info.pad_token_id, np.int32),
             "attention_mask": np.zeros((b, length), np.int32),
             "positions": np.zeros((b, width), np.int32), "targets": np.zeros((b, width), np.int32),
             "target_mask": np.zeros((b, width), bool)}
    for r, (ids, n, _) in enumerate(items):
      batch["input_ids"][r, :len(ids)] = ids
      batch["attention_mask"][r, :len(ids)] = 1
      first = len(ids) - n  # the continuation's first token; logits at first - 1 predict it
      batch["positions"][r, :n] = np.arange(first - 1, len(ids) - 1)
      batch["targets"][r, :n] = ids[first:]
      batch["target_mask"][r, :n] = True
    images = [px for _, _, row in items for px in row]
    if images:
      batch["pixel_values"] = np.stack(images)
    return batch

  # --- not supported ------------------------------------------------------------------------------

  def loglikelihood_rolling(self, requests):
    raise NotImplementedError("llavamod_jax: loglikelihood_rolling (perplexity tasks) is not "
                              "implemented; use generate_until or multiple-choice tasks")

  def generate_until_multi_round(self, requests):
    raise NotImplementedError("llavamod_jax: generate_until_multi_round (multi-round tasks) is not "
                              "implemented; use single-round generate_until tasks")


@functools.partial(jax.jit, static_argnums=0)
def _continuation_logps(model, params, batch):
  """Summed log-probs of each row's continuation and whether every token is the argmax, both
  [batch]. The LM head runs only on the continuation's positions."""
  out, _ = models.forward(model, params, batch, logits=False)
  hidden = jnp.take_along_axis(out.hidden_states, batch["positions"][..., None], axis=1)
  logits = model.apply({"params": params}, hidden, method="logits")  # [batch, answer, vocab]
  mask = batch["target_mask"]
  logps = jnp.sum(jnp.where(mask, losses.token_logps(logits, batch["targets"]), 0.0), axis=-1)
  greedy = jnp.all((jnp.argmax(logits, axis=-1) == batch["targets"]) | ~mask, axis=-1)
  return logps, greedy


# ---------------------------------------------------------------------------------------------------
# Options.


def with_dtype(model, params, dtype: str):
  """The model computing in `dtype` with its floating parameters cast to it."""
  target = configs.to_dtype(dtype)
  cfg = model.cfg
  cfg = cfg.replace(text=cfg.text.replace(dtype=dtype, param_dtype=dtype),
                    vision=cfg.vision.replace(dtype=dtype, param_dtype=dtype))
  params = jax.tree.map(
      lambda x: x.astype(target) if jnp.issubdtype(x.dtype, jnp.floating) else x, params)
  return models.build(cfg), params


def _positive_int(value, name: str) -> int:
  try:
    n = int(value)
  except (TypeError, ValueError):
    raise ValueError(f"llavamod_jax: {name} must be a positive integer, got {value!r}") from None
  if n < 1:
    raise ValueError(f"llavamod_jax: {name} must be a positive integer, got {value!r}")
  return n
