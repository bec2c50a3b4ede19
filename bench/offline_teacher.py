"""The mimic step from stored top-k teacher logits (teacher.init=offline) against the step with the
teacher in memory: step time (interleaved, same run) at the train-step benchmark's sizes, and peak
memory (XLA's compiled memory analysis) at the memory benchmark's sizes (vocabulary 151,936).

    python bench/offline_teacher.py [--quick]

Both steps are `steps.make_train_step("mimic", ...)`: KL + CE + 0.01 aux, AdamW, the student's FFN
and experts trainable. The offline step's batch carries the teacher's top-k (k = 64 by default) log-
probabilities, ids and log-sum-exp at every position, computed once from the same teacher; its
time excludes reading them from disk (the data pipeline does that on the host, ahead of the step).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import benchutil as bu
import jax_steps as js
from llavamod_jax import models, moe
from llavamod_jax.train import optim, steps

TOP_K = 64


def teacher_topk(teacher, tparams, batch, k: int):
  """The stored fields of every position (as data.teacher_logits places them), from the teacher."""
  out, _ = models.forward(teacher, tparams, batch)
  z = out.logits.astype(jnp.float32)
  lse = jax.nn.logsumexp(z, axis=-1)
  values, ids = jax.lax.top_k(z, k)
  return {"teacher_topk_logits": values, "teacher_topk_ids": ids.astype(jnp.int32),
          "teacher_logsumexp": lse}


def _step(student, teacher, chunk: int):
  tx, _ = optim.adamw(js.LR, total_steps=10_000, warmup_ratio=0.0, grad_clip_norm=0.0)
  cfg = steps.LossConfig(ce_weight=1.0, chunk_size=chunk)
  return tx, steps.make_train_step("mimic", student, teacher, tx, cfg)


def time_steps(p: bu.Profile, log=print) -> dict:
  teacher, tparams = js.build(p.teacher.text(p.vocab), seed=0)
  student, sparams = js.build_student(p.student.text(p.vocab), p.experts, p.top_k, p.moe_layers)
  batch = {k: jnp.asarray(v) for k, v in bu.batch_arrays(p.vocab, p.batch, p.seq).items()}
  stored = {**batch, **jax.jit(lambda b: teacher_topk(teacher, tparams, b, TOP_K))(batch)}
  runs = {}
  for name, t, b, tp in (("teacher in memory", teacher, batch, tparams),
                         (f"stored top-{TOP_K}", None, stored, None)):
    tx, step = _step(student, t, 0)
    state = steps.init_state(jax.tree.map(jnp.copy, sparams), js.TRAINABLE["ffn"], tx)
    compiled = step.lower(state, b, tp).compile()
    holder = {"state": state}

    def run(compiled=compiled, holder=holder, b=b, tp=tp):
      holder["state"], m = compiled(holder["state"], b, tp)
      return jax.block_until_ready(m)

    runs[name] = run
  times = bu.interleaved(runs, p.step_repeats)
  tokens = p.batch * p.seq
  out = {name: {"median_s": bu.median(ts), "tokens_per_s": tokens / bu.median(ts)}
         for name, ts in times.items()}
  online, offline = out["teacher in memory"], out[f"stored top-{TOP_K}"]
  out["speedup"] = online["median_s"] / offline["median_s"]
  log(f"  step time: teacher in memory {online['median_s'] * 1e3:.0f} ms, stored top-{TOP_K} "
      f"{offline['median_s'] * 1e3:.0f} ms: x{out['speedup']:.2f}")
  return out


def _abstract(model):
  return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype),
                      nn.unbox(models.abstract_params(model)))


def memory(p: bu.Profile, log=print) -> dict:
  teacher = models.build(p.mem_teacher.text(p.mem_vocab))
  student = models.build(moe.moe_text_config(p.mem_student.text(p.mem_vocab), 4, 2, "sparse"))
  tparams, sparams = _abstract(teacher), _abstract(student)
  b, s = p.mem_batch, p.mem_seq
  ids = jax.ShapeDtypeStruct((b, s), jnp.int32)
  batch = {"input_ids": ids, "attention_mask": ids, "labels": ids}
  stored = {**batch, "teacher_topk_logits": jax.ShapeDtypeStruct((b, s, TOP_K), jnp.float32),
            "teacher_topk_ids": jax.ShapeDtypeStruct((b, s, TOP_K), jnp.int32),
            "teacher_logsumexp": jax.ShapeDtypeStruct((b, s), jnp.float32)}
  rows = {}
  for chunk in (0, p.mem_chunk):
    for name, t, bb, tp in (("teacher in memory", teacher, batch, tparams),
                            (f"stored top-{TOP_K}", None, stored, None)):
      tx, step = _step(student, t, chunk)
      state = jax.eval_shape(lambda q, tx=tx: steps.init_state(q, js.TRAINABLE["ffn"], tx), sparams)
      m = step.lower(state, bb, tp).compile().memory_analysis()
      peak = (m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
              - m.alias_size_in_bytes)
      label = f"{name}, {'chunked KL (' + str(chunk) + ')' if chunk else 'full logits'}"
      rows[label] = {"peak": peak / 2**20, "temp": m.temp_size_in_bytes / 2**20,
                     "args": m.argument_size_in_bytes / 2**20}
      log(f"  {label}: peak {rows[label]['peak']:.0f} MiB")
  return {"rows": rows, "teacher": p.mem_teacher.describe(), "student": p.mem_student.describe(),
          "vocab": p.mem_vocab, "batch": b, "seq": s}


def run(profile: bu.Profile, log=print) -> dict:
  return {"profile": profile.name, "time": time_steps(profile, log), "memory": memory(profile, log),
          "sizes": {"teacher": profile.teacher.describe(), "student": profile.student.describe(),
                    "vocab": profile.vocab, "batch": profile.batch, "seq": profile.seq}}


def markdown(res: dict) -> str:
  t, m, z = res["time"], res["memory"], res["sizes"]
  on, off = t["teacher in memory"], t[f"stored top-{TOP_K}"]
  lines = [
      f"Step time ({res['profile']} profile: teacher {z['teacher']}, student {z['student']} "
      f"upcycled to 4 experts top-2, vocabulary {z['vocab']:,}, batch {z['batch']} x {z['seq']}, "
      "fp32, medians of interleaved steps):",
      "",
      "| mimic step | ms | tokens/s |",
      "|---|---|---|",
      f"| teacher in memory | {on['median_s'] * 1e3:.0f} | {on['tokens_per_s']:,.0f} |",
      f"| stored top-{TOP_K} | {off['median_s'] * 1e3:.0f} | {off['tokens_per_s']:,.0f} |",
      "",
      f"Offline / online step time: **{1 / t['speedup']:.2f}** (x{t['speedup']:.2f} faster).",
      "",
      f"Peak memory (XLA's analysis of the compiled step; teacher {m['teacher']}, student "
      f"{m['student']}, vocabulary {m['vocab']:,}, batch {m['batch']} x {m['seq']}):",
      "",
      "| mimic step | peak MiB | temporaries MiB | arguments MiB |",
      "|---|---|---|---|",
  ]
  for name, r in m["rows"].items():
    lines.append(f"| {name} | {r['peak']:.0f} | {r['temp']:.0f} | {r['args']:.0f} |")
  return "\n".join(lines)


def main():
  bu.section_main(run, markdown)


if __name__ == "__main__":
  main()
