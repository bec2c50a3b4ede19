"""Our numpy safetensors reader/writer against the reference `safetensors` library."""

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from llavamod_jax.hf.safetensors_io import SafetensorsFile, plan_shards, write_file


def test_reads_what_the_reference_writes(tmp_path):
  rng = np.random.default_rng(0)
  tensors = {"a": rng.standard_normal((3, 4)).astype(np.float32),
             "b.c": rng.integers(-5, 5, (7,)).astype(np.int64),
             "h": rng.standard_normal((2, 2, 2)).astype(np.float16), "s": np.array(3.0, np.float32)}
  save_file(tensors, tmp_path / "x.safetensors", metadata={"format": "pt"})
  f = SafetensorsFile(tmp_path / "x.safetensors")
  assert sorted(f.keys()) == sorted(tensors)
  for k, v in tensors.items():
    assert f.shape(k) == v.shape and f.dtype(k) == v.dtype
    np.testing.assert_array_equal(f.get(k), v)


def test_reference_reads_what_we_write(tmp_path):
  rng = np.random.default_rng(1)
  tensors = [("w", rng.standard_normal((5, 3)).astype(np.float32)),
             ("t", np.asfortranarray(rng.standard_normal((4, 6)).astype(np.float32)).T),
             ("i", np.arange(9, dtype=np.int32))]
  write_file(tmp_path / "y.safetensors", tensors)
  back = load_file(tmp_path / "y.safetensors")
  for k, v in tensors:
    np.testing.assert_array_equal(back[k], v)


def test_bfloat16_round_trip_against_torch(tmp_path, torch):
  from safetensors.torch import load_file as torch_load, save_file as torch_save
  t = torch.randn(4, 5).to(torch.bfloat16)
  torch_save({"x": t}, str(tmp_path / "t.safetensors"))
  got = SafetensorsFile(tmp_path / "t.safetensors").get("x")
  assert got.dtype == ml_dtypes.bfloat16
  np.testing.assert_array_equal(got.astype(np.float32), t.float().numpy())
  write_file(tmp_path / "u.safetensors", [("x", got)])
  assert torch.equal(torch_load(str(tmp_path / "u.safetensors"))["x"], t)


def test_corrupt_header_is_named(tmp_path):
  p = tmp_path / "bad.safetensors"
  p.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}......")
  with pytest.raises(ValueError, match="bad.safetensors: corrupt safetensors header"):
    SafetensorsFile(p)


def test_plan_shards_respects_the_limit():
  sizes = [("a", 4), ("b", 4), ("c", 9), ("d", 1), ("e", 3)]
  shards = plan_shards(iter(sizes), 8)
  assert shards == [["a", "b"], ["c"], ["d", "e"]]
  assert [n for s in shards for n in s] == [n for n, _ in sizes]
