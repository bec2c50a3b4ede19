"""How the demo teacher learns each task: teacher-forced answer accuracy on the held-out shapes
questions, per task and per question kind, every --eval_every steps of the teacher's own recipe (a
pretrained, frozen vision tower, the fixed standardising projector, a from-scratch language model;
assets.py).

    python -m llavamod_jax.demo.teacher_probe [--steps 1600] [--seed 0] [--lr 2e-3] [--batch 16]
        [--hidden 128 --layers 4 --heads 8 --kv_heads 8] [--init_std 0.1] [--rope_theta 10000]
        [--train_file train.jsonl --eval_file eval.jsonl]
        [--demo_cache workdirs/demo_cache] [--eval_every 200] [--eval_limit 600]

An answer counts as right when every one of its tokens is the model's argmax given the reference
before it: the model's knowledge without generation's compounding errors, in a minute of CPU per
evaluation, so a change to the data or the recipe is judged at 1,600 steps instead of after a whole
demo run. The kinds split each task by whether it can be answered without joining the question's
words to the image ("color, 1 object" can, "color, 2+ objects" cannot). The tokenizer, shapes set
and tower come from --demo_cache (built there if missing, as the demo builds them); the language
model and the projector's start are always fresh, so sizes and init std can change. --train_file
names a file in the shapes folder, e.g. a rewritten train.jsonl to try another answer format (the
tokenizer must cover its words), and --eval_file its held-out counterpart.

Results: README.md of this package.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from llavamod_jax import hf, models
from llavamod_jax.demo import assets, recipes, synthetic, tower
from llavamod_jax.train import build, optim, steps


def question_kind(record: dict, scene: synthetic.Scene) -> str:
  """A shapes record's task, split by what a shortcut could answer."""
  task = record["task"]
  question = record["conversations"][0]["value"]
  if task == "count":
    return "count, all shapes" if "How many shapes" in question else "count, one shape"
  if task == "color":
    return "color, 1 object" if len(scene.objects) == 1 else "color, 2+ objects"
  if task == "position":
    sides = {scene.side(o) for o in scene.objects}
    return "position, all on one side" if len(sides) == 1 else "position, both sides"
  if task == "pope":
    answer = record.get("label") or record["conversations"][-1]["value"]
    return f"pope, {answer}"
  return task


def make_scorer(model):
  """jit(params, batch) -> bool [rows]: every response token is the argmax of the logits before it."""

  @jax.jit
  def answers_right(params, batch):
    out = model.apply({"params": params}, batch["input_ids"], batch["pixel_values"],
                      batch["attention_mask"], image_mask=batch["image_mask"])
    target = batch["labels"][:, 1:]
    right = jnp.argmax(out.logits[:, :-1], -1) == target
    return jnp.all(jnp.where(target >= 0, right, True), -1)

  return answers_right


