"""The public op: `fib_attention(q, k, v, pattern, backend=...)` with a custom VJP.

Shape key: B batch, T sequence, H query heads, K kv heads, D head dim.

The pattern (a hashable `fibax.patterns.Pattern`) is static: its window and rung table are
read on the host at trace time and unrolled into the kernels. Sequences that are not a
block multiple are zero-padded at the end; padded queries are sliced off and padded keys
are never attended (they lie after every real query).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Literal

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from fibax.patterns import Pattern
from kernels_pallas import gpu
from kernels_pallas.reference import check_qkv

Backend = Literal["gpu", "gpu_interpret", "tpu", "tpu_interpret"]
BACKENDS = ("gpu", "gpu_interpret", "tpu", "tpu_interpret")


def _pad_len(seq_len: int, multiple: int) -> int:
  return -(-seq_len // multiple) * multiple


def _pad(x, seq_len):
  return (
    x if x.shape[1] == seq_len else jnp.pad(x, ((0, 0), (0, seq_len - x.shape[1]), (0, 0), (0, 0)))
  )


def _blocks_for(backend: str, seq_len: int, blocks):
  if backend.startswith("gpu"):
    b = blocks or gpu.GpuBlocks()
    # Triton tiles need power-of-two sides >= 16; shrink blocks for short sequences.
    cap = max(16, 1 << max(seq_len - 1, 1).bit_length())
    b = dataclasses.replace(b, block_q=min(b.block_q, cap), block_q_bwd=min(b.block_q_bwd, cap))
    return b, max(b.block_q, b.block_q_bwd)
  from kernels_pallas import tpu

  b = blocks or tpu.TpuBlocks()
  # Rows a multiple of 16 (bf16 sublane packing); shrink for short sequences.
  b = tpu.TpuBlocks(block_q=min(b.block_q, _pad_len(seq_len, 16)))
  return b, b.block_q


def _impl(backend: str):
  if backend.startswith("gpu"):
    return gpu, dict(interpret=backend == "gpu_interpret")
  from kernels_pallas import tpu

  return tpu, dict(interpret=tpu.interpret_params() if backend == "tpu_interpret" else False)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _attend(q, k, v, pattern: Pattern, backend: str, blocks):
  return _fwd(q, k, v, pattern, backend, blocks)[0]


def _plan(seq_len: int, pattern: Pattern, backend: str, blocks):
  """Kernel module, padded length and static kernel arguments for a length-`seq_len` call.

  Rungs at or beyond T never have a valid key and are dropped; so is the part of the window
  past T - 1.
  """
  blocks, multiple = _blocks_for(backend, seq_len, blocks)
  module, kw = _impl(backend)
  far = tuple(d for d in pattern.far if d < seq_len)
  statics = dict(window=min(pattern.window, seq_len - 1), far=far, blocks=blocks, **kw)
  return module, _pad_len(seq_len, multiple), statics


def _fwd(q, k, v, pattern, backend, blocks):
  seq_len = q.shape[1]
  module, padded, statics = _plan(seq_len, pattern, backend, blocks)
  o, lse = module.forward(_pad(q, padded), _pad(k, padded), _pad(v, padded), **statics)
  o = o[:, :seq_len]
  return o, (q, k, v, o, lse)


def _bwd(pattern, backend, blocks, res, do, dlse_BxHxT=None):
  q, k, v, o, lse = res
  seq_len = q.shape[1]
  module, padded, statics = _plan(seq_len, pattern, backend, blocks)
  if dlse_BxHxT is not None:  # to the kernels' lse layout: [B, H, T_pad] (GPU), [..., 1] (TPU)
    dlse = jnp.pad(dlse_BxHxT, ((0, 0), (0, 0), (0, padded - seq_len)))
    statics["dlse"] = dlse.reshape(lse.shape)
  dq, dk, dv = module.backward(
    *(_pad(x, padded) for x in (q, k, v, o)), lse, _pad(do, padded), **statics
  )
  return dq[:, :seq_len], dk[:, :seq_len], dv[:, :seq_len]


_attend.defvjp(_fwd, _bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _attend_lse(q, k, v, pattern: Pattern, backend: str, blocks):
  return _fwd_lse(q, k, v, pattern, backend, blocks)[0]


def _fwd_lse(q, k, v, pattern, backend, blocks):
  o, res = _fwd(q, k, v, pattern, backend, blocks)
  lse = res[4]
  lse_BxHxT = lse.reshape(lse.shape[:3])[:, :, : q.shape[1]]
  return (o, lse_BxHxT), res


def _bwd_lse(pattern, backend, blocks, res, cotangents):
  do, dlse_BxHxT = cotangents
  return _bwd(pattern, backend, blocks, res, do, dlse_BxHxT)


_attend_lse.defvjp(_fwd_lse, _bwd_lse)


def fib_attention(
  q: Float[Array, "B T H D"],
  k: Float[Array, "B T K D"],
  v: Float[Array, "B T K D"],
  pattern: Pattern,
  *,
  backend: Backend = "gpu",
  blocks=None,
) -> Float[Array, "B T H D"]:
  """Sparse attention over `pattern`'s distances, O(T * (W + R)) forward and backward.

  Args:
    q, k, v: queries [B, T, H, D] and keys/values [B, T, K, D], H a multiple of K (GQA).
    pattern: the layer's static `Pattern` (window W and rung table).
    backend: "gpu" (Triton), "tpu" (Mosaic), or their "_interpret" modes for CPU tests.
    blocks: block sizes (`GpuBlocks` / `TpuBlocks`); defaults tuned on an H100.

  Returns:
    o [B, T, H, D] in q's dtype.
  """
  _check(q, k, v, pattern, backend, blocks)
  return _attend(q, k.astype(q.dtype), v.astype(q.dtype), pattern, backend, blocks)


def fib_attention_lse(
  q: Float[Array, "B T H D"],
  k: Float[Array, "B T K D"],
  v: Float[Array, "B T K D"],
  pattern: Pattern,
  *,
  backend: Backend = "gpu",
  blocks=None,
) -> tuple[Float[Array, "B T H D"], Float[Array, "B H T"]]:
  """`fib_attention` and the log-sum-exp of each query's scores (float32 [B, H, T]), both
  differentiable: a caller can merge this softmax with scores of its own (the learned path
  adds its fractional rungs so). The lse cotangent enters the kernels' backward through
  delta: d lse / d s_j = p_j, so ds_j = p_j (dp_j - (delta - dlse))."""
  _check(q, k, v, pattern, backend, blocks)
  return _attend_lse(q, k.astype(q.dtype), v.astype(q.dtype), pattern, backend, blocks)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8))
def _attend_learned(q, k, v, lo, frac, keep, window: int, backend: str, blocks):
  return _fwd_learned(q, k, v, lo, frac, keep, window, backend, blocks)[0]


def _learned_plan(seq_len, window, backend, blocks):
  blocks, multiple = _blocks_for(backend, seq_len, blocks)
  statics = dict(window=min(window, seq_len - 1), blocks=blocks)
  return _pad_len(seq_len, multiple), statics | dict(interpret=backend == "gpu_interpret")


def _fwd_learned(q, k, v, lo, frac, keep, window, backend, blocks):
  seq_len = q.shape[1]
  padded, statics = _learned_plan(seq_len, window, backend, blocks)
  o, lse = gpu.learned_forward(
    _pad(q, padded), _pad(k, padded), _pad(v, padded), lo, frac, keep, **statics
  )
  return o[:, :seq_len], (q, k, v, o, lse, lo, frac, keep)


def _bwd_learned(window, backend, blocks, res, do):
  q, k, v, o, lse, lo, frac, keep = res
  seq_len = q.shape[1]
  padded, statics = _learned_plan(seq_len, window, backend, blocks)
  dq, dk, dv, dfrac = gpu.learned_backward(
    *(_pad(x, padded) for x in (q, k, v, o)), lse, _pad(do, padded), lo, frac, keep, **statics
  )
  return dq[:, :seq_len], dk[:, :seq_len], dv[:, :seq_len], None, dfrac.astype(frac.dtype), None


_attend_learned.defvjp(_fwd_learned, _bwd_learned)


def fib_attention_learned(
  q: Float[Array, "B T H D"],
  k: Float[Array, "B T K D"],
  v: Float[Array, "B T K D"],
  window: int,
  lo: Int[Array, " R"],
  frac: Float[Array, " R"],
  keep: Bool[Array, " R"],
  *,
  backend: Literal["gpu", "gpu_interpret"] = "gpu",
  blocks=None,
) -> Float[Array, "B T H D"]:
  """A learned layer's attention in the packed GPU kernels: the window 0..W, then rung r at
  the run-time floor lo[r] with weight frac[r]: query i reads (1 - frac) x[i - lo] +
  frac x[max(i - lo - 1, 0)] of the keys and values, where i >= lo and keep[r]
  (`fibax.attention.learned` computes the same in plain JAX). Differentiable in q, k, v and
  frac (the path from frac to alpha is the caller's)."""
  check_qkv(q, k, v)
  if backend not in ("gpu", "gpu_interpret"):
    raise ValueError(f"learned rungs run in the GPU kernels only; got {backend=}")
  if not (lo.shape == frac.shape == keep.shape and lo.ndim == 1 and lo.shape[0] >= 1):
    raise ValueError(
      f"lo, frac and keep must be [R] with R >= 1; got {lo.shape}, {frac.shape}, {keep.shape}"
    )
  blocks = dataclasses.replace(blocks or gpu.GpuBlocks(), kernel="packed")
  _check_triton_shapes(q, k, backend, packed=True)
  k, v = k.astype(q.dtype), v.astype(q.dtype)
  return _attend_learned(q, k, v, lo, frac, keep, int(window), backend, blocks)


def _check_triton_shapes(q, k, backend, packed: bool):
  """Triton tiles have power-of-two sides >= 16: the head dim, and the packed kernels' Q * G
  rows. The interpreters take any shape; a GPU would fail deep in compilation."""
  if backend != "gpu":
    return
  head_dim, groups = q.shape[3], q.shape[2] // k.shape[2]
  if head_dim < 16 or head_dim & (head_dim - 1):
    raise ValueError(f"the GPU kernels need a power-of-two head dim >= 16; got {head_dim=}")
  if packed and groups & (groups - 1):
    raise ValueError(
      f"the packed GPU kernels need a power-of-two number of query heads per kv head; got {groups=}"
    )


def _check(q, k, v, pattern, backend, blocks=None):
  check_qkv(q, k, v)
  if backend not in BACKENDS:
    raise ValueError(f"unknown {backend=}; expected one of {BACKENDS}")
  _check_triton_shapes(q, k, backend, packed=getattr(blocks, "kernel", None) == "packed")
  if not isinstance(pattern, Pattern):
    raise ValueError(f"pattern must be a fibax.patterns.Pattern, got {type(pattern).__name__}")
  if q.dtype not in (jnp.float32, jnp.bfloat16, jnp.float16):
    raise ValueError(f"unsupported dtype {q.dtype}; expected float32, bfloat16 or float16")
