"""Shared pieces of the benchmarks: size profiles, interleaved timing, the matmul peak, FLOP counts.

The machine these run on is noisy (shared cores), so every comparison times its variants interleaved
(A, B, A, B, ...) in one process and reports medians and ratios measured in that same run.
"""

from __future__ import annotations

import dataclasses
import os
import platform
import statistics
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from llavamod_jax.losses import IGNORE
from llavamod_jax.models.configs import TextConfig


# ---------------------------------------------------------------------------------------------
# Sizes. "full" is the setting docs/benchmarks.md reports; "quick" fits in minutes on 2 cores;
# "tiny" is for the smoke test only.
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LMSize:
  hidden: int
  layers: int
  heads: int
  kv_heads: int
  inter: int

  def text(self, vocab: int, **kw) -> TextConfig:
    return TextConfig(vocab_size=vocab, hidden_size=self.hidden, intermediate_size=self.inter,
                      num_layers=self.layers, num_heads=self.heads, num_kv_heads=self.kv_heads,
                      rope_theta=10000.0, **kw)

  def describe(self) -> str:
    return f"h{self.hidden} x {self.layers} layers ({self.heads} heads, {self.kv_heads} kv, FFN {self.inter})"


@dataclasses.dataclass(frozen=True)
class Profile:
  name: str
  teacher: LMSize
  student: LMSize
  vocab: int
  batch: int
  seq: int
  experts: int
  top_k: int
  moe_layers: str  # which student layers are MoE (moe.parse_layers)
  step_repeats: int  # interleaved timed steps per variant
  # MoE layer benchmark
  moe_tokens: int
  moe_hidden: int
  moe_inter: int
  moe_grid: tuple[tuple[int, int], ...]
  moe_repeats: int
  moe_variants: tuple[str, ...]  # names in moe_layer.VARIANTS
  # memory benchmark (XLA memory analysis, no execution)
  mem_vocab: int
  mem_batch: int
  mem_seq: int
  mem_teacher: LMSize
  mem_student: LMSize
  mem_chunk: int
  # scaling
  scale_batch: int
  scale_seqs: tuple[int, ...]
  scale_experts: tuple[int, ...]
  scale_experts_seq: int  # sequence length of the experts sweep
  scale_repeats: int
  matmul_n: int
  with_expert_parallel: bool = True
  tunix_batch: int = 1  # rows per step of the Tunix comparison (bench/tunix_step.py)


FULL = Profile(
    name="full",
    teacher=LMSize(512, 8, 8, 2, 2048), student=LMSize(256, 4, 4, 2, 1024), vocab=32000,
    batch=4, seq=512, experts=4, top_k=2, moe_layers="sparse", step_repeats=7,
    moe_tokens=2048, moe_hidden=256, moe_inter=512, moe_grid=((4, 1), (4, 2), (8, 1), (8, 2)),
    moe_repeats=15, moe_variants=("dropless-dense", "dropless-ragged", "dropless-blocked",
                                  "dropless-blocked-64", "capacity-1.5"),
    mem_vocab=151936, mem_batch=2, mem_seq=512, mem_teacher=LMSize(256, 2, 4, 2, 512),
    mem_student=LMSize(128, 2, 4, 2, 256), mem_chunk=128,
    scale_batch=1, scale_seqs=(512, 1024, 2048, 4096), scale_experts=(2, 4, 8, 16),
    scale_experts_seq=512, scale_repeats=5, matmul_n=2048,
)

QUICK = dataclasses.replace(
    FULL, name="quick", batch=1, step_repeats=5, moe_repeats=4,
    moe_variants=("dropless-ragged", "dropless-blocked", "capacity-1.5"),
    scale_seqs=(512, 1024), scale_experts=(2, 4, 8, 16), scale_experts_seq=256, scale_repeats=2,
    matmul_n=1536,
)

