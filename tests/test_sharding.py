"""Meshes on 8 simulated CPU devices: forward, loss and gradients equal the 1-device result, and the
parameters (student and teacher) are really sharded by the logical-axis rules. Runs in a subprocess
because the device count is fixed when jax starts."""

import json
import os
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(r'''
    import json
    import jax, jax.numpy as jnp, numpy as np, optax
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from llavamod_jax import models, moe, sharding
    from llavamod_jax.models.configs import LlavaConfig, TextConfig, VisionConfig
    from llavamod_jax.train import steps
    from llavamod_jax.sharding import batch_to_device, make_mesh, place
    import ml_collections

    text = TextConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                      num_kv_heads=2, rope_theta=1e4)
    vision = VisionConfig(hidden_size=16, intermediate_size=32, num_layers=2, num_heads=2, image_size=16,
                          patch_size=8)
    dense = models.build(LlavaConfig(text=text, vision=vision, image_token_id=63))
    teacher = models.build(LlavaConfig(text=text.replace(hidden_size=48, intermediate_size=96),
                                       vision=vision, image_token_id=63))
    student, sp = moe.upcycle(dense, models.init_params(dense, 0), num_experts=4, top_k=2, layers="all")
    sp = jax.tree.map(lambda a: a + 0.01 * jax.random.normal(jax.random.key(1), a.shape), sp)
    tp = models.init_params(teacher, 2)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 60, (8, 12)).astype(np.int32)
    ids[:, 1:5] = 63
    labels = ids.copy(); labels[:, :6] = -100
    batch = {"input_ids": ids, "attention_mask": np.ones_like(ids), "labels": labels,
             "pixel_values": rng.standard_normal((8, 16, 16, 3)).astype(np.float32),
             "image_mask": np.ones(8, bool)}
    loss = steps.loss_fn("mimic", student, teacher, steps.LossConfig(ce_weight=1.0))

    def run(mesh):
      p, t = place(student, sp, mesh), place(teacher, tp, mesh)
      b = batch_to_device(batch, mesh)
      f = jax.jit(jax.value_and_grad(lambda p, t, b: loss(p, t, b, None, True), has_aux=True))
      (v, m), g = f(p, t, b)
      logits = jax.jit(lambda p, b: student.apply({"params": p}, b["input_ids"], b["pixel_values"],
                                                  image_mask=b["image_mask"]).logits)(p, b)
      up = p["language_model"]["layers_0"]["mlp"]["experts"]["up_proj"]
      return (np.asarray(v), {k: np.asarray(x) for k, x in m.items()}, jax.tree.map(np.asarray, g),
              np.asarray(logits), up.sharding.shard_shape(up.shape))

    def cfg(**axes):
      c = ml_collections.ConfigDict({"mesh": {"data": 1, "fsdp": 1, "expert": 1, "tensor": 1}})
      c.mesh.update(axes)
      return c

    one = Mesh(np.asarray(jax.devices()[:1]).reshape(1, 1, 1, 1), ("data", "fsdp", "expert", "tensor"))
    ref = run(one)
    # Relative per leaf; a leaf whose true gradient is zero (k_proj bias: softmax ignores it) is
    # compared in absolute terms.
    gerr = lambda g: max(float(np.max(np.abs(np.asarray(a) - b)) / max(np.max(np.abs(b)), 1e-8))  # noqa
                         for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(ref[2])))
    out = {}
    for name, axes in {"data8": dict(data=8), "data2_expert4": dict(data=2, expert=4)}.items():
      v, m, g, logits, shard = run(make_mesh(cfg(**axes).mesh))
      out[name] = {"loss": float(abs(v - ref[0]) / abs(ref[0])),
                   "logits": float(np.max(np.abs(logits - ref[3])) / np.max(np.abs(ref[3]))),
                   "grads": gerr(g), "expert_shard": list(shard)}

    # The loop's mimic step, with an "optimizer" that keeps the gradients as its state. The step
    # enters the mesh of its arguments, so the MoE layers dispatch expert-parallel by all-to-all.
    mesh = make_mesh(cfg(fsdp=2, expert=2, tensor=2).mesh)
    tx = optax.GradientTransformation(lambda p: jax.tree.map(jnp.zeros_like, p),
                                      lambda g, s, p=None: (jax.tree.map(jnp.zeros_like, g), g))
    state = steps.init_state(place(student, jax.device_get(sp), mesh), [".*"], tx)
    step = steps.make_train_step("mimic", student, teacher, tx, steps.LossConfig(ce_weight=1.0))
    t, b = place(teacher, tp, mesh), batch_to_device(batch, mesh)
    all_to_all = "all_to_all" in step.lower(state, b, t).as_text()
    up = state.params["language_model"]["layers_0"]["mlp"]["experts"]["up_proj"]
    shard = list(up.sharding.shard_shape(up.shape))
    new, metrics = step(state, b, t)
    tl = t["language_model"]
    out["fsdp2_expert2_tensor2"] = {
        "loss": float(abs(metrics["loss"] - ref[0]) / abs(ref[0])),
        "grads": gerr(new.opt_state),
        "all_to_all": all_to_all, "expert_shard": shard,
        "teacher_shards": {n: list(x.sharding.shard_shape(x.shape)) for n, x in {
            "embed_tokens": tl["embed_tokens"]["embedding"],
            "up_proj": tl["layers_0"]["mlp"]["up_proj"]["kernel"],
            "o_proj": tl["layers_0"]["self_attn"]["o_proj"]["kernel"],
            "k_proj": tl["layers_0"]["self_attn"]["k_proj"]["kernel"]}.items()}}
    print("RESULT" + json.dumps(out))
''')


