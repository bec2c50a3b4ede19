"""Hugging Face weights in and out: `model, params = hf.load(dir)`, `hf.save(model, params, dir)`."""

from llavamod_jax.hf.convert import load, load_config, read_config, save

__all__ = ["load", "load_config", "read_config", "save"]
