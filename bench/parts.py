"""Where the mimic step's time goes: its parts timed separately, and the matmul throughput this CPU
reaches at the step's own matmul shapes (what MFU is measured against is one large square matmul).

    python bench/parts.py [--quick]

Parts (each jitted on its own, timed interleaved): the teacher forward with logits; the student's
gradient of CE + aux and of KL + CE + aux given the teacher's logits (their difference is the KL
over the vocabulary); the gradient of the whole mimic loss; AdamW alone on the trainable parameters;
the whole train step; the train step with the proposed einsum KL (`token_kl_einsum`); in the full
setting also the dense student (no MoE layer). Then a JAX profiler trace of the step, its op times
summed by category.
"""

from __future__ import annotations

import collections
import contextlib
import glob
import gzip
import json
import os
import re
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import optax

import benchutil as bu
from llavamod_jax.train import flops as flop_count
import jax_steps as js
from llavamod_jax import losses, moe
from llavamod_jax.train import optim, steps
from llavamod_jax.train.optim import merge, partition


def matmul_shapes(p: bu.Profile) -> dict[str, tuple[int, int, int]]:
  """(m, k, n) of the mimic step's largest matmul kinds, m = tokens of the batch."""
  m = p.batch * p.seq
  t, s = p.teacher, p.student
  return {
      f"teacher FFN [{m}x{t.hidden}]@[{t.hidden}x{t.inter}]": (m, t.hidden, t.inter),
      f"teacher LM head [{m}x{t.hidden}]@[{t.hidden}x{p.vocab}]": (m, t.hidden, p.vocab),
      f"student expert block [128x{s.hidden}]@[{s.hidden}x{s.inter}] x{p.top_k * m // 128}":
          (128, s.hidden, s.inter),
      f"student LM head [{m}x{s.hidden}]@[{s.hidden}x{p.vocab}]": (m, s.hidden, p.vocab),
      f"student attention q/o [{m}x{s.hidden}]@[{s.hidden}x{s.hidden}]": (m, s.hidden, s.hidden),
  }


def matmul_rate(m: int, k: int, n: int, repeats: int = 5) -> float:
  """Best FLOP/s of a jitted f32 [m, k] @ [k, n]."""
  import time

  rng = np.random.default_rng(0)
  a = jnp.asarray(rng.standard_normal((m, k)), jnp.float32)
  b = jnp.asarray(rng.standard_normal((k, n)), jnp.float32)
  f = jax.jit(jnp.dot)
  f(a, b).block_until_ready()
  best = float("inf")
  for _ in range(repeats):
    t0 = time.perf_counter()
    f(a, b).block_until_ready()
    best = min(best, time.perf_counter() - t0)
  return 2 * m * k * n / best


def _student_grads(student, trainable, frozen, batch, *, kl: bool):
  """jitted gradient of CE + aux (+ KL to given teacher logits) w.r.t. the trainable parameters."""
  kl_mask = losses.distill_mask(batch["labels"])

  def loss(tr, t_logits):
    out, state = student.apply({"params": merge(tr, frozen)}, batch["input_ids"], None,
                               batch["attention_mask"], train=True, mutable=["moe"])
    total = losses.cross_entropy(out.logits, batch["labels"])
    if kl:
      total = total + losses.kl_distillation(out.logits, t_logits, kl_mask)
    return total + 0.01 * moe.aux_losses(state.get("moe", {}))["load_balancing_loss"]

  return jax.jit(jax.grad(loss))


CATEGORIES = ("LM heads (matmul, with loss ops fused in)", "loss over the vocabulary (softmax, KL, CE)",
              "MLP / MoE", "attention", "other (norms, embeddings, optimizer, ...)")


def _category(op_name: str, shape: str, has_dot: bool, vocab: int) -> str:
  vocab_sized = re.search(rf"[\[,]{vocab}[\],]", shape) is not None
  if has_dot and (vocab_sized or "lm_head" in op_name or "logits" in op_name):
    return CATEGORIES[0]
  if vocab_sized or any(k in op_name for k in ("log_softmax", "take_along_axis", "jvp()/", "jvp())/")):
    return CATEGORIES[1]
  if "/mlp/" in op_name:
    return CATEGORIES[2]
  if "self_attn" in op_name:
    return CATEGORIES[3]
  return CATEGORIES[4]