TINY = Profile(
    name="tiny",
    teacher=LMSize(32, 2, 4, 2, 64), student=LMSize(16, 2, 4, 2, 32), vocab=128,
    batch=2, seq=16, experts=4, top_k=2, moe_layers="sparse", step_repeats=2,
    moe_tokens=64, moe_hidden=16, moe_inter=32, moe_grid=((4, 2),), moe_repeats=2,
    moe_variants=("dropless-blocked", "capacity-1.5"),
    mem_vocab=1024, mem_batch=1, mem_seq=32, mem_teacher=LMSize(32, 1, 4, 2, 64),
    mem_student=LMSize(16, 1, 4, 2, 32), mem_chunk=8,
    scale_batch=1, scale_seqs=(16, 32), scale_experts=(2, 4), scale_experts_seq=16, scale_repeats=2,
    matmul_n=128,
    with_expert_parallel=False,
)

PROFILES = {p.name: p for p in (FULL, QUICK, TINY)}


# ---------------------------------------------------------------------------------------------
# Timing.
# ---------------------------------------------------------------------------------------------


def interleaved(fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 1) -> dict[str, list[float]]:
  """Seconds per call of each fn, timed round-robin so machine noise hits every variant alike.

  Each fn must block until its work is done. The first `warmup` calls (compilation) are not timed.
  """
  for f in fns.values():
    for _ in range(warmup):
      f()
  times = {n: [] for n in fns}
  for _ in range(repeats):
    for n, f in fns.items():
      t0 = time.perf_counter()
      f()
      times[n].append(time.perf_counter() - t0)
  return times


def median(xs) -> float:
  return statistics.median(xs)


def matmul_peak(n: int, repeats: int = 7) -> float:
  """The matmul peak MFU divides by: the best FLOP/s of a jitted f32 square matmul of size n or n / 2,
  best of `repeats` each (on a loaded machine the shorter one more often runs undisturbed; taking the
  higher of the two keeps MFU on the conservative side)."""
  rng = np.random.default_rng(0)
  f = jax.jit(jnp.dot)
  best = 0.0
  for size in (n // 2, n):
    a = jnp.asarray(rng.standard_normal((size, size)), jnp.float32)
    b = jnp.asarray(rng.standard_normal((size, size)), jnp.float32)
    f(a, b).block_until_ready()
    t = min(_timed(lambda a=a, b=b: f(a, b).block_until_ready()) for _ in range(repeats))
    best = max(best, 2 * size**3 / t)
  return best


def _timed(f) -> float:
  t0 = time.perf_counter()
  f()
  return time.perf_counter() - t0


ISA_FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni",
             "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8", "asimd", "sve", "sve2")


def cpu() -> dict:
  """The CPU's model name and the ISA extensions that matter to matmul kernels (from
  /proc/cpuinfo on Linux; the platform's processor string elsewhere)."""
  model, flags = platform.processor() or platform.machine(), set()
  try:
    text = open("/proc/cpuinfo").read()
  except OSError:
    text = ""
  for line in text.splitlines():
    key, _, value = line.partition(":")
    key = key.strip().lower()
    if key in ("model name", "cpu model") and value.strip():
      model = value.strip()
    elif key in ("flags", "features"):
      flags |= set(value.split())
  return {"cpu": model, "isa": [f for f in ISA_FLAGS if f in flags]}


def cores() -> int:
  return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def batch_arrays(vocab: int, batch: int, seq: int, prompt_frac: float = 0.25, seed: int = 0):
  """Random token ids, all-ones attention mask, labels with the first `prompt_frac` of each row masked
  (as a prompt), as numpy int32 / int64 arrays."""
  rng = np.random.default_rng(seed)
  ids = rng.integers(0, vocab, (batch, seq)).astype(np.int32)
  labels = ids.copy()
  labels[:, : int(seq * prompt_frac)] = IGNORE
  return {"input_ids": ids, "attention_mask": np.ones_like(ids), "labels": labels}


def fmt_rate(x: float) -> str:
  return f"{x:,.0f}"


def section_main(run: Callable, markdown: Callable) -> None:
  """The command line of a section run on its own: `python bench/<section>.py [--quick]`."""
  import argparse

  ap = argparse.ArgumentParser()
  ap.add_argument("--quick", action="store_true")
  args = ap.parse_args()
  print(markdown(run(QUICK if args.quick else FULL)))
