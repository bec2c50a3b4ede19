"""train/plan.py and launch/plan.py: a stage planned from config.json files alone; what it counts
against transformers and the optimizer's state; exit codes; a TPU slice where libtpu is installed."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import numpy as np
import pytest

import needs
import tiny_hf
from llavamod_jax.train import config as config_lib
from llavamod_jax.train import plan

REPO = Path(__file__).resolve().parents[2]
EXPERTS, MOE_LAYERS = 4, (0,)  # "sparse" on 2 layers: layer 0


def _config_dirs(root: Path):
  """HF directories that hold only config.json: a LLaVA teacher and a smaller dense student."""
  import transformers

  out = {}
  for name, hidden in (("teacher", 48), ("student", 32)):
    cfg = transformers.LlavaConfig(
        vision_config=tiny_hf.vision_config(),
        text_config=tiny_hf.text_config(hidden_size=hidden, intermediate_size=2 * hidden),
        image_token_id=tiny_hf.IMAGE_TOKEN)
    cfg.save_pretrained(root / name)
    assert sorted(p.name for p in (root / name).iterdir()) == ["config.json"]
    out[name] = cfg
  return out


def _mimic(root: Path):
  c = config_lib.base()
  c.stage = "mimic"
  c.teacher.init, c.teacher.hf_dir = "hf", str(root / "teacher")
  c.student.init, c.student.hf_dir = "hf", str(root / "student")
  c.student.upcycle.num_experts = EXPERTS
  c.loss.ce_weight = 1.0
  c.data.batch_size, c.data.max_length = 4, 64
  return c


def test_counts_match_transformers_and_adam(tmp_path):
  import transformers

  hf_cfgs = _config_dirs(tmp_path)
  report = plan.plan(_mimic(tmp_path), "local")
  torch_count = {k: sum(p.numel() for p in transformers.LlavaForConditionalGeneration(c).parameters())
                 for k, c in hf_cfgs.items()}
  text = hf_cfgs["student"].text_config
  h, i = text.hidden_size, text.intermediate_size
  upcycled = torch_count["student"] + len(MOE_LAYERS) * ((EXPERTS - 1) * 3 * h * i + h * EXPERTS)
  p, b = report["parameters"], report["bytes_per_chip"]
  assert p["teacher"] == torch_count["teacher"] and p["student"] == upcycled
  assert b["teacher_params"] == 4 * p["teacher"]  # fp32, one device
  assert b["trainable_params"] == 4 * p["student_trainable"]
  assert b["trainable_params"] + b["frozen_params"] == 4 * p["student"]
  assert b["optimizer_state"] == 2 * b["trainable_params"] + 2 * 4  # Adam's mu, nu; two counts
  rows, length = 4, 64
  n_img = (28 // 7) ** 2
  assert report["tokens_per_step"] == rows * length
  assert b["batch"] == 3 * rows * length * 4 + rows * 28 * 28 * 3 * 4 + rows  # ids, mask, labels;
  assert n_img < length  # pixels, image mask (bool)
  assert report["fits"] and report["peak_bytes_per_chip"] >= b["arguments"] - b["aliased"]
  assert report["num_chips"] == 1 and report["compile_seconds"] > 0


def test_abstract_state_is_the_state_the_loop_makes():
  import tiny_run
  from llavamod_jax import sharding
  from llavamod_jax.train import optim, steps

  model, params = tiny_run.student()
  mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "expert": 1, "tensor": 1}, jax.devices()[:1])
  tx, _ = optim.adamw(1e-3, 10)
  patterns = optim.trainable_patterns("dense_to_sparse")
  real = steps.init_state(params, patterns, tx)
  abstract = plan.abstract_state(plan.abstract_params(model, mesh), patterns, tx, mesh)
  got, want = jax.tree_util.tree_flatten_with_path(abstract), jax.tree_util.tree_flatten_with_path(real)
  assert got[1] == want[1]
  for (path, a), (_, r) in zip(got[0], want[0]):
    assert (a.shape, a.dtype) == (r.shape, r.dtype), jax.tree_util.keystr(path)
    assert a.sharding.mesh == mesh


SHARDED = textwrap.dedent(r'''
    import json, sys
    from ml_collections import ConfigDict
    from llavamod_jax.train import plan
    c = ConfigDict(json.loads(sys.argv[1]))
    print("RESULT" + json.dumps(plan.plan(c, "local")))
''')


def test_fsdp_over_eight_devices_splits_what_each_chip_holds(tmp_path):
  _config_dirs(tmp_path)
  whole = plan.plan(_mimic(tmp_path), "local")["bytes_per_chip"]
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
         "JAX_PLATFORMS": "cpu"}
  c = _mimic(tmp_path)
  c.mesh.data, c.mesh.fsdp = 1, -1
  c.data.batch_size = 8
  p = subprocess.run([sys.executable, "-c", SHARDED, c.to_json()], env=env, capture_output=True,
                     text=True, timeout=600)
  assert p.returncode == 0, p.stderr[-3000:]
  eight = json.loads(p.stdout.split("RESULT", 1)[1])
  assert eight["num_chips"] == 8 and eight["mesh"]["fsdp"] == 8
  b = eight["bytes_per_chip"]
  assert b["batch"] * 8 == 2 * whole["batch"]  # twice the rows, split 8 ways
  # embed (the hidden size) is split over fsdp; only norms and biases stay whole on every chip.
  for key in ("teacher_params", "trainable_params", "optimizer_state"):
    assert b[key] < whole[key] / 4, key


def _launch(args, cwd):
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "TRANSFORMERS_VERBOSITY": "error"}
  return subprocess.run([sys.executable, str(REPO / "launch" / "plan.py"), *args], cwd=cwd, env=env,
                        capture_output=True, text=True, timeout=600)


def _flags(root):
  return [f"--config={REPO / 'configs/mimic.py'}:d2s_paper", f"--config.teacher.hf_dir={root / 'teacher'}",
          "--config.student.init=hf", f"--config.student.hf_dir={root / 'student'}",
          "--config.data.max_length=64",  # per-device batch 1 x 1 device x 2 micro-batches
          "--config.optimizer.grad_accum_steps=2", "--config.loss.chunk_size=32"]


def test_command_line_plan_exit_codes_and_bad_input(tmp_path):
  _config_dirs(tmp_path)
  tight = _launch([*_flags(tmp_path), "--hbm_gib=0.0001", f"--out={tmp_path / 'plan.json'}"],
                  tmp_path)
  assert tight.returncode == 1, tight.stderr[-3000:]
  assert "DOES NOT FIT" in tight.stdout
  saved = json.loads((tmp_path / "plan.json").read_text())
  for key in ("fits", "peak_bytes_per_chip", "hbm_bytes_per_chip", "compile_seconds",
              "tokens_per_step", "topology", "num_chips"):
    assert key in saved, key
  assert not saved["fits"] and saved["topology"] == "local" and saved["tokens_per_step"] == 2 * 64
  assert saved["hbm_bytes_per_chip"] == int(0.0001 * 2**30)

  bad = _launch([*_flags(tmp_path), "--topology=v9-8"], tmp_path)
  assert bad.returncode == 2 and "Traceback" not in bad.stderr
  assert "--topology='v9-8': expected 'local' or one of" in bad.stderr
  missing = _launch([f"--config={REPO / 'configs/mimic.py'}:d2s_paper",
                     f"--config.teacher.hf_dir={tmp_path / 'nowhere'}"], tmp_path)
  assert missing.returncode == 2 and "Traceback" not in missing.stderr
  assert f"{tmp_path / 'nowhere'}: no config.json" in missing.stderr


@needs.libtpu
def test_plans_for_a_tpu_slice_without_a_tpu(tmp_path):
  _config_dirs(tmp_path)
  c = _mimic(tmp_path)
  c.student.dtype = c.teacher.dtype = "bfloat16"
  c.data.batch_size, c.data.per_device_batch_size = 0, 1  # one row on each of the 8 chips
  report = plan.plan(c, "v5e-8")
  assert report["batch_size"] == 8 and report["tokens_per_step"] == 8 * 64
  assert report["num_chips"] == 8 and report["device_kind"] == "TPU v5 lite"
  assert report["hbm_bytes_per_chip"] == 16 * 2**30 and report["fits"]
  assert report["peak_bytes_per_chip"] > report["bytes_per_chip"]["arguments"] > 0
  assert report["attention"] == {"student": "splash", "teacher": "splash"}  # auto on TPU

  # The splash kernel against the einsum at 512 tokens: the [q, k] scores it never holds.
  c.data.max_length = 512
  compared = plan.plan(c, "v5e-8", compare_attention=True)
  a = compared["attention"]
  assert a["saved_bytes_per_chip"] == a["xla_peak_bytes_per_chip"] - compared["peak_bytes_per_chip"]
  assert a["saved_bytes_per_chip"] > 0
  assert "these kernels save" in plan.summary(compared)

  c.data.batch_size, c.data.per_device_batch_size = 4, 0
  with pytest.raises(plan.PlanError, match="4 rows per micro-batch do not split over the 8"):
    plan.plan(c, "v5e-8")


def test_unknown_slice_is_named():
  with pytest.raises(plan.PlanError, match="v5p-8"):
    plan.devices_of("v5p-9")
  assert np.all([s.hbm_bytes > 0 for s in plan.SLICES.values()])


def test_a_program_the_tpu_compiler_refuses_is_a_plan_that_does_not_fit():
  """libtpu refuses to compile when temporaries exceed HBM; the size in its message is the plan's."""
  msg = ("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO "
         "temporaries (17.68G) exceeds available HBM (15.75G).")
  assert plan._refused_temporaries(msg) == int(17.68 * 2**30)
  assert plan._refused_temporaries("RESOURCE_EXHAUSTED: something else") is None
  # The refused plan counts its arguments from their shardings, the state's PRNG key included.
  assert plan._shard_bytes(jax.eval_shape(lambda: jax.random.key(0))) == 8
  assert plan._shard_bytes(jax.ShapeDtypeStruct((3, 5), np.float32)) == 60
