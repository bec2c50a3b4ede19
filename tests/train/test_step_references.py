"""The train steps against references written apart from them: transformers + PyTorch run the SFT and
preference steps (the original's HF Trainer pieces: torch AdamW with decoupled weight decay,
`clip_grad_norm_`, `get_cosine_schedule_with_warmup` over ceil(warmup_ratio * steps) warmup steps),
with the MoE load-balancing and router z-loss terms written from their papers; transformers' schedule
functions check the learning rate at every step; a count by hand checks the activated parameters.

The torch side loads our parameters through `hf.save` (bench/torch_steps.load), so both start equal;
several steps are compared, so the later losses also check both optimizer updates."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llavamod_jax import losses, models, moe
from llavamod_jax.models.configs import TextConfig
from llavamod_jax.train import optim, report, steps

# The module fixture is computed once: every test of this file runs on one xdist worker
# (`--dist loadgroup`, pyproject.toml).
pytestmark = [pytest.mark.filterwarnings("ignore:Initializing zero-element tensors"),
              pytest.mark.xdist_group("step_references")]

BENCH = Path(__file__).resolve().parents[2] / "bench"
IGN = losses.IGNORE
VOCAB = 64


def _torch_steps():
  if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))
  import torch_steps
  return torch_steps


def _text(hidden, layers, **kw):
  return TextConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden, num_layers=layers,
                    num_heads=4, num_kv_heads=2, rope_theta=10000.0, initializer_range=0.3, **kw)


@pytest.fixture(scope="module")
def pair():
  """A dense teacher and an upcycled student whose second layer only is sparse (so the export mixes
  dense and MoE layers), with distinct experts and non-zero biases."""
  teacher = models.build(_text(32, 2))
  tp = models.init_params(teacher, 1)
  tp = jax.tree.map(lambda a: a + 0.1 * jax.random.normal(jax.random.key(5), a.shape), tp)
  dense = models.build(_text(16, 2))
  student, sp = moe.upcycle(dense, models.init_params(dense, 2), num_experts=4, top_k=2, layers=[1])
  sp = jax.tree.map(lambda a: a + 0.1 * jax.random.normal(jax.random.key(3), a.shape), sp)
  return teacher, tp, student, sp


def _rows(rng, b, s, prompt):
  ids = rng.integers(0, VOCAB, (b, s)).astype(np.int32)
  labels = ids.copy()
  labels[:, :prompt] = IGN
  return ids, labels


def _sft_batch():
  ids, labels = _rows(np.random.default_rng(0), 3, 14, 5)
  mask = np.ones_like(ids)
  mask[0, -3:] = 0  # right padding
  labels[0, -3:] = IGN
  labels[2, 5:8] = IGN  # a row with fewer trained tokens
  return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _preference_batch():
  rng = np.random.default_rng(1)
  prompt, _ = _rows(rng, 2, 5, 5)
  rows = [np.concatenate([prompt, _rows(rng, 2, 9, 0)[0]], 1) for _ in range(2)]  # chosen, rejected
  ids = np.concatenate(rows).astype(np.int32)
  labels = ids.copy()
  labels[:, :5] = IGN
  return {"input_ids": ids, "attention_mask": np.ones_like(ids), "labels": labels}


class TorchReference:
  """One step as HF Trainer and TRL's DPO trainer take it, written with torch on the exported models:
  loss.backward(); clip_grad_norm_; AdamW.step(); scheduler.step()."""

  def __init__(self, kind, student, sp, teacher, tp, batch, *, trainable, lr, total, warmup_ratio,
               weight_decay, clip, aux_coef, z_coef, beta=0.1, label_smoothing=0.0,
               loss_type="sigmoid"):
    import torch
    import transformers

    ts = _torch_steps()
    self.torch, self.ts = torch, ts
    self.kind, self.aux_coef, self.z_coef, self.clip = kind, aux_coef, z_coef, clip
    self.beta, self.smooth, self.loss_type = beta, label_smoothing, loss_type
    self.student = ts.load(student, sp, attn="eager").train()
    self.teacher = ts.load(teacher, tp, attn="eager").eval().requires_grad_(False)
    self.params = []
    for name, p in self.student.named_parameters():
      p.requires_grad_(trainable == "all" or ".mlp." in name)
      if p.requires_grad:
        self.params.append(p)
    self.opt = torch.optim.AdamW(self.params, lr=lr, betas=(0.9, 0.999), eps=1e-8,
                                 weight_decay=weight_decay)
    self.sched = transformers.get_cosine_schedule_with_warmup(
        self.opt, math.ceil(total * warmup_ratio), total)  # TrainingArguments.get_warmup_steps
    self.tap = ts.RouterTap(self.student)
    self.ids = torch.as_tensor(batch["input_ids"], dtype=torch.long)
    self.mask = torch.as_tensor(batch["attention_mask"], dtype=torch.long)
    labels = torch.as_tensor(batch["labels"], dtype=torch.long)
    self.trained, self.targets = ts.distill_mask(labels)

  def sequence_logps(self, logits):
    logp = self.torch.log_softmax(logits.float(), -1).gather(-1, self.targets[..., None])[..., 0]
    return (logp * self.trained).sum(-1)

  def preference(self, logits):
    F = self.torch.nn.functional
    with self.torch.no_grad():
      reference = self.sequence_logps(self.teacher(input_ids=self.ids, attention_mask=self.mask).logits)
    policy = self.sequence_logps(logits)
    half = policy.shape[0] // 2
    chosen, rejected = policy[:half] - reference[:half], policy[half:] - reference[half:]
    if self.loss_type == "sigmoid":  # DPO (Rafailov et al.), conservative label smoothing
      z = self.beta * (chosen - rejected)
      return (-F.logsigmoid(z) * (1 - self.smooth) - F.logsigmoid(-z) * self.smooth).mean()
    assert self.loss_type == "kto_pair"  # TRL 0.7's paired KTO, which the original's script calls
    chosen_kl = chosen.mean().clamp(min=0)
    rejected_kl = rejected.mean().clamp(min=0)
    return self.torch.cat([1 - self.torch.sigmoid(self.beta * (chosen - rejected_kl)),
                           1 - self.torch.sigmoid(self.beta * (chosen_kl - rejected))]).mean()

  def __call__(self):
    torch = self.torch
    lr = self.sched.get_last_lr()[0]
    logits = self.student(input_ids=self.ids, attention_mask=self.mask).logits
    router = self.tap.take()
    if self.kind == "sft":
      main = self.ts.ce_loss(logits, self.targets, self.trained)
    else:
      main = self.preference(logits)
    balance = self.ts.load_balancing(router)
    # ST-MoE's router z-loss: mean over tokens of logsumexp(router logits)^2, summed over layers.
    z = sum(torch.logsumexp(r.float(), -1).square().mean() for r in router)
    loss = main + self.aux_coef * balance + self.z_coef * z
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(self.params, self.clip)
    self.opt.step()
    self.sched.step()
    self.opt.zero_grad(set_to_none=True)
    return {"loss": float(loss), "aux": float(balance), "z_loss": float(z), "grad_norm": float(norm),
            "learning_rate": lr}


def _ours(kind, student, sp, teacher, tp, batch, *, trainable, lr, total, warmup_ratio,
          weight_decay, clip, aux_coef, z_coef, **loss_kw):
  tx, schedule = optim.adamw(lr, total, warmup_ratio=warmup_ratio, weight_decay=weight_decay,
                             grad_clip_norm=clip)
  cfg = steps.LossConfig(aux_coef=aux_coef, z_coef=z_coef, **loss_kw)
  step = steps.make_train_step(kind, student, teacher, tx, cfg, schedule=schedule)
  patterns = [r".*"] if trainable == "all" else [r"layers_\d+/mlp/.*"]
  state = steps.init_state(jax.tree.map(jnp.copy, sp), patterns, tx)
  arrays = {k: jnp.asarray(v) for k, v in batch.items()}

  def run():
    nonlocal state
    state, m = step(state, arrays, tp)
    return {k: float(v) for k, v in m.items() if np.ndim(v) == 0}
  return run


def _compare(ours, theirs, n, keys):
  seen = []
  for i in range(n):
    a, b = ours(), theirs()
    seen.append((a, b))
    for k in keys:
      assert a[k] == pytest.approx(b[k], rel=5e-4, abs=1e-6), (i, k, a[k], b[k])
  return seen


def test_sft_steps_equal_torch_with_clipping_weight_decay_schedule_and_z_loss(pair, torch):
  teacher, tp, student, sp = pair
  kw = dict(trainable="all", lr=2e-2, total=6, warmup_ratio=0.3, weight_decay=0.1, clip=0.5,
            aux_coef=0.01, z_coef=0.01)
  batch = _sft_batch()
  ours = _ours("sft", student, sp, None, None, batch, **kw)
  theirs = TorchReference("sft", student, sp, teacher, tp, batch, **kw)
  seen = _compare(ours, theirs, 5, ("loss", "aux", "z_loss", "grad_norm", "learning_rate"))
  assert all(b["grad_norm"] > 2 * kw["clip"] for _, b in seen)  # clipping is active at every step
  assert seen[0][1]["learning_rate"] == 0.0 and seen[2][1]["learning_rate"] == kw["lr"]  # 2 warmup
  assert seen[0][1]["z_loss"] > 1.0  # the z-loss is not negligible here
  assert seen[-1][0]["loss"] < seen[0][0]["loss"] - 0.1  # the compared steps do move the model
  assert sp["layers_0"]["mlp"].keys() != sp["layers_1"]["mlp"].keys()  # one dense, one MoE layer


@pytest.mark.parametrize("loss_type", ["sigmoid", "kto_pair"])
def test_preference_steps_equal_torch_with_the_teacher_as_reference(pair, torch, loss_type):
  teacher, tp, student, sp = pair
  kw = dict(trainable="mlp", lr=1e-2, total=4, warmup_ratio=0.0, weight_decay=0.0, clip=1.0,
            aux_coef=0.01, z_coef=0.0, beta=0.5, label_smoothing=0.1 if loss_type == "sigmoid" else 0.0,
            loss_type=loss_type)
  batch = _preference_batch()
  ours = _ours("preference", student, sp, teacher, tp, batch, **kw)
  theirs = TorchReference("preference", student, sp, teacher, tp, batch, **kw)
  seen = _compare(ours, theirs, 3, ("loss", "aux", "grad_norm", "learning_rate"))
  # Swapping chosen and rejected changes the first loss well past the tolerance.
  swapped = {k: np.concatenate([v[2:], v[:2]]) for k, v in batch.items()}
  first_swapped = TorchReference("preference", student, sp, teacher, tp, swapped, **kw)()["loss"]
  assert abs(first_swapped - seen[0][1]["loss"]) > 0.02


@pytest.mark.parametrize("total,warmup_ratio,end_ratio", [
    (10, 0.03, 0.0),    # ceil(0.3) = 1 warmup step (rounding would give none)
    (50, 0.03, 0.0),    # ceil(1.5) = 2
    (1000, 0.03, 0.0),  # 30, the paper's ratio at a realistic length
    (7, 0.5, 0.0),
    (20, 0.1, 0.1),     # a floor of 10% of the peak
    (6, 0.0, 0.0),      # no warmup
    (3, 1.0, 0.0),      # all warmup
])
def test_learning_rate_schedule_equals_transformers(total, warmup_ratio, end_ratio, torch):
  import transformers

  lr = 3e-4
  opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
  warmup = math.ceil(total * warmup_ratio)
  if end_ratio:
    sched = transformers.get_cosine_with_min_lr_schedule_with_warmup(opt, warmup, total,
                                                                    min_lr_rate=end_ratio)
  else:
    sched = transformers.get_cosine_schedule_with_warmup(opt, warmup, total)
  want = []
  for _ in range(total):
    want.append(sched.get_last_lr()[0])
    opt.step()
    sched.step()
  schedule = optim.learning_rate_schedule(lr, total, warmup_ratio, end_ratio)
  got = [float(schedule(k)) for k in range(total)]
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6 * lr)  # fp32 near the end


def test_activated_parameters_equal_a_count_by_hand(pair):
  """Counted from the configuration: embeddings, attention with q/k/v biases, norms, the dense FFN of
  layer 0, the router and the experts of layer 1 (top_k of num_experts per token), the final norm and
  the untied LM head."""
  _, _, student, sp = pair
  t = student.cfg
  h, i, v, e, k = t.hidden_size, t.intermediate_size, t.vocab_size, t.num_experts, t.num_experts_per_tok
  hd = h // t.num_heads
  kv = t.num_kv_heads * hd
  attention = (h * h + h) + 2 * (h * kv + kv) + h * h
  layer = attention + 2 * h  # two RMSNorms
  ffn = 3 * h * i
  total = v * h + 2 * layer + ffn + (h * e + e * ffn) + h + h * v
  active = total - (e - k) * ffn
  assert sum(x.size for x in jax.tree.leaves(sp)) == total
  assert report.activated_parameters(student, sp) == active
  dense_total = total - (h * e + e * ffn) + ffn
  dense = models.build(student.cfg.replace(num_experts=0, num_experts_per_tok=0, moe_layers=()))
  assert report.activated_parameters(dense, models.init_params(dense, 0)) == dense_total
