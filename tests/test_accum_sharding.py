"""Gradient accumulation keeps each micro-batch's rows on the devices: with the batch split over 8
simulated devices, every device computes the logits of its own rows of a micro-batch, never the
whole micro-batch. (Splitting [rows] into [micro-batches, rows / micro-batches] puts the devices'
contiguous blocks of rows on the micro-batch axis; at paper size, the adaptor stage on v5e-8 then
held every row's [chunk, vocabulary] logits on every chip.) The step's loss still equals the mean
of the micro-batches' losses computed one by one. Runs in a subprocess: the device count is fixed
when jax starts."""

import os
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(r'''
    import re
    import jax, jax.numpy as jnp, numpy as np, optax
    from llavamod_jax import models, sharding
    from llavamod_jax.models.configs import TextConfig
    from llavamod_jax.train import steps

    ROWS, SEQ, VOCAB, ACCUM, DEVICES = 32, 16, 1024, 4, 8
    model = models.build(TextConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                    num_layers=1, num_heads=4, num_kv_heads=2))
    params = models.init_params(model, 0)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, VOCAB, (ROWS, SEQ)).astype(np.int32)
    labels = np.where(rng.random((ROWS, SEQ)) < 0.6, ids, -100).astype(np.int32)
    batch = {"input_ids": ids, "attention_mask": np.ones_like(ids), "labels": labels}

    mesh = sharding.make_mesh({"data": 2, "fsdp": 4, "expert": 1, "tensor": 1})
    tx = optax.sgd(0.0)
    state = steps.init_state(sharding.place(model, params, mesh), [".*"], tx)
    step = steps.make_train_step("sft", model, None, tx, grad_accum_steps=ACCUM)
    b = sharding.batch_to_device(batch, mesh)
    hlo = step.lower(state, b, None).compile().as_text()
    rows = sorted({int(r) for r in re.findall(r"f32\[(\d+),%d,%d\]" % (SEQ, VOCAB), hlo)})
    assert rows == [ROWS // ACCUM // DEVICES], f"per-device logits rows {rows}"

    loss = steps.loss_fn("sft", model, None, steps.LossConfig())
    size = ROWS // ACCUM
    want = np.mean([float(loss(params, None, {k: v[i * size:(i + 1) * size] for k, v in batch.items()},
                                None, False)[0]) for i in range(ACCUM)])
    _, metrics = step(state, b, None)  # donates the state
    np.testing.assert_allclose(float(metrics["loss"]), want, rtol=1e-5)
    print("OK")
''')


def test_micro_batch_rows_stay_on_their_devices():
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
         "JAX_PLATFORMS": "cpu"}
  p = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True,
                     timeout=600)
  assert p.returncode == 0 and "OK" in p.stdout, p.stderr[-4000:]
