"""Upcycling, the student's HF export/import, and the aux outputs of a whole MoE model."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file

import tiny_hf
from llavamod_jax import hf, models, moe

DISPATCH = {"dense": dict(moe_impl="dense"), "ragged": dict(moe_impl="ragged"),
            "blocked": dict(moe_impl="blocked", moe_block_size=8), "capacity": dict(moe_dispatch="capacity")}
LAYERS = ["sparse", "first_half", "second_half", "all", [1, 2]]


@pytest.fixture(scope="module")
def dense_llava(tmp_path_factory, torch):
  import transformers
  tc = tiny_hf.text_config("qwen2", num_hidden_layers=4)
  cfg = transformers.LlavaConfig(vision_config=tiny_hf.vision_config("clip"), text_config=tc,
                                 image_token_index=tiny_hf.IMAGE_TOKEN)
  ref = tiny_hf.randomize(transformers.LlavaForConditionalGeneration(cfg), seed=21)
  path = tiny_hf.save(ref, tmp_path_factory.mktemp("dense"))
  model, params = hf.load(path)
  rng = np.random.default_rng(0)
  n = model.cfg.num_image_tokens
  ids = rng.integers(0, 100, (2, n + 9))
  ids[:, 4:4 + n] = tiny_hf.IMAGE_TOKEN
  pix = rng.standard_normal((2, 28, 28, 3)).astype(np.float32)
  return ref, model, params, jnp.asarray(ids), jnp.asarray(pix)


def test_parse_layers():
  assert moe.parse_layers("sparse", 6) == (0, 2, 4)
  assert moe.parse_layers("first_half", 6) == (0, 1, 2)
  assert moe.parse_layers("second_half", 6) == (3, 4, 5)
  assert moe.parse_layers("all", 3) == (0, 1, 2)
  assert moe.parse_layers([4, 1, 1], 6) == (1, 4)
  with pytest.raises(ValueError, match="out of range"):
    moe.parse_layers([6], 6)
  with pytest.raises(ValueError, match="'odd'"):
    moe.parse_layers("odd", 6)


@pytest.mark.parametrize("dispatch", list(DISPATCH))
@pytest.mark.parametrize("layers", LAYERS, ids=str)
def test_upcycled_student_equals_dense(dense_llava, layers, dispatch):
  _, model, params, ids, pix = dense_llava
  want = model.apply({"params": params}, ids, pix).logits
  student, sparams = moe.upcycle(model, params, num_experts=4, top_k=2, layers=layers, seed=3,
                                 **DISPATCH[dispatch])
  n_moe = len(moe.parse_layers(layers, 4))
  assert student.cfg.text.moe_layers == moe.parse_layers(layers, 4)
  assert sparams["language_model"]["layers_0"]["mlp"].keys() == (
      {"router", "experts"} if 0 in student.cfg.text.moe_layers else
      {"gate_proj", "up_proj", "down_proj"})
  for train in (False, True):  # train=True: the capacity path uses its (smaller) training factor
    out, state = student.apply({"params": sparams}, ids, pix, train=train, mutable=["moe"])
    if dispatch != "capacity" or not train:
      assert tiny_hf.rel_err(out.logits, want) < 1e-5
    assert len(moe.per_layer(state["moe"])) == n_moe


def test_upcycle_copies_experts_and_inits_router(dense_llava):
  _, model, params, _, _ = dense_llava
  _, sp = moe.upcycle(model, params, num_experts=3, top_k=1, layers=[1], seed=0)
  dense = params["language_model"]["layers_1"]["mlp"]
  got = sp["language_model"]["layers_1"]["mlp"]
  for e in range(3):
    np.testing.assert_array_equal(got["experts"]["gate_proj"][e], dense["gate_proj"]["kernel"])
    np.testing.assert_array_equal(got["experts"]["down_proj"][e], dense["down_proj"]["kernel"])
  bound = 1 / np.sqrt(32)
  assert got["router"].shape == (32, 3) and np.abs(got["router"]).max() <= bound
  _, sp2 = moe.upcycle(model, params, num_experts=3, top_k=1, layers=[1], seed=1)
  assert not np.array_equal(got["router"], sp2["language_model"]["layers_1"]["mlp"]["router"])
  with pytest.raises(ValueError, match="top_k=5 exceeds num_experts=3"):
    moe.upcycle(model, params, num_experts=3, top_k=5)


def test_aux_losses_sum_over_layers_and_reach_every_expert(dense_llava):
  _, model, params, ids, pix = dense_llava
  student, sp = moe.upcycle(model, params, layers="all")
  # Make experts differ so the routing matters, as after some training.
  noise = jax.tree.map(lambda a: 0.01 * jax.random.normal(jax.random.key(0), a.shape), sp)
  sp = jax.tree.map(jnp.add, sp, noise)

  def loss(p, i, x):
    out, state = student.apply({"params": p}, i, x, train=True, mutable=["moe"])
    aux = moe.aux_losses(state["moe"])
    return jnp.mean(out.logits ** 2) + 0.01 * aux["load_balancing_loss"], aux

  # Jitted, inputs as arguments (no eager op-by-op run).
  (_, aux), g = jax.jit(jax.value_and_grad(loss, has_aux=True))(sp, ids, pix)
  per = moe.per_layer(jax.jit(lambda p, i, x: jax.lax.stop_gradient(
      student.apply({"params": p}, i, x, mutable=["moe"])[1]["moe"]))(sp, ids, pix))
  assert float(aux["load_balancing_loss"]) == pytest.approx(
      sum(float(v["load_balancing_loss"]) for v in per.values()), rel=1e-6)
  for i in range(4):
    mlp = g["language_model"][f"layers_{i}"]["mlp"]
    assert float(jnp.abs(mlp["router"]).sum()) > 0
    # An expert gets gradient exactly when it was given tokens.
    used = np.asarray(per[f"language_model/layers_{i}/mlp"]["tokens_per_expert"]) > 0
    assert used.sum() >= 2
    np.testing.assert_array_equal(np.asarray(jnp.abs(mlp["experts"]["up_proj"]).reshape(4, -1).sum(-1) > 0),
                                  used)


def test_remat_student_matches(dense_llava, tmp_path):
  ref, model, params, ids, pix = dense_llava
  student, sp = moe.upcycle(model, params, layers="sparse", moe_dispatch="capacity")
  remat = models.build(student.cfg.replace(text=student.cfg.text.replace(remat=True)))
  f = lambda m: jax.jit(jax.grad(  # noqa: E731 (jitted, inputs as arguments: no eager op-by-op run)
      lambda p, i, x: jnp.mean(m.apply({"params": p}, i, x, train=True).logits ** 2)))
  g1, g2 = f(student)(sp, ids, pix), f(remat)(sp, ids, pix)
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7)


def test_student_from_config_with_random_weights():
  cfg = models.TextConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_layers=4, num_heads=2,
                          num_kv_heads=1, num_experts=4, num_experts_per_tok=2, moe_layers=(0, 2))
  params = models.init_params(models.build(cfg), seed=0)
  assert params["layers_0"]["mlp"]["experts"]["gate_proj"].shape == (4, 16, 32)
  assert "gate_proj" in params["layers_1"]["mlp"]
  logits = models.build(cfg).apply({"params": params}, jnp.zeros((1, 5), jnp.int32)).logits
  assert logits.shape == (1, 5, 64) and bool(jnp.isfinite(logits).all())


# ------------------------------------------------------------------------------------------------
# Hugging Face: the student exports as LLaVA + Qwen2-MoE; Qwen2-MoE checkpoints import.
# ------------------------------------------------------------------------------------------------


def test_exported_student_loads_in_transformers_with_dense_logits(dense_llava, tmp_path):
  import transformers
  ref, model, params, ids, pix = dense_llava
  student, sp = moe.upcycle(model, params, layers="sparse")
  out = hf.save(student, sp, tmp_path / "student")
  cfg = json.loads((out / "config.json").read_text())["text_config"]
  assert cfg["model_type"] == "qwen2_moe" and cfg["mlp_only_layers"] == [1, 3]
  assert cfg["shared_expert_intermediate_size"] == 0 and cfg["norm_topk_prob"] is True
  assert cfg["decoder_sparse_step"] == 1 and cfg["num_experts"] == 4
  back = transformers.LlavaForConditionalGeneration.from_pretrained(out).eval()
  assert type(back.model.language_model.layers[0].mlp).__name__ == "Qwen2MoeSparseMoeBlock"
  teacher = tiny_hf.torch_logits(ref, np.asarray(ids), pixel_values=np.asarray(pix))
  assert tiny_hf.rel_err(tiny_hf.torch_logits(back, np.asarray(ids), pixel_values=np.asarray(pix)),
                         teacher) < 1e-5
  again, sp2 = hf.load(out)
  assert again.cfg.text.moe_layers == (0, 2)
  assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), sp, sp2))


def test_text_only_student_exports_as_qwen2_moe_for_causal_lm(tmp_path, torch):
  import transformers
  ref = tiny_hf.causal_lm("llama", seed=22)  # a LLaMA base: no q/k/v bias, tied embeddings
  model, params = hf.load(tiny_hf.save(ref, tmp_path / "dense"))
  student, sp = moe.upcycle(model, params, num_experts=3, top_k=2, layers="all")
  out = hf.save(student, sp, tmp_path / "student")
  back = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
  assert type(back).__name__ == "Qwen2MoeForCausalLM"
  ids = np.random.default_rng(5).integers(0, tiny_hf.VOCAB, (2, 9))
  assert tiny_hf.rel_err(tiny_hf.torch_logits(back, ids), tiny_hf.torch_logits(ref, ids)) < 1e-5


def _qwen2_moe(seed):
  import transformers
  cfg = transformers.Qwen2MoeConfig(
      vocab_size=tiny_hf.VOCAB, hidden_size=32, intermediate_size=48, moe_intermediate_size=20,
      num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, num_experts=4,
      num_experts_per_tok=2, shared_expert_intermediate_size=0, norm_topk_prob=True,
      mlp_only_layers=[1], max_position_embeddings=128)
  return tiny_hf.randomize(transformers.Qwen2MoeForCausalLM(cfg), seed)


@pytest.mark.parametrize("layout", ["per_expert", "fused"])
def test_random_qwen2_moe_imports_with_parity(layout, tmp_path, torch):
  ref = _qwen2_moe(23)
  path = tiny_hf.save(ref, tmp_path / "q")
  if layout == "fused":  # transformers' in-memory names: experts.gate_up_proj [E, 2I, H]
    (path / "model.safetensors").unlink()
    state = {k: v.detach().numpy() for k, v in ref.state_dict().items()}
    assert "model.layers.0.mlp.experts.gate_up_proj" in state
    save_file(state, path / "model.safetensors", metadata={"format": "pt"})
  model, params = hf.load(path)
  assert model.cfg.moe_layers == (0, 2) and model.cfg.moe_intermediate_size == 20
  ids = np.random.default_rng(6).integers(0, tiny_hf.VOCAB, (2, 12))
  mask = np.ones_like(ids)
  mask[0, -3:] = 0
  got = np.asarray(model.apply({"params": params}, jnp.asarray(ids),
                               attention_mask=jnp.asarray(mask)).logits)
  want = tiny_hf.torch_logits(ref, ids, mask)
  assert tiny_hf.rel_err(got[mask == 1], want[mask == 1]) < 1e-4


def test_shared_expert_is_rejected(tmp_path, torch):
  import transformers
  cfg = transformers.Qwen2MoeConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
                                    moe_intermediate_size=8, num_hidden_layers=1, num_attention_heads=2,
                                    num_key_value_heads=1, num_experts=2, num_experts_per_tok=1,
                                    shared_expert_intermediate_size=8)
  path = tiny_hf.save(transformers.Qwen2MoeForCausalLM(cfg), tmp_path / "shared")
  with pytest.raises(NotImplementedError, match="shared expert"):
    hf.load(path)


def test_missing_expert_is_named(tmp_path, torch):
  from safetensors.numpy import load_file
  path = tiny_hf.save(_qwen2_moe(24), tmp_path / "q")
  t = load_file(path / "model.safetensors")
  del t["model.layers.2.mlp.experts.3.up_proj.weight"]
  save_file(t, path / "model.safetensors", metadata={"format": "pt"})
  with pytest.raises(ValueError, match=r"layers_2/mlp/experts/up_proj \(experts present: \[0, 1, 2\]"):
    hf.load(path)