def op_profile(step: js.JaxStep, vocab: int, steps: int = 3) -> dict:
  """Per-op device time of the compiled step from a JAX profiler trace, summed by category.

  Each traced op (fusion, dot, ...) is named in the compiled HLO; its `op_name` metadata and whether
  its fused computation contains a dot decide the category.
  """
  hlo = step.compiled.as_text()
  meta, calls, dots = {}, {}, set()
  current = None
  for line in hlo.splitlines():
    head = re.match(r"\s*%?([\w.\-]+) .*\{\s*$", line)
    if head and "=" not in line.split("{")[0]:
      current = head.group(1)
    if re.search(r"\sdot\(", line) and current:
      dots.add(current)
    m = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = (\S+) .*?op_name=\"([^\"]*)\"", line)
    if m:
      meta[m.group(1)] = (m.group(2), m.group(3))
      c = re.search(r"calls=%?([\w.\-]+)", line)
      if c:
        calls[m.group(1)] = c.group(1)
      if " dot(" in line:
        dots.add(m.group(1))
  with tempfile.TemporaryDirectory() as d:
    jax.profiler.start_trace(d, create_perfetto_trace=True)
    for _ in range(steps):
      step()
    jax.profiler.stop_trace()
    trace = glob.glob(os.path.join(d, "**", "*perfetto_trace.json.gz"), recursive=True)
    events = {}
    if trace:
      with gzip.open(trace[0]) as f:
        events = json.load(f)
  events = events.get("traceEvents", []) if isinstance(events, dict) else events
  per_op = collections.Counter()
  for e in events:
    if e.get("ph") == "X" and e.get("name") in meta:
      per_op[e["name"]] += e.get("dur", 0) / 1e3 / steps  # ms per step
  by_cat = {c: 0.0 for c in CATEGORIES}
  top = []
  for name, ms in per_op.items():
    shape, op = meta[name]
    has_dot = name in dots or calls.get(name) in dots
    cat = _category(op, shape, has_dot, vocab)
    by_cat[cat] += ms
    top.append({"ms": ms, "op": name, "shape": shape, "op_name": op, "category": cat})
  top.sort(key=lambda r: -r["ms"])
  return {"categories": by_cat, "total_ms": sum(by_cat.values()), "top": top[:8], "steps": steps}


def token_kl_einsum(student_logits, teacher_logits, temperature: float = 1.0, reverse: bool = False):
  """`losses.token_kl` with the sum over the vocabulary written as an einsum (the proposed change):
  XLA:CPU (jaxlib 0.10) lowers `jnp.sum(p * (logp - logq), -1)` to a YNNPACK reduce fusion that runs
  several times slower than the dot_general the einsum becomes."""
  s = jax.nn.log_softmax(student_logits.astype(jnp.float32) / temperature, axis=-1)
  t = jax.nn.log_softmax(teacher_logits.astype(jnp.float32) / temperature, axis=-1)
  logp, logq = (s, t) if reverse else (t, s)
  return jnp.einsum("...v,...v->...", jnp.exp(logp), logp - logq)


@contextlib.contextmanager
def patched(module, name, value):
  """Temporarily replace module.name while a step is traced and compiled (bench-only experiment)."""
  old = getattr(module, name)
  setattr(module, name, value)
  try:
    yield
  finally:
    setattr(module, name, old)


