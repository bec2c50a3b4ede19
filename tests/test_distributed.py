"""When launch/train.py starts jax.distributed, and the single-process behaviour of the helpers (the
two-process run is tests/launch/test_multihost.py)."""

import pytest

from llavamod_jax import distributed


@pytest.mark.parametrize("mode, address, tpu_vm, env, expected", [
    ("auto", None, False, {}, False),  # a plain CPU/GPU run never initializes
    ("auto", "10.0.0.1:1234", False, {}, True),
    ("auto", None, False, {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234"}, True),
    ("auto", None, True, {}, True),  # a TPU VM: JAX finds the slice's hosts
    ("on", None, False, {}, True),
    ("off", "10.0.0.1:1234", True, {}, False),
])
def test_should_initialize(mode, address, tpu_vm, env, expected):
  assert distributed.should_initialize(mode, address, tpu_vm=tpu_vm, environ=env) is expected


def test_bad_mode_and_orphan_flags_are_errors():
  with pytest.raises(ValueError, match="--distributed='maybe'"):
    distributed.should_initialize("maybe", None, tpu_vm=False, environ={})
  with pytest.raises(ValueError, match="--num_processes, --process_id given"):
    distributed.initialize("off", num_processes=2, process_id=0)


def test_tpu_vm_needs_libtpu(monkeypatch):
  monkeypatch.setattr(distributed.importlib.util, "find_spec", lambda name: None)
  assert not distributed.on_tpu_vm({"TPU_WORKER_HOSTNAMES": "a,b"})


def test_single_process_helpers_are_local():
  assert not distributed.initialize("auto") or pytest.fail("initialized a plain run")
  assert distributed.is_main()
  assert distributed.main_first("x", lambda: 7) == 7
  assert distributed.main_value(3) == 3 and distributed.any_process(True)
  assert distributed.total(2.5) == 2.5
  distributed.barrier("nothing to wait for")