def test_meshes_match_one_device_and_shard_student_and_teacher():
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
  p = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True,
                     timeout=600)
  assert p.returncode == 0, p.stderr[-4000:]
  out = json.loads(p.stdout.split("RESULT", 1)[1])
  for name, r in out.items():
    assert r["loss"] < 1e-4 and r.get("logits", 0) < 1e-4 and r["grads"] < 1e-4, (name, r)
  # up_proj [experts 4, embed 32, mlp 64] with logical axes (expert, embed, mlp).
  assert out["data8"]["expert_shard"] == [4, 32, 64]  # replicated
  assert out["data2_expert4"]["expert_shard"] == [1, 32, 64]  # one expert per device
  step = out["fsdp2_expert2_tensor2"]
  assert step["expert_shard"] == [2, 16, 32] and step["all_to_all"]
  # The teacher (hidden 48, mlp 96, vocab 64, 4 heads, 2 kv heads of 12) is sharded by the same
  # rules: vocab/mlp/heads/kv over tensor 2, embed over fsdp 2.
  assert step["teacher_shards"] == {"embed_tokens": [32, 24], "up_proj": [24, 48],
                                    "o_proj": [24, 24], "k_proj": [24, 12]}


RESTORE = textwrap.dedent(r'''
    import sys
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh
    from llavamod_jax import checkpoint, models, moe
    from llavamod_jax.models.configs import TextConfig
    from llavamod_jax.sharding import place

    dense = models.build(TextConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2,
                                    num_heads=4, num_kv_heads=2))
    model, params = moe.upcycle(dense, models.init_params(dense, 0), num_experts=4, top_k=2)
    axes = ("data", "fsdp", "expert", "tensor")
    eight = Mesh(np.asarray(jax.devices()).reshape(1, 2, 4, 1), axes)
    one = Mesh(np.asarray(jax.devices()[:1]).reshape(1, 1, 1, 1), axes)
    root = sys.argv[1]
    checkpoint.save_model(root + "/from8", model, place(model, params, eight))   # 8 -> 1
    _, back1 = checkpoint.restore_model(root + "/from8", mesh=one)
    checkpoint.save_model(root + "/from1", model, place(model, params, one))     # 1 -> 8
    _, back8 = checkpoint.restore_model(root + "/from1", mesh=eight)
    same = lambda a, b: all(bool(jnp.array_equal(x, y)) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
    up1 = back1["layers_0"]["mlp"]["experts"]["up_proj"]
    up8 = back8["layers_0"]["mlp"]["experts"]["up_proj"]
    print("RESULT", same(back1, params), same(back8, params), len(up1.sharding.device_set),
          up8.sharding.shard_shape(up8.shape))
''')


def test_checkpoint_restores_across_meshes(tmp_path):
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
  p = subprocess.run([sys.executable, "-c", RESTORE, str(tmp_path)], env=env, capture_output=True,
                     text=True, timeout=600)
  assert p.returncode == 0, p.stderr[-4000:]
  same1, same8, devices1, shard8 = p.stdout.split("RESULT", 1)[1].split(maxsplit=3)
  assert same1 == "True" and same8 == "True"
  assert devices1 == "1"
  assert shard8.strip() == "(1, 16, 64)"  # expert over 4 devices, embed over fsdp 2


CONSTRAINTS = textwrap.dedent(r'''
    import json, re
    import jax, numpy as np, optax
    from llavamod_jax import models
    from llavamod_jax.models.configs import TextConfig
    from llavamod_jax.sharding import batch_to_device, make_mesh, place
    from llavamod_jax.train import steps

    lm = models.build(TextConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=3,
                                 num_heads=4, num_kv_heads=2))
    mesh = make_mesh({"data": 2, "fsdp": 2, "expert": 2, "tensor": 1})
    tx = optax.sgd(0.1)
    state = steps.init_state(place(lm, models.init_params(lm, 0), mesh), [".*"], tx)
    ids = np.arange(8 * 16, dtype=np.int32).reshape(8, 16) % 60
    batch = batch_to_device({"input_ids": ids, "attention_mask": np.ones_like(ids), "labels": ids},
                            mesh)
    step = steps.make_train_step("sft", lm, None, tx)
    pattern = re.compile(r"sdy\.sharding_constraint %\S+ <@mesh, \[([^\]]*)\]> : tensor<8x16x32xf32>")
    ruled = pattern.findall(step.lower(state, batch, None).as_text())
    bare = pattern.findall(step.jitted.lower(state, batch, None).as_text())  # no rules context
    print("RESULT" + json.dumps([len(ruled), sorted(set(ruled)), len(bare)]))
''')


def test_activation_constraints_follow_the_rules_on_the_step_mesh():
  """activation_batch -> (data, fsdp): each decoder layer's output [batch, seq, embed] is constrained
  to be split over data and fsdp by rows, in the step the loop runs; without the rules context that
  the step enters, flax drops the constraint."""
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
  p = subprocess.run([sys.executable, "-c", CONSTRAINTS], env=env, capture_output=True, text=True,
                     timeout=600)
  assert p.returncode == 0, p.stderr[-4000:]
  ruled, specs, bare = json.loads(p.stdout.split("RESULT", 1)[1])
  assert ruled >= 3 + 1  # every layer's output and the final hidden states
  assert specs == ['{"data", "fsdp"}, {}, {}']
  assert bare == 0
