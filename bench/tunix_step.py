"""Our mimic step against Tunix's logit distillation, the JAX peer (see DESCRIPTION below).

    python bench/tunix_step.py [--quick]

Tunix is an optional benchmark dependency: without it the section is skipped with a message. It pins
an older transformers, so install it beside ours without its dependencies (docs/benchmark_notes.md):

    pip install --no-deps google-tunix==0.1.7 google-metrax clu tensorboardX jaxtyping \\
        wadler-lindig sentencepiece perfetto pandas
"""

from __future__ import annotations

import tempfile

import numpy as np

import benchutil as bu
import jax_steps as js
from llavamod_jax import hf
from llavamod_jax.train import flops as flop_count

TUNIX_VERSION = "0.1.7"  # the release this section was written against
TEMPERATURE, ALPHA = 1.0, 0.5  # Tunix: ALPHA * T^2 * KL + (1 - ALPHA) * CE; ours KL + CE (x2, same update)
INSTALL = ("pip install --no-deps google-tunix==0.1.7 google-metrax clu tensorboardX jaxtyping "
           "wadler-lindig sentencepiece perfetto pandas")


def _tunix():
  """Tunix's modules, or the reason they cannot be imported."""
  try:
    from tunix.distillation import distillation_trainer, strategies
    from tunix.models.qwen2 import model as qwen2_model
    from tunix.models.qwen2 import params as qwen2_params
    from tunix.sft import sharding_utils, utils
  except ImportError as e:  # not installed, or one of its dependencies missing
    return None, f"Tunix is not importable ({type(e).__name__}: {e}); to run this section: {INSTALL}"
  return dict(trainer=distillation_trainer, strategies=strategies, model=qwen2_model,
              params=qwen2_params, sharding=sharding_utils, utils=utils), None


def tunix_config(tx, cfg):
  """Tunix's Qwen2 ModelConfig for one of our text configs (fp32, plain attention, no remat)."""
  return tx["model"].ModelConfig(
      num_layers=cfg.num_layers, vocab_size=cfg.vocab_size, embed_dim=cfg.hidden_size,
      hidden_dim=cfg.intermediate_size, num_heads=cfg.num_heads,
      head_dim=cfg.head_dim or cfg.hidden_size // cfg.num_heads, num_kv_heads=cfg.num_kv_heads,
      rope_theta=int(cfg.rope_theta), norm_eps=cfg.rms_norm_eps,
      use_tied_embedding=cfg.tie_word_embeddings)


class TunixStep:
  """Tunix's DistillationTrainer with its LogitStrategy, wired as Tunix's own distillation example
  and tests wire it (logits of positions 0..L-2, one-hot labels of tokens 1..L-1 times the mask).
  `__call__` runs one step as `trainer.train()` runs it: the strategy's jitted teacher forward
  (`_prepare_inputs`), then the trainer's jitted train step (student forward + backward, AdamW);
  the loop's Python bookkeeping (metrics buffer, progress bar, checkpoint manager) is left out."""

  def __init__(self, tx, student, teacher, batch, lr: float):
    import jax
    import jax.numpy as jnp
    import optax

    self.jax = jax
    vocab = student.config.vocab_size
    utils = tx["utils"]

    def forward(model, input_tokens, input_mask, positions, attention_mask):
      del input_mask
      logits, _ = model(input_tokens, positions, None, attention_mask)
      return logits[:, :-1, :]

    def labels(input_tokens, input_mask, positions, attention_mask):
      del positions, attention_mask
      one_hot = jax.nn.one_hot(input_tokens[:, 1:], vocab)
      return one_hot * input_mask[:, 1:].astype(one_hot.dtype)[..., None]

    def model_inputs(x):
      return {"input_tokens": x.input_tokens, "input_mask": x.input_mask,
              "positions": utils.build_positions_from_mask(x.input_mask.astype(bool)),
              "attention_mask": utils.make_causal_attn_mask(x.input_mask.astype(bool))}

    strategy = tx["strategies"].LogitStrategy(
        student_forward_fn=forward, teacher_forward_fn=forward, labels_fn=labels,
        temperature=TEMPERATURE, alpha=ALPHA)
    config = tx["trainer"].TrainingConfig(eval_every_n_steps=10**9, max_steps=10**9,
                                          pbar_description=None)
    self.trainer = tx["trainer"].DistillationTrainer(
        student_model=student, teacher_model=teacher, strategy=strategy,
        optimizer=optax.adamw(lr), training_config=config).with_gen_model_input_fn(model_inputs)
    self.train_step, _ = self.trainer.jit_train_and_eval_step(skip_jit=False, cache_nnx_graph=True)
    self.sharding = tx["sharding"]
    self.input = tx["trainer"].TrainingInput(input_tokens=jnp.asarray(batch["input_ids"]),
                                             input_mask=jnp.asarray(batch["attention_mask"]))
    self.last = None

  def __call__(self):
    x = self.trainer._prepare_inputs(self.input)  # the teacher forward, as train() calls it
    x = self.sharding.shard_input(x, self.trainer.config.data_sharding_axis)
    loss, aux, grad_norm = self.train_step(x)
    self.last = self.jax.block_until_ready({"loss": loss, **aux, "grad_norm": grad_norm})
    return self.last


def _load(tx, model, params, d: str):
  hf.save(model, params, d)
  return tx["params"].create_model_from_safe_tensors(d, tunix_config(tx, model.cfg))


