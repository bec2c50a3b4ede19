"""The embedded default: a tiny LLaVA-MoD on a synthetic shapes set, minutes on a CPU.

This package sits above the trainer: it builds its data, tokenizer and teacher (`assets`), gives the
configs their demo settings (`recipes`), and holds its research (`tower`, the probes; README.md).
Nothing else in llavamod_jax imports it.

    cfg = demo.prepare(cfg)   # a config with a `demo` section -> plain trainer inputs
"""

from llavamod_jax.demo.assets import prepare

__all__ = ["prepare"]