def summarize(right: np.ndarray, groups: list[str]) -> dict[str, float]:
  by = collections.defaultdict(list)
  for ok, g in zip(right, groups):
    by[g].append(bool(ok))
  return {g: round(float(np.mean(v)), 3) for g, v in sorted(by.items())}


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--demo_cache", default="workdirs/demo_cache")
  p.add_argument("--steps", type=int, default=1600)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--lr", type=float, default=None, help="default: the teacher recipe's")
  p.add_argument("--batch", type=int, default=16)
  p.add_argument("--max_length", type=int, default=None, help="default: the teacher recipe's")
  p.add_argument("--hidden", type=int, default=None)
  p.add_argument("--layers", type=int, default=None)
  p.add_argument("--heads", type=int, default=None)
  p.add_argument("--kv_heads", type=int, default=None)
  p.add_argument("--rope_theta", type=float, default=None, help="default: the demo models' 10000")
  p.add_argument("--train_file", default="train.jsonl")
  p.add_argument("--eval_file", default="eval.jsonl")
  p.add_argument("--init_std", type=float, default=None,
                 help="the LM's and projector's initializer_range (default: the teacher recipe's)")
  p.add_argument("--eval_every", type=int, default=200)
  p.add_argument("--eval_limit", type=int, default=600, help="first N held-out questions")
  p.add_argument("--eval_batch", type=int, default=50)
  # The demo's data and tower sizes (small values make a quick check of this script).
  p.add_argument("--num_train", type=int, default=None)
  p.add_argument("--num_eval", type=int, default=None)
  p.add_argument("--vision_steps", type=int, default=None)
  args = p.parse_args(argv)

  d = recipes.section()  # the embedded default's cache settings
  d.cache = args.demo_cache
  for key in ("num_train", "num_eval"):
    if getattr(args, key) is not None:
      d.shapes[key] = getattr(args, key)
  if args.vision_steps is not None:
    d.vision_steps = args.vision_steps
  root = assets.ensure_shapes(d)

  def teacher_cfg(batch: int):
    c = recipes.teacher()
    c.demo.cache = d.cache
    c.demo.shapes = ml_collections.ConfigDict(d.shapes.to_dict())
    c.student.scratch.image_size = d.shapes.image_size
    c.data.image_root = str(root)
    c.data.batch_size = batch
    c.data.max_length = args.max_length or c.data.max_length
    return c

  tokenizer = assets.ensure_tokenizer(d)
  # The tower and projector, built and cached with the unchanged recipe exactly as the demo does.
  init_dir = assets.teacher_init(d, teacher_cfg(args.batch))
  tcfg = teacher_cfg(args.batch)
  scratch = tcfg.student.scratch
  for key, value in (("hidden_size", args.hidden), ("num_layers", args.layers),
                     ("num_heads", args.heads), ("num_kv_heads", args.kv_heads)):
    if value is not None:
      scratch[key] = value
  if args.hidden is not None:
    scratch.intermediate_size = 2 * args.hidden
  if args.init_std is not None:
    scratch.initializer_range = args.init_std

  llava = build.scratch_config(tcfg.student, tokenizer)
  if args.rope_theta is not None:
    text = dataclasses.replace(llava.text, rope_theta=args.rope_theta)
    llava = dataclasses.replace(llava, text=text)
  model = models.build(llava)
  params = models.init_params(model, args.seed)
  _, start = hf.load(init_dir)
  params["vision_tower"] = start["vision_tower"]
  files = [str(root / args.train_file)]
  # The fixed projector's start, made as the demo makes it but from this LM's fresh projector.
  pixels, _ = tower.load_split(root, "train", model.cfg, limit=256)
  params["multi_modal_projector"] = tower.projector_init(
      model.cfg, params["multi_modal_projector"], params["vision_tower"], pixels)

  train = iter(build.data_pipeline(tcfg, tokenizer, model, None, files, seed=args.seed, shuffle=True,
                                   num_epochs=None))
  ecfg = teacher_cfg(args.eval_batch)
  efiles = [str(Path(root, args.eval_file))]
  records = [json.loads(line) for line in Path(efiles[0]).read_text().splitlines()]
  scenes = {d["image"]: synthetic.Scene.from_dict(d)
            for d in map(json.loads, Path(root, "scenes.jsonl").read_text().splitlines())}
  pipe = build.data_pipeline(ecfg, tokenizer, model, None, efiles, seed=0, shuffle=False,
                             num_epochs=1)
  n_batches = max(1, min(args.eval_limit, len(records)) // args.eval_batch)
  eval_batches = [b for b, _ in zip(pipe, range(n_batches))]
  records = records[:len(eval_batches) * args.eval_batch]
  # Rows are scored against records by position: check that each row's response is its record's.
  labels = np.concatenate([b["labels"] for b in eval_batches])
  for row, (ids, record) in enumerate(zip(labels, records)):
    said = tokenizer.decode(ids[ids >= 0], skip_special_tokens=True).strip()
    if said != record["conversations"][-1]["value"].strip():
      raise ValueError(f"{efiles[0]}: held-out row {row} holds the response {said!r}, not record "
                       f"{record['id']!r}'s; the pipeline skipped or reordered records")
  tasks = [r["task"] for r in records]
  kinds = [question_kind(r, scenes[r["image"]]) for r in records]

  lr = args.lr if args.lr is not None else tcfg.optimizer.lr
  tx, schedule = optim.adamw(lr, args.steps, warmup_ratio=tcfg.optimizer.warmup_ratio,
                             weight_decay=tcfg.optimizer.weight_decay)
  state = steps.init_state(params, optim.trainable_patterns("language_model/.*"), tx, args.seed)
  train_step = steps.make_train_step("sft", model, None, tx, steps.LossConfig(), schedule=schedule)
  score = make_scorer(model)

  def evaluate():
    merged = optim.merge(state.params, state.frozen)
    return np.concatenate([np.asarray(score(merged, b)) for b in eval_batches])

  print(json.dumps(vars(args)), flush=True)
  history, losses, t0 = [], [], time.time()
  for step in range(1, args.steps + 1):
    state, metrics = train_step(state, next(train), None)
    losses.append(float(metrics["loss"]))
    if step % args.eval_every == 0 or step == args.steps:
      right = evaluate()
      row = {"step": step, "loss": round(float(np.mean(losses[-50:])), 4),
             "seconds": round(time.time() - t0), **summarize(right, tasks)}
      history.append(row)
      print(json.dumps(row), flush=True)
  by_kind = summarize(right, kinds)
  for kind, acc in by_kind.items():
    print(f"{kind:28s} n={kinds.count(kind):4d} right={acc:.3f}")
  return {"history": history, "kinds": by_kind}


if __name__ == "__main__":
  main()
