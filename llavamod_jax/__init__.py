"""llavamod_jax: LLaVA-MoD (MoE knowledge distillation of LLaVA) in JAX/Flax."""

__version__ = "0.1.0"
