"""launch/convert.py as a user runs it: HF LLaVA -> Orbax -> HF, checked in transformers."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import tiny_hf

# The module fixture is computed once: every test of this file runs on one xdist worker
# (`--dist loadgroup`, pyproject.toml).
pytestmark = pytest.mark.xdist_group("convert")

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "launch" / "convert.py"


def _run(*flags: str) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, str(SCRIPT), *flags], cwd=REPO, capture_output=True,
                        text=True, timeout=300)


def _ok(proc: subprocess.CompletedProcess) -> str:
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc.stderr


@pytest.fixture(scope="module")
def converted(tmp_path_factory, torch):
  root = tmp_path_factory.mktemp("convert")
  ref = tiny_hf.llava("clip", "qwen2", seed=3)
  hf_dir = tiny_hf.save(ref, root / "hf")
  ckpt_dir, out_dir = root / "ckpt", root / "hf_out"
  to_orbax = _ok(_run(f"--hf_dir={hf_dir}", f"--ckpt_dir={ckpt_dir}"))
  to_hf = _ok(_run(f"--ckpt_dir={ckpt_dir}", f"--out_hf_dir={out_dir}"))
  return ref, hf_dir, ckpt_dir, out_dir, to_orbax + to_hf


def test_round_trip_gives_the_original_logits_in_transformers(converted):
  import transformers

  from llavamod_jax import hf

  ref, hf_dir, _, out_dir, _ = converted
  back = transformers.LlavaForConditionalGeneration.from_pretrained(out_dir).eval()
  n_image_tokens = hf.load_config(hf_dir).num_image_tokens
  rng = np.random.default_rng(0)
  ids = rng.integers(0, 100, (2, 30))
  ids[0, 3:3 + n_image_tokens] = tiny_hf.IMAGE_TOKEN
  ids[1, 10:10 + n_image_tokens] = tiny_hf.IMAGE_TOKEN
  pix = rng.standard_normal((2, 28, 28, 3)).astype(np.float32)
  want = tiny_hf.torch_logits(ref, ids, pixel_values=pix)
  got = tiny_hf.torch_logits(back, ids, pixel_values=pix)
  assert tiny_hf.rel_err(got, want) <= 1e-5


def test_checkpoint_holds_the_hf_weights_bitwise(converted):
  from llavamod_jax import checkpoint, hf

  _, hf_dir, ckpt_dir, _, _ = converted
  model, params = hf.load(hf_dir)
  restored_model, restored = checkpoint.restore_model(ckpt_dir)
  assert restored_model.cfg == model.cfg
  assert restored_model.cfg.num_image_tokens == 16
  flat, flat_restored = _flat(params), _flat(restored)
  assert flat.keys() == flat_restored.keys()
  for path, a in flat.items():
    b = flat_restored[path]
    assert a.dtype == b.dtype and np.array_equal(np.asarray(a), np.asarray(b)), path


def test_logs_what_it_converted(converted):
  ref, *_, logs = converted
  n = sum(p.numel() for p in ref.parameters())  # transformers' own count of the same model
  assert f"Llava, {n:,} parameters, {4 * n:,} bytes (float32)" in logs
  assert "wrote Orbax checkpoint" in logs and "wrote Hugging Face model" in logs


@pytest.mark.parametrize("flags, message", [
    (["--hf_dir=H", "--ckpt_dir=C", "--out_hf_dir=O"], "exactly one of --hf_dir"),
    (["--ckpt_dir=C"], "exactly one of --hf_dir"),
    (["--out_hf_dir=O"], "--ckpt_dir is required"),
    (["--ckpt_dir=/no/such/ckpt", "--out_hf_dir=O"], "--ckpt_dir=/no/such/ckpt"),
    (["--hf_dir=/no/such/hf", "--ckpt_dir=C"], "--hf_dir=/no/such/hf"),
])
def test_bad_usage_exits_nonzero_naming_the_flag(flags, message):
  # These fail before the script imports jax, so each subprocess costs well under a second.
  proc = _run(*flags)
  assert proc.returncode != 0
  assert message in proc.stderr


def _flat(tree):
  from flax import traverse_util

  return traverse_util.flatten_dict(tree, sep="/")