def run(profile: bu.Profile, log=print) -> dict:
  tx, why = _tunix()
  if tx is None:
    log(f"  skipped: {why}")
    return {"skipped": why}
  from importlib import metadata

  p = profile
  tcfg, scfg = p.teacher.text(p.vocab), p.student.text(p.vocab)
  teacher, tparams = js.build(tcfg, 0)
  student, sparams = js.build(scfg, 1)
  # Unpadded rows, every next token trained: Tunix's LogitStrategy averages over every position it
  # is given (padding included), ours over the trained ones; on these rows both are the same 511
  # positions per row, so the first-step KL must agree.
  batch = bu.batch_arrays(p.vocab, p.tunix_batch, p.seq, prompt_frac=0.0)
  with tempfile.TemporaryDirectory() as d:
    t_tunix, s_tunix = _load(tx, teacher, tparams, d + "/teacher"), _load(tx, student, sparams, d + "/student")
  fns = {
      "ours": js.make_step("mimic", student, sparams, teacher, tparams, batch=batch, trainable="all"),
      "ours_full": js.make_step("mimic", student, sparams, teacher, tparams, batch=batch,
                                trainable="all", chunk_size=0),
      "tunix": TunixStep(tx, s_tunix, t_tunix, batch, js.LR),
  }
  first = {n: f() for n, f in fns.items()}  # compile + the first step at the shared start weights
  kl = {n: float(np.asarray(m["kl"])) for n, m in first.items() if n != "tunix"}
  kl["tunix"] = float(np.asarray(first["tunix"]["distill/kl_div"]))
  ce_tunix = float(np.asarray(first["tunix"]["distill/hard_loss"]))
  # Tunix's train step compiles again on its second call (the optimizer state it gets back differs
  # from the one it was traced with): one untimed step more for every variant.
  times = bu.interleaved(fns, p.step_repeats, warmup=1)
  tokens = p.tunix_batch * p.seq
  flops = flop_count.mimic_flops(tcfg, scfg, p.tunix_batch, p.seq, "all")
  med = {n: bu.median(t) for n, t in times.items()}
  rows = []
  default = js.steps.LossConfig().chunk_size
  for name, key in ((f"default: fused LM heads + loss, {default}-position chunks", "ours"),
                    ("full logits", "ours_full")):
    rows.append({"name": name, "ours_s": med[key], "tunix_s": med["tunix"],
                 "ours_tps": tokens / med[key], "tunix_tps": tokens / med["tunix"],
                 "ratio": med["tunix"] / med[key], "flops": flops,
                 "kl_ours": kl[key], "kl_tunix": kl["tunix"],
                 "kl_rel_diff": abs(kl[key] - kl["tunix"]) / max(abs(kl["tunix"]), 1e-12),
                 "ce_ours": float(np.asarray(first[key]["ce"])), "ce_tunix": ce_tunix,
                 "samples_ours": times[key], "samples_tunix": times["tunix"]})
    log(f"  {name}: ours {rows[-1]['ours_tps']:,.0f} tok/s, Tunix {rows[-1]['tunix_tps']:,.0f} "
        f"tok/s, x{rows[-1]['ratio']:.2f}; first-step KL {kl[key]:.6f} vs {kl['tunix']:.6f}")
  rows[0]["default"] = True
  return {"rows": rows, "tunix": metadata.version("google-tunix"),
          "setup": {"teacher": p.teacher.describe(), "student": p.student.describe(),
                    "vocab": p.vocab, "batch": p.tunix_batch, "seq": p.seq,
                    "repeats": p.step_repeats, "threads": bu.cores()}}


DESCRIPTION = """\
The same logit-distillation step in both JAX frameworks, on the same HF checkpoints: our
`hf.save` writes the teacher (Qwen2) and the dense student (Qwen2, every parameter trainable), ours
trains them as `launch/train.py` builds the mimic step, Tunix loads them with
`tunix.models.qwen2.params.create_model_from_safe_tensors` and trains with its
`DistillationTrainer` + `LogitStrategy` (temperature 1, alpha 0.5: 0.5 KL + 0.5 CE, which is our
KL + CE halved, the same AdamW update up to epsilon), wired as Tunix's own example does. One step
is: the teacher's forward without gradient, the student's forward and backward, AdamW. Tunix runs
its teacher as a separately jitted call that hands the full [batch, seq, vocab] logits to the train
step, as `DistillationTrainer.train()` does; its loop's Python bookkeeping is not timed. Rows are
unpadded and every next token is trained, so both average the KL over the same positions (Tunix's
`LogitStrategy` averages over every position it is given, padding included) and the first-step
KL must agree."""


def markdown(res: dict) -> str:
  if "skipped" in res:
    return f"Not measured in this run: {res['skipped']}."
  s = res["setup"]
  lines = [
      f"Tunix {res['tunix']}; teacher Qwen2 {s['teacher']}, dense student {s['student']}; "
      f"vocabulary {s['vocab']:,}; batch {s['batch']} x {s['seq']} tokens; fp32; median of "
      f"{s['repeats']} interleaved steps.", "",
      "| our step | ours tokens/s | Tunix tokens/s | ours / Tunix | MFU ours / Tunix | first-step KL "
      "ours / Tunix (rel. diff) | first-step CE ours / Tunix |",
      "|---|---|---|---|---|---|---|"]
  for r in res["rows"]:
    lines.append(f"| {r['name']} | {bu.fmt_rate(r['ours_tps'])} | {bu.fmt_rate(r['tunix_tps'])} | "
                 f"**{r['ratio']:.2f}** | {_pct(r.get('mfu'))} / {_pct(r.get('tunix_mfu'))} | "
                 f"{r['kl_ours']:.6f} / {r['kl_tunix']:.6f} "
                 f"({r['kl_rel_diff']:.1e}) | {r['ce_ours']:.5f} / {r['ce_tunix']:.5f} |")
  return "\n".join(lines)


def _pct(x) -> str:
  return "-" if x is None else f"{100 * x:.0f}%"


def main():
  bu.section_main(run, markdown)


if __name__ == "__main__":
  main()
