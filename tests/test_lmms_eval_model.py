"""llavamod_jax/integrations: lmms-eval's model "llavamod_jax", run by lmms-eval's own CLI on local
tasks (tests/lmms_eval_task/) and called in-process, against the project's generation and numpy
log-likelihoods from the full logits of the same model. Skipped without lmms-eval
(pip install -e ".[eval]")."""

import functools
import glob
import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import jax
import numpy as np
import pytest

pytest.importorskip("lmms_eval")

import tiny_run  # noqa: E402
from lmms_eval.api.instance import Instance, unwrap_generation_output  # noqa: E402
from PIL import Image  # noqa: E402

from llavamod_jax import evaluation, export, integrations, models  # noqa: E402
from llavamod_jax.data import image, templates  # noqa: E402
from llavamod_jax.integrations import lmms_eval_model  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TASKS = REPO / "tests" / "lmms_eval_task"
BATCH = 3  # 4 docs: one full batch and one with filler rows
MAX_NEW_TOKENS = 6  # the generate task's generation_kwargs
SEED = 2  # a student whose greedy answers differ between these prompts

# question, scikit-image picture (camera: greyscale), choices; answers and gold come from the model.
# Every doc has one image, so their batches share shapes and compile once (text only: _forms).
DOCS = [("What is in the image?", "astronaut", ["a red circle", "Yes", "No"]),
        ("Is there a cup?", "coffee", ["Yes", "No"]),
        ("Describe the image briefly.", "chelsea", ["a star", "two triangles"]),
        ("How many shapes are there?", "camera", ["three", "one"])]


def _pixels(info, path):
  return image.preprocess(image.load_image(path), info.image.kind, info.image.size,
                          info.image.aspect)


def _prompt(tokenizer, info, question, image_path=""):
  """The ids generation starts from."""
  record = evaluation.question_record(question, [image_path] if image_path else [])
  return templates.Encoder(tokenizer, info.template).encode_prompt(
      record.prompt, image_token_id=info.image_token_id, num_image_tokens=info.num_image_tokens)


def _sequence(tokenizer, info, question, image_path, continuation):
  """(ids, answer length): the prompt, then the answer text as the "qwen" template writes it
  (" " + text)."""
  prompt = _prompt(tokenizer, info, question, image_path)
  answer = tokenizer(" " + continuation.lstrip(), add_special_tokens=False)["input_ids"]
  return np.concatenate([prompt, answer]).astype(np.int32), len(answer)


@functools.partial(jax.jit, static_argnums=0)
def _logits(model, params, batch):
  return models.forward(model, params, batch)[0].logits


def _numpy_loglikelihoods(model, params, tokenizer, info, items):
  """[(sum of log p(continuation tokens), greedy, log p over the first continuation token)] for
  (question, image path or "", continuation) items, in numpy from the full logits of the model on
  all the sequences at once (right-padded: causal attention keeps the padding out of every real
  position)."""
  seqs = [_sequence(tokenizer, info, *item) for item in items]
  lengths = np.array([len(s) for s, _ in seqs])
  ids = np.zeros((len(seqs), lengths.max()), np.int32)
  for r, (s, _) in enumerate(seqs):
    ids[r, :len(s)] = s
  batch = {"input_ids": ids, "attention_mask": (np.arange(ids.shape[1]) < lengths[:, None]).astype(
      np.int32), "pixel_values": np.stack([_pixels(info, path) for _, path, _ in items if path])}
  out = []
  for row, (s, n) in zip(np.asarray(_logits(model, params, batch), np.float64), seqs):
    row = row[len(s) - n - 1:len(s) - 1]  # the positions predicting the answer tokens
    logp = row - row.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    out.append((float(logp[np.arange(n), s[-n:]].sum()), bool((row.argmax(-1) == s[-n:]).all()),
                logp[0]))
  return out


