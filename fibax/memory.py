"""Will one evaluation forward fit? XLA's compiled memory estimate against the free memory,
checked before anything runs, so a long dense evaluation is refused with a message instead of
crashing out of memory.

Shape key: B batch, L evaluation length.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp

from fibax.config import ModelConfig
from fibax.steps import nll_sum_fn

# Only a fraction of the free memory is promised to one forward (allocator fragmentation).
MEMORY_HEADROOM = 0.9


class InsufficientMemory(RuntimeError):
  """A forward at this length would not fit in the device's free memory; nothing was run."""


def free_memory_bytes(device: jax.Device | None = None) -> int:
  """Free memory of `device` (an accelerator's allocator limit, else the host's available)."""
  device = device or jax.devices()[0]
  stats = device.memory_stats() if device.platform != "cpu" else None
  if stats and "bytes_limit" in stats:
    return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))
  try:
    with open("/proc/meminfo") as f:
      info = dict(line.split(":", 1) for line in f)
    return int(info["MemAvailable"].split()[0]) * 1024
  except (OSError, KeyError, ValueError):
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def _materializes_scores(cfg: ModelConfig) -> bool:
  """Whether a dense layer builds the [B, H, L, L] score tensor (every path but cuDNN's
  flash attention, which `dense` picks only on a GPU for 16-bit inputs)."""
  if cfg.attention.schedule != "dense":
    return False
  impl = cfg.attention.dense_impl
  flash = impl == "cudnn" or (
    impl == "dense" and jax.default_backend() == "gpu" and cfg.compute_dtype != "float32"
  )
  return not flash


def _gib(n: float) -> str:
  return f"{n / 2**30:.2f} GiB"


def compile_forward(
  cfg: ModelConfig, params, seq_len: int, batch_size: int, free_bytes: int | None = None
) -> tuple[Any, int, int]:
  """(compiled per-position NLL sum, batch size, estimated bytes) for windows of `seq_len`.

  The batch is lowered until XLA's compiled memory estimate (beyond the parameters, which are
  already resident) fits in MEMORY_HEADROOM of the free memory.

  Raises:
    InsufficientMemory: even batch 1 would not fit (nothing is run, so no out-of-memory crash).
  """
  free = free_memory_bytes() if free_bytes is None else free_bytes
  budget = int(free * MEMORY_HEADROOM)
  param_bytes = sum(x.nbytes for x in jax.tree.leaves(params))
  kind = "dense" if cfg.attention.schedule == "dense" else f"{cfg.attention.schedule} sparse"
  if _materializes_scores(cfg):
    # The [1, H, L, L] float32 scores alone; checked before compiling such a graph at all.
    scores = cfg.num_heads * seq_len * seq_len * 4
    if scores > budget:
      raise InsufficientMemory(
        f"{kind} model at seq_len={seq_len} needs > {_gib(scores)} for one row's attention "
        f"scores (dense_impl={cfg.attention.dense_impl!r}) but {_gib(free)} is free; not run"
      )
  fn = nll_sum_fn(cfg)

  def build(batch: int) -> tuple[Any, int, int]:
    tokens = jax.ShapeDtypeStruct((batch, seq_len), jnp.int32)
    weights = jax.ShapeDtypeStruct((batch,), jnp.float32)
    compiled = fn.lower(params, tokens, tokens, weights).compile()
    stats = compiled.memory_analysis()
    if stats is None:  # a backend without an estimate: logits and one layer's activations
      need = batch * seq_len * (cfg.vocab_size * 8 + cfg.mlp_hidden * 12 + cfg.d_model * 32)
    else:
      need = (
        stats.temp_size_in_bytes
        + stats.output_size_in_bytes
        + stats.argument_size_in_bytes
        - stats.alias_size_in_bytes
        - param_bytes
      )
    return compiled, batch, need

  # One compile when the asked batch fits; otherwise batch 1 decides whether anything fits,
  # and the largest batch that its estimate scaled linearly allows is tried (then halved).
  result = build(batch_size)
  if result[2] <= budget:
    return result
  if batch_size > 1:
    single = build(1)
    if single[2] <= budget:
      batch = min(batch_size - 1, budget // max(single[2], 1))
      while batch > 1:
        result = build(batch)
        if result[2] <= budget:
          return result
        batch //= 2
      return single
    result = single
  raise InsufficientMemory(
    f"{kind} model at seq_len={seq_len} needs ~{_gib(result[2])} at batch 1 (XLA's compiled "
    f"estimate) but {_gib(free)} is free on {jax.devices()[0].device_kind}; not run"
  )
