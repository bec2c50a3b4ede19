"""The end of a run: student (and teacher) quality on held-out data, printed and saved.

Answers generated for `data.report_files` (else `data.eval_files`), scored per task (exact match;
POPE accuracy / F1 / yes-ratio), activated parameters per token, and the mean KL to the teacher.
"""

from __future__ import annotations

import json
import logging
import jax
from flax import traverse_util

from llavamod_jax import evaluation, fileutil, workdir as workdir_lib
from llavamod_jax.models.configs import LlavaConfig

log = logging.getLogger(__name__)
ROW_NAMES = {"student_ce_alone": "student (CE alone)"}  # report.json key -> the table's row


def activated_parameters(model, params) -> int:
  """Parameters a token passes through: all, minus the (E - k)/E unused share of every MoE layer."""
  total = sum(x.size for x in jax.tree.leaves(params))
  text = model.cfg.text if isinstance(model.cfg, LlavaConfig) else model.cfg
  if not text.num_experts:
    return total
  # Every MoE layer has the same experts, in either parameter layout (models/scan.py).
  experts = sum(x.size for path, x in traverse_util.flatten_dict(params, sep="/").items()
                if "/mlp/experts/" in path)
  return total - experts * (text.num_experts - text.num_experts_per_tok) // text.num_experts


def _quality(model, params, tokenizer, info, records, batch_size: int) -> dict:
  metrics, _ = evaluation.evaluate(model, params, tokenizer, info, records, batch_size=batch_size,
                                   max_new_tokens=24)
  metrics["params"] = {"activated": activated_parameters(model, params),
                       "total": sum(x.size for x in jax.tree.leaves(params))}
  return metrics


def final_report(cfg, workdir, *, baselines: dict | None = None, limit: int = 200,
                 batch_size: int = 16) -> dict:
  """Evaluate the run's student (and its teacher) on the held-out split; writes report.json.
  `baselines` ({name: workdir}) are other students scored beside it on the same records, their KL
  to this run's teacher included (the demo's student trained with CE alone).
  Every process of a multi-process run computes it (orbax reads are collective; the evaluation runs
  on each process's own devices); process 0 writes and prints it. `workdir` may be a gs:// URI."""
  workdir = fileutil.path(workdir)
  files = list(cfg.data.report_files or cfg.data.eval_files)
  if not files:
    log.info("final report: no data.report_files or data.eval_files, nothing to score")
    return {}
  student, sparams, tokenizer, info = workdir_lib.load_model(workdir)
  students = {"student": (student, sparams)}
  for name, other in (baselines or {}).items():
    students[name] = workdir_lib.load_model(other)[:2]
  records = evaluation.read_records(files, image_root=cfg.data.image_root or None, limit=limit)
  report = {name: _quality(model, params, tokenizer, info, records, batch_size)
            for name, (model, params) in students.items()}
  if info.teacher:
    teacher, tparams, ttok, tinfo = workdir_lib.load_model(info.teacher)
    report["teacher"] = _quality(teacher, tparams, ttok, tinfo, records, batch_size)
    for name, (model, params) in students.items():
      batches = evaluation.kl_batches(tokenizer, info, tinfo, records, batch_size=batch_size)
      report[name]["kl_to_teacher"] = {
          "kl": evaluation.kl_to_teacher(model, params, teacher, tparams, batches)["kl"]}
  if jax.process_index() == 0:
    (workdir / "report.json").write_text(json.dumps(report, indent=2))
    print(table(report))
  return report


def table(report: dict) -> str:
  """Markdown: one row per model, columns per task."""
  tasks = [t for t in ("color", "count", "position", "caption") if t in report["student"]]
  head = ["model", *tasks, "POPE acc", "POPE F1", "yes ratio", "activated params", "KL to teacher"]
  rows = []
  for name, m in report.items():
    pope = m.get("pope", {})
    rows.append([ROW_NAMES.get(name, name), *(f"{m[t]['exact_match']:.3f}" for t in tasks),
                 f"{pope.get('accuracy', float('nan')):.3f}", f"{pope.get('f1', float('nan')):.3f}",
                 f"{pope.get('yes_ratio', float('nan')):.3f}", f"{m['params']['activated']:,}",
                 f"{m['kl_to_teacher']['kl']:.4f}" if "kl_to_teacher" in m else "-"])
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])