def _forms(paths):
  """Requests besides multiple choice's (context, " " + choice, ...) and their numpy items:
  doc_to_target as a function of the doc, lmms-eval's unconditional (context, continuation) without
  images, and a blank continuation (the template's answer separator alone)."""
  question = DOCS[1][0]
  target = lambda doc: doc["question"][:5]  # noqa: E731
  requests = [("loglikelihood", (question, target, _visual, 1, "t", "test"), 1),
              ("loglikelihood", ("", "Yes"), 0),
              ("loglikelihood", (question, " ", _visual, 1, "t", "test"), 1)]
  items = [(question, paths[1], question[:5]), ("", "", "Yes"), (question, paths[1], "")]
  return requests, items


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """A student saved as a training workdir and exported as an HF directory, the docs' images, the
  project's own answers, and numpy log-likelihoods of every (doc, choice) and of `_forms`."""
  root = tmp_path_factory.mktemp("lmms_eval")
  model, params = tiny_run.student(SEED)
  info = tiny_run.make_workdir(root / "workdir", model, params)
  tokenizer = tiny_run.tokenizer()
  export.export_hf(model, params, tokenizer, info, root / "hf")
  from skimage import data

  paths = [str(root / f"{name}.png") for _, name, _ in DOCS]
  for (_, name, _), path in zip(DOCS, paths):
    Image.fromarray(getattr(data, name)()).save(path)
  records = [evaluation.question_record(q, [p]) for (q, _, _), p in zip(DOCS, paths)]
  answers = evaluation.generate_answers(model, params, tokenizer, info, records, batch_size=BATCH,
                                        max_new_tokens=MAX_NEW_TOKENS)
  choices = [(q, p, c) for (q, _, cs), p in zip(DOCS, paths) for c in cs]
  flat = _numpy_loglikelihoods(model, params, tokenizer, info, choices + _forms(paths)[1])
  lls = [[flat.pop(0)[:2] for _ in cs] for _, _, cs in DOCS]
  return {"root": root, "model": (model, params, tokenizer, info), "paths": paths,
          "answers": answers, "lls": lls, "forms": [f[:2] for f in flat],
          "first_logp": flat[-1][2]}  # the distribution of the first answer token after doc 1


def _docs(run):
  """The docs.jsonl records: half the answers are the model's own, and half the gold choices the
  most likely one, so neither metric is trivially 0 or 1."""
  out = []
  for i, ((question, name, choices), answer, lls) in enumerate(
      zip(DOCS, run["answers"], run["lls"])):
    best = int(np.argmax([ll for ll, _ in lls]))
    out.append({"question": question, "image": f"{name}.png", "choices": choices,
                "answer": answer if i % 2 == 0 else answer + " no",
                "gold": best if i < 2 else (best + 1) % len(choices)})
  return out


def _entry_point_dir(root: Path) -> Path:
  """A dist-info holding pyproject.toml's "lmms_eval.models" entry points, so lmms-eval finds the
  model as after `pip install -e .[eval]`, even where the editable install predates them."""
  eps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["entry-points"]
  dist = root / "entry_points" / "llavamod_jax_lmms_eval_test-0.dist-info"
  dist.mkdir(parents=True)
  (dist / "METADATA").write_text(
      "Metadata-Version: 2.1\nName: llavamod-jax-lmms-eval-test\nVersion: 0\n")
  lines = [f"{k} = {v}" for k, v in eps["lmms_eval.models"].items()]
  (dist / "entry_points.txt").write_text("[lmms_eval.models]\n" + "\n".join(lines) + "\n")
  return dist.parent


def _samples(out: Path, task: str) -> list[dict]:
  [path] = glob.glob(str(out / "**" / f"*_samples_{task}.jsonl"), recursive=True)
  return sorted((json.loads(line) for line in Path(path).read_text().splitlines()),
                key=lambda s: s["doc_id"])


# --- lmms-eval's CLI ------------------------------------------------------------------------------


