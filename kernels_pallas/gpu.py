"""Fibonacci sparse attention for GPUs: Pallas kernels lowered through Triton.

Shape key: B batch, T (padded) sequence, H query heads, K kv heads, G = H // K, D head dim,
Q query-block rows, C key-block rows.

The pattern's distances are static (built on the host at trace time). For a query block
[i0, i0 + Q) the window 0..W is a banded flash loop over key blocks (tensor-core matmuls),
and each far rung d reads the contiguous key rows [i0 - d, i0 - d + Q): one key per query,
a row-wise dot product. The backward for key block [j0, j0 + C) reads query rows j0 + d,
the transpose of the same table, so dK/dV need no atomics. Online softmax in float32
(FlashAttention-2 §3.1); the log-sum-exp is saved for the backward.

All G query heads of a kv head run in one program, so each K/V row is loaded once for G.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from kernels_pallas.reference import MASK_VALUE


@dataclasses.dataclass(frozen=True)
class GpuBlocks:
  """Block rows and warps; the window loop uses block_q x block_q tiles."""

  # Tuned on one H100 at T = 65,536, 8/2 heads, D = 64 (experiments/results/
  # bench_attention_h100.json, "autotune"): small query blocks keep the G = 4 heads'
  # accumulators in registers; the rungs are CUDA-core work, not tensor-core work.
  block_q: int = 16
  num_warps: int = 2
  num_stages: int = 2
  block_q_bwd: int = 16
  num_warps_bwd: int = 4


def _rows(ref, rows, cols, valid, dtype=None):
  """Gathers ref[rows, :] with rows clamped to the ref and zero where not `valid`."""
  rows_c = jnp.clip(rows, 0, ref.shape[0] - 1)
  x = plgpu.load(ref.at[rows_c[:, None], cols[None, :]], mask=valid[:, None], other=0.0)
  return x if dtype is None else x.astype(dtype)


def _window_tile(k_ref, v_ref, kb, rows_i, window, block_q):
  """Key tile kb and the band mask 0 <= i - j <= W of query rows `rows_i` against it."""
  j0 = kb * block_q
  rel = rows_i[:, None] - (j0 + jnp.arange(block_q))[None, :]
  keep = (rel >= 0) & (rel <= window)
  return k_ref[pl.ds(j0, block_q), :], v_ref[pl.ds(j0, block_q), :], keep


def _online(carry, s_QxC, v_CxD):
  """One online-softmax step over a key tile (FlashAttention-2 §3.1), one query head."""
  acc, m, l = carry
  m_new = jnp.maximum(m, jnp.max(s_QxC, axis=1))
  corr = jnp.exp(m - m_new)
  p_QxC = jnp.exp(s_QxC - m_new[:, None])
  l = l * corr + jnp.sum(p_QxC, axis=1)
  acc = acc * corr[:, None] + plgpu.dot(p_QxC.astype(v_CxD.dtype), v_CxD)
  return acc, m_new, l


def _fwd_kernel(q_ref, k_ref, v_ref, o_ref, lse_ref, *, window, far, groups, scale, block_q):
  # q_ref/o_ref [Q, G, D]; k_ref/v_ref [T, D]; lse_ref [G, Q]
  qi = pl.program_id(0)
  i0 = qi * block_q
  head_dim = k_ref.shape[1]
  cols = jnp.arange(head_dim)
  rows_i = i0 + jnp.arange(block_q)
  q_g = [q_ref[:, g, :] for g in range(groups)]

  # Pass 1: rung scores (one key row i - d per query). Their max seeds the online softmax,
  # so the rungs' values are added once at the end without rescaling the accumulators.
  s_rungs = [[] for _ in range(groups)]
  for d in far:
    valid = rows_i - d >= 0
    k_QxD = _rows(k_ref, rows_i - d, cols, valid, jnp.float32)
    for g in range(groups):
      s_Q = jnp.sum(q_g[g].astype(jnp.float32) * k_QxD, axis=1) * scale
      s_rungs[g].append(jnp.where(valid, s_Q, MASK_VALUE))
  carry = []
  for g in range(groups):
    m_Q = jnp.full((block_q,), MASK_VALUE, jnp.float32)
    for s_Q in s_rungs[g]:
      m_Q = jnp.maximum(m_Q, s_Q)
    carry.append(
      (jnp.zeros((block_q, head_dim), jnp.float32), m_Q, jnp.zeros((block_q,), jnp.float32))
    )

  # Pass 2: the window, a banded flash loop over key blocks overlapping [i0 - W, i0 + Q).
  def window_body(kb, carry):
    k_CxD, v_CxD, keep = _window_tile(k_ref, v_ref, kb, rows_i, window, block_q)
    out = []
    for g in range(groups):
      s_QxC = plgpu.dot(q_g[g], k_CxD, trans_b=True) * scale
      out.append(_online(carry[g], jnp.where(keep, s_QxC, MASK_VALUE), v_CxD))
    return out

  kb_lo = jnp.maximum(i0 - window, 0) // block_q
  carry = lax.fori_loop(kb_lo, qi + 1, window_body, carry)

  # Pass 3: rung values at the final max.
  for j, d in enumerate(far):
    valid = rows_i - d >= 0
    v_QxD = _rows(v_ref, rows_i - d, cols, valid, jnp.float32)
    for g in range(groups):
      acc, m, l = carry[g]
      p_Q = jnp.where(valid, jnp.exp(s_rungs[g][j] - m), 0.0)
      carry[g] = (acc + p_Q[:, None] * v_QxD, m, l + p_Q)

  for g in range(groups):
    acc, m, l = carry[g]
    o_ref[:, g, :] = (acc / l[:, None]).astype(o_ref.dtype)
    lse_ref[g, :] = m + jnp.log(l)


def _dq_kernel(
  q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref, *, window, far, groups, scale, block_q
):
  # q/do/dq [Q, G, D]; k/v [T, D]; lse/delta [G, Q]
  qi = pl.program_id(0)
  i0 = qi * block_q
  head_dim = k_ref.shape[1]
  cols = jnp.arange(head_dim)
  rows_i = i0 + jnp.arange(block_q)
  q_g = [q_ref[:, g, :] for g in range(groups)]
  do_g = [do_ref[:, g, :] for g in range(groups)]
  lse_g = [lse_ref[g, :] for g in range(groups)]
  delta_g = [delta_ref[g, :] for g in range(groups)]

  def window_body(kb, dq):
    k_CxD, v_CxD, keep = _window_tile(k_ref, v_ref, kb, rows_i, window, block_q)
    out = []
    for g in range(groups):
      s_QxC = plgpu.dot(q_g[g], k_CxD, trans_b=True) * scale
      p_QxC = jnp.where(keep, jnp.exp(s_QxC - lse_g[g][:, None]), 0.0)
      dp_QxC = plgpu.dot(do_g[g], v_CxD, trans_b=True)
      ds_QxC = p_QxC * (dp_QxC - delta_g[g][:, None])
      out.append(dq[g] + plgpu.dot(ds_QxC.astype(k_CxD.dtype), k_CxD))
    return out

  dq = [jnp.zeros((block_q, head_dim), jnp.float32) for _ in range(groups)]
  kb_lo = jnp.maximum(i0 - window, 0) // block_q
  dq = lax.fori_loop(kb_lo, qi + 1, window_body, dq)

  for d in far:
    rows_k = rows_i - d
    valid = rows_k >= 0
    k_QxD = _rows(k_ref, rows_k, cols, valid, jnp.float32)
    v_QxD = _rows(v_ref, rows_k, cols, valid, jnp.float32)
    for g in range(groups):
      s_Q = jnp.sum(q_g[g].astype(jnp.float32) * k_QxD, axis=1) * scale
      p_Q = jnp.where(valid, jnp.exp(s_Q - lse_g[g]), 0.0)
      dp_Q = jnp.sum(do_g[g].astype(jnp.float32) * v_QxD, axis=1)
      dq[g] = dq[g] + (p_Q * (dp_Q - delta_g[g]))[:, None] * k_QxD

  for g in range(groups):
    dq_ref[:, g, :] = (dq[g] * scale).astype(dq_ref.dtype)


def _dkv_kernel(
  q_ref,
  k_ref,
  v_ref,
  do_ref,
  lse_ref,
  delta_ref,
  dk_ref,
  dv_ref,
  *,
  window,
  far,
  groups,
  scale,
  block_q,
  seq_len,
):
  # q/do [T, G, D]; k/v/dk/dv [C, D]; lse/delta [G, T]
  kj = pl.program_id(0)
  j0 = kj * block_q
  head_dim = k_ref.shape[1]
  cols = jnp.arange(head_dim)
  rows_j = j0 + jnp.arange(block_q)
  k_CxD = k_ref[...]
  v_CxD = v_ref[...]
  num_q_blocks = seq_len // block_q

  def window_body(qb, carry):
    dk, dv = carry
    i0 = qb * block_q
    rows_q = pl.ds(i0, block_q)
    rel = (i0 + jnp.arange(block_q))[:, None] - rows_j[None, :]
    keep = (rel >= 0) & (rel <= window)
    for g in range(groups):
      q_QxD = q_ref[rows_q, g, :]
      do_QxD = do_ref[rows_q, g, :]
      lse_Q = lse_ref[g, rows_q]
      delta_Q = delta_ref[g, rows_q]
      s_QxC = plgpu.dot(q_QxD, k_CxD, trans_b=True) * scale
      p_QxC = jnp.where(keep, jnp.exp(s_QxC - lse_Q[:, None]), 0.0)
      dv = dv + plgpu.dot(p_QxC.astype(do_QxD.dtype), do_QxD, trans_a=True)
      dp_QxC = plgpu.dot(do_QxD, v_CxD, trans_b=True)
      ds_QxC = p_QxC * (dp_QxC - delta_Q[:, None])
      dk = dk + plgpu.dot(ds_QxC.astype(q_QxD.dtype), q_QxD, trans_a=True)
    return dk, dv

  zeros = jnp.zeros((block_q, head_dim), jnp.float32)
  qb_hi = jnp.minimum((j0 + block_q - 1 + window) // block_q + 1, num_q_blocks)
  dk, dv = lax.fori_loop(kj, qb_hi, window_body, (zeros, zeros))

  # Far rungs, transposed: key row j is read by query row j + d.
  k32, v32 = k_CxD.astype(jnp.float32), v_CxD.astype(jnp.float32)
  for d in far:
    rows_q = rows_j + d
    valid = rows_q < seq_len
    rows_c = jnp.clip(rows_q, 0, seq_len - 1)
    for g in range(groups):
      q_QxD = plgpu.load(
        q_ref.at[rows_c[:, None], g, cols[None, :]], mask=valid[:, None], other=0.0
      ).astype(jnp.float32)
      do_QxD = plgpu.load(
        do_ref.at[rows_c[:, None], g, cols[None, :]], mask=valid[:, None], other=0.0
      ).astype(jnp.float32)
      lse_Q = plgpu.load(lse_ref.at[g, rows_c], mask=valid, other=0.0)
      delta_Q = plgpu.load(delta_ref.at[g, rows_c], mask=valid, other=0.0)
      s_Q = jnp.sum(q_QxD * k32, axis=1) * scale
      p_Q = jnp.where(valid, jnp.exp(s_Q - lse_Q), 0.0)
      dv = dv + p_Q[:, None] * do_QxD
      dp_Q = jnp.sum(do_QxD * v32, axis=1)
      dk = dk + (p_Q * (dp_Q - delta_Q))[:, None] * q_QxD

  dk_ref[...] = (dk * scale).astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


def _params(num_warps, num_stages, interpret):
  if interpret:
    return None
  return plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages)


@functools.partial(jax.jit, static_argnames=("window", "far", "blocks", "interpret"))
def forward(q, k, v, *, window, far, blocks: GpuBlocks, interpret: bool):
  """q [B,T,H,D], k/v [B,T,K,D] with T a multiple of block_q -> (o, lse [B,H,T])."""
  bsz, seq_len, num_heads, head_dim = q.shape
  num_kv = k.shape[2]
  groups = num_heads // num_kv
  bq = blocks.block_q
  kernel = functools.partial(
    _fwd_kernel, window=window, far=far, groups=groups, scale=head_dim**-0.5, block_q=bq
  )
  grid = (seq_len // bq, bsz, num_kv)
  return pl.pallas_call(
    kernel,
    grid=grid,
    in_specs=[
      pl.BlockSpec((None, bq, groups, head_dim), lambda i, b, h: (b, i, h, 0)),
      pl.BlockSpec((None, seq_len, None, head_dim), lambda i, b, h: (b, 0, h, 0)),
      pl.BlockSpec((None, seq_len, None, head_dim), lambda i, b, h: (b, 0, h, 0)),
    ],
    out_specs=[
      pl.BlockSpec((None, bq, groups, head_dim), lambda i, b, h: (b, i, h, 0)),
      pl.BlockSpec((None, groups, bq), lambda i, b, h: (b, h, i)),
    ],
    out_shape=[
      jax.ShapeDtypeStruct(q.shape, q.dtype),
      jax.ShapeDtypeStruct((bsz, num_heads, seq_len), jnp.float32),
    ],
    compiler_params=_params(blocks.num_warps, blocks.num_stages, interpret),
    interpret=interpret,
    name="fib_attention_fwd",
  )(q, k, v)


@functools.partial(jax.jit, static_argnames=("window", "far", "blocks", "interpret"))
def backward(q, k, v, o, lse, do, *, window, far, blocks: GpuBlocks, interpret: bool, dlse=None):
  """Gradients (dq, dk, dv); T a multiple of block_q_bwd. `dlse` [B, H, T]: a cotangent of
  the forward's lse as well (it is subtracted from delta)."""
  bsz, seq_len, num_heads, head_dim = q.shape
  num_kv = k.shape[2]
  groups = num_heads // num_kv
  bq = blocks.block_q_bwd
  scale = head_dim**-0.5
  # delta_i = sum_d o_i * do_i (FlashAttention-2 Algorithm 2, line 4), one XLA fusion.
  delta = jnp.einsum("bthd,bthd->bht", o.astype(jnp.float32), do.astype(jnp.float32))
  if dlse is not None:
    delta = delta - dlse
  params = _params(blocks.num_warps_bwd, blocks.num_stages, interpret)
  statics = dict(window=window, far=far, groups=groups, scale=scale, block_q=bq)
  q_blk = pl.BlockSpec((None, bq, groups, head_dim), lambda i, b, h: (b, i, h, 0))
  q_all = pl.BlockSpec((None, seq_len, groups, head_dim), lambda i, b, h: (b, 0, h, 0))
  kv_all = pl.BlockSpec((None, seq_len, None, head_dim), lambda i, b, h: (b, 0, h, 0))
  kv_blk = pl.BlockSpec((None, bq, None, head_dim), lambda i, b, h: (b, i, h, 0))
  stat_blk = pl.BlockSpec((None, groups, bq), lambda i, b, h: (b, h, i))
  stat_all = pl.BlockSpec((None, groups, seq_len), lambda i, b, h: (b, h, 0))
  grid = (seq_len // bq, bsz, num_kv)
  dq = pl.pallas_call(
    functools.partial(_dq_kernel, **statics),
    grid=grid,
    in_specs=[q_blk, kv_all, kv_all, q_blk, stat_blk, stat_blk],
    out_specs=q_blk,
    out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
    compiler_params=params,
    interpret=interpret,
    name="fib_attention_dq",
  )(q, k, v, do, lse, delta)
  dk, dv = pl.pallas_call(
    functools.partial(_dkv_kernel, **statics, seq_len=seq_len),
    grid=grid,
    in_specs=[q_all, kv_blk, kv_blk, q_all, stat_all, stat_all],
    out_specs=[kv_blk, kv_blk],
    out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
    compiler_params=params,
    interpret=interpret,
    name="fib_attention_dkv",
  )(q, k, v, do, lse, delta)
  return dq, dk, dv
