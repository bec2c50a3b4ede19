"""The baseline: the same train steps written with transformers + PyTorch (eager, CPU).

Models are the transformers classes our export targets (`Qwen2ForCausalLM`, `Qwen2MoeForCausalLM` with
`shared_expert_intermediate_size=0`, `norm_topk_prob=True`, dense layers in `mlp_only_layers`), loaded
from our own parameters through `hf.save` so both sides start from the same weights and the first
step's losses can be compared. Losses follow `llavamod_jax.losses` formula by formula:
KL(teacher || student) at T=1 over positions predicting a trained token, next-token CE, and the
load-balancing loss E^2 * mean_e(mean_tokens(probs)_e * fraction with top-1 = e) summed over MoE layers
(coefficient 0.01), computed from router logits captured by forward hooks (transformers' own aux
loss uses a different formula and is not computed). Optimizer: torch.optim.AdamW (foreach), no clipping.

Bench/test-only module: the package never imports torch.
"""

from __future__ import annotations

import tempfile
import warnings

import torch
import torch.nn.functional as F
import transformers

from llavamod_jax import hf
from llavamod_jax.losses import IGNORE


# The exported Qwen2-MoE has an empty shared expert (Linear(h, 0)); torch warns when building it.
warnings.filterwarnings("ignore", message="Initializing zero-element tensors")

AUX_COEF = 0.01


def load(model, params, attn: str = "sdpa"):
  """Our (module, params) -> the transformers model, through an HF directory written by `hf.save`."""
  with tempfile.TemporaryDirectory() as d:
    hf.save(model, params, d + "/m")
    m = transformers.AutoModelForCausalLM.from_pretrained(d + "/m", dtype=torch.float32,
                                                          attn_implementation=attn)
  return m


def distill_mask(labels):
  """Positions t whose next token is trained ([batch, seq] bool; last position off)."""
  nxt = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], IGNORE)], dim=1)
  return nxt != IGNORE, torch.where(nxt == IGNORE, torch.zeros_like(nxt), nxt)


def masked_mean(x, mask):
  m = mask.float()
  return (x * m).sum() / m.sum().clamp_min(1.0)


def kl_loss(student_logits, teacher_logits, mask):
  s = F.log_softmax(student_logits.float(), dim=-1)
  t = F.log_softmax(teacher_logits.float(), dim=-1)
  return masked_mean((t.exp() * (t - s)).sum(-1), mask)


def ce_loss(logits, targets, mask):
  logp = F.log_softmax(logits.float(), dim=-1)
  return masked_mean(-logp.gather(-1, targets[..., None])[..., 0], mask)


def load_balancing(router_logits: list) -> torch.Tensor:
  total = torch.zeros(())
  for logits in router_logits:  # [tokens, experts] per MoE layer
    probs = F.softmax(logits.float(), dim=-1)
    e = probs.shape[-1]
    top1 = F.one_hot(probs.argmax(-1), e).float()
    total = total + e * e * torch.mean(probs.mean(0) * top1.mean(0))
  return total


class RouterTap:
  """Collects the router logits of every Qwen2-MoE layer during a forward pass."""

  def __init__(self, model):
    self.logits = []
    for mod in model.modules():
      if type(mod).__name__.endswith("TopKRouter"):
        mod.register_forward_hook(lambda _m, _i, out: self.logits.append(out[0]))

  def take(self):
    out, self.logits = self.logits, []
    return out


def trainable_only(model, trainable: str):
  for name, p in model.named_parameters():
    p.requires_grad_(trainable == "all" or ".mlp." in name)
  return [p for p in model.parameters() if p.requires_grad]


class TorchStep:
  """One step of kind "mimic" (KL + ce_weight * CE + 0.01 aux) or "sft" (CE + 0.01 aux)."""

  def __init__(self, kind: str, student, batch, teacher=None, *, trainable: str = "all",
               ce_weight: float = 1.0, lr: float = 1e-5, threads: int | None = None):
    self.kind, self.student, self.teacher, self.ce_weight = kind, student.train(), teacher, ce_weight
    self.threads = threads  # torch.set_num_threads before each step (None: leave as is)
    if teacher is not None:
      teacher.eval().requires_grad_(False)
    self.params = trainable_only(student, trainable)
    self.opt = torch.optim.AdamW(self.params, lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                                 foreach=True)
    self.tap = RouterTap(student)
    self.input_ids = torch.as_tensor(batch["input_ids"], dtype=torch.long)
    self.attention_mask = torch.as_tensor(batch["attention_mask"], dtype=torch.long)
    labels = torch.as_tensor(batch["labels"], dtype=torch.long)
    self.mask, self.targets = distill_mask(labels)
    self.last = None

  def loss(self):
    s_logits = self.student(input_ids=self.input_ids, attention_mask=self.attention_mask).logits
    loss = ce_loss(s_logits, self.targets, self.mask)
    parts = {"ce": loss}
    if self.kind == "mimic":
      with torch.no_grad():
        t_logits = self.teacher(input_ids=self.input_ids, attention_mask=self.attention_mask).logits
      n = min(s_logits.shape[-1], t_logits.shape[-1])
      kl = kl_loss(s_logits[..., :n], t_logits[..., :n], self.mask)
      parts["kl"] = kl
      loss = kl + self.ce_weight * loss
    aux = load_balancing(self.tap.take())
    parts["aux"] = aux
    return loss + AUX_COEF * aux, parts

  def __call__(self):
    if self.threads:
      torch.set_num_threads(self.threads)
    loss, parts = self.loss()
    loss.backward()
    self.opt.step()
    self.opt.zero_grad(set_to_none=True)
    self.last = {"loss": float(loss.detach()), **{k: float(v.detach()) for k, v in parts.items()}}
    return self.last
