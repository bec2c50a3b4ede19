"""How our mimic step's time scales with sequence length and with the number of experts.

    python bench/scaling.py [--quick]

Same teacher / student / loss as bench/train_step.py (naive KL, FFN/experts/router trainable). The
sequence sweep runs batch `scale_batch`; the experts sweep keeps top-2 and the expert width, so the
active FLOPs per token stay the same while the parameters grow with E. Variants of a sweep are timed
interleaved.
"""

from __future__ import annotations


import benchutil as bu
from llavamod_jax.train import flops as flop_count
import jax_steps as js


def _sweep(profile: bu.Profile, variants: dict, log) -> list[dict]:
  """variants: label -> (experts, batch, seq). Returns rows with median seconds and FLOP/s."""
  p = profile
  tcfg = p.teacher.text(p.vocab)
  teacher, tparams = js.build(tcfg, 0)
  fns, flops, tokens = {}, {}, {}
  for label, (experts, batch, seq) in variants.items():
    student, sparams = js.build_student(p.student.text(p.vocab), experts, p.top_k, p.moe_layers)
    arrays = bu.batch_arrays(p.vocab, batch, seq)
    fns[label] = js.make_step("mimic", student, sparams, teacher, tparams, batch=arrays, trainable="ffn")
    flops[label] = flop_count.mimic_flops(tcfg, student.cfg, batch, seq, "ffn")
    tokens[label] = batch * seq
  times = bu.interleaved(fns, p.scale_repeats, warmup=1)
  rows = []
  for label, (experts, batch, seq) in variants.items():
    t = bu.median(times[label])
    rows.append({"label": label, "experts": experts, "batch": batch, "seq": seq, "s": t,
                 "tps": tokens[label] / t, "flops": flops[label], "flops_per_s": flops[label] / t})
    log(f"  {label}: {1e3 * t:.0f} ms/step, {tokens[label] / t:,.0f} tokens/s, "
        f"{flops[label] / t / 1e9:.1f} GFLOP/s")
  return rows


def run(profile: bu.Profile, log=print) -> dict:
  p = profile
  seq_rows = _sweep(p, {f"seq {s}": (p.experts, p.scale_batch, s) for s in p.scale_seqs}, log)
  exp_rows = _sweep(p, {f"E={e}": (e, p.batch, p.scale_experts_seq) for e in p.scale_experts}, log)
  return {"seq": seq_rows, "experts": exp_rows, "batch": p.scale_batch, "experts_batch": p.batch,
          "experts_seq": p.scale_experts_seq, "top_k": p.top_k, "default_experts": p.experts,
          "repeats": p.scale_repeats}


def markdown(res: dict, peak: float | None = None) -> str:
  def mfu(r):
    return f" | {100 * r['flops_per_s'] / peak:.0f}%" if peak else ""

  head_mfu = " | MFU" if peak else ""
  sep_mfu = "---|" if peak else ""
  s0 = res["seq"][0]
  lines = [
      f"Mimic step, batch {res['batch']}, {res['default_experts']} experts top-{res['top_k']}; "
      f"median of {res['repeats']} interleaved steps. 'x per token' is the time per token relative "
      f"to the shortest sequence; 'x FLOPs' the analytic FLOPs per token relative to it (attention "
      f"grows linearly per token with the sequence).",
      "",
      f"| sequence | ms / step | tokens/s | GFLOP/s | x per token | x FLOPs per token{head_mfu} |",
      f"|---|---|---|---|---|---|{sep_mfu}",
  ]
  for r in res["seq"]:
    per_tok = (r["s"] / (r["batch"] * r["seq"])) / (s0["s"] / (s0["batch"] * s0["seq"]))
    fl_tok = (r["flops"] / (r["batch"] * r["seq"])) / (s0["flops"] / (s0["batch"] * s0["seq"]))
    lines.append(f"| {r['seq']} | {1e3 * r['s']:.0f} | {r['tps']:,.0f} | {r['flops_per_s'] / 1e9:.1f} | "
                 f"{per_tok:.2f} | {fl_tok:.2f}{mfu(r)} |")
  e0 = res["experts"][0]
  lines += [
      "",
      f"Experts sweep: batch {res['experts_batch']} x {res['experts_seq']}, top-{res['top_k']}, same "
      f"expert width (constant active FLOPs; parameters grow with E).",
      "",
      f"| experts | ms / step | tokens/s | x time of E={e0['experts']}{head_mfu} |",
      f"|---|---|---|---|{sep_mfu}",
  ]
  for r in res["experts"]:
    lines.append(f"| {r['experts']} | {1e3 * r['s']:.0f} | {r['tps']:,.0f} | {r['s'] / e0['s']:.2f}{mfu(r)} |")
  return "\n".join(lines)


def plot(res: dict, path) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.8))
  seqs = [r["seq"] for r in res["seq"]]
  a.plot(seqs, [1e3 * r["s"] for r in res["seq"]], "o-", label="measured")
  s0 = res["seq"][0]
  a.plot(seqs, [1e3 * s0["s"] * r["flops"] / s0["flops"] for r in res["seq"]], "--",
         label="analytic FLOPs, scaled")
  a.set_xscale("log", base=2)
  a.set_yscale("log")
  a.set_xticks(seqs, [str(s) for s in seqs])
  a.set_xlabel("sequence length")
  a.set_ylabel("ms per mimic step")
  a.set_title(f"step time vs sequence (batch {res['batch']})")
  a.legend()
  exps = [r["experts"] for r in res["experts"]]
  b.plot(exps, [1e3 * r["s"] for r in res["experts"]], "o-")
  b.set_xscale("log", base=2)
  b.set_xticks(exps, [str(e) for e in exps])
  b.set_ylim(bottom=0)
  b.set_xlabel(f"experts (top-{res['top_k']})")
  b.set_ylabel("ms per mimic step")
  b.set_title(f"step time vs experts ({res['experts_batch']} x {res['experts_seq']} tokens)")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main():
  bu.section_main(run, markdown)


if __name__ == "__main__":
  main()
