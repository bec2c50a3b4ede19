"""launch/{export_hf,evaluate,chat}.py on a hand-made training workdir (an MoE student).

Most calls run in-process as `script.main(script.parse(argv))`; two run as a user types them.
"""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from absl import app, flags

import tiny_run
from llavamod_jax import evaluation, generate, workdir
from llavamod_jax.data import image, templates
from llavamod_jax.demo import synthetic

# The module fixture is computed once: every test of this file runs on one xdist worker
# (`--dist loadgroup`, pyproject.toml).
pytestmark = pytest.mark.xdist_group("chat_export")

REPO = Path(__file__).resolve().parents[2]


def _script(name):
  spec = importlib.util.spec_from_file_location(f"launch_{name}", REPO / "launch" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


export_hf, evaluate, chat = _script("export_hf"), _script("evaluate"), _script("chat")


def _call(script, *flag_args):
  return script.main(script.parse(["prog", *flag_args]))


def _subprocess(name, *flag_args):
  proc = subprocess.run([sys.executable, str(REPO / "launch" / f"{name}.py"), *flag_args], cwd=REPO,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc.stdout


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """(workdir, shapes data dir, exported HF dir, the student's (model, params))."""
  root = tmp_path_factory.mktemp("run")
  synthetic.build(root / "shapes", num_train=0, num_eval=2, image_size=64)
  model, params = tiny_run.student()
  tiny_run.make_workdir(root / "wd", model, params, data=workdir.DataSettings(
      (str(root / "shapes" / "eval.jsonl"),), str(root / "shapes")))
  out = root / "hf"
  _call(export_hf, f"--workdir={root / 'wd'}", f"--out={out}")
  return root / "wd", root / "shapes", out, (model, params)


# --- export ------------------------------------------------------------------------------------------

def test_export_writes_a_complete_hf_directory(run):
  _, _, out, _ = run
  names = {p.name for p in out.iterdir()}
  assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
          "preprocessor_config.json", "processor_config.json", "generation_config.json",
          "chat_template.jinja", workdir.SIDECAR} <= names
  pre = json.loads((out / "preprocessor_config.json").read_text())
  assert pre["image_processor_type"] == "CLIPImageProcessor"
  assert (pre["crop_size"], pre["size"], pre["do_center_crop"]) == (
      {"height": 28, "width": 28}, {"shortest_edge": 28}, True)
  proc = json.loads((out / "processor_config.json").read_text())
  assert (proc["processor_class"], proc["patch_size"], proc["image_token"]) == (
      "LlavaProcessor", 7, "<image>")
  assert json.loads((out / workdir.SIDECAR).read_text())["image"] == {
      "kind": "clip", "size": 28, "aspect": "pad"}


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")  # qwen2_moe, no shared expert
def test_export_generates_the_same_tokens_in_transformers(run, torch):
  import transformers

  wd, shapes, out, (model, params) = run
  info = workdir.read(wd)
  hf_model = transformers.LlavaForConditionalGeneration.from_pretrained(out).eval()
  assert hf_model.config.text_config.model_type == "qwen2_moe"
  tok = transformers.AutoTokenizer.from_pretrained(out)
  assert tok.get_vocab() == tiny_run.tokenizer().get_vocab()
  processor = transformers.AutoProcessor.from_pretrained(out)

  # The processor and chat template of the export prompt exactly as our template and images do.
  from PIL import Image
  [record] = [r for r in evaluation.read_records(shapes / "eval.jsonl") if r.task == "color"][:1]
  question = record.prompt[0][1].removeprefix("<image>\n")
  text = processor.apply_chat_template(
      [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}],
      add_generation_prompt=True)
  inputs = processor(text=text, images=Image.open(record.images[0]), return_tensors="pt")
  ids = templates.Encoder(tok, "qwen").encode_prompt(
      record.prompt, image_token_id=info.image_token_id, num_image_tokens=info.num_image_tokens)
  pixels = image.preprocess(image.load_image(record.images[0]), "clip", 28, "pad")
  np.testing.assert_array_equal(inputs["input_ids"][0].numpy(), ids)
  np.testing.assert_allclose(inputs["pixel_values"][0].numpy().transpose(1, 2, 0), pixels, atol=1e-6)

  with torch.no_grad():
    want = hf_model.generate(**inputs, max_new_tokens=8, do_sample=False)[0, ids.size:].numpy()
  got = generate.generate(model, params, ids[None], None, pixels[None], max_new_tokens=8,
                          eos_token_id=evaluation.stop_ids(tok, info), pad_token_id=info.pad_token_id)
  np.testing.assert_array_equal(np.asarray(got.tokens)[0, :int(got.lengths[0])], want)


def test_export_reloads_with_the_runs_settings(run):
  wd, _, out, _ = run
  info, got = workdir.read(wd), workdir.load_model(out)[3]
  assert (got.template, got.image, got.stage, got.eos_token_id, got.pad_token_id) == (
      info.template, info.image, info.stage, info.eos_token_id, info.pad_token_id)
  assert (got.image_token_id, got.num_image_tokens) == (info.image_token_id, info.num_image_tokens)


