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


def test_committed_report_links_to_the_notes():
  out = BENCH.parent / "docs" / "benchmarks.md"
  _assert_notes_links_resolve(out.read_text(), out)


@pytest.mark.slow
def test_run_writes_the_report_of_every_section(tmp_path, torch):
  """One run of every in-process section at minuscule sizes (the expert-parallel one needs a
  subprocess with 8 devices and is left out; Tunix's is skipped with a message when absent)."""
  run = _bench_module("run")
  out = tmp_path / "docs" / "benchmarks.md"
  res = run.main(["--profile=tiny", f"--out={out}",
                  "--only=train_step,tunix,parts,moe_layer,memory,scaling"])
  text = out.read_text()
  for title in ("## Targets", "## 1-2. Train steps", "Where the mimic step's time goes",
                "## 3. MoE layer", "## 4. Mimic step peak memory", "## 5. Scaling", "Tunix"):
    assert title in text
  targets = run.targets(res["results"])
  assert len(targets) == text.count("**Target: ") >= 5
  for t in targets:
    status = "met" if t["met"] else "MISSED"
    assert f"**Target: {t['what']} {t['goal']} — {status}** (measured {t['value']})." in text
  _assert_notes_links_resolve(text, out)
  for name in ("train_steps", "moe_layer", "memory", "scaling"):
    assert (tmp_path / "docs" / "images" / f"bench_{name}.png").stat().st_size > 1000
  for row in res["results"]["train_step"]["rows"]:
    assert math.isfinite(row["ratio"]) and row["ratio"] > 0
    assert row["loss_rel_diff"] < 2e-6, row["name"]
  machine = res["results"]["machine"]
  assert machine["jax_matmul_flops"] > 0 and machine["torch_matmul_flops"] > 0 and machine["cpu"]
  line = res["final_line"]
  assert line.startswith("BENCH ") and "mimic x" in line and "targets met" in line
  assert all(math.isfinite(float(x)) for x in re.findall(r"x(\d+\.\d+)", line))


def test_tunix_section_is_skipped_with_the_install_line_when_absent(monkeypatch):
  ts = _bench_module("tunix_step")
  monkeypatch.setitem(sys.modules, "tunix", None)  # import tunix -> ImportError
  res = ts.run(_bench_module("benchutil").TINY, log=lambda *_: None)
  assert "pip install --no-deps google-tunix" in res["skipped"]
  assert res["skipped"] in ts.markdown(res)


def test_tunix_step_agrees_with_ours_on_the_first_step():
  """With Tunix installed: its first-step KL and CE equal ours on the same HF checkpoints."""
  pytest.importorskip("tunix.distillation", reason="Tunix is an optional benchmark dependency")
  ts = _bench_module("tunix_step")
  res = ts.run(_bench_module("benchutil").TINY, log=lambda *_: None)
  for r in res["rows"]:
    assert r["kl_ours"] == pytest.approx(r["kl_tunix"], rel=1e-4) and r["kl_tunix"] > 1e-3
    assert r["ce_ours"] == pytest.approx(r["ce_tunix"], rel=1e-5)
    assert math.isfinite(r["ratio"]) and r["ratio"] > 0


