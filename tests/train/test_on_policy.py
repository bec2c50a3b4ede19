"""On-policy distillation: the student's samples replace the responses; the step's CE leaves them out."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llavamod_jax import generate, losses, models
from llavamod_jax.models.configs import TextConfig
from llavamod_jax.train import on_policy, steps

IGN = losses.IGNORE
VOCAB, EOS, PAD = 40, 3, 0


@pytest.fixture(scope="module")
def lms():
  def text(h, seed):
    m = models.build(TextConfig(vocab_size=VOCAB, hidden_size=h, intermediate_size=2 * h,
                                num_layers=2, num_heads=4, num_kv_heads=2))
    return m, models.init_params(m, seed)
  return (*text(16, 0), *text(24, 1))


def _batch():
  """Row 0: a 3-token prompt and 4-token answer; row 1: a 5-token prompt, 2-token answer, padding;
  row 2: no trained token (a padding row of a partial batch)."""
  ids = np.array([[5, 6, 7, 8, 9, 10, 11, PAD], [5, 6, 7, 8, 9, 12, 13, PAD],
                  [PAD] * 8], np.int32)
  labels = np.full_like(ids, IGN)
  labels[0, 3:7] = ids[0, 3:7]
  labels[1, 5:7] = ids[1, 5:7]
  mask = (np.arange(8) < np.array([[7], [7], [0]])).astype(np.int32)
  return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def test_sampled_rows_keep_their_prompt_and_train_on_the_sample(lms):
  student, sp, _, _ = lms
  batch, rng = _batch(), jax.random.key(4)
  out = on_policy.sampled_batch(student, sp, batch, rng=rng, eos_token_id=EOS, pad_token_id=PAD,
                                max_new_tokens=6)
  assert out["on_policy"].tolist() == [1, 1, 0]
  # The sampler on the left-padded prompts (what sampled_batch must have asked for).
  prompts = np.full((3, 8), PAD, np.int32)
  pmask = np.zeros((3, 8), np.int32)
  for r, n in enumerate([3, 5]):
    prompts[r, 8 - n:], pmask[r, 8 - n:] = batch["input_ids"][r, :n], 1
  prompts[2, 7], pmask[2, 7] = PAD, 1
  want = generate.generate(student, sp, prompts, pmask, max_new_tokens=6, temperature=1.0,
                           eos_token_id=EOS, pad_token_id=PAD, rng=rng)
  for r, n in enumerate([3, 5]):
    k = min(int(want.lengths[r]), 8 - n)  # the sample, cut to the row
    sample = np.asarray(want.tokens[r, :k])
    np.testing.assert_array_equal(out["input_ids"][r, :n], batch["input_ids"][r, :n])
    np.testing.assert_array_equal(out["input_ids"][r, n:n + k], sample)
    assert (out["input_ids"][r, n + k:] == PAD).all()
    np.testing.assert_array_equal(out["labels"][r], np.r_[[IGN] * n, sample, [IGN] * (8 - n - k)])
    np.testing.assert_array_equal(out["attention_mask"][r], (np.arange(8) < n + k).astype(int))
  for key in ("input_ids", "labels", "attention_mask"):
    np.testing.assert_array_equal(out[key][2], batch[key][2])
  assert on_policy.off_policy(batch)["on_policy"].tolist() == [0, 0, 0]


def test_draws_are_seeded_and_their_rate_is_the_fraction():
  a = [on_policy.draw(0, s, 0.3) for s in range(2000)]
  assert a == [on_policy.draw(0, s, 0.3) for s in range(2000)]
  assert abs(np.mean(a) - 0.3) < 0.04
  assert not any(on_policy.draw(0, s, 0.0) for s in range(100))
  assert all(on_policy.draw(0, s, 1.0) for s in range(100))


@pytest.mark.parametrize("chunk", [0, 4])
def test_the_step_distils_every_row_and_takes_ce_only_off_policy(lms, chunk):
  student, sp, teacher, tp = lms
  batch = {k: jnp.asarray(v) for k, v in _batch().items()}
  batch["on_policy"] = jnp.asarray([1, 0, 0], jnp.int32)
  cfg = steps.LossConfig(ce_weight=1.0, chunk_size=chunk)
  m = steps.make_eval_step("mimic", student, teacher, cfg)(sp, batch, tp)
  s_logits = student.apply({"params": sp}, batch["input_ids"], None, batch["attention_mask"]).logits
  t_logits = teacher.apply({"params": tp}, batch["input_ids"], None, batch["attention_mask"]).logits
  kl = losses.kl_distillation(s_logits, t_logits, losses.distill_mask(batch["labels"]))
  ce = losses.cross_entropy(s_logits[1:2], batch["labels"][1:2])  # row 1 alone
  assert float(m["kl"]) == pytest.approx(float(kl), rel=1e-5)
  assert float(m["ce"]) == pytest.approx(float(ce), rel=1e-5)
  assert float(m["on_policy"]) == pytest.approx(1 / 3)
