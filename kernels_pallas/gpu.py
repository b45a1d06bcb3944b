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

Two kernel sets (`GpuBlocks.kernel`): "rowwise" (above: rungs unrolled per layer, one key per
query as a row-wise dot product) and "packed" (below: the G heads packed into the rows of
tensor-core tiles, the rungs a loop over an int32 table passed to the kernel, so every layer
shares one compiled kernel).
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
  # "rowwise": the rungs unrolled per layer as row-wise dot products (CUDA cores).
  # "packed": the G heads of a kv head packed into the rows of tensor-core tiles, the rungs a
  # loop over an int32 table that is a kernel input, so layers share one compiled kernel.
  kernel: str = "rowwise"

  def __post_init__(self):
    if self.kernel not in KERNELS:
      raise ValueError(f"unknown GPU kernel={self.kernel!r}; expected one of {KERNELS}")


KERNELS = ("rowwise", "packed")


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
  if blocks.kernel == "packed":
    return _forward_packed(
      q, k, v, rung_table(far), window=window, blocks=blocks, interpret=interpret
    )
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
  if blocks.kernel == "packed":
    return _backward_packed(
      q, k, v, o, lse, do, rung_table(far), window=window, blocks=blocks, interpret=interpret,
      dlse=dlse,
    )  # fmt: skip
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


# ----------------------------------------------------------------------------------------------
# Packed kernels. M = Q * G packed rows: row m is query row m // G of head m % G, the order of
# a [Q, G, D] block in memory, so the packed load is one contiguous tile. Every score tile is a
# tensor-core matmul of the M packed rows against a tile of keys: the window's tile of
# pow2(Q + W) rows (a band mask), then one Q-row tile per rung (a diagonal mask: query row r
# reads key row r of the tile), in a loop whose distances come from an int32 table.


