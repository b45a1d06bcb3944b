"""Forward latency of one model under three attention variants, measured in one process:

  static   an integer-offset schedule (default `fixed`), compiled from its tables;
  learned  learned alpha on its dynamic path (the paper reports ~5x static);
  frozen   the learned alphas rounded into integer patterns (`fibax.evaluate.freeze`) and
           compiled like a static schedule (the target: <= 1.05x static).

    table = latency_table(model_cfg, learned_params=run.params, batch_sizes=(1, 32))
    print(format_latency(table))

Works on any backend: on a CPU the numbers are CPU numbers (use a small config there).
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable, Sequence

import jax

from fibax import attention
from fibax.config import ModelConfig
from fibax.evaluate import freeze
from fibax.model import Transformer, init_params

LATENCY_VARIANTS = ("static", "learned", "frozen")


def variant_models(
  cfg: ModelConfig, learned_params=None, static_schedule: str = "fixed"
) -> dict[str, tuple[ModelConfig, object]]:
  """variant -> (config, parameters). Without `learned_params` the learned model is freshly
  initialised (every alpha = 1, so `frozen` has the `fixed` schedule's pattern)."""
  if static_schedule in ("learned", "dense"):
    raise ValueError(f"static_schedule={static_schedule!r} must be an integer-offset schedule")

  def with_schedule(schedule: str) -> ModelConfig:
    att = dataclasses.replace(cfg.attention, schedule=schedule, frozen_alphas=None)
    return dataclasses.replace(cfg, attention=att)

  static_cfg, learned_cfg = with_schedule(static_schedule), with_schedule("learned")
  learned_params = init_params(learned_cfg) if learned_params is None else learned_params
  return {
    "static": (static_cfg, init_params(static_cfg)),
    "learned": (learned_cfg, learned_params),
    "frozen": (freeze(learned_params, learned_cfg), learned_params),
  }


def time_forward(
  cfg: ModelConfig, params, batch_size: int, seq_len: int, *, reps: int = 10, rounds: int = 5
) -> float:
  """Milliseconds per forward (logits) at [batch_size, seq_len]: the median over `rounds` of
  the mean of `reps` back-to-back calls, after a compiling call."""
  fn = jax.jit(lambda p, x: Transformer(cfg).apply({"params": p}, x))
  tokens_BxT = jax.random.randint(jax.random.key(1), (batch_size, seq_len), 0, cfg.vocab_size)
  return median_ms(fn, params, tokens_BxT, reps=reps, rounds=rounds)


def median_ms(fn, *args, reps: int = 10, rounds: int = 5) -> float:
  """Milliseconds per call of `fn(*args)`: the median over `rounds` of the mean of `reps`
  back-to-back (asynchronously dispatched) calls, after a first, compiling call."""
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(rounds):
    start = time.perf_counter()
    for _ in range(reps):
      out = fn(*args)
    jax.block_until_ready(out)
    times.append((time.perf_counter() - start) / reps * 1e3)
  return statistics.median(times)


def latency_table(
  cfg: ModelConfig,
  *,
  learned_params=None,
  static_schedule: str = "fixed",
  seq_len: int = 1024,
  batch_sizes: Sequence[int] = (1, 32),
  variants: Sequence[str] = LATENCY_VARIANTS,
  reps: int = 10,
  rounds: int = 5,
  log: Callable[[str], None] = print,
) -> dict:
  """ms per forward and tokens/s for each variant and batch size, with the ratio to static.

  Returns:
    {"device", "jax_version", "seq_len", "impl", "gpu_blocks", "static_schedule", "frozen_alphas",
     "learned_alphas" ("given": `learned_params`' alphas; "initial": a fresh model's, every
     alpha 1), "rows": [{"variant", "batch_size", "ms", "tokens_per_s", "vs_static"}]}.
  """
  for v in variants:
    if v not in LATENCY_VARIANTS:
      raise ValueError(f"unknown latency variant={v!r}; expected one of {LATENCY_VARIANTS}")
  for b in batch_sizes:
    if b < 1:
      raise ValueError(f"batch_size={b} must be >= 1")
  models = variant_models(cfg, learned_params, static_schedule)
  rows = []
  for batch in batch_sizes:
    static_ms = None
    for variant in variants:
      variant_cfg, params = models[variant]
      ms = time_forward(variant_cfg, params, batch, seq_len, reps=reps, rounds=rounds)
      static_ms = ms if variant == "static" else static_ms
      row = {
        "variant": variant,
        "batch_size": batch,
        "ms": ms,
        "tokens_per_s": batch * seq_len / (ms * 1e-3),
        "vs_static": None if static_ms is None else ms / static_ms,
      }
      log(_latency_line(row))
      rows.append(row)
  device = jax.devices()[0]
  return {
    "device": f"{device.device_kind} ({device.platform})",
    "jax_version": jax.__version__,
    "seq_len": seq_len,
    "impl": cfg.attention.impl,
    # The packed Pallas GPU kernels' blocks of the static and frozen layers ("" for another
    # impl; learned rungs always take the Triton kernels).
    "gpu_blocks": attention.resolved_gpu_blocks(cfg.attention),
    "static_schedule": static_schedule,
    "frozen_alphas": list(models["frozen"][0].attention.frozen_alphas),
    "learned_alphas": "initial" if learned_params is None else "given",
    "config": dataclasses.asdict(cfg),
    "rows": rows,
  }


def _latency_line(row: dict) -> str:
  ratio = "" if row["vs_static"] is None else f"  {row['vs_static']:.3f}x static"
  return (
    f"{row['variant']:<8} batch {row['batch_size']:>3}: {row['ms']:9.2f} ms  "
    f"{row['tokens_per_s']:>12,.0f} tok/s{ratio}"
  )


def format_latency(table: dict) -> str:
  head = (
    f"forward latency at T={table['seq_len']} on {table['device']} (impl {table['impl']}, "
    f"static = {table['static_schedule']})"
  )
  return "\n".join([head, *(_latency_line(r) for r in table["rows"])])
