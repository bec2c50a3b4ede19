"""Hugging Face weights in and out: `model, params = hf.load(dir)`, `hf.save(model, params, dir)`;
`hf.from_original(dir, out)` rewrites an original LLaVA-MoD / LLaVA-1.5 checkpoint for transformers."""

from llavamod_jax.hf.convert import load, load_config, read_config, save
from llavamod_jax.hf.original import to_transformers as from_original

__all__ = ["from_original", "load", "load_config", "read_config", "save"]