@pytest.mark.slow  # ~30 s: lmms-eval's start, the model's load and compiles in a subprocess
def test_lmms_eval_cli_scores_the_project_answers_and_loglikelihoods(run):
  root, docs = run["root"], _docs(run)
  (root / "docs.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
  env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1",
         "HF_HOME": str(root / "hf_home"),
         "PYTHONPATH": os.pathsep.join([str(_entry_point_dir(root)), str(REPO)]),
         "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu")}
  cmd = [sys.executable, "-m", "lmms_eval", "--model", "llavamod_jax",
         "--model_args", f"hf_dir={root / 'hf'},batch_size={BATCH}",
         "--tasks", "llavamod_qa,llavamod_mc", "--include_path", str(TASKS),
         "--output_path", str(root / "out"), "--log_samples"]
  proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=300)
  # lmms-eval exits 0 after an error too: the results file tells.
  results = glob.glob(str(root / "out" / "**" / "*_results.json"), recursive=True)
  assert proc.returncode == 0 and results, (proc.stdout + proc.stderr)[-4000:]
  scores = json.loads(Path(results[0]).read_text())["results"]

  answers = run["answers"]
  got = [s["filtered_resps"] for s in _samples(root / "out", "llavamod_qa")]
  assert got == answers
  want = np.mean([a == d["answer"] for a, d in zip(answers, docs)])
  assert scores["llavamod_qa"]["exact_match,none"] == pytest.approx(want) and 0 < want < 1

  lls = run["lls"]
  got = [[(float(v), g == "True") for v, g in s["filtered_resps"]]
         for s in _samples(root / "out", "llavamod_mc")]
  for doc_got, doc_want in zip(got, lls, strict=True):
    np.testing.assert_allclose([v for v, _ in doc_got], [-ll for ll, _ in doc_want], rtol=1e-4)
    assert [g for _, g in doc_got] == [g for _, g in doc_want]
  want = np.mean([int(np.argmax([ll for ll, _ in doc])) == d["gold"] for doc, d in zip(lls, docs)])
  assert scores["llavamod_mc"]["acc,none"] == pytest.approx(want) and 0 < want < 1


# --- in-process: requests made by hand ------------------------------------------------------------


@pytest.fixture(scope="module")
def adapter(run):
  lm = lmms_eval_model.LlavaModJax.create_from_arg_string(
      f"workdir={run['root'] / 'workdir'},batch_size={BATCH}", {"batch_size": 1, "device": "cuda"})
  docs = [{"question": q, "image": p} for (q, _, _), p in zip(DOCS, run["paths"])]
  lm.task_dict = {"t": {"test": docs}}
  return lm


def _visual(doc):
  return [Image.open(doc["image"])]


def _request(kind, args, doc_id):
  return Instance(request_type=kind, arguments=args, idx=0,
                  metadata={"task": "t", "doc_id": doc_id, "repeats": 1})


def test_model_args_win_over_lmms_eval_flags(adapter):
  assert adapter.batch_size == BATCH and adapter.is_simple


def test_loglikelihood_argument_forms(adapter, run):
  requests = [_request(*r) for r in _forms(run["paths"])[0]]
  got = [unwrap_generation_output(r)[0] for r in adapter.loglikelihood(requests)]
  np.testing.assert_allclose([v for v, _ in got], [-ll for ll, _ in run["forms"]], rtol=1e-4)
  assert [g for _, g in got] == [g for _, g in run["forms"]]


def test_greedy_token_is_greedy(adapter, run):
  """No answer text tokenizes to this model's greedy token (it lacks the template's leading space),
  so the batch is made from ids: prompt + the argmax token -> greedy, with its numpy log-prob."""
  model, params, tokenizer, info = run["model"]
  prompt = _prompt(tokenizer, info, DOCS[1][0], run["paths"][1])
  token = int(run["first_logp"].argmax())
  pixels = [_pixels(info, run["paths"][1])]
  batch = adapter._ll_batch([(np.append(prompt, token).astype(np.int32), 1, pixels)])
  logps, greedy = lmms_eval_model._continuation_logps(model, params, batch)
  assert bool(greedy[0]) and float(logps[0]) == pytest.approx(run["first_logp"][token], rel=1e-4)