def rung_table(far: tuple[int, ...]) -> jax.Array:
  """int32 [1 + R rounded up to 16]: the rung count, then the rung distances (zero padding,
  never read). Its length depends only on R // 16, so layers share one compiled kernel."""
  size = -(-(len(far) + 1) // 16) * 16
  return jnp.asarray([len(far), *far] + [0] * (size - 1 - len(far)), jnp.int32)


def _pow2_at_least(n: int) -> int:
  return max(16, 1 << (n - 1).bit_length())


def _packed(block_q: int, groups: int):
  """(query row of each packed row, head of each packed row), both int32 [Q * G]."""
  m = jnp.arange(block_q * groups)
  return m // groups, m % groups


def _fwd_packed_kernel(
  table_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, *, window, groups, scale, block_q
):
  # table [S] int32; q_ref/o_ref [Q, G, D]; k_ref/v_ref [T, D]; lse_ref [G, Q]
  i0 = pl.program_id(0) * block_q
  cols = jnp.arange(k_ref.shape[1])
  r_M, g_M = _packed(block_q, groups)
  q_MxD = plgpu.load(q_ref.at[r_M[:, None], g_M[:, None], cols[None, :]])
  rows_M = i0 + r_M

  # The window: key rows [i0 + Q - CW, i0 + Q), a band 0 <= i - j <= W.
  cw = _pow2_at_least(block_q + window)
  kw_C = i0 + block_q - cw + jnp.arange(cw)
  k_CxD = _rows(k_ref, kw_C, cols, kw_C >= 0)
  v_CxD = _rows(v_ref, kw_C, cols, kw_C >= 0)
  rel = rows_M[:, None] - kw_C[None, :]
  keep = (rel >= 0) & (rel <= window) & (kw_C >= 0)[None, :]
  s_MxC = jnp.where(keep, plgpu.dot(q_MxD, k_CxD, trans_b=True) * scale, MASK_VALUE)
  m_M = jnp.max(s_MxC, axis=1)
  p_MxC = jnp.exp(s_MxC - m_M[:, None])
  carry = (plgpu.dot(p_MxC.astype(v_CxD.dtype), v_CxD), m_M, jnp.sum(p_MxC, axis=1))

  # The rungs: key rows i0 + r - d of the tile, query row r reads row r only.
  c_Q = jnp.arange(block_q)
  diag = r_M[:, None] == c_Q[None, :]

  def rung(j, carry):
    kr_Q = i0 + c_Q - table_ref[1 + j]
    valid = kr_Q >= 0
    k_QxD = _rows(k_ref, kr_Q, cols, valid)
    v_QxD = _rows(v_ref, kr_Q, cols, valid)
    s_MxQ = plgpu.dot(q_MxD, k_QxD, trans_b=True) * scale
    return _online(carry, jnp.where(diag & valid[None, :], s_MxQ, MASK_VALUE), v_QxD)

  acc, m_M, l_M = lax.fori_loop(0, table_ref[0], rung, carry)
  o = (acc / l_M[:, None]).astype(o_ref.dtype)
  plgpu.store(o_ref.at[r_M[:, None], g_M[:, None], cols[None, :]], o)
  plgpu.store(lse_ref.at[g_M, r_M], m_M + jnp.log(l_M))


def _dq_packed_kernel(
  table_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref, *, window, groups, scale,
  block_q,
):  # fmt: skip
  # q/do/dq [Q, G, D]; k/v [T, D]; lse/delta [G, Q]
  i0 = pl.program_id(0) * block_q
  cols = jnp.arange(k_ref.shape[1])
  r_M, g_M = _packed(block_q, groups)
  tile = (r_M[:, None], g_M[:, None], cols[None, :])
  q_MxD = plgpu.load(q_ref.at[tile])
  do_MxD = plgpu.load(do_ref.at[tile])
  lse_M = plgpu.load(lse_ref.at[g_M, r_M])
  delta_M = plgpu.load(delta_ref.at[g_M, r_M])
  rows_M = i0 + r_M

  def grad(dq, k_CxD, v_CxD, keep):
    s = plgpu.dot(q_MxD, k_CxD, trans_b=True) * scale
    p = jnp.where(keep, jnp.exp(s - lse_M[:, None]), 0.0)
    dp = plgpu.dot(do_MxD, v_CxD, trans_b=True)
    ds = p * (dp - delta_M[:, None])
    return dq + plgpu.dot(ds.astype(k_CxD.dtype), k_CxD)

  cw = _pow2_at_least(block_q + window)
  kw_C = i0 + block_q - cw + jnp.arange(cw)
  rel = rows_M[:, None] - kw_C[None, :]
  keep = (rel >= 0) & (rel <= window) & (kw_C >= 0)[None, :]
  dq = jnp.zeros(q_MxD.shape, jnp.float32)
  dq = grad(dq, _rows(k_ref, kw_C, cols, kw_C >= 0), _rows(v_ref, kw_C, cols, kw_C >= 0), keep)

  c_Q = jnp.arange(block_q)
  diag = r_M[:, None] == c_Q[None, :]

  def rung(j, dq):
    kr_Q = i0 + c_Q - table_ref[1 + j]
    valid = kr_Q >= 0
    k_QxD = _rows(k_ref, kr_Q, cols, valid)
    v_QxD = _rows(v_ref, kr_Q, cols, valid)
    return grad(dq, k_QxD, v_QxD, diag & valid[None, :])

  dq = lax.fori_loop(0, table_ref[0], rung, dq)
  plgpu.store(dq_ref.at[tile], (dq * scale).astype(dq_ref.dtype))


def _dkv_packed_kernel(
  table_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref, *, window, groups,
  scale, block_q, seq_len,
):  # fmt: skip
  # q/do [T, G, D]; k/v/dk/dv [C, D]; lse/delta [G, T]. Key block [j0, j0 + C); the queries
  # that read it are a contiguous run of rows for the window and for each rung, packed with
  # their G heads, so the contraction over packed rows sums the heads' gradients.
  j0 = pl.program_id(0) * block_q
  cols = jnp.arange(k_ref.shape[1])
  k_CxD = k_ref[...]
  v_CxD = v_ref[...]
  c_C = jnp.arange(block_q)

  def grad(carry, first_row, rows, keep_fn):
    """Adds the gradients of the `rows` x G packed queries starting at query row first_row."""
    dk, dv = carry
    r_M, g_M = _packed(rows, groups)
    qr_M = first_row + r_M
    valid = qr_M < seq_len
    qr_c = jnp.minimum(qr_M, seq_len - 1)
    at = (qr_c[:, None], g_M[:, None], cols[None, :])
    q_MxD = plgpu.load(q_ref.at[at], mask=valid[:, None], other=0.0)
    do_MxD = plgpu.load(do_ref.at[at], mask=valid[:, None], other=0.0)
    lse_M = plgpu.load(lse_ref.at[g_M, qr_c], mask=valid, other=0.0)
    delta_M = plgpu.load(delta_ref.at[g_M, qr_c], mask=valid, other=0.0)
    keep = keep_fn(r_M, qr_M) & valid[:, None]
    s = plgpu.dot(q_MxD, k_CxD, trans_b=True) * scale
    p = jnp.where(keep, jnp.exp(s - lse_M[:, None]), 0.0)
    dv = dv + plgpu.dot(p.astype(do_MxD.dtype), do_MxD, trans_a=True)
    dp = plgpu.dot(do_MxD, v_CxD, trans_b=True)
    ds = p * (dp - delta_M[:, None])
    dk = dk + plgpu.dot(ds.astype(q_MxD.dtype), q_MxD, trans_a=True)
    return dk, dv

  def band(r_M, qr_M):
    rel = qr_M[:, None] - (j0 + c_C)[None, :]
    return (rel >= 0) & (rel <= window)

  zeros = jnp.zeros((block_q, k_ref.shape[1]), jnp.float32)
  carry = grad((zeros, zeros), j0, _pow2_at_least(block_q + window), band)

  def diagonal(r_M, qr_M):
    return r_M[:, None] == c_C[None, :]

  def rung(j, carry):
    return grad(carry, j0 + table_ref[1 + j], block_q, diagonal)

  dk, dv = lax.fori_loop(0, table_ref[0], rung, carry)
  dk_ref[...] = (dk * scale).astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


def _packed_specs(seq_len, groups, head_dim, bq, table):
  table_spec = pl.BlockSpec(table.shape, lambda i, b, h: (0,))
  q_blk = pl.BlockSpec((None, bq, groups, head_dim), lambda i, b, h: (b, i, h, 0))
  kv_all = pl.BlockSpec((None, seq_len, None, head_dim), lambda i, b, h: (b, 0, h, 0))
  return table_spec, q_blk, kv_all


@functools.partial(jax.jit, static_argnames=("window", "blocks", "interpret"))
def _forward_packed(q, k, v, table, *, window, blocks: GpuBlocks, interpret: bool):
  bsz, seq_len, num_heads, head_dim = q.shape
  num_kv = k.shape[2]
  groups = num_heads // num_kv
  bq = blocks.block_q
  table_spec, q_blk, kv_all = _packed_specs(seq_len, groups, head_dim, bq, table)
  kernel = functools.partial(
    _fwd_packed_kernel, window=window, groups=groups, scale=head_dim**-0.5, block_q=bq
  )
  return pl.pallas_call(
    kernel,
    grid=(seq_len // bq, bsz, num_kv),
    in_specs=[table_spec, q_blk, kv_all, kv_all],
    out_specs=[q_blk, pl.BlockSpec((None, groups, bq), lambda i, b, h: (b, h, i))],
    out_shape=[
      jax.ShapeDtypeStruct(q.shape, q.dtype),
      jax.ShapeDtypeStruct((bsz, num_heads, seq_len), jnp.float32),
    ],
    compiler_params=_params(blocks.num_warps, blocks.num_stages, interpret),
    interpret=interpret,
    name="fib_attention_packed_fwd",
  )(table, q, k, v)


@functools.partial(jax.jit, static_argnames=("window", "blocks", "interpret"))
def _backward_packed(q, k, v, o, lse, do, table, *, window, blocks, interpret, dlse=None):
  bsz, seq_len, num_heads, head_dim = q.shape
  num_kv = k.shape[2]
  groups = num_heads // num_kv
  bq = blocks.block_q_bwd
  delta = jnp.einsum("bthd,bthd->bht", o.astype(jnp.float32), do.astype(jnp.float32))
  if dlse is not None:
    delta = delta - dlse
  params = _params(blocks.num_warps_bwd, blocks.num_stages, interpret)
  statics = dict(window=window, groups=groups, scale=head_dim**-0.5, block_q=bq)
  table_spec, q_blk, kv_all = _packed_specs(seq_len, groups, head_dim, bq, table)
  q_all = pl.BlockSpec((None, seq_len, groups, head_dim), lambda i, b, h: (b, 0, h, 0))
  kv_blk = pl.BlockSpec((None, bq, None, head_dim), lambda i, b, h: (b, i, h, 0))
  stat_blk = pl.BlockSpec((None, groups, bq), lambda i, b, h: (b, h, i))
  stat_all = pl.BlockSpec((None, groups, seq_len), lambda i, b, h: (b, h, 0))
  grid = (seq_len // bq, bsz, num_kv)
  dq = pl.pallas_call(
    functools.partial(_dq_packed_kernel, **statics),
    grid=grid,
    in_specs=[table_spec, q_blk, kv_all, kv_all, q_blk, stat_blk, stat_blk],
    out_specs=q_blk,
    out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
    compiler_params=params,
    interpret=interpret,
    name="fib_attention_packed_dq",
  )(table, q, k, v, do, lse, delta)
  dk, dv = pl.pallas_call(
    functools.partial(_dkv_packed_kernel, **statics, seq_len=seq_len),
    grid=grid,
    in_specs=[table_spec, q_all, kv_blk, kv_blk, q_all, stat_all, stat_all],
    out_specs=[kv_blk, kv_blk],
    out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
    compiler_params=params,
    interpret=interpret,
    name="fib_attention_packed_dkv",
  )(table, q, k, v, do, lse, delta)
  return dq, dk, dv


# ----------------------------------------------------------------------------------------------
# Learned rungs in the packed kernels. Rung r of a learned layer has a run-time floor lo_r and
# weight f_r: query i reads the key (1 - f) k[i - lo] + f k[max(i - lo - 1, 0)] (and the same
# value blend), valid where i >= lo and the rung is kept. Scores and values are linear in the
# blend, so each rung is two tensor-core matmuls on the two integer-offset tiles, mixed by f;
# the dq kernel also returns each program's d f_r, which reaches alpha through f = alpha b - lo.


def _learned_rung_scalars(lo_ref, frac_ref, keep_ref, j):
  return lo_ref[j], frac_ref[j], keep_ref[j] != 0


def _learned_fwd_kernel(
  lo_ref, frac_ref, keep_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, *, window, groups, scale,
  block_q, num_rungs,
):  # fmt: skip
  i0 = pl.program_id(0) * block_q
  cols = jnp.arange(k_ref.shape[1])
  r_M, g_M = _packed(block_q, groups)
  q_MxD = plgpu.load(q_ref.at[r_M[:, None], g_M[:, None], cols[None, :]])
  rows_M = i0 + r_M
  cw = _pow2_at_least(block_q + window)
  kw_C = i0 + block_q - cw + jnp.arange(cw)
  k_CxD = _rows(k_ref, kw_C, cols, kw_C >= 0)
  v_CxD = _rows(v_ref, kw_C, cols, kw_C >= 0)
  rel = rows_M[:, None] - kw_C[None, :]
  keep = (rel >= 0) & (rel <= window) & (kw_C >= 0)[None, :]
  s_MxC = jnp.where(keep, plgpu.dot(q_MxD, k_CxD, trans_b=True) * scale, MASK_VALUE)
  m_M = jnp.max(s_MxC, axis=1)
  p_MxC = jnp.exp(s_MxC - m_M[:, None])
  carry = (plgpu.dot(p_MxC.astype(v_CxD.dtype), v_CxD), m_M, jnp.sum(p_MxC, axis=1))
  c_Q = jnp.arange(block_q)
  diag = r_M[:, None] == c_Q[None, :]

  def rung(j, carry):
    acc, m, l = carry
    lo, f, kept = _learned_rung_scalars(lo_ref, frac_ref, keep_ref, j)
    ka_Q = i0 + c_Q - lo
    kb_Q = jnp.maximum(ka_Q - 1, 0)
    valid = ka_Q >= 0
    k_a, k_b = _rows(k_ref, ka_Q, cols, valid), _rows(k_ref, kb_Q, cols, valid)
    v_a, v_b = _rows(v_ref, ka_Q, cols, valid), _rows(v_ref, kb_Q, cols, valid)
    s = (1 - f) * plgpu.dot(q_MxD, k_a, trans_b=True) + f * plgpu.dot(q_MxD, k_b, trans_b=True)
    s = jnp.where(diag & valid[None, :] & kept, s * scale, MASK_VALUE)
    m_new = jnp.maximum(m, jnp.max(s, axis=1))
    corr = jnp.exp(m - m_new)
    p = jnp.exp(s - m_new[:, None])
    pv = p.astype(v_a.dtype)
    acc = acc * corr[:, None] + (1 - f) * plgpu.dot(pv, v_a) + f * plgpu.dot(pv, v_b)
    return acc, m_new, l * corr + jnp.sum(p, axis=1)

  acc, m_M, l_M = lax.fori_loop(0, num_rungs, rung, carry)
  plgpu.store(
    o_ref.at[r_M[:, None], g_M[:, None], cols[None, :]], (acc / l_M[:, None]).astype(o_ref.dtype)
  )
  plgpu.store(lse_ref.at[g_M, r_M], m_M + jnp.log(l_M))


def _learned_dq_kernel(
  lo_ref, frac_ref, keep_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref,
  dfrac_ref, *, window, groups, scale, block_q, num_rungs,
):  # fmt: skip
  # dfrac_ref [R_pad]: this program's d loss / d f_r.
  i0 = pl.program_id(0) * block_q
  cols = jnp.arange(k_ref.shape[1])
  r_M, g_M = _packed(block_q, groups)
  tile = (r_M[:, None], g_M[:, None], cols[None, :])
  q_MxD = plgpu.load(q_ref.at[tile])
  do_MxD = plgpu.load(do_ref.at[tile])
  lse_M = plgpu.load(lse_ref.at[g_M, r_M])
  delta_M = plgpu.load(delta_ref.at[g_M, r_M])
  rows_M = i0 + r_M
  cw = _pow2_at_least(block_q + window)
  kw_C = i0 + block_q - cw + jnp.arange(cw)
  k_CxD = _rows(k_ref, kw_C, cols, kw_C >= 0)
  v_CxD = _rows(v_ref, kw_C, cols, kw_C >= 0)
  rel = rows_M[:, None] - kw_C[None, :]
  keep = (rel >= 0) & (rel <= window) & (kw_C >= 0)[None, :]
  p = jnp.where(keep, jnp.exp(plgpu.dot(q_MxD, k_CxD, trans_b=True) * scale - lse_M[:, None]), 0.0)
  ds = p * (plgpu.dot(do_MxD, v_CxD, trans_b=True) - delta_M[:, None])
  dq = plgpu.dot(ds.astype(k_CxD.dtype), k_CxD)
  c_Q = jnp.arange(block_q)
  diag = r_M[:, None] == c_Q[None, :]
  slots = jnp.arange(dfrac_ref.shape[0])

  def rung(j, carry):
    dq, dfrac = carry
    lo, f, kept = _learned_rung_scalars(lo_ref, frac_ref, keep_ref, j)
    ka_Q = i0 + c_Q - lo
    kb_Q = jnp.maximum(ka_Q - 1, 0)
    valid = ka_Q >= 0
    k_a, k_b = _rows(k_ref, ka_Q, cols, valid), _rows(k_ref, kb_Q, cols, valid)
    v_a, v_b = _rows(v_ref, ka_Q, cols, valid), _rows(v_ref, kb_Q, cols, valid)
    s_a = plgpu.dot(q_MxD, k_a, trans_b=True) * scale
    s_b = plgpu.dot(q_MxD, k_b, trans_b=True) * scale
    keep = diag & valid[None, :] & kept
    p = jnp.where(keep, jnp.exp((1 - f) * s_a + f * s_b - lse_M[:, None]), 0.0)
    dp_a = plgpu.dot(do_MxD, v_a, trans_b=True)
    dp_b = plgpu.dot(do_MxD, v_b, trans_b=True)
    ds = p * ((1 - f) * dp_a + f * dp_b - delta_M[:, None])
    dsk = ds.astype(k_a.dtype)
    dq = dq + (1 - f) * plgpu.dot(dsk, k_a) + f * plgpu.dot(dsk, k_b)
    d_f = jnp.sum(ds * (s_b - s_a) + p * (dp_b - dp_a))
    return dq, dfrac + jnp.where(slots == j, d_f, 0.0)

  dq, dfrac = lax.fori_loop(0, num_rungs, rung, (dq, jnp.zeros(dfrac_ref.shape, jnp.float32)))
  plgpu.store(dq_ref.at[tile], (dq * scale).astype(dq_ref.dtype))
  dfrac_ref[...] = dfrac


def _learned_dkv_kernel(
  lo_ref, frac_ref, keep_ref, q_ref, k_ref, v_ref, kall_ref, vall_ref, do_ref, lse_ref,
  delta_ref, dk_ref, dv_ref, *, window, groups, scale, block_q, seq_len, num_rungs,
):  # fmt: skip
  # Key block [j0, j0 + C). Rung r reaches row j from query j + lo (weight 1 - f, its other
  # key the row before, j - 1) and from query j + lo + 1 (weight f, its other key the row
  # after); query lo also reads row 0 with weight f (the clamp), which lands on row 0.
  j0 = pl.program_id(0) * block_q
  cols = jnp.arange(k_ref.shape[1])
  k_CxD, v_CxD = k_ref[...], v_ref[...]
  c_C = jnp.arange(block_q)
  before = jnp.maximum(j0 + c_C - 1, 0)
  after = jnp.minimum(j0 + c_C + 1, seq_len - 1)
  every = c_C >= 0
  k_before, v_before = _rows(kall_ref, before, cols, every), _rows(vall_ref, before, cols, every)
  k_after, v_after = _rows(kall_ref, after, cols, every), _rows(vall_ref, after, cols, every)

  def queries(first_row, rows):
    r_M, g_M = _packed(rows, groups)
    qr_M = first_row + r_M
    valid = qr_M < seq_len
    qr_c = jnp.minimum(qr_M, seq_len - 1)
    at = (qr_c[:, None], g_M[:, None], cols[None, :])
    return (
      r_M,
      qr_M,
      valid,
      plgpu.load(q_ref.at[at], mask=valid[:, None], other=0.0),
      plgpu.load(do_ref.at[at], mask=valid[:, None], other=0.0),
      plgpu.load(lse_ref.at[g_M, qr_c], mask=valid, other=0.0),
      plgpu.load(delta_ref.at[g_M, qr_c], mask=valid, other=0.0),
    )

  # The window: the integer band, as in the packed dkv kernel.
  r_M, qr_M, valid, q_w, do_w, lse_w, delta_w = queries(j0, _pow2_at_least(block_q + window))
  rel = qr_M[:, None] - (j0 + c_C)[None, :]
  keep = (rel >= 0) & (rel <= window) & valid[:, None]
  p = jnp.where(keep, jnp.exp(plgpu.dot(q_w, k_CxD, trans_b=True) * scale - lse_w[:, None]), 0.0)
  dv = plgpu.dot(p.astype(do_w.dtype), do_w, trans_a=True)
  ds = p * (plgpu.dot(do_w, v_CxD, trans_b=True) - delta_w[:, None])
  dk = plgpu.dot(ds.astype(q_w.dtype), q_w, trans_a=True)

  def tile(carry, first_row, f, kept, k_a, v_a, k_b, v_b, w_C):
    """Queries first_row + c (x G heads) whose rung key is (1 - f) k_a[c] + f k_b[c]; adds
    their gradients, weighted by w_C, to this block's rows."""
    dk, dv = carry
    r_M, _, valid, q_M, do_M, lse_M, delta_M = queries(first_row, block_q)
    keep = (r_M[:, None] == c_C[None, :]) & valid[:, None] & kept
    s_a = plgpu.dot(q_M, k_a, trans_b=True) * scale
    s_b = plgpu.dot(q_M, k_b, trans_b=True) * scale
    p = jnp.where(keep, jnp.exp((1 - f) * s_a + f * s_b - lse_M[:, None]), 0.0)
    dp = (1 - f) * plgpu.dot(do_M, v_a, trans_b=True) + f * plgpu.dot(do_M, v_b, trans_b=True)
    ds = p * (dp - delta_M[:, None])
    dv = dv + plgpu.dot((p * w_C[None, :]).astype(do_M.dtype), do_M, trans_a=True)
    dk = dk + plgpu.dot((ds * w_C[None, :]).astype(q_M.dtype), q_M, trans_a=True)
    return dk, dv

  def rung(j, carry):
    lo, f, kept = _learned_rung_scalars(lo_ref, frac_ref, keep_ref, j)
    w_a = (1 - f) + jnp.where(j0 + c_C == 0, f, 0.0)  # the clamp of query lo onto row 0
    carry = tile(carry, j0 + lo, f, kept, k_CxD, v_CxD, k_before, v_before, w_a)
    w_b = jnp.full((block_q,), f, jnp.float32)
    return tile(carry, j0 + lo + 1, f, kept, k_after, v_after, k_CxD, v_CxD, w_b)

  dk, dv = lax.fori_loop(0, num_rungs, rung, (dk, dv))
  dk_ref[...] = (dk * scale).astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


def _learned_tables(lo, frac, keep):
  size = -(-lo.shape[0] // 16) * 16
  pad = (0, size - lo.shape[0])
  return (
    jnp.pad(lo.astype(jnp.int32), pad),
    jnp.pad(frac.astype(jnp.float32), pad),
    jnp.pad(keep.astype(jnp.int32), pad),
  )


@functools.partial(jax.jit, static_argnames=("window", "blocks", "interpret"))
def learned_forward(q, k, v, lo, frac, keep, *, window, blocks: GpuBlocks, interpret: bool):
  """A learned layer's attention: the window 0..W and rungs r with run-time (lo_r, f_r,
  keep_r) [R]; q [B,T,H,D], k/v [B,T,K,D], T a multiple of block_q -> (o, lse [B,H,T])."""
  bsz, seq_len, num_heads, head_dim = q.shape
  num_kv = k.shape[2]
  groups = num_heads // num_kv
  bq = blocks.block_q
  tables = _learned_tables(lo, frac, keep)
  table_spec = pl.BlockSpec(tables[0].shape, lambda i, b, h: (0,))
  _, q_blk, kv_all = _packed_specs(seq_len, groups, head_dim, bq, tables[0])
  kernel = functools.partial(
    _learned_fwd_kernel, window=window, groups=groups, scale=head_dim**-0.5, block_q=bq,
    num_rungs=lo.shape[0],
  )  # fmt: skip
  return pl.pallas_call(
    kernel,
    grid=(seq_len // bq, bsz, num_kv),
    in_specs=[table_spec] * 3 + [q_blk, kv_all, kv_all],
    out_specs=[q_blk, pl.BlockSpec((None, groups, bq), lambda i, b, h: (b, h, i))],
    out_shape=[
      jax.ShapeDtypeStruct(q.shape, q.dtype),
      jax.ShapeDtypeStruct((bsz, num_heads, seq_len), jnp.float32),
    ],
    compiler_params=_params(blocks.num_warps, blocks.num_stages, interpret),
    interpret=interpret,
    name="fib_attention_learned_fwd",
  )(*tables, q, k, v)


@functools.partial(jax.jit, static_argnames=("window", "blocks", "interpret"))
def learned_backward(q, k, v, o, lse, do, lo, frac, keep, *, window, blocks, interpret):
  """(dq, dk, dv, dfrac [R]) of `learned_forward`."""
  bsz, seq_len, num_heads, head_dim = q.shape
  num_kv = k.shape[2]
  groups = num_heads // num_kv
  bq = blocks.block_q_bwd
  num_q_blocks = seq_len // bq
  delta = jnp.einsum("bthd,bthd->bht", o.astype(jnp.float32), do.astype(jnp.float32))
  params = _params(blocks.num_warps_bwd, blocks.num_stages, interpret)
  statics = dict(
    window=window, groups=groups, scale=head_dim**-0.5, block_q=bq, num_rungs=lo.shape[0]
  )
  tables = _learned_tables(lo, frac, keep)
  table_spec = pl.BlockSpec(tables[0].shape, lambda i, b, h: (0,))
  _, q_blk, kv_all = _packed_specs(seq_len, groups, head_dim, bq, tables[0])
  q_all = pl.BlockSpec((None, seq_len, groups, head_dim), lambda i, b, h: (b, 0, h, 0))
  kv_blk = pl.BlockSpec((None, bq, None, head_dim), lambda i, b, h: (b, i, h, 0))
  stat_blk = pl.BlockSpec((None, groups, bq), lambda i, b, h: (b, h, i))
  stat_all = pl.BlockSpec((None, groups, seq_len), lambda i, b, h: (b, h, 0))
  rungs_pad = tables[0].shape[0]
  grid = (num_q_blocks, bsz, num_kv)
  dq, dfrac = pl.pallas_call(
    functools.partial(_learned_dq_kernel, **statics),
    grid=grid,
    in_specs=[table_spec] * 3 + [q_blk, kv_all, kv_all, q_blk, stat_blk, stat_blk],
    out_specs=[
      q_blk,
      pl.BlockSpec((None, None, None, rungs_pad), lambda i, b, h: (b, h, i, 0)),
    ],
    out_shape=[
      jax.ShapeDtypeStruct(q.shape, q.dtype),
      jax.ShapeDtypeStruct((bsz, num_kv, num_q_blocks, rungs_pad), jnp.float32),
    ],
    compiler_params=params,
    interpret=interpret,
    name="fib_attention_learned_dq",
  )(*tables, q, k, v, do, lse, delta)
  dk, dv = pl.pallas_call(
    functools.partial(_learned_dkv_kernel, **statics, seq_len=seq_len),
    grid=grid,
    in_specs=[table_spec] * 3 + [q_all, kv_blk, kv_blk, kv_all, kv_all, q_all, stat_all, stat_all],
    out_specs=[kv_blk, kv_blk],
    out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
    compiler_params=params,
    interpret=interpret,
    name="fib_attention_learned_dkv",
  )(*tables, q, k, v, k, v, do, lse, delta)
  return dq, dk, dv, dfrac.sum(axis=(0, 1, 2))[: lo.shape[0]]
