"""Hugging Face weights in and out: `model, params = hf.load(dir)`, `hf.save(model, params, dir)`;
`hf.from_original(dir, out)` rewrites an original LLaVA-MoD / LLaVA-1.5 checkpoint for transformers."""

from llavamod_jax.hf.convert import from_original, load, load_config, read_config, save

__all__ = ["from_original", "load", "load_config", "read_config", "save"]
