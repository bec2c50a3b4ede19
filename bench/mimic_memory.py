"""Peak memory of the mimic step at Qwen2's vocabulary (151,936): chunked vs naive KL, against a
student-only CE (SFT) step — from XLA's compiled memory analysis, so the numbers are exact and do not
depend on machine load.

    python bench/mimic_memory.py [--quick] [--seq 512] [--batch 2] [--chunk 128]

Peak = arguments + outputs + temporaries - donated aliases (what the step needs resident at once).
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

from llavamod_jax import models, moe
from llavamod_jax.models.configs import TextConfig
from llavamod_jax.train import optim, steps

VOCAB = 151936


def _lm(hidden, layers, **kw):
  return TextConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden,
                    num_layers=layers, num_heads=4, num_kv_heads=2, **kw)


def _abstract(model):
  import flax.linen as nn
  return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype),
                      nn.unbox(models.abstract_params(model)))


def measure(kind: str, chunk: int, teacher, tparams, student, sparams, batch) -> dict[str, float]:
  tx, _ = optim.adamw(1e-4, total_steps=10)
  cfg = steps.LossConfig(ce_weight=1.0, chunk_size=chunk)
  step = steps.make_train_step(kind, student, teacher, tx, cfg)
  state = jax.eval_shape(lambda p: steps.init_state(p, [r".*mlp.*", r"embed_tokens/.*", r"lm_head/.*"],
                                                    tx), sparams)
  compiled = step.lower(state, batch, tparams if kind == "mimic" else None).compile()
  m = compiled.memory_analysis()
  peak = m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes
  return {"temp": m.temp_size_in_bytes / 2**20, "args": m.argument_size_in_bytes / 2**20,
          "peak": peak / 2**20}


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--quick", action="store_true")
  ap.add_argument("--seq", type=int, default=512)
  ap.add_argument("--batch", type=int, default=2)
  ap.add_argument("--chunk", type=int, default=128)
  args = ap.parse_args()
  seq = 128 if args.quick else args.seq
  teacher = models.build(_lm(256, 2))
  dense = models.build(_lm(128, 2))
  student = models.build(moe.moe_text_config(dense.cfg, 4, 2, "sparse"))
  tparams, sparams = _abstract(teacher), _abstract(student)
  ids = jax.ShapeDtypeStruct((args.batch, seq), jnp.int32)
  batch = {"input_ids": ids, "attention_mask": ids, "labels": ids}
  rows = {
      "student-only CE step (sft)": measure("sft", 0, teacher, tparams, student, sparams, batch),
      "mimic, naive KL": measure("mimic", 0, teacher, tparams, student, sparams, batch),
      f"mimic, chunked KL ({args.chunk})": measure("mimic", args.chunk, teacher, tparams, student,
                                                   sparams, batch),
  }
  ce = rows["student-only CE step (sft)"]["peak"]
  logits_mb = args.batch * seq * VOCAB * 4 / 2**20
  print(f"vocab {VOCAB}, batch {args.batch} x {seq}; teacher h256 x 2 layers, student h128 x 2 layers "
        f"(MoE 4 experts top-2 on layer 0); one [batch, seq, vocab] fp32 tensor = {logits_mb:.0f} MiB")
  print()
  print("| step | temporaries MiB | arguments MiB | peak MiB | x CE step |")
  print("|---|---|---|---|---|")
  for name, r in rows.items():
    print(f"| {name} | {r['temp']:.0f} | {r['args']:.0f} | {r['peak']:.0f} | {r['peak'] / ce:.2f} |")


if __name__ == "__main__":
  main()
