"""Adapters that let other tools run llavamod_jax models.

- `lmms_eval_model`: the model "llavamod_jax" of lmms-eval (`pip install -e ".[eval]"`), registered
  through lmms-eval's entry-point group "lmms_eval.models" (pyproject.toml) by `lmms_eval_models`.
"""

LMMS_EVAL_MODEL = "llavamod_jax"


def lmms_eval_models():
  """lmms-eval's entry point: the manifest of our model. lmms-eval loads every entry point of its
  group at start, whichever model it then runs, so this module stays light: JAX is imported only
  when the model is built."""
  from lmms_eval.models.registry_v2 import ModelManifest

  return [ModelManifest(model_id=LMMS_EVAL_MODEL,
                        simple_class_path=f"{__name__}.lmms_eval_model.LlavaModJax")]
