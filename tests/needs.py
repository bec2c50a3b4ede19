"""What the tests need beyond the package: the `[test]` extras (torch, scikit-image, libtpu) and the
Qwen2 tokenizer in ../shared/assets. Outside CI a missing one skips the tests that need it; in CI
(`.ci/run` sets CI=true), where `pip install -e ".[test]"` and ../shared provide every one, it fails
them, so a broken install or a moved asset cannot pass as a row of skips."""

from __future__ import annotations

import importlib
import importlib.util
import os

import pytest

STRICT = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def module(name: str):
  """`pytest.importorskip(name)`, or a plain import (failing) in CI."""
  return importlib.import_module(name) if STRICT else pytest.importorskip(name)


def missing(what: str, hint: str):
  """Inside a test or fixture: skip, or in CI fail, because `what` is not there."""
  if STRICT:
    pytest.fail(f"{what} is missing, and CI must have it ({hint})")
  pytest.skip(f"{what} not found ({hint})")


# Compile-only TPU devices need libtpu (`[test]` and `[tpu]` install it).
libtpu = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None and not STRICT,
                            reason="libtpu is not installed (pip install -e '.[tpu]')")