def run(profile: bu.Profile, log=print) -> dict:
  p = profile
  tcfg, dcfg = p.teacher.text(p.vocab), p.student.text(p.vocab)
  teacher, tparams = js.build(tcfg, 0)
  student, sparams = js.build_student(dcfg, p.experts, p.top_k, p.moe_layers)
  arrays = bu.batch_arrays(p.vocab, p.batch, p.seq)
  batch = {k: jnp.asarray(v) for k, v in arrays.items()}

  teacher_fwd = jax.jit(lambda tp, b: teacher.apply({"params": tp}, b["input_ids"],
                                                    attention_mask=b["attention_mask"]).logits)
  t_logits = teacher_fwd(tparams, batch)
  loss = steps.loss_fn("mimic", student, teacher, steps.LossConfig(ce_weight=1.0))
  trainable, frozen = partition(sparams, js.TRAINABLE["ffn"])
  mimic_grad = jax.jit(jax.grad(lambda tr, fr, tp, b: loss(merge(tr, fr), tp, b, None, True)[0]))
  ce_grad = _student_grads(student, trainable, frozen, batch, kl=False)
  kl_grad = _student_grads(student, trainable, frozen, batch, kl=True)
  full = js.make_step("mimic", student, sparams, teacher, tparams, batch=arrays, trainable="ffn")
  full()
  with patched(losses, "token_kl", token_kl_einsum):  # compiled now; the patch is gone afterwards
    proposed = js.make_step("mimic", student, sparams, teacher, tparams, batch=arrays,
                            trainable="ffn", lr=js.LR * (1 + 1e-7))  # another compile-cache key
    proposed()
  kl_now, kl_new = float(full.last["kl"]), float(proposed.last["kl"])
  tx, _ = optim.adamw(js.LR, total_steps=10_000, warmup_ratio=0.0, grad_clip_norm=0.0)
  opt_state = tx.init(trainable)
  grads = jax.tree.map(jnp.ones_like, trainable)

  @jax.jit
  def adamw(params, opt_state, grads):
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  n_trainable = sum(x.size for x in jax.tree.leaves(trainable))
  fns = {
      "teacher forward": lambda: teacher_fwd(tparams, batch).block_until_ready(),
      "student CE": lambda: jax.block_until_ready(ce_grad(trainable, t_logits)),
      "student KL + CE": lambda: jax.block_until_ready(kl_grad(trainable, t_logits)),
      "mimic gradient": lambda: jax.block_until_ready(mimic_grad(trainable, frozen, tparams, batch)),
      "adamw": lambda: jax.block_until_ready(adamw(trainable, opt_state, grads)),
      "train step": full,
      "train step, einsum KL": proposed,
  }
  dense_flops = None
  if p.name == "full":  # the dense student (no MoE layer): what the MoE dispatch adds
    dense, dparams = js.build(dcfg, 1)
    d_train, d_frozen = partition(dparams, js.TRAINABLE["ffn"])
    dense_grad = _student_grads(dense, d_train, d_frozen, batch, kl=False)
    fns["dense student CE"] = lambda: jax.block_until_ready(dense_grad(d_train, t_logits))
    dense_flops = flop_count.train_flops(dcfg, p.batch, p.seq, "ffn")
  times = {n: bu.median(t) for n, t in bu.interleaved(fns, p.step_repeats, warmup=1).items()}
  t_fwd = sum(flop_count.forward_flops(tcfg, p.batch, p.seq).values())
  s_train = flop_count.train_flops(student.cfg, p.batch, p.seq, "ffn")
  parts = [
      {"part": "teacher forward (logits)", "s": times["teacher forward"], "flops": t_fwd},
      {"part": "student forward + backward, CE + aux only", "s": times["student CE"], "flops": s_train},
      {"part": "+ KL over the vocabulary (student KL + CE - CE)",
       "s": times["student KL + CE"] - times["student CE"], "flops": 0.0},
      {"part": "mimic loss gradient (teacher + student, no optimizer)", "s": times["mimic gradient"],
       "flops": t_fwd + s_train},
      {"part": f"AdamW update alone ({n_trainable / 1e6:.1f} M trainable parameters)",
       "s": times["adamw"], "flops": 0.0},
      {"part": "whole step", "s": times["train step"], "flops": t_fwd + s_train},
  ]
  if dense_flops is not None:
    parts.insert(2, {"part": "dense student (no MoE layer) forward + backward, CE only",
                     "s": times["dense student CE"], "flops": dense_flops})
  for r in parts:
    r["flops_per_s"] = r["flops"] / r["s"] if r["s"] > 0 else float("nan")
    log(f"  {r['part']}: {1e3 * r['s']:.0f} ms" +
        (f", {r['flops_per_s'] / 1e9:.1f} GFLOP/s" if r["flops"] else ""))
  shapes = {name: matmul_rate(*mkn) for name, mkn in matmul_shapes(p).items()}
  for name, rate in shapes.items():
    log(f"  matmul {name}: {rate / 1e9:.1f} GFLOP/s")
  ops = op_profile(full, p.vocab)
  for cat, ms in ops["categories"].items():
    log(f"  profile: {cat}: {ms:.0f} ms ({ms / max(ops['total_ms'], 1e-9):.0%})")
  einsum = {"ratio": times["train step, einsum KL"] / times["train step"],
            "kl_rel_diff": abs(kl_new - kl_now) / max(abs(kl_now), 1e-12)}
  log(f"  train step with the einsum KL: x{einsum['ratio']:.2f} the step time (KL agrees to "
      f"{einsum['kl_rel_diff']:.1e})")
  return {"parts": parts, "matmuls": shapes, "times": times, "peak": bu.matmul_peak(p.matmul_n),
          "matmul_n": p.matmul_n, "batch": p.batch, "seq": p.seq, "ops": ops, "einsum_kl": einsum}


