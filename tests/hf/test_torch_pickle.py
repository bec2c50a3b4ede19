"""torch.save files read with numpy only, against torch's own tensors."""

import pickle

import numpy as np
import pytest

from llavamod_jax.hf import torch_pickle


def test_tensors_read_back_as_torch_wrote_them(tmp_path, torch):
  base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
  sd = {
      "f32": base, "bf16": torch.randn(3, 5).to(torch.bfloat16), "f16": torch.randn(7).half(),
      "i64": torch.arange(5), "bool": torch.tensor([True, False, True]),
      "transposed": base.t(), "row": base[2], "strided": base[:, ::2], "scalar": torch.tensor(2.5),
      "param": torch.nn.Parameter(torch.randn(2, 2)), "empty": torch.zeros(0, 3),
  }
  torch.save(sd, tmp_path / "w.bin")
  f = torch_pickle.TorchFile(tmp_path / "w.bin")
  assert f.keys() == list(sd)
  for key, t in sd.items():
    want = t.detach().float().numpy() if t.dtype == torch.bfloat16 else t.detach().numpy()
    got = np.asarray(f.get(key))
    assert f.shape(key) == tuple(t.shape), key
    assert str(f.dtype(key)) == str(t.dtype).replace("torch.", ""), key
    np.testing.assert_array_equal(got.astype(np.float32) if t.dtype == torch.bfloat16 else got,
                                  want, err_msg=key)


def test_a_pickle_with_other_globals_is_refused(tmp_path):
  class Evil:
    def __reduce__(self):
      return (print, ("never",))

  import zipfile
  with zipfile.ZipFile(tmp_path / "evil.bin", "w") as z:
    z.writestr("evil/data.pkl", pickle.dumps({"w": Evil()}, protocol=2))
  with pytest.raises(pickle.UnpicklingError, match=r"refusing pickle global (__builtin__|builtins).print"):
    torch_pickle.TorchFile(tmp_path / "evil.bin")
  (tmp_path / "old.bin").write_bytes(b"\x80\x02not a zip")
  with pytest.raises(ValueError, match="not a zip-format torch checkpoint"):
    torch_pickle.TorchFile(tmp_path / "old.bin")
