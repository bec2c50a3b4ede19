"""All benchmarks in one run: writes docs/benchmarks.md (tables + PNG plots) and prints the main ratios.

The report holds this run's numbers and one met / MISSED line per target; why the numbers are what
they are is written by hand in docs/benchmark_notes.md, which the report links to.

    python bench/run.py [--quick] [--out=docs/benchmarks.md]

  1. train steps (mimic, dense SFT, MoE SFT) against transformers + PyTorch   bench/train_step.py
  2. MFU of those steps against the same run's matmul peak                    bench/train_step.py
     the mimic step against Tunix's logit distillation (optional dependency)  bench/tunix_step.py
  3. MoE layer dispatch paths vs a dense FFN of the same active FLOPs         bench/moe_layer.py
  4. peak memory of the mimic step at vocabulary 151,936                      bench/mimic_memory.py
  5. step time vs sequence length and vs number of experts                    bench/scaling.py
  6. expert-parallel all-to-all vs GSPMD on 8 simulated devices               bench/expert_parallel.py
`--quick` uses smaller shapes and fewer repeats (minutes on 2 cores); the default is the full setting
the committed docs/benchmarks.md reports. `--profile=tiny` and `--only=...` exist for the smoke test.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(BENCH))

import benchutil as bu

SECTIONS = ("train_step", "tunix", "parts", "moe_layer", "memory", "scaling", "expert_parallel")
TARGETS = {"mimic_ratio": 1.5, "tunix_ratio": 1.5, "sft_ratio": 1.0, "mfu": 0.5, "moe_layer": 1.25,
           "memory": 1.3}
NOTES = ROOT / "docs" / "benchmark_notes.md"  # the reasoning behind the numbers, written by hand


def log(msg: str) -> None:
  print(msg, flush=True)


# ---------------------------------------------------------------------------------------------
# Running the sections.
# ---------------------------------------------------------------------------------------------


def run_expert_parallel(quick: bool, timeout: float) -> dict:
  """bench/expert_parallel.py in a subprocess with 8 simulated CPU devices (the device count is
  fixed when jax starts), so this process keeps its single device."""
  path = BENCH / "expert_parallel.py"
  if not path.exists():
    return {"skipped": "bench/expert_parallel.py does not exist"}
  flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=8".strip()
  env = {**os.environ, "XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu"}
  cmd = [sys.executable, str(path), "--json"] + (["--quick"] if quick else [])
  try:
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, check=False)
  except subprocess.TimeoutExpired:
    return {"skipped": f"timed out after {timeout:.0f} s"}
  if p.returncode:
    return {"skipped": f"failed (exit {p.returncode}): {p.stderr.strip().splitlines()[-1:]}"}
  try:
    return json.loads(p.stdout.strip().splitlines()[-1])
  except (ValueError, IndexError):
    return {"skipped": f"no JSON result line in its output: {p.stdout[-300:]!r}"}


def run_sections(profile: bu.Profile, only: tuple[str, ...]) -> dict:
  results, seconds = {}, {}
  load_start = os.getloadavg()[0]
  for name in only:
    t0 = time.perf_counter()
    log(f"[{name}]")
    if name == "train_step":
      import train_step
      results[name] = train_step.run(profile, log)
    elif name == "tunix":
      import tunix_step
      results[name] = tunix_step.run(profile, log)
    elif name == "parts":
      import parts
      results[name] = parts.run(profile, log)
    elif name == "moe_layer":
      import moe_layer
      results[name] = moe_layer.run(profile, log)
    elif name == "memory":
      import mimic_memory
      results[name] = mimic_memory.run(profile, log)
    elif name == "scaling":
      import scaling
      results[name] = scaling.run(profile, log)
    elif name == "expert_parallel" and profile.with_expert_parallel:
      quick = profile.name != "full"
      results[name] = run_expert_parallel(quick, timeout=240 if quick else 1200)
      log(f"  {_ep_summary(results[name])}")
    seconds[name] = time.perf_counter() - t0
    log(f"  ({seconds[name]:.0f} s)")
  results["machine"] = machine(results, profile)
  return {"results": results, "seconds": seconds, "load": (load_start, os.getloadavg()[0])}


def machine(results: dict, profile: bu.Profile) -> dict:
  """The CPU (model, ISA extensions) and both libraries' f32 square-matmul rates: taken from the
  train-step section when it ran, measured here otherwise (torch only when installed)."""
  out = bu.cpu()
  ts = results.get("train_step", {})
  out["jax_matmul_flops"] = ts.get("peak") or bu.matmul_peak(profile.matmul_n)
  out["torch_matmul_flops"] = ts.get("torch_peak")
  if out["torch_matmul_flops"] is None:
    try:
      import train_step
      out["torch_matmul_flops"] = train_step.torch_matmul_peak(profile.matmul_n)
    except ImportError:
      pass
  out["matmul_n"] = profile.matmul_n
  return out


def use_one_peak(results: dict) -> float | None:
  """MFU everywhere against the highest square-matmul rate any section measured (on a noisy machine
  a later measurement can land in a busy moment; the highest is the conservative choice)."""
  peaks = [results[k]["peak"] for k in ("train_step", "parts") if k in results]
  if not peaks:
    return None
  peak = max(peaks)
  for k in ("train_step", "parts"):
    if k in results:
      results[k]["peak_measured"] = results[k]["peak"]
      results[k]["peak"] = peak
  for r in results.get("train_step", {}).get("rows", []):
    r["mfu"] = r["flops"] / r["ours_s"] / peak
    r["torch_mfu"] = r["flops"] / r["torch_s"] / peak
  for r in results.get("tunix", {}).get("rows", []):
    r["mfu"], r["tunix_mfu"] = r["flops"] / r["ours_s"] / peak, r["flops"] / r["tunix_s"] / peak
  return peak


# ---------------------------------------------------------------------------------------------
# Targets and the summary line.
# ---------------------------------------------------------------------------------------------


def _mimic_row(res):
  """The mimic step as launch/train.py builds it by default (the row marked default)."""
  rows = res["train_step"]["rows"]
  return next((r for r in rows if r.get("default")), rows[0])


def targets(results: dict) -> list[dict]:
  """One entry per target the issues set: measured value, goal, met or not."""
  out = []
  if "train_step" in results:
    r = _mimic_row(results)
    out.append({"what": "mimic step (MoE student) vs transformers (tokens/s ratio)",
                "goal": f">= {TARGETS['mimic_ratio']}x", "value": f"{r['ratio']:.2f}x",
                "met": r["ratio"] >= TARGETS["mimic_ratio"]})
    for x in results["train_step"]["rows"]:
      if x.get("sft"):
        out.append({"what": f"{x['name'].split(' (')[0]} step vs transformers (tokens/s ratio)",
                    "goal": f">= {TARGETS['sft_ratio']}x", "value": f"{x['ratio']:.2f}x",
                    "met": x["ratio"] >= TARGETS["sft_ratio"]})
    out.append({"what": "MFU of the mimic step (analytic FLOPs / jnp.dot peak)",
                "goal": f">= {TARGETS['mfu']:.0%}", "value": f"{r['mfu']:.0%}",
                "met": r["mfu"] >= TARGETS["mfu"]})
  if "tunix" in results and "rows" in results["tunix"]:
    r = next(x for x in results["tunix"]["rows"] if x.get("default"))
    out.append({"what": "mimic step (dense student) vs Tunix (tokens/s ratio)",
                "goal": f">= {TARGETS['tunix_ratio']}x", "value": f"{r['ratio']:.2f}x",
                "met": r["ratio"] >= TARGETS["tunix_ratio"]})
  if "moe_layer" in results:
    res = results["moe_layer"]
    worst = max(res["rows"], key=lambda r: r["ratios"][res["default"]])
    top2 = [r["ratios"][res["default"]] for r in res["rows"] if r["k"] == 2]
    v = worst["ratios"][res["default"]]
    note = f" (top-2: {max(top2):.2f}x)" if top2 and worst["k"] != 2 else ""
    out.append({"what": "MoE layer, dropless default (blocked) vs dense FFN of equal active FLOPs, "
                "worst E/k", "goal": f"<= {TARGETS['moe_layer']}x",
                "value": f"{v:.2f}x at E={worst['experts']} k={worst['k']}{note}",
                "met": v <= TARGETS["moe_layer"]})
  if "memory" in results:
    res = results["memory"]
    r = res["rows"][res["chunked_key"]]
    out.append({"what": "mimic peak memory, chunked KL vs student-only CE step (vocab 151,936)",
                "goal": f"<= {TARGETS['memory']}x",
                "value": f"{r['x_ce']:.2f}x ({r['x_ce_chunked']:.2f}x a chunked-CE step)",
                "met": r["x_ce"] <= TARGETS["memory"]})
  return out


def _ep_summary(res: dict) -> str:
  if "skipped" in res:
    return f"expert parallel: skipped ({res['skipped']})"
  ratio = res.get("ratio", {})
  return "expert parallel: " + ", ".join(f"{k} x{v:.2f}" for k, v in ratio.items())


def final_line(results: dict, seconds: float) -> str:
  parts = []
  if "train_step" in results:
    rows = results["train_step"]["rows"]
    r = _mimic_row(results)
    parts.append(f"mimic x{r['ratio']:.2f} transformers "
                 f"({r['ours_tps']:,.0f} vs {r['torch_tps']:,.0f} tok/s)")
    resp = [x for x in rows if "response_frac" in x]
    parts += [f"mimic {x['response_frac']:.0%} response x{x['ratio']:.2f}" for x in resp]
    parts.append(", ".join(f"{x['name'].split(' (')[0]} x{x['ratio']:.2f}" for x in rows
                           if x.get("sft")))
    parts.append(f"MFU {r['mfu']:.0%}")
  if "tunix" in results:
    res = results["tunix"]
    parts.append("Tunix: skipped" if "skipped" in res else
                 "mimic x{:.2f} Tunix".format(next(x for x in res["rows"] if x.get("default"))["ratio"]))
  if "moe_layer" in results:
    res = results["moe_layer"]
    ratios = [r["ratios"][res["default"]] for r in res["rows"]]
    parts.append(f"MoE layer blocked x{min(ratios):.2f}-{max(ratios):.2f} dense-equivalent")
  if "memory" in results:
    res = results["memory"]
    parts.append(f"memory chunked x{res['rows'][res['chunked_key']]['x_ce']:.2f} CE step")
  if "scaling" in results:
    seq = results["scaling"]["seq"]
    per_tok = (seq[-1]["s"] / seq[-1]["seq"]) / (seq[0]["s"] / seq[0]["seq"])
    exp = results["scaling"]["experts"]
    parts.append(f"seq {seq[0]['seq']}->{seq[-1]['seq']} x{per_tok:.2f} per token, "
                 f"E {exp[0]['experts']}->{exp[-1]['experts']} x{exp[-1]['s'] / exp[0]['s']:.2f}")
  if "expert_parallel" in results:
    parts.append(_ep_summary(results["expert_parallel"]))
  met = [t for t in targets(results)]
  parts.append(f"targets met {sum(t['met'] for t in met)}/{len(met)}")
  parts.append(f"{seconds:.0f} s")
  return "BENCH " + " | ".join(parts)


# ---------------------------------------------------------------------------------------------
# Plots.
# ---------------------------------------------------------------------------------------------


def _plt():
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  return plt


def plot_steps(res: dict, path: Path) -> None:
  plt = _plt()
  rows = res["rows"]
  fig, ax = plt.subplots(figsize=(8, 3.6))
  xs = range(len(rows))
  ax.bar([x - 0.2 for x in xs], [r["ours_tps"] for r in rows], 0.4, label="ours (JAX, jit)")
  ax.bar([x + 0.2 for x in xs], [r["torch_tps"] for r in rows], 0.4, label="transformers + PyTorch")
  for x, r in zip(xs, rows, strict=True):
    ax.text(x - 0.2, r["ours_tps"], f"x{r['ratio']:.2f}", ha="center", va="bottom", fontsize=8)
  labels = [r["name"].replace(" (", "\n(").replace(", ", ",\n") for r in rows]
  ax.set_xticks(list(xs), labels, fontsize=7)
  ax.set_ylabel("tokens / s")
  ax.set_title("train step throughput (CPU, fp32; higher is better)")
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def plot_moe(res: dict, path: Path) -> None:
  plt = _plt()
  rows = res["rows"]
  names = [n for n in rows[0]["ratios"] if n != "dense-equivalent FFN"]
  fig, ax = plt.subplots(figsize=(8, 3.6))
  width = 0.8 / len(names)
  for i, n in enumerate(names):
    ax.bar([j + (i - len(names) / 2 + 0.5) * width for j in range(len(rows))],
           [r["ratios"].get(n, math.nan) for r in rows], width, label=n)
  ax.axhline(1.0, color="k", lw=0.8)
  ax.axhline(TARGETS["moe_layer"], color="r", lw=0.8, ls="--",
             label=f"target {TARGETS['moe_layer']}x")
  ax.set_xticks(range(len(rows)), [f"E={r['experts']} k={r['k']}" for r in rows])
  ax.set_ylabel("time / dense-equivalent FFN")
  ax.set_yscale("log")
  ax.yaxis.set_major_formatter(plt.matplotlib.ticker.FormatStrFormatter("%g"))
  ax.yaxis.set_minor_formatter(plt.matplotlib.ticker.NullFormatter())
  ax.set_yticks([0.5, 0.75, 1, 1.25, 2, 3, 5])
  ax.set_title("MoE block forward + backward (lower is better)")
  ax.legend(fontsize=7, ncol=3, loc="upper center", bbox_to_anchor=(0.5, -0.1))
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def plot_memory(res: dict, path: Path) -> None:
  plt = _plt()
  names = list(res["rows"])
  fig, ax = plt.subplots(figsize=(8, 3.2))
  temp = [res["rows"][n]["temp"] for n in names]
  peak = [res["rows"][n]["peak"] for n in names]
  ax.barh(names, peak, label="peak (arguments + temporaries - donated)")
  ax.barh(names, temp, label="temporaries", alpha=0.7)
  ax.invert_yaxis()
  ax.set_xlabel("MiB")
  ax.set_title(f"train-step memory at vocabulary {res['vocab']:,} (XLA memory analysis)")
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


# ---------------------------------------------------------------------------------------------
# The report.
# ---------------------------------------------------------------------------------------------


def status_lines(results: dict, section: str) -> list[str]:
  """One line per target the section measures: met or MISSED, with the measured value."""
  return [f"**Target: {t['what']} {t['goal']} — {'met' if t['met'] else 'MISSED'}** "
          f"(measured {t['value']})." for t in targets({section: results[section]})]


def report(run: dict, profile: bu.Profile, images: Path, out: Path, total_s: float) -> str:
  """The tables and plots of this run; the reasoning stays in docs/benchmark_notes.md."""
  results = run["results"]
  rel = os.path.relpath(images, out.parent)
  notes = os.path.relpath(NOTES, out.parent)

  def close(section: str, anchor: str) -> list[str]:  # each line its own paragraph
    why = f"Why: [benchmark notes]({notes}#{anchor})."
    return [x for line in (*status_lines(results, section), why) for x in ("", line)]

  lines = [
      "# Benchmarks",
      "",
      f"Written by `python bench/run.py{' --quick' if profile.name == 'quick' else ''}` "
      f"({profile.name} setting, {total_s / 60:.1f} min) on {platform.machine()} with "
      f"{bu.cores()} CPU cores, no accelerator; jax {_version('jax')}, "
      f"transformers {_version('transformers')}, torch {_version('torch')}; load average "
      f"{run['load'][0]:.1f} at the start, {run['load'][1]:.1f} at the end. The machine is shared "
      "and noisy, so every comparison times its variants interleaved (A, B, A, B, ...) in one run "
      "and reports medians and ratios measured in that same run: compare ratios, not absolute "
      "times. Why the numbers are what they are, and the changes to package code they led to: "
      f"[benchmark notes]({notes}) (written by hand).",
      "",
      *_machine_lines(results.get("machine")),
      "## Targets",
      "",
      "| target | goal | measured | |",
      "|---|---|---|---|",
  ]
  for t in targets(results):
    lines.append(f"| {t['what']} | {t['goal']} | {t['value']} | "
                 f"{'met' if t['met'] else '**missed**'} |")
  if "train_step" in results:
    import train_step
    plot_steps(results["train_step"], images / "bench_train_steps.png")
    lines += ["", "## 1-2. Train steps vs transformers + PyTorch, and MFU", "",
              "`bench/train_step.py`. " + train_step.DESCRIPTION, "",
              train_step.markdown(results["train_step"]), "",
              f"![train step throughput]({rel}/bench_train_steps.png)",
              *close("train_step", "train-steps-vs-transformers")]
  if "tunix" in results:
    import tunix_step
    lines += ["", "### The mimic step against Tunix, the JAX peer", "",
              "`bench/tunix_step.py`. " + tunix_step.DESCRIPTION, "",
              tunix_step.markdown(results["tunix"]), *close("tunix", "the-jax-peer-tunix")]
  if "parts" in results:
    import parts
    lines += ["", "### Where the mimic step's time goes", "",
              "`bench/parts.py`. " + parts.__doc__.split("\n\n", 2)[2].strip(), "",
              parts.markdown(results["parts"]), *close("parts", "mfu-and-the-profile")]
  if "moe_layer" in results:
    import moe_layer
    plot_moe(results["moe_layer"], images / "bench_moe_layer.png")
    lines += ["", "## 3. MoE layer: dispatch paths vs a dense FFN of the same active FLOPs", "",
              "`bench/moe_layer.py`. " + moe_layer.markdown(results["moe_layer"]), "",
              f"![MoE layer ratios]({rel}/bench_moe_layer.png)", *close("moe_layer", "moe-layer")]
  if "memory" in results:
    import mimic_memory
    plot_memory(results["memory"], images / "bench_memory.png")
    lines += ["", "## 4. Mimic step peak memory at vocabulary 151,936", "",
              "`bench/mimic_memory.py`. " + mimic_memory.markdown(results["memory"]), "",
              f"![memory]({rel}/bench_memory.png)", *close("memory", "memory")]
  if "scaling" in results:
    import scaling
    peak = results.get("train_step", {}).get("peak")
    scaling.plot(results["scaling"], images / "bench_scaling.png")
    lines += ["", "## 5. Scaling with sequence length and number of experts", "",
              "`bench/scaling.py`. " + scaling.markdown(results["scaling"], peak), "",
              f"![scaling]({rel}/bench_scaling.png)", *close("scaling", "scaling")]
  if "expert_parallel" in results:
    lines += ["", "## 6. Expert parallelism: shard_map all-to-all vs GSPMD", "",
              "`bench/expert_parallel.py` (in a subprocess with "
              "`XLA_FLAGS=--xla_force_host_platform_device_count=8`).", "",
              _ep_markdown(results["expert_parallel"])]
  lines += ["", "## Section times", "", "| section | seconds |", "|---|---|"]
  lines += [f"| {k} | {v:.0f} |" for k, v in run["seconds"].items()]
  return "\n".join(lines) + "\n"


def _machine_lines(m: dict | None) -> list[str]:
  if not m:
    return []
  torch = m.get("torch_matmul_flops")
  return [f"CPU: {m['cpu']}; ISA extensions: {', '.join(m['isa']) or 'none found'}. Best f32 "
          f"square matmul ({m['matmul_n'] // 2} or {m['matmul_n']}): `jnp.dot` "
          f"{m['jax_matmul_flops'] / 1e9:.1f} GFLOP/s"
          + (f", torch {torch / 1e9:.1f} GFLOP/s (torch / jnp.dot {torch / m['jax_matmul_flops']:.2f})"
             if torch else "") + ".", ""]


def _ep_markdown(res: dict) -> str:
  if "skipped" in res:
    return f"Not measured in this run: {res['skipped']}."
  try:
    import expert_parallel
    return expert_parallel.table(res)
  except (ImportError, AttributeError, KeyError, TypeError, ValueError):  # its format changed: raw
    return "```\n" + json.dumps(res, indent=1, default=str) + "\n```"


def _version(pkg: str) -> str:
  from importlib import metadata
  try:
    return metadata.version(pkg)
  except metadata.PackageNotFoundError:
    return "?"


def main(argv=None) -> dict:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--quick", action="store_true", help="smaller shapes, fewer repeats (minutes)")
  ap.add_argument("--out", default=str(ROOT / "docs" / "benchmarks.md"))
  ap.add_argument("--images", default=None, help="PNG folder (default: images/ beside --out)")
  ap.add_argument("--profile", choices=sorted(bu.PROFILES), default=None, help=argparse.SUPPRESS)
  ap.add_argument("--only", default=",".join(SECTIONS),
                  help=f"comma-separated subset of {SECTIONS}")
  ap.add_argument("--json", default=None, help="also write the raw results as JSON here")
  args = ap.parse_args(argv)
  profile = bu.PROFILES[args.profile or ("quick" if args.quick else "full")]
  only = tuple(s for s in args.only.split(",") if s)
  unknown = set(only) - set(SECTIONS)
  if unknown:
    ap.error(f"--only: unknown sections {sorted(unknown)}; expected some of {SECTIONS}")
  out = Path(args.out)
  images = Path(args.images) if args.images else out.parent / "images"
  images.mkdir(parents=True, exist_ok=True)
  t0 = time.perf_counter()
  run = run_sections(profile, only)
  use_one_peak(run["results"])
  total = time.perf_counter() - t0
  out.write_text(report(run, profile, images, out, total))
  if args.json:
    Path(args.json).write_text(json.dumps(run, indent=1, default=str))
  line = final_line(run["results"], time.perf_counter() - t0)
  log(f"wrote {out}")
  log(line)
  return {**run, "final_line": line}


if __name__ == "__main__":
  main()
