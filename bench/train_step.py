"""Train-step throughput against transformers + PyTorch, and MFU (see DESCRIPTION below).

    python bench/train_step.py [--quick]
"""

from __future__ import annotations


import numpy as np

import benchutil as bu
from llavamod_jax.train import flops as flop_count
import jax_steps as js


RESPONSE_FRAC = 0.35  # trained share of each row in the response-only mimic row


def _torch():
  import torch
  import transformers

  torch.set_num_threads(bu.cores())
  transformers.utils.logging.set_verbosity_error()
  transformers.utils.logging.disable_progress_bar()
  import torch_steps
  return torch, torch_steps


def torch_matmul_peak(n: int, repeats: int = 7) -> float:
  """`bu.matmul_peak` for torch: best f32 square-matmul FLOP/s at size n / 2 or n."""
  import time

  torch, _ = _torch()
  g = torch.Generator().manual_seed(0)
  best = 0.0
  for size in (n // 2, n):
    a, b = torch.randn(size, size, generator=g), torch.randn(size, size, generator=g)
    a @ b
    t = float("inf")
    for _ in range(repeats):
      t0 = time.perf_counter()
      a @ b
      t = min(t, time.perf_counter() - t0)
    best = max(best, 2 * size**3 / t)
  return best


def _row(name, times, ours, tokens, flops, xla, peak, loss_ours, loss_torch):
  """Ours against the faster of transformers with all cores and with one thread."""
  t_ours = bu.median(times[ours])
  by_threads = {bu.cores(): bu.median(times["torch"]), 1: bu.median(times["torch_1t"])}
  threads = min(by_threads, key=by_threads.get)
  t_torch = by_threads[threads]
  return {
      "name": name, "ours_s": t_ours, "torch_s": t_torch, "tokens": tokens,
      "torch_threads": threads, "torch_tps_by_threads": {n: tokens / t for n, t in by_threads.items()},
      "ours_tps": tokens / t_ours, "torch_tps": tokens / t_torch, "ratio": t_torch / t_ours,
      "flops": flops, "xla_flops": xla, "mfu": flops / t_ours / peak, "torch_mfu": flops / t_torch / peak,
      "loss_ours": loss_ours, "loss_torch": loss_torch,
      "loss_rel_diff": abs(loss_ours - loss_torch) / max(abs(loss_torch), 1e-12),
      "samples_ours": times[ours], "samples_torch": times["torch"], "samples_torch_1t": times["torch_1t"],
  }


def run(profile: bu.Profile, log=print) -> dict:
  torch, ts = _torch()
  p = profile
  peak = bu.matmul_peak(p.matmul_n)
  torch_peak = torch_matmul_peak(p.matmul_n)
  log(f"  matmul peak (f32, {p.matmul_n // 2} or {p.matmul_n} square): jnp.dot {peak / 1e9:.1f} "
      f"GFLOP/s, torch {torch_peak / 1e9:.1f}")
  tcfg, dense_cfg = p.teacher.text(p.vocab), p.student.text(p.vocab)
  teacher, tparams = js.build(tcfg, 0)
  dense, dparams = js.build(dense_cfg, 1)
  student, sparams = js.build_student(dense_cfg, p.experts, p.top_k, p.moe_layers)
  batch = bu.batch_arrays(p.vocab, p.batch, p.seq)
  tokens = p.batch * p.seq
  t_teacher = ts.load(teacher, tparams)
  rows = []

  # --- mimic ---------------------------------------------------------------------------------
  chunk = min(512, p.seq)
  default = js.steps.LossConfig().chunk_size  # what launch/train.py builds: the fused chunked loss
  # A LLaVA-like row: image tokens, system prompt and question untrained, the answer (the last
  # RESPONSE_FRAC of the row) trained; the chunked loss computes logits only where it is trained.
  resp_batch = bu.batch_arrays(p.vocab, p.batch, p.seq, prompt_frac=1 - RESPONSE_FRAC)
  mimic = lambda b=batch, **kw: js.make_step("mimic", student, sparams, teacher, tparams, batch=b,  # noqa: E731
                                             trainable="ffn", **kw)
  torch_mimic = lambda b=batch, threads=bu.cores(): ts.TorchStep(  # noqa: E731
      "mimic", ts.load(student, sparams), b, t_teacher, trainable="ffn", threads=threads)
  fns = {
      "ours": mimic(),
      "ours_full": mimic(chunk_size=0),
      "ours_chunked": mimic(chunk_size=chunk),
      "ours_chunked_ckpt": mimic(chunk_size=chunk, fused=False),
      "torch": torch_mimic(),
      "torch_1t": torch_mimic(threads=1),
      "ours_resp": mimic(resp_batch),
      "torch_resp": torch_mimic(resp_batch),
      "torch_resp_1t": torch_mimic(resp_batch, threads=1),
  }
  first = {n: _loss(f()) for n, f in fns.items()}  # compile + the losses at the shared start weights
  times = bu.interleaved(fns, p.step_repeats, warmup=0)
  flops = flop_count.mimic_flops(tcfg, student.cfg, p.batch, p.seq, "ffn")
  for name, key in ((f"mimic (KL + CE + aux), default: fused LM heads + loss, {default}-position "
                     "chunks", "ours"),
                    ("mimic, full logits", "ours_full"),
                    (f"mimic, fused, {chunk}-position chunks", "ours_chunked"),
                    (f"mimic, checkpointed {chunk}-position chunks", "ours_chunked_ckpt")):
    rows.append(_row(name, times, key, tokens, flops, js.xla_flops(fns[key]), peak, first[key],
                     first["torch"]))
  rows[0]["default"] = True
  resp = {"ours_resp": times["ours_resp"], "torch": times["torch_resp"],
          "torch_1t": times["torch_resp_1t"]}
  rows.append(_row(f"mimic, {100 * RESPONSE_FRAC:.0f}% response positions, default loss", resp,
                   "ours_resp", tokens, flops, js.xla_flops(fns["ours_resp"]), peak,
                   first["ours_resp"], first["torch_resp"]))
  rows[-1]["response_frac"] = RESPONSE_FRAC
  for r in rows:
    log(_summary(r))
  del fns

  # --- SFT: dense student (Qwen2), MoE student (Qwen2-MoE) ---------------------------------------
  for name, module, params in (("dense SFT (Qwen2 student)", dense, dparams),
                                ("MoE SFT (Qwen2-MoE student)", student, sparams)):
    # Both sides train from the same start weights (a fresh torch model: steps update it in place).
    fns = {"ours": js.make_step("sft", module, params, batch=batch, trainable="all"),
           "torch": ts.TorchStep("sft", ts.load(module, params), batch, trainable="all",
                                 threads=bu.cores()),
           "torch_1t": ts.TorchStep("sft", ts.load(module, params), batch, trainable="all", threads=1)}
    first = {n: _loss(f()) for n, f in fns.items()}
    times = bu.interleaved(fns, p.step_repeats, warmup=0)
    flops = flop_count.train_flops(module.cfg, p.batch, p.seq, "all")
    rows.append(_row(name, times, "ours", tokens, flops, js.xla_flops(fns["ours"]), peak,
                     first["ours"], first["torch"]))
    rows[-1]["sft"] = True
    log(_summary(rows[-1]))
    del fns

  return {"peak": peak, "torch_peak": torch_peak, "matmul_n": p.matmul_n, "rows": rows,
          "setup": {"teacher": p.teacher.describe(), "student": p.student.describe(), "vocab": p.vocab,
                    "batch": p.batch, "seq": p.seq, "experts": p.experts, "top_k": p.top_k,
                    "moe_layers": list(student.cfg.moe_layers), "repeats": p.step_repeats,
                    "threads": bu.cores(), "torch": torch.__version__}}


def _loss(metrics) -> float:
  return float(np.asarray(metrics["loss"]))


def _summary(r) -> str:
  return (f"  {r['name']}: ours {r['ours_tps']:,.0f} tok/s, torch {r['torch_tps']:,.0f} tok/s, "
          f"x{r['ratio']:.2f}, MFU {100 * r['mfu']:.0f}%")


DESCRIPTION = """\
Three steps, each timed interleaved (ours, transformers, ours, transformers, ...) in one process:
**mimic**, the paper's dense-to-sparse stage 1b (teacher forward without gradient + MoE student
forward/backward + AdamW; loss KL(teacher || student) + CE + 0.01 x load balancing; FFN / experts /
router trainable). Ours as `launch/train.py` builds it by default (`LossConfig`: both LM heads fused
into the loss, 128-position chunks, the student's logit gradient formed in the forward pass), then
with full logits, with the paper recipe's 512-position fused chunks, and with 512-position
checkpointed chunks (`LossConfig.fused=False`), on rows whose last 75% of positions are trained;
then the default step again on LLaVA-like rows where only the last 35% (the answer) is trained and
the rest (image tokens, system prompt, question) is not: the chunked loss moves each row's trained
positions to its front and skips the chunks that hold none, so both LM heads and the softmax / KL /
CE over the vocabulary run on the trained positions only. transformers computes the full logits of
every position there, as the original LLaVA-MoD code does (its MFU column counts the same analytic
FLOPs, full LM heads included, for both sides). **dense SFT** of the student before upcycling
(Qwen2) and **MoE SFT** of the upcycled student (Qwen2-MoE), every parameter trainable, CE (+ aux),
ours with the default loss (fused LM head + CE, 128-position chunks). Both sides start from the
same weights (ours exported with `hf.save`, loaded by `from_pretrained`), so the first step's losses
must agree (last column). Text-only language models: the step benchmark leaves out the vision tower,
which is frozen and runs once per image in both implementations.

MFU = analytic FLOPs / median step time / this run's best f32 `jnp.dot` rate on a square matmul.
Analytic FLOPs (`bench/benchutil.py`): 2 per multiply-add of every weight matmul (k active experts +
router), the full [seq, seq] attention matrix (QK^T and PV, no causal discount, PaLM's convention)
and the LM head; the teacher forward once; the student forward once, activation gradients twice the
forward (attention's two matmul inputs both need gradients) and weight gradients once per trainable
matmul. Elementwise work (softmax, RMSNorm, SwiGLU, the KL over the vocabulary, Adam) is not counted.
"XLA GFLOP" is XLA's cost analysis of the compiled step: it adds the chunked loss's recomputation
and elementwise ops, and counts the MoE kernel's and the chunk loop's bodies once per loop (XLA does
not know their trip counts).\
"""


def markdown(res: dict) -> str:
  s = res["setup"]
  lines = [
      f"Teacher Qwen2 {s['teacher']}, student {s['student']} upcycled to {s['experts']} experts "
      f"top-{s['top_k']} on layers {s['moe_layers']} (Qwen2-MoE, no shared expert); vocabulary "
      f"{s['vocab']:,}; batch {s['batch']} x {s['seq']} tokens; fp32; median of {s['repeats']} "
      f"interleaved steps; torch {s['torch']} eager, sdpa attention, transformers' default experts "
      f"kernel (`grouped_mm`), torch.optim.AdamW (foreach). transformers runs twice, interleaved "
      f"with ours: with `torch.set_num_threads({s['threads']})` (the core count) and with one "
      "thread; the ratio is against the faster of the two (on a loaded machine one thread can "
      "win: OpenMP's barriers wait for preempted threads).",
      "",
      f"| step | ours tokens/s | transformers tokens/s ({s['threads']} / 1 threads) | ours / transformers "
      "| ours MFU | transformers MFU | analytic GFLOP | XLA GFLOP | first-step loss ours / torch |",
      "|---|---|---|---|---|---|---|---|---|",
  ]
  for r in res["rows"]:
    by = r["torch_tps_by_threads"]
    cells = " / ".join(f"**{bu.fmt_rate(v)}**" if int(n) == r["torch_threads"] else bu.fmt_rate(v)
                       for n, v in sorted(by.items(), key=lambda kv: -int(kv[0])))
    lines.append(
        f"| {r['name']} | {bu.fmt_rate(r['ours_tps'])} | {cells} | "
        f"**{r['ratio']:.2f}** | {100 * r['mfu']:.0f}% | {100 * r['torch_mfu']:.0f}% | "
        f"{r['flops'] / 1e9:.1f} | {r['xla_flops'] / 1e9:.1f} | {r['loss_ours']:.5f} / "
        f"{r['loss_torch']:.5f} |")
  lines += ["", f"Matmul peak of this run: the best f32 square `jnp.dot` ({res['matmul_n'] // 2} or "
            f"{res['matmul_n']}, best of 7 each, measured here and again in the profile section; the "
            f"highest is used everywhere): {res['peak'] / 1e9:.1f} GFLOP/s; torch (MKL) measured "
            f"{res['torch_peak'] / 1e9:.1f} GFLOP/s the same way. Both MFU columns divide by the "
            "`jnp.dot` peak."]
  return "\n".join(lines)


def main():
  bu.section_main(run, markdown)


if __name__ == "__main__":
  main()
