"""Run config: validation errors name the key; MoE options reach the built model's config."""

import pytest

import tiny_run
from llavamod_jax.train import build
from llavamod_jax.train import config as config_lib


@pytest.mark.parametrize("who", ["student", "teacher"])
def test_invalid_expert_parallel_names_the_key(who):
  cfg = config_lib.base()
  cfg[who].moe.expert_parallel = "alltoall"
  with pytest.raises(ValueError, match=rf"config\.{who}\.moe\.expert_parallel: 'alltoall': "
                     r"expected one of \('auto', 'all_to_all', 'gspmd'\)"):
    config_lib.validate(cfg)


@pytest.mark.parametrize("moe", [{"dispatch": "capacity"}, {"impl": "dense"}])
def test_all_to_all_needs_a_sorted_dropless_kernel(moe):
  cfg = config_lib.base()
  cfg.student.moe.update({"expert_parallel": "all_to_all", **moe})
  with pytest.raises(ValueError, match=r"config\.student\.moe\.expert_parallel: 'all_to_all' needs"):
    config_lib.validate(cfg)


def test_expert_parallel_reaches_the_model():
  mode = "gspmd"  # not the model's default ("auto"), so the value must have come from the config
  cfg = config_lib.base()
  cfg.stage, cfg.data.train_files = "adaptor", ["train.jsonl"]
  src = cfg.student
  src.moe.expert_parallel = mode
  src.upcycle.num_experts = 4
  src.scratch.update({"hidden_size": 16, "intermediate_size": 32, "num_layers": 2, "num_heads": 2,
                      "num_kv_heads": 1, "vision_hidden_size": 16, "vision_layers": 1,
                      "vision_heads": 2, "image_size": 16})
  config_lib.validate(cfg)
  model, _ = build.load_model(src, tiny_run.tokenizer(), cfg, role="student")
  assert model.cfg.text.num_experts == 4
  assert model.cfg.text.moe_expert_parallel == mode


@pytest.mark.parametrize("path,arg", [("adaptor", "paper"), ("mimic", "d2d_paper"),
                                      ("mimic", "d2s_paper"), ("preference", "paper")])
