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
