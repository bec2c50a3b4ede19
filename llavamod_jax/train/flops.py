"""Analytic FLOPs of a training step (multiply-add = 2 FLOPs), for MFU and for plans.

Attention counts the full [seq, seq] score matrix, as the PaLM MFU convention does (and as the
einsum path computes it): no causal discount. Rematerialisation is not counted (model FLOPs, not
hardware FLOPs). XLA's own count is no substitute: it counts a scanned layer's body once.
"""

from __future__ import annotations

from llavamod_jax.models.configs import LlavaConfig, TextConfig, VisionConfig


def layer_matmul_params(cfg: TextConfig, layer: int) -> dict[str, int]:
  """Multiply-add weights per token of one decoder layer, split into attention and FFN (active)."""
  h, hd = cfg.hidden_size, cfg.resolved_head_dim
  q, kv = cfg.num_heads * hd, cfg.num_kv_heads * hd
  attn = h * (q + 2 * kv) + q * h
  if cfg.num_experts and layer in cfg.moe_layers:
    inter = cfg.moe_intermediate_size or cfg.intermediate_size
    ffn = cfg.num_experts_per_tok * 3 * h * inter + h * cfg.num_experts  # k experts + router
  else:
    ffn = 3 * h * cfg.intermediate_size
  return {"attn": attn, "ffn": ffn}


def forward_flops(cfg: TextConfig, batch: int, seq: int) -> dict[str, float]:
  """Forward FLOPs of a decoder LM on [batch, seq] tokens: weight matmuls, attention, LM head."""
  tokens = batch * seq
  q = cfg.num_heads * cfg.resolved_head_dim
  per = [layer_matmul_params(cfg, i) for i in range(cfg.num_layers)]
  return {
      "attn_proj": 2.0 * tokens * sum(p["attn"] for p in per),
      "ffn": 2.0 * tokens * sum(p["ffn"] for p in per),
      "attn_scores": 4.0 * tokens * seq * q * cfg.num_layers,  # QK^T and PV
      "head": 2.0 * tokens * cfg.hidden_size * cfg.vocab_size,
  }


def train_flops(cfg: TextConfig, batch: int, seq: int, trainable: str | tuple[str, ...]) -> float:
  """Forward + backward FLOPs of one training step of `cfg`.

  Backward = gradients of activations (2x the forward of every matmul and of attention, down to the
  first layer) + gradients of trainable weights (1x the forward of their matmuls).
  trainable: "all" | "ffn" (FFN / experts / router only: the paper's dense-to-sparse stage) | "none"
  (the LM frozen, gradients flow through it to the projector: the adaptor stage), or a tuple of
  the parts ("attn_proj", "ffn", "head").
  """
  f = forward_flops(cfg, batch, seq)
  fwd = sum(f.values())
  act_grads = fwd  # d(input) of each matmul costs what its forward costs
  act_grads += f["attn_scores"]  # attention has two matmul inputs that both need gradients
  parts = {"all": ("ffn", "attn_proj", "head"), "ffn": ("ffn",), "none": ()}.get(trainable, trainable)
  return fwd + act_grads + sum(f[p] for p in parts)


def mimic_flops(teacher: TextConfig, student: TextConfig, batch: int, seq: int,
                trainable="ffn") -> float:
  """Teacher forward + student training step (the KL/softmax elementwise work is not counted)."""
  return sum(forward_flops(teacher, batch, seq).values()) + train_flops(student, batch, seq, trainable)


def vision_forward_flops(cfg: VisionConfig, images: int) -> float:
  """Forward FLOPs of a ViT tower on `images` images (patch embedding, every layer)."""
  n, h = cfg.num_positions, cfg.hidden_size
  patch = 2.0 * cfg.num_patches * cfg.patch_size ** 2 * cfg.num_channels * h
  layer = 2.0 * n * (4 * h * h + 2 * h * cfg.intermediate_size) + 4.0 * n * n * h
  return images * (patch + cfg.num_layers * layer)


def step_flops(kind: str, student, teacher, rows: int, seq: int, images: int,
               trainable: tuple[str, ...]) -> float:
  """One optimizer step of a stage kind (steps.make_train_step's: sft | mimic | preference) on
  `rows` rows of `seq` tokens with `images` images: the frozen towers' forward, the projector
  (small; not counted), the teacher's forward, the student's forward and backward."""
  def text(m):
    return m.cfg.text if isinstance(m.cfg, LlavaConfig) else m.cfg

  def tower(m):
    return vision_forward_flops(m.cfg.vision, images) if isinstance(m.cfg, LlavaConfig) else 0.0

  total = train_flops(text(student), rows, seq, trainable) + tower(student)
  if teacher is not None and kind in ("mimic", "preference"):
    total += sum(forward_flops(text(teacher), rows, seq).values()) + tower(teacher)
  return total