def test_paper_recipes_compute_in_bf16_with_fp32_student_parameters(path, arg):
  import importlib.util
  from pathlib import Path

  spec = importlib.util.spec_from_file_location(
      f"{path}_config", Path(__file__).resolve().parents[2] / "configs" / f"{path}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config(arg)
  config_lib.validate(c)
  assert (c.student.dtype, c.student.param_dtype) == ("bfloat16", "float32")
  assert (c.teacher.dtype, c.teacher.param_dtype) == ("bfloat16", "bfloat16")
  assert c.data.max_length == 2048 and c.loss.chunk_size == 512
  assert c.student.scan_layers and c.teacher.scan_layers and c.student.remat


@pytest.mark.parametrize("path,arg,per_device,accum", [
    ("adaptor", "paper", 8, 2), ("mimic", "d2s_paper", 1, 8), ("preference", "paper", 1, 8)])
def test_paper_recipes_keep_the_original_per_device_batch_on_every_slice(path, arg, per_device,
                                                                         accum):
  """The original sets a per-device batch on every GPU: the global batch grows with the slice and
  each micro-batch holds whole rows on each chip (a global batch would not split over some)."""
  import importlib.util
  import types
  from pathlib import Path

  spec = importlib.util.spec_from_file_location(
      f"{path}_config", Path(__file__).resolve().parents[2] / "configs" / f"{path}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  for chips in (4, 8, 16, 32):
    c = module.get_config(arg)
    assert (c.data.per_device_batch_size, c.optimizer.grad_accum_steps) == (per_device, accum)
    mesh = types.SimpleNamespace(shape={"data": 1, "fsdp": chips, "expert": 1, "tensor": 1})
    assert config_lib.resolve_batch(c, mesh) == per_device * chips * accum
    assert c.data.batch_size // accum == per_device * chips  # rows per micro-batch
  c = module.get_config(arg)
  c.data.per_device_batch_size, c.data.batch_size = 0, 4 * accum  # a global batch of 4 rows
  with pytest.raises(ValueError, match="4 rows per micro-batch do not split over the 8 devices"):
    config_lib.resolve_batch(c, types.SimpleNamespace(shape={"data": 2, "fsdp": 4}))
  c = module.get_config(arg)
  c.data.batch_size = 16
  with pytest.raises(ValueError, match="set exactly one of them"):
    config_lib.validate(c)


@pytest.mark.parametrize("change, message", [
    ({"loss.objective": "kl"}, r"config\.loss\.objective: distillation objective 'kl': expected"),
    ({"loss.objective": "jsd", "loss.reverse_kl": True}, r"reverse=True with objective='jsd'"),
    ({"loss.jsd_beta": 1.5}, r"config\.loss\.skew_alpha: .*jsd_beta=1.5: both must lie in \[0, 1\]"),
    ({"teacher.init": "offline"}, r"config\.teacher\.logits_dir: required when teacher.init='offline'"),
    ({"loss.on_policy_fraction": 0.5, "teacher.init": "offline", "teacher.logits_dir": "x"},
     r"config\.loss\.on_policy_fraction: on-policy distillation needs the mimic stage with a teacher"),
    ({"teacher.init": "offline", "teacher.logits_dir": "x", "stage": "preference"},
     r"config\.teacher\.init: 'offline' \(stored teacher logits\) is for the mimic stage"),
])
def test_objective_and_offline_teacher_errors_name_the_key(change, message):
  cfg = config_lib.base()
  cfg.data.train_files = ["x.jsonl"]
  cfg.teacher.init = "hf"
  cfg.teacher.hf_dir = "t"
  for key, value in change.items():
    section, field = key.split(".") if "." in key else (None, key)
    (cfg[section] if section else cfg)[field] = value
  with pytest.raises(ValueError, match=message):
    config_lib.validate(cfg)


def test_list_keys_take_command_line_values(tmp_path):
  """`--config.data.train_files=a,b` (and every list key) overrides from the command line; a missing
  file named there fails before anything loads, naming the key and its position in the list."""
  import os
  import pathlib
  import subprocess
  import sys

  repo = pathlib.Path(__file__).resolve().parents[2]
  a = tmp_path / "a.jsonl"
  a.write_text("")
  p = subprocess.run(
      [sys.executable, str(repo / "launch" / "train.py"), f"--config={repo / 'configs/mimic.py'}:d2s_paper",
       f"--config.data.train_files={a},{tmp_path / 'typo.jsonl'}", "--config.data.weights=1,0.5",
       f"--workdir={tmp_path / 'w'}"], capture_output=True, text=True, timeout=120,
      env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert p.returncode == 1
  assert p.stderr.strip().splitlines()[-1] == (
      "error: config.data.train_files: [1] '" + str(tmp_path / "typo.jsonl") + "': no such file")
  assert "Traceback" not in p.stderr
  assert not (tmp_path / "w" / "checkpoints").exists()  # nothing was built


def test_data_weights_need_one_per_file(tmp_path):
  cfg = config_lib.base()
  cfg.stage, cfg.data.train_files, cfg.data.weights = "adaptor", ["x.jsonl"], [1, 0.5]
  with pytest.raises(ValueError, match=r"config\.data\.weights: 2 weights for 1 data.train_files"):
    config_lib.validate(cfg)


@pytest.mark.parametrize("text, want", [("a.jsonl,b.jsonl", ["a.jsonl", "b.jsonl"]), ("", []),
                                        ("1, 0.5,x", [1, 0.5, "x"]), ("[2, 'y']", [2, "y"]),
                                        ("gs://b/1.jsonl", ["gs://b/1.jsonl"])])
def test_list_parser(text, want):
  assert config_lib.ListParser().parse(text) == want