def test_export_usage_errors(run, tmp_path):
  wd, _, out, _ = run
  with pytest.raises(app.UsageError, match="not empty"):
    _call(export_hf, f"--workdir={wd}", f"--out={out}")
  with pytest.raises(app.UsageError, match="--dry_run applies to --push_to_hub"):
    _call(export_hf, f"--workdir={wd}", f"--out={out}", "--dry_run")
  with pytest.raises(app.UsageError, match="expected ORG/NAME"):
    _call(export_hf, f"--out={out}", "--push_to_hub=name")
  with pytest.raises(app.UsageError, match="no run.json or checkpoints"):
    _call(export_hf, f"--workdir={tmp_path}", f"--out={tmp_path / 'x'}")
  with pytest.raises(flags.Error):
    _call(export_hf, f"--workdir={wd}", "--dtype=int8")


def test_push_to_hub_dry_run_lists_the_files(run):
  _, _, out, _ = run
  stdout = _subprocess("export_hf", f"--out={out}", "--push_to_hub=org/student", "--dry_run")
  files = sorted(p for p in out.iterdir())
  assert f"would upload {len(files)} files" in stdout and "huggingface.co/org/student" in stdout
  for p in files:
    assert f"{p.stat().st_size:,}  {p.name}" in stdout


def test_push_to_hub_calls_huggingface_hub(run, monkeypatch, capsys):
  import huggingface_hub

  _, _, out, _ = run
  calls = []

  class FakeApi:
    def create_repo(self, repo_id, **kw):
      calls.append(("create_repo", repo_id, kw))

    def upload_folder(self, **kw):
      calls.append(("upload_folder", kw))

  monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
  files = _call(export_hf, f"--out={out}", "--push_to_hub=org/student", "--private")
  assert calls[0] == ("create_repo", "org/student",
                      {"repo_type": "model", "private": True, "exist_ok": True})
  assert calls[1][0] == "upload_folder"
  assert (calls[1][1]["folder_path"], calls[1][1]["repo_id"]) == (str(out), "org/student")
  assert {name for name, _ in files} == {p.name for p in out.iterdir()}
  assert f"uploaded {len(files)} files" in capsys.readouterr().out


# --- evaluate ----------------------------------------------------------------------------------------

def test_evaluate_workdir_and_its_export(run, tmp_path, capsys):
  wd, shapes, out, _ = run
  # Defaults from run.json (eval files, image root); the teacher is the student's own export.
  result = _call(evaluate, f"--workdir={wd}", f"--teacher_hf_dir={out}", "--limit=6",
                 "--batch_size=4", "--max_new_tokens=3", f"--out={tmp_path / 'eval.json'}")
  metrics = result["metrics"]
  assert {"caption", "count", "pope", "all", "kl_to_teacher"} <= set(metrics)
  assert set(metrics["pope"]) == {"n", "accuracy", "precision", "recall", "f1", "yes_ratio"}
  assert metrics["all"]["n"] == 6 and metrics["kl_to_teacher"]["tokens"] > 0
  assert metrics["kl_to_teacher"]["kl"] == pytest.approx(0.0, abs=1e-5)
  printed = capsys.readouterr().out
  assert printed.splitlines()[0].split() == ["task", "n", "metrics"]
  assert "kl_to_teacher" in printed and "f1=" in printed
  saved = json.loads((tmp_path / "eval.json").read_text())
  assert saved["metrics"] == json.loads(json.dumps(metrics))
  assert len(saved["predictions"]) == 6 and saved["data"] == [str(shapes / "eval.jsonl")]

  # The HF export answers exactly as the workdir does.
  from_hf = _call(evaluate, f"--hf_dir={out}", f"--data={shapes / 'eval.jsonl'}", "--limit=6",
                  "--batch_size=4", "--max_new_tokens=3")
  assert from_hf["predictions"] == result["predictions"]


def test_evaluate_usage_errors(run):
  wd, _, out, _ = run
  with pytest.raises(app.UsageError, match="give only one of --workdir / --hf_dir"):
    _call(evaluate, f"--workdir={wd}", f"--hf_dir={out}")
  with pytest.raises(app.UsageError, match="give one of --workdir / --hf_dir"):
    _call(evaluate)
  with pytest.raises(app.UsageError, match="names no eval files"):
    _call(evaluate, f"--hf_dir={out}")
  with pytest.raises(flags.Error, match="nonsense"):
    _call(evaluate, f"--workdir={wd}", "--nonsense=1")


# --- chat --------------------------------------------------------------------------------------------

def test_chat_answers_the_same_from_the_command_line_and_the_export(run, capsys):
  wd, shapes, out, _ = run
  picture = shapes / "images" / "eval" / "000001.png"
  args = [f"--image={picture}", "--question=What color is the circle?", "--max_new_tokens=5"]
  answer = _call(chat, f"--hf_dir={out}", *args)
  assert capsys.readouterr().out == answer + "\n"
  assert _subprocess("chat", f"--workdir={wd}", *args) == answer + "\n"
  with pytest.raises(app.UsageError, match="does not exist"):
    _call(chat, f"--hf_dir={out}", "--image=/no/such.png", "--question=hi")
  with pytest.raises(app.UsageError, match="--question is required"):
    _call(chat, f"--hf_dir={out}")
