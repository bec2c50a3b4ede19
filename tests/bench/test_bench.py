"""bench/run.py at minuscule sizes: the report is written, the ratios are finite, and the transformers
baseline computes what our steps compute (same weights -> same losses, step after step)."""

import importlib
import math
import re
import sys
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")

BENCH = Path(__file__).resolve().parents[2] / "bench"


def _bench_module(name):
  """bench/ is a folder of scripts that import each other by plain name."""
  if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))
  return importlib.import_module(name)


def test_torch_baseline_takes_the_same_steps(torch):
  bu, js, ts = (_bench_module(n) for n in ("benchutil", "jax_steps", "torch_steps"))
  p = bu.TINY
  teacher, tparams = js.build(p.teacher.text(p.vocab), 0)
  student, sparams = js.build_student(p.student.text(p.vocab), p.experts, p.top_k, "all")
  batch = bu.batch_arrays(p.vocab, 2, 12)
  ours = js.make_step("mimic", student, sparams, teacher, tparams, batch=batch, trainable="ffn", lr=1e-2)
  theirs = ts.TorchStep("mimic", ts.load(student, sparams), batch, ts.load(teacher, tparams),
                        trainable="ffn", lr=1e-2)
  for _ in range(3):  # the later losses also check that both AdamW updates agree
    got = {k: float(np.asarray(v)) for k, v in ours().items() if k in ("loss", "kl", "ce", "aux")}
    want = theirs()
    for k, v in got.items():
      assert v == pytest.approx(want[k], rel=2e-4, abs=1e-6), k


def _assert_notes_links_resolve(text, out):
  # Every link into the hand-written notes names the file and one of its headings.
  links = re.findall(r"\]\(([^)#]*benchmark_notes\.md)(?:#([^)]*))?\)", text)
  assert links
  for path, anchor in links:
    notes = (out.parent / path).resolve()
    headings = {re.sub(r"[^a-z0-9 -]", "", h.lower()).replace(" ", "-")
                for h in re.findall(r"^#+ (.+)$", notes.read_text(), re.M)}
    assert not anchor or anchor in headings, anchor


def test_run_writes_the_report(tmp_path, torch):
  run = _bench_module("run")
  out = tmp_path / "docs" / "benchmarks.md"
  res = run.main(["--profile=tiny", "--only=train_step", f"--out={out}"])
  text = out.read_text()
  assert "## Targets" in text and "## 1-2. Train steps" in text
  for t in run.targets(res["results"]):
    status = "met" if t["met"] else "MISSED"
    assert f"**Target: {t['what']} {t['goal']} — {status}** (measured {t['value']})." in text
  _assert_notes_links_resolve(text, out)
  assert (tmp_path / "docs" / "images" / "bench_train_steps.png").stat().st_size > 1000
  for row in res["results"]["train_step"]["rows"]:
    assert math.isfinite(row["ratio"]) and row["ratio"] > 0
    assert row["loss_rel_diff"] < 2e-6, row["name"]
  line = res["final_line"]
  assert line.startswith("BENCH ") and "mimic x" in line
  assert all(math.isfinite(float(x)) for x in re.findall(r"x(\d+\.\d+)", line))


def test_committed_report_links_to_the_notes():
  out = BENCH.parent / "docs" / "benchmarks.md"
  _assert_notes_links_resolve(out.read_text(), out)


@pytest.mark.slow
def test_run_all_sections_at_minuscule_sizes(tmp_path, torch):
  run = _bench_module("run")
  out = tmp_path / "benchmarks.md"
  res = run.main(["--profile=tiny", f"--out={out}", "--only=train_step,parts,moe_layer,memory,scaling"])
  text = out.read_text()
  for title in ("Where the mimic step's time goes", "## 3. MoE layer", "## 4. Mimic step peak memory",
                "## 5. Scaling"):
    assert title in text
  assert text.count("**Target: ") == 4
  _assert_notes_links_resolve(text, out)
  for name in ("train_steps", "moe_layer", "memory", "scaling"):
    assert (tmp_path / "images" / f"bench_{name}.png").exists()
  assert "targets met" in res["final_line"]