def markdown(res: dict) -> str:
  peak = res["peak"]
  lines = [f"Batch {res['batch']} x {res['seq']}, median of interleaved runs; 'x peak' divides by "
           f"the run's matmul peak ({peak / 1e9:.1f} GFLOP/s; see above).", "",
           "| part of the mimic step | ms | share of step | analytic GFLOP | GFLOP/s | x peak |",
           "|---|---|---|---|---|---|"]
  whole = res["parts"][-1]["s"]
  for r in res["parts"]:
    rate = f"{r['flops_per_s'] / 1e9:.1f} | {r['flops_per_s'] / peak:.0%}" if r["flops"] else "– | –"
    lines.append(f"| {r['part']} | {1e3 * r['s']:.0f} | {r['s'] / whole:.0%} | {r['flops'] / 1e9:.1f} | {rate} |")
  lines += ["", f"| matmul at the step's shapes (f32, jitted alone) | GFLOP/s | x peak "
            f"({peak / 1e9:.1f} GFLOP/s) |", "|---|---|---|"]
  for name, rate in res["matmuls"].items():
    lines.append(f"| {name} | {rate / 1e9:.1f} | {rate / peak:.0%} |")
  if res.get("einsum_kl"):
    e = res["einsum_kl"]
    lines += ["", f"The train step compiled with `token_kl_einsum` (the KL's sum over the vocabulary as "
              f"an einsum; proposed change 1): {e['ratio']:.2f}x the current step's time, KL equal to "
              f"{e['kl_rel_diff']:.0e}."]
  ops = res.get("ops")
  if ops and ops["total_ms"] > 0:
    lines += ["", f"JAX profiler trace of the train step ({ops['steps']} steps): time of the compiled "
              "program's ops by category (an op fused from several kinds counts under its largest "
              "part: a fusion that holds an LM-head matmul counts as LM head).", "",
              "| category | ms / step | share |", "|---|---|---|"]
    for cat, ms in ops["categories"].items():
      lines.append(f"| {cat} | {ms:.0f} | {ms / ops['total_ms']:.0%} |")
    lines += ["", "| slowest ops | ms / step | shape | from |", "|---|---|---|---|"]
    for r in ops["top"]:
      lines.append(f"| `{r['op']}` | {r['ms']:.0f} | `{r['shape']}` | "
                   f"`{r['op_name'].replace('jit(step)/', '')[-70:]}` |")
  return "\n".join(lines)


def main():
  bu.section_main(run, markdown)


if __name__ == "__main__":
  main()
