"""The stored teacher logits' format: entries, keys, positions and their placement in a batch."""

import jax.numpy as jnp
import numpy as np
import pytest

from llavamod_jax import losses
from llavamod_jax.data import teacher_logits as tl

IGN = losses.IGNORE


def _labels():
  labels = np.full(12, IGN, np.int32)
  labels[4:7] = [21, 22, 23]  # an answer
  labels[9:11] = [24, 25]  # a second answer of the same row
  return labels


@pytest.mark.parametrize("shift", [True, False])
def test_distilled_positions_are_the_loss_mask(shift):
  labels = _labels()
  want = np.flatnonzero(np.asarray(losses.distill_mask(jnp.asarray(labels[None]), shift))[0])
  np.testing.assert_array_equal(tl.distilled_positions(labels, shift), want)


@pytest.mark.parametrize("dtype", tl.DTYPES)
def test_an_entry_reads_back_what_was_written(dtype):
  rng = np.random.default_rng(0)
  lp = -rng.random((5, 3)).astype(np.float32) * 4
  ids = rng.integers(0, 150_000, (5, 3)).astype(np.int32)
  lse = rng.normal(size=5).astype(np.float32)
  data = tl.encode_entry("rec-7#abc", lp, ids, lse, dtype)
  head, lp2, ids2, lse2 = tl.decode_entry(data)
  assert head == {"key": "rec-7#abc", "n": 5, "k": 3, "dtype": dtype}
  np.testing.assert_allclose(lp2, lp, rtol=1e-3 if dtype == "float16" else 0)
  np.testing.assert_array_equal(ids2, ids)
  np.testing.assert_array_equal(lse2, lse)
  assert len(data) - data.index(b"\n") - 1 == 5 * 3 * (np.dtype(dtype).itemsize + 4) + 5 * 4
  with pytest.raises(tl.TeacherLogitsError, match="rec-7#abc"):
    tl.decode_entry(data[:-4])


def test_keys_follow_the_text_not_the_image_tokens():
  """The same record through two views (1 or 3 image tokens, id 99) has one key; other text or other
  trained tokens give another."""
  ids_a = np.array([1, 99, 5, 6, 7])
  ids_b = np.array([1, 99, 99, 99, 5, 6, 7])
  lab_a, lab_b = np.array([IGN, IGN, IGN, 6, 7]), np.array([IGN] * 5 + [6, 7])
  assert tl.record_key("r", ids_a, lab_a, 99) == tl.record_key("r", ids_b, lab_b, 99)
  assert tl.record_key("r", ids_a, lab_a, 99) != tl.record_key("r", ids_a + 1, lab_a, 99)
  assert tl.record_key("r", ids_a, lab_a, 99) != tl.record_key("r", ids_a, np.r_[IGN, lab_a[1:3],
                                                                                   IGN, 7], 99)
  assert tl.record_key("r", ids_a, lab_a, 99).startswith("r#")


def test_place_puts_entries_at_the_distilled_positions_as_topk_kl_reads_them():
  labels = _labels()
  pos = tl.distilled_positions(labels, True)
  rng = np.random.default_rng(1)
  lp = np.log(rng.dirichlet(np.ones(4), size=pos.size)).astype(np.float32)[:, :3]
  ids = np.tile(np.arange(3, dtype=np.int32), (pos.size, 1))
  lse = rng.normal(size=pos.size).astype(np.float32)
  logits, out_ids, out_lse = tl.place(labels, (lp, ids, lse), True, 2.0, 14, 3)
  assert logits.shape == (14, 3) and out_lse.shape == (14,)
  np.testing.assert_allclose(logits[pos] / 2.0 - out_lse[pos, None], lp, rtol=1e-5, atol=1e-6)
  off = np.setdiff1d(np.arange(14), pos)
  assert not logits[off].any() and not out_ids[off].any() and not out_lse[off].any()


def test_a_directory_without_meta_is_named(tmp_path):
  with pytest.raises(tl.TeacherLogitsError, match=rf"{tmp_path}/meta.json: not found"):
    tl.Reader(tmp_path)
