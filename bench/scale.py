"""docs/scale.md: every paper stage planned for every TPU slice it is meant for, from config files.

    pip install -e ".[tpu]"        # libtpu: compile-only TPU devices on any machine
    python bench/scale.py [--stages=d2s,preference] [--slices=v5p-8] [--student=0.5b|1.5b]

Writes config-only HF directories of the paper's models (a CLIP-L/336 + Qwen2-7B LLaVA teacher, a
CLIP-L/336 + Qwen2-0.5B (or 1.5B) student, the CLIP tower and the Qwen2 LLM the adaptor stage
composes) from their published hyperparameters — no weights, no network — then runs
`launch/plan.py` once per (stage, slice) in its own process and writes the table to docs/scale.md
(plan.json files next to the model directories). A failed plan is a row that says why, never a
missing row.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SLICES = ("v4-8", "v5e-8", "v5e-16", "v5p-8", "v5p-16", "v6e-8")
GiB = 2**30

# The published configurations (config.json of Qwen/Qwen2-7B, Qwen/Qwen2-0.5B, Qwen/Qwen2-1.5B and
# openai/clip-vit-large-patch14-336); only what the models compute with.
QWEN2 = {
    "7b": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
               num_attention_heads=28, num_key_value_heads=4, vocab_size=152064,
               tie_word_embeddings=False),
    "1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                 num_attention_heads=12, num_key_value_heads=2, vocab_size=151936,
                 tie_word_embeddings=True),
    "0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                 num_attention_heads=14, num_key_value_heads=2, vocab_size=151936,
                 tie_word_embeddings=True),
}
CLIP_L_336 = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                  num_attention_heads=16, image_size=336, patch_size=14, projection_dim=768,
                  hidden_act="quick_gelu")

# (stage label, config, flags): the student of the later stages is planned from an HF directory,
# as its earlier stage's workdir would give it (upcycled where the stage's student is MoE).
STAGES = {
    "adaptor": ("configs/adaptor.py:paper", lambda d: [
        f"--config.student.vision_hf_dir={d / 'clip'}", f"--config.student.llm_hf_dir={d / 'llm'}"]),
    "d2d": ("configs/mimic.py:d2d_paper", lambda d: [
        f"--config.teacher.hf_dir={d / 'teacher'}", "--config.student.init=hf",
        f"--config.student.hf_dir={d / 'student'}"]),
    "d2s": ("configs/mimic.py:d2s_paper", lambda d: [
        f"--config.teacher.hf_dir={d / 'teacher'}", "--config.student.init=hf",
        f"--config.student.hf_dir={d / 'student'}"]),
    "preference": ("configs/preference.py:paper", lambda d: [
        f"--config.teacher.hf_dir={d / 'teacher'}", "--config.student.init=hf",
        f"--config.student.hf_dir={d / 'student'}", "--config.student.upcycle.num_experts=4"]),
}


def write_models(root: Path, student: str) -> None:
  import transformers

  def text(size):
    return transformers.Qwen2Config(rope_theta=1_000_000.0, max_position_embeddings=32768,
                                    rms_norm_eps=1e-6, **QWEN2[size])

  def llava(size):
    t = text(size)
    return transformers.LlavaConfig(vision_config=transformers.CLIPVisionConfig(**CLIP_L_336),
                                    text_config=t, image_token_id=t.vocab_size - 1,
                                    vision_feature_layer=-2,
                                    vision_feature_select_strategy="default")

  llava("7b").save_pretrained(root / "teacher")
  llava(student).save_pretrained(root / "student")
  transformers.CLIPVisionConfig(**CLIP_L_336).save_pretrained(root / "clip")
  text(student).save_pretrained(root / "llm")


def plan_one(root: Path, stage: str, slice_: str, timeout: int, compare: bool = False,
             extra: tuple[str, ...] = ()) -> dict:
  config, flags = STAGES[stage]
  label = f"{stage} ({' '.join(extra)})" if extra else stage
  tag = "".join(c if c.isalnum() else "_" for c in " ".join(extra))
  out = root / f"{stage}_{slice_}{'_attention' if compare else ''}{'_' + tag if tag else ''}.json"
  cmd = [sys.executable, str(REPO / "launch" / "plan.py"), f"--config={REPO / config}",
         f"--topology={slice_}", "--config.mesh.data=1", "--config.mesh.fsdp=-1", *flags(root),
         *extra, f"--out={out}", *(["--compare_attention"] if compare else [])]
  env = {**os.environ, "TPU_SKIP_MDS_QUERY": "1", "TRANSFORMERS_VERBOSITY": "error"}
  t0 = time.time()
  try:
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
  except subprocess.TimeoutExpired:
    return {"stage": label, "slice": slice_, "error": f"no plan within {timeout} s"}
  if out.exists() and p.returncode in (0, 1):
    return {**json.loads(out.read_text()), "stage": label, "slice": slice_,  # d2d, not "mimic"
            "wall_seconds": round(time.time() - t0, 1)}
  lines = [l for l in p.stderr.splitlines() if l.strip() and "WARNING" not in l]
  return {"stage": label, "slice": slice_, "error": lines[-1] if lines else f"exit {p.returncode}"}


def _smallest(rows: list[dict], stage: str) -> str:
  fits = [r for r in rows if r["stage"] == stage and r.get("fits")]
  if not fits:
    return "none of these"
  return min(fits, key=lambda r: (r["num_chips"], r["hbm_bytes_per_chip"]))["slice"]


def attention_table(rows: list[dict]) -> str:
  """The configured kernels (auto: splash on TPU) against the einsum, same step otherwise."""
  lines = ["| stage | slice | attention (student, teacher) | peak per chip | with xla attention | "
           "saved | temporaries | with xla attention |", "|---|---|---|---|---|---|---|---|"]
  for r in rows:
    if "error" in r:
      lines.append(f"| {r['stage']} | {r['slice']} | error: {r['error']} | | | | | |")
      continue
    a, gib = r["attention"], lambda n: f"{n / GiB:.2f} GiB"  # noqa: E731
    least = "≥ " if a["xla_refused_by_compiler"] else ""
    lines.append(
        f"| {r['stage']} | {r['slice']} | {a['student']}, {a.get('teacher', '-')} | "
        f"{gib(r['peak_bytes_per_chip'])} | {least}{gib(a['xla_peak_bytes_per_chip'])} | "
        f"{least}{gib(a['saved_bytes_per_chip'])} | {gib(r['bytes_per_chip']['temporaries'])} | "
        f"{least}{gib(a['xla_temporaries_bytes_per_chip'])} |")
  return "\n".join(lines) + "\n"


def table(rows: list[dict], student: str) -> str:
  lines = [
      "| stage | slice | chips | global batch (micro-batches) | peak / HBM per chip | fits | "
      "params + optimizer | teacher | temporaries | model TFLOPs per chip | compile (s) |",
      "|---|---|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    if "error" in r:
      lines.append(f"| {r['stage']} | {r['slice']} | | | | error: {r['error']} | | | | | |")
      continue
    b = r["bytes_per_chip"]
    state = b["trainable_params"] + b["frozen_params"] + b["optimizer_state"]
    lines.append(
        f"| {r['stage']} | {r['slice']} | {r['num_chips']} | {r['batch_size']} "
        f"({r['grad_accum_steps']}) | {r['peak_bytes_per_chip'] / GiB:.1f} / "
        f"{r['hbm_bytes_per_chip'] / GiB:.0f} GiB | {'yes' if r['fits'] else '**no**'} | "
        f"{state / GiB:.2f} GiB | {b['teacher_params'] / GiB:.2f} GiB | "
        f"{b['temporaries'] / GiB:.2f} GiB | {r['flops_per_chip'] / 1e12:.1f} | "
        f"{r['compile_seconds']:.0f} |")
  smallest = ", ".join(f"{s}: {_smallest(rows, s)}" for s in dict.fromkeys(r["stage"] for r in rows))
  return "\n".join(lines) + f"\n\nSmallest slice each stage fits (student Qwen2-{student.upper()}): " \
                            f"{smallest}.\n"


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--stages", default=",".join(STAGES))
  ap.add_argument("--slices", default=",".join(SLICES))
  ap.add_argument("--student", default="0.5b", choices=("0.5b", "1.5b"))
  ap.add_argument("--models_dir", default="/tmp/llavamod_scale")
  ap.add_argument("--timeout", type=int, default=900, help="seconds per plan")
  ap.add_argument("--flag", action="append", default=[],
                  help="a config override for every plan of this run (repeatable), e.g. "
                       "--flag=--config.loss.chunk_size=128; its rows are labelled with it")
  ap.add_argument("--keep_rows", action="store_true",
                  help="keep the earlier run's rows (rows.json) for the stages x slices not planned now")
  ap.add_argument("--compare_attention", action="store_true",
                  help="plan each row twice (configured attention, then xla) and write the "
                       "attention table instead")
  ap.add_argument("--out", default=str(REPO / "docs" / "scale.md"),
                  help="the table replaces what lies between its markers there")
  args = ap.parse_args(argv)
  root = Path(args.models_dir) / args.student
  write_models(root, args.student)
  rows = []
  for stage in args.stages.split(","):
    for slice_ in args.slices.split(","):
      rows.append(plan_one(root, stage, slice_, args.timeout, args.compare_attention,
                           tuple(args.flag)))
      r = rows[-1]
      print(f"{stage} {slice_}: " + (r["error"] if "error" in r else
            f"{r['peak_bytes_per_chip'] / GiB:.1f} GiB, fits={r['fits']}, "
            f"compile {r['compile_seconds']:.0f} s"), flush=True)
  saved = root / ("attention_rows.json" if args.compare_attention else "rows.json")
  rows = merged(saved, rows) if args.keep_rows else rows
  saved.write_text(json.dumps(rows, indent=1))
  if args.compare_attention:
    write_table(Path(args.out), f"{args.student} attention", attention_table(rows))
  else:
    write_table(Path(args.out), args.student, table(rows, args.student))
  print(f"wrote {args.out}")


def merged(saved: Path, rows: list[dict]) -> list[dict]:
  """The rows of an earlier run (`saved`) with those planned now replacing theirs, in table order."""
  keep = {(r["stage"], r["slice"]): r for r in json.loads(saved.read_text())} if saved.exists() else {}
  keep.update({(r["stage"], r["slice"]): r for r in rows})
  order = {**{s: i for i, s in enumerate(STAGES)}, **{s: i for i, s in enumerate(SLICES)}}
  return sorted(keep.values(), key=lambda r: (order.get(r["stage"].split()[0], 99), r["stage"],
                                              order.get(r["slice"], 99), r["slice"]))


def write_table(path: Path, student: str, text: str) -> None:
  """Replace the student's table between its markers in `path` (appended when absent)."""
  start, end = f"<!-- scale table {student} -->", f"<!-- end of scale table {student} -->"
  doc = path.read_text() if path.exists() else "# Paper scale\n"
  block = f"{start}\n{text}{end}"
  if start in doc and end in doc:
    doc = doc[:doc.index(start)] + block + doc[doc.index(end) + len(end):]
  else:
    doc = doc.rstrip("\n") + "\n\n" + block + "\n"
  path.write_text(doc)


if __name__ == "__main__":
  main()
