"""Which image features let the demo's from-scratch language model learn the shapes lookups: the LM
alone, trained on the short-answer questions with fixed image tokens, scored per question kind.

    python -m llavamod_jax.demo.lookup_probe --features tower|kinds|side_kinds
        [--tower_steps 1200 --prototype_weight 10] [--steps 1600 --seed 0 --batch 16 --lr 2e-3]
        [--rope_theta 10000] [--demo_cache workdirs/demo_cache]

A sequence is the image's 64 patch tokens, then "\\n<question>\\nASSISTANT:"; the loss is on the one
token that decides the answer ("green", "3", "left", "yes"). The image tokens are the features
standardised over all patches and passed through a fresh, fixed projector (the demo teacher's
`tower.projector_init` start); only the LM trains. With no tower forward pass and short sequences a
run takes about 3 minutes of CPU, against 10 for teacher_probe.py, so a change to what the tower
hands the LM can be judged on its own. `--features tower` reads the demo cache's tower, or with
`--tower_steps` a fresh one pretrained here (`tower.pretrain`, `--prototype_weight`); `kinds` hands
the LM each patch's exact kind, one-hot; `side_kinds` adds the patch's half of the image (left /
right) as two more one-hot dimensions. The LM is the demo teacher's (`recipes.teacher`), its sizes
and RoPE base overridable.

Results: README.md of this package.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from llavamod_jax import hf
from llavamod_jax.data import image as image_lib
from llavamod_jax.demo import assets, recipes, synthetic, tower
from llavamod_jax.demo.teacher_probe import question_kind, summarize
from llavamod_jax.models.llava import Projector
from llavamod_jax.models.llm import DecoderLM
from llavamod_jax.train import build

SHORT = ("color", "count", "position", "pope")


def image_features(args, cfg, root: Path, images: list[str], scenes: dict) -> np.ndarray:
  """[images, patches, dim] features for the LM, standardised over all patches."""
  patch = cfg.vision.patch_size
  if args.features in ("kinds", "side_kinds"):
    labels = np.stack([synthetic.patch_labels(scenes[k], patch) for k in images])
    f = np.eye(tower.NUM_CLASSES, dtype=np.float32)[labels]
    if args.features == "side_kinds":
      n = scenes[images[0]].size // patch
      right = np.tile((np.arange(n * n) % n) >= n // 2, (len(images), 1)).astype(int)
      f = np.concatenate([f, np.eye(2, dtype=np.float32)[right]], -1)
  else:
    if args.tower_steps:
      vision, stats = tower.pretrain(cfg, root, steps=args.tower_steps,
                                     prototype_weight=args.prototype_weight, seed=args.seed)
      print(json.dumps({"tower": {k: round(v, 4) for k, v in stats.items()}}), flush=True)
    else:  # the demo teacher's tower, as the cache holds it
      vision = hf.load(assets.teacher_init(args.demo, recipes.teacher()))[1]["vision_tower"]
    kind = "clip" if cfg.vision.is_clip else "siglip"
    feats = jax.jit(lambda x: tower.features(cfg, vision, x))
    f = []
    for i in range(0, len(images), 256):
      pixels = np.stack([image_lib.preprocess(image_lib.load_image(str(root / k)), kind=kind,
                                              size=cfg.vision.image_size)
                         for k in images[i:i + 256]])
      f.append(np.asarray(feats(pixels)))
    f = np.concatenate(f)
  flat = f.reshape(-1, f.shape[-1])
  return ((f - flat.mean(0)) / (flat.std(0) + 1e-6)).astype(np.float32)


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--demo_cache", default="workdirs/demo_cache")
  p.add_argument("--features", default="tower", choices=("kinds", "side_kinds", "tower"))
  p.add_argument("--tower_steps", type=int, default=0, help="> 0: pretrain a fresh tower this long")
  p.add_argument("--prototype_weight", type=float, default=0.0, help="with --tower_steps")
  p.add_argument("--steps", type=int, default=1600)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--lr", type=float, default=None, help="default: the teacher recipe's")
  p.add_argument("--batch", type=int, default=16)
  p.add_argument("--hidden", type=int, default=None)
  p.add_argument("--layers", type=int, default=None)
  p.add_argument("--heads", type=int, default=None)
  p.add_argument("--kv_heads", type=int, default=None)
  p.add_argument("--rope_theta", type=float, default=None, help="default: the demo models' 10000")
  p.add_argument("--init_std", type=float, default=None)
  p.add_argument("--eval_every", type=int, default=400)
  p.add_argument("--num_train", type=int, default=None, help="the demo's shapes set sizes")
  p.add_argument("--num_eval", type=int, default=None)
  args = p.parse_args(argv)
  print(json.dumps(vars(args)), flush=True)

  args.demo = d = recipes.section()
  d.cache = args.demo_cache
  for key in ("num_train", "num_eval"):
    if getattr(args, key) is not None:
      d.shapes[key] = getattr(args, key)
  tokenizer = assets.ensure_tokenizer(d)
  root = assets.ensure_shapes(d)
  tcfg = recipes.teacher()
  scratch = tcfg.student.scratch
  scratch.image_size = d.shapes.image_size
  for key, value in (("hidden_size", args.hidden), ("num_layers", args.layers),
                     ("num_heads", args.heads), ("num_kv_heads", args.kv_heads),
                     ("initializer_range", args.init_std)):
    if value is not None:
      scratch[key] = value
  if args.hidden is not None:
    scratch.intermediate_size = 2 * args.hidden
  llava = build.scratch_config(tcfg.student, tokenizer)
  if args.rope_theta is not None:
    text = dataclasses.replace(llava.text, rope_theta=args.rope_theta)
    llava = dataclasses.replace(llava, text=text)

  scenes = {d["image"]: synthetic.Scene.from_dict(d)
            for d in map(json.loads, (root / "scenes.jsonl").read_text().splitlines())}
  images = sorted(scenes)
  index = {k: i for i, k in enumerate(images)}
  num_patches = llava.num_image_tokens

  def load(name):
    rows = []
    for r in map(json.loads, (root / name).read_text().splitlines()):
      if r["task"] not in SHORT:
        continue
      question = r["conversations"][0]["value"].replace("<image>\n", "")
      text = tokenizer("\n" + question + "\nASSISTANT:")["input_ids"]
      answer = tokenizer(r["conversations"][-1]["value"])["input_ids"][0]
      kind = question_kind(r, scenes[r["image"]])
      rows.append((text, answer, index[r["image"]], r["task"], kind))
    return rows

  train, held_out = load("train.jsonl"), load("eval.jsonl")
  length = num_patches + max(len(r[0]) for r in train + held_out)

  def pack(rows):
    ids = np.full((len(rows), length), tokenizer.pad_token_id, np.int32)
    mask = np.zeros((len(rows), length), bool)
    last = np.array([num_patches + len(r[0]) - 1 for r in rows], np.int32)
    for i, r in enumerate(rows):
      ids[i, num_patches:num_patches + len(r[0])] = r[0]
      mask[i, :num_patches + len(r[0])] = True
    return (ids, mask, last, np.array([r[1] for r in rows], np.int32),
            np.array([r[2] for r in rows], np.int32))

  feats = jnp.asarray(image_features(args, llava, root, images, scenes))
  lm = DecoderLM(llava.text)
  projector = Projector(llava)
  key_lm, key_proj = jax.random.split(jax.random.key(args.seed))
  held = pack(held_out)
  params = nn.unbox(lm.init(key_lm, jnp.asarray(held[0][:1]))["params"])
  proj = nn.unbox(projector.init(key_proj, feats[:1])["params"])

  def logits_at(params, ids, mask, last, image):
    embeds = lm.apply({"params": params}, ids, method=lambda m, x: m.embed(x))
    embeds = embeds.at[:, :num_patches].set(projector.apply({"params": proj}, feats[image]))
    logits = lm.apply({"params": params}, None, attention_mask=mask, inputs_embeds=embeds).logits
    return logits[jnp.arange(ids.shape[0]), last]

  lr = args.lr if args.lr is not None else tcfg.optimizer.lr
  warmup = int(tcfg.optimizer.warmup_ratio * args.steps)
  schedule = optax.warmup_cosine_decay_schedule(0.0, lr, warmup, args.steps)
  tx = optax.chain(optax.clip_by_global_norm(1.0),
                   optax.adamw(schedule, weight_decay=tcfg.optimizer.weight_decay))
  opt = tx.init(params)

  @jax.jit
  def step(params, opt, ids, mask, last, answer, image):
    def loss_fn(p):
      return optax.softmax_cross_entropy_with_integer_labels(
          logits_at(p, ids, mask, last, image), answer).mean()
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt = tx.update(grads, opt, params)
    return optax.apply_updates(params, updates), opt, loss

  right_fn = jax.jit(lambda params, ids, mask, last, answer, image:
                     jnp.argmax(logits_at(params, ids, mask, last, image), -1) == answer)
  rng = np.random.default_rng(args.seed + 1)
  history, losses, t0 = [], [], time.time()
  for i in range(1, args.steps + 1):
    batch = pack([train[j] for j in rng.integers(len(train), size=args.batch)])
    params, opt, loss = step(params, opt, *batch)
    losses.append(float(loss))
    if i % args.eval_every == 0 or i == args.steps:
      right = np.asarray(right_fn(params, *held))
      row = {"step": i, "loss": round(float(np.mean(losses[-100:])), 4),
             "seconds": round(time.time() - t0), **summarize(right, [r[4] for r in held_out])}
      history.append(row)
      print(json.dumps(row), flush=True)
  return {"history": history}


if __name__ == "__main__":
  main()