def test_generate_until_in_request_order_with_stop_strings(adapter, run):
  answers = run["answers"]
  stop = answers[0][2:4]
  greedy = {"max_new_tokens": MAX_NEW_TOKENS, "temperature": 0, "do_sample": False,
            "until": ["\n\n"]}
  cut = {**greedy, "until": [stop]}
  requests = [_request("generate_until", (q, kw, _visual, i, "t", "test"), i)
              for i, ((q, _, _), kw) in enumerate(zip(DOCS, [cut, greedy, cut, greedy]))]
  got = adapter.generate_until(requests)
  want = [lmms_eval_model.cut_at_stop(a, [stop]).strip() if i % 2 == 0 else a
          for i, a in enumerate(answers)]
  assert got == want and got[0] != answers[0]


# --- pure parts and registration ------------------------------------------------------------------


def test_generation_settings():
  g = lmms_eval_model.generation_settings
  gen = lmms_eval_model.Generation
  pope = {"max_new_tokens": 16, "temperature": 0, "top_p": 1.0, "num_beams": 1, "do_sample": False,
          "until": "\n\n"}
  assert g(pope, 128) == gen(16, 0.0, 1.0, ("\n\n",))
  assert g({"temperature": 0.7, "top_p": None, "until": ["a", ""]}, 32) == gen(32, 0.7, 1.0, ("a",))
  assert g({"temperature": 0.7, "do_sample": False}, 8).temperature == 0.0
  assert g(None, 8) == gen(8)
  with pytest.raises(ValueError, match="no beam search"):
    g({"num_beams": 4}, 8)


@pytest.mark.parametrize("text, until, want", [
    ("Yes.\n\nNo", ["\n\n"], "Yes."), ("abcabc", ["c", "b"], "a"), ("abc", [], "abc"),
    ("abc", ["", "x"], "abc"), ("abc", ["a"], ""),
])
def test_cut_at_stop(text, until, want):
  assert lmms_eval_model.cut_at_stop(text, until) == want


@pytest.mark.parametrize("kwargs, match", [
    ({}, "exactly one of workdir"), ({"workdir": "a", "hf_dir": "b"}, "exactly one of workdir"),
    ({"hf_dir": "x", "batch_size": "auto"}, "batch_size must be a positive integer"),
    ({"hf_dir": "x", "max_new_tokens": 0}, "max_new_tokens must be a positive integer"),
])
def test_model_arg_errors(kwargs, match):
  with pytest.raises(ValueError, match=match):
    lmms_eval_model.LlavaModJax(**kwargs)


def test_unknown_model_arg():
  with pytest.raises(TypeError, match=r"unknown model arg\(s\) \['pretrained'\]"):
    lmms_eval_model.LlavaModJax(pretrained="x", device="cuda")


def test_with_dtype_casts_floating_params_and_compute(run):
  model, params = run["model"][:2]
  model, params = lmms_eval_model.with_dtype(model, params, "bfloat16")
  assert (model.cfg.text.dtype, model.cfg.vision.param_dtype) == ("bfloat16", "bfloat16")
  assert {str(x.dtype) for x in jax.tree.leaves(params)} == {"bfloat16"}


def test_not_implemented_request_types():
  lm = object.__new__(lmms_eval_model.LlavaModJax)
  with pytest.raises(NotImplementedError, match="loglikelihood_rolling"):
    lm.loglikelihood_rolling([])
  with pytest.raises(NotImplementedError, match="generate_until_multi_round"):
    lm.generate_until_multi_round([])


def test_entry_point_names_the_model():
  eps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["entry-points"]
  assert eps["lmms_eval.models"] == {"llavamod_jax": "llavamod_jax.integrations:lmms_eval_models"}
  from lmms_eval.models.registry_v2 import ModelRegistryV2

  registry = ModelRegistryV2()
  for manifest in integrations.lmms_eval_models():
    registry.register_manifest(manifest)
  assert registry.get_model_class("llavamod_jax") is lmms_eval_model.LlavaModJax
