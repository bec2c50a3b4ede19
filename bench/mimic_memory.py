"""Peak memory of the mimic step at Qwen2's vocabulary (151,936): chunked vs naive KL, against a
student-only CE (SFT) step, the chunked losses fused with the LM heads (the default) and as
checkpointed chunks — from XLA's compiled memory analysis, so the numbers are exact and do not
depend on machine load.

    python bench/mimic_memory.py [--quick]

Peak = arguments + outputs + temporaries - donated aliases (what the step needs resident at once).
"""

from __future__ import annotations


import flax.linen as nn
import jax
import jax.numpy as jnp

import benchutil as bu
import jax_steps as js
from llavamod_jax import models, moe
from llavamod_jax.train import optim, steps


def _abstract(model):
  return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype),
                      nn.unbox(models.abstract_params(model)))


def measure(kind: str, chunk: int, teacher, tparams, student, sparams, batch,
            fused: bool = True) -> dict[str, float]:
  tx, _ = optim.adamw(1e-4, total_steps=10)
  cfg = steps.LossConfig(ce_weight=1.0, chunk_size=chunk, fused=fused)
  step = steps.make_train_step(kind, student, teacher, tx, cfg)
  state = jax.eval_shape(lambda p: steps.init_state(p, js.TRAINABLE["ffn"] + [r"embed_tokens/.*",
                                                                              r"lm_head/.*"], tx), sparams)
  compiled = step.lower(state, batch, tparams if kind == "mimic" else None).compile()
  m = compiled.memory_analysis()
  peak = m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes
  return {"temp": m.temp_size_in_bytes / 2**20, "args": m.argument_size_in_bytes / 2**20,
          "peak": peak / 2**20}


def run(profile: bu.Profile, log=print) -> dict:
  p = profile
  teacher = models.build(p.mem_teacher.text(p.mem_vocab))
  student = models.build(moe.moe_text_config(p.mem_student.text(p.mem_vocab), 4, 2, "sparse"))
  tparams, sparams = _abstract(teacher), _abstract(student)
  ids = jax.ShapeDtypeStruct((p.mem_batch, p.mem_seq), jnp.int32)
  batch = {"input_ids": ids, "attention_mask": ids, "labels": ids}
  chunked = f"mimic, chunked KL ({p.mem_chunk} positions), fused LM heads"
  rows = {
      "student-only CE step (sft)": measure("sft", 0, teacher, tparams, student, sparams, batch),
      f"student-only CE step, chunked CE ({p.mem_chunk})": measure("sft", p.mem_chunk, teacher,
                                                                  tparams, student, sparams, batch),
      "mimic, naive KL": measure("mimic", 0, teacher, tparams, student, sparams, batch),
      f"mimic, chunked KL ({p.mem_chunk} positions), checkpointed chunks": measure(
          "mimic", p.mem_chunk, teacher, tparams, student, sparams, batch, fused=False),
      chunked: measure("mimic", p.mem_chunk, teacher, tparams, student, sparams, batch),
  }
  ce = rows["student-only CE step (sft)"]["peak"]
  ce_chunked = rows[f"student-only CE step, chunked CE ({p.mem_chunk})"]["peak"]
  for name, r in rows.items():
    r["x_ce"] = r["peak"] / ce
    r["x_ce_chunked"] = r["peak"] / ce_chunked
    log(f"  {name}: peak {r['peak']:.0f} MiB, x{r['x_ce']:.2f} CE step")
  return {"vocab": p.mem_vocab, "batch": p.mem_batch, "seq": p.mem_seq, "chunk": p.mem_chunk,
          "teacher": p.mem_teacher.describe(), "student": p.mem_student.describe(),
          "logits_mib": p.mem_batch * p.mem_seq * p.mem_vocab * 4 / 2**20, "rows": rows,
          "chunked_key": chunked}


def markdown(res: dict) -> str:
  lines = [
      f"XLA's compiled memory analysis of the whole jitted train step (arguments + outputs + "
      f"temporaries - donated aliases), vocabulary {res['vocab']:,}, batch {res['batch']} x "
      f"{res['seq']}, teacher {res['teacher']}, student {res['student']} with 4 experts top-2 on "
      f"layer 0, fp32; trainable: FFN/experts/router, embeddings and LM head. One [batch, seq, vocab] "
      f"fp32 tensor is {res['logits_mib']:.0f} MiB.",
      "",
      "| step | temporaries MiB | arguments MiB | peak MiB | x CE step | x chunked CE step |",
      "|---|---|---|---|---|---|",
  ]
  for name, r in res["rows"].items():
    x = f"**{r['x_ce']:.2f}**" if name == res["chunked_key"] else f"{r['x_ce']:.2f}"
    lines.append(f"| {name} | {r['temp']:.0f} | {r['args']:.0f} | {r['peak']:.0f} | {x} | "
                 f"{r['x_ce_chunked']:.2f} |")
  return "\n".join(lines)


def main():
  bu.section_main(run, markdown)


if __name__ == "__main__":
  main()
