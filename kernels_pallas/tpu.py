"""Fibonacci sparse attention for TPUs: Pallas kernels lowered through Mosaic.

Shape key: B batch, T (padded) sequence, H query heads, K kv heads, G = H // K, D head dim,
Q block rows, N = Q + Wp window rows (Wp = W rounded up to 8).

Mosaic tiles the last two dims by (8, 128), so the wrapper moves heads in front of the
sequence ([B, H, T, D]); a block is then (rows, D) with rows a multiple of 8. Row offsets
of the rungs (i0 - d) are not aligned, so every shifted block is fetched through an
element-offset BlockSpec (`pl.Element`), which the pipeline double-buffers like any other
input; the distances d come from an int32 table prefetched into SMEM (index maps and kernels
read it), so the kernels do not depend on them. K/V are zero-padded in front (queries: at
the end, for the backward) so that no offset is negative. Each program sees all its rows at
once, so the softmax is two-pass over the window tile and the R rung vectors, in float32.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from kernels_pallas.reference import MASK_VALUE

MAX_WINDOW = 2048  # the window tile is (Q + W) x D in VMEM; dense layers use the dense path


@dataclasses.dataclass(frozen=True)
class TpuBlocks:
  block_q: int = 128


def interpret_params():
  return pltpu.InterpretParams()


def _round8(x: int) -> int:
  return -(-x // 8) * 8


def _dot_t(a, b):
  """a [M, D] @ b[N, D]^T -> [M, N] in float32."""
  return lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)


def _dot(a, b):
  return lax.dot_general(a, b, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def _dot_tn(a, b):
  """a[N, M]^T @ b [N, D] -> [M, D]."""
  return lax.dot_general(a, b, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def _window_keep(rows_q, rows_k, window):
  rel = rows_q[:, None] - rows_k[None, :]
  return (rel >= 0) & (rel <= window) & (rows_k[None, :] >= 0)


def _query_block(block_q, wpad, window):
  """Query rows of this program's block and their band mask against the window tile."""
  i0 = pl.program_id(2) * block_q
  rows_q = i0 + lax.broadcasted_iota(jnp.int32, (block_q,), 0)
  rows_k = i0 - wpad + lax.broadcasted_iota(jnp.int32, (block_q + wpad,), 0)
  return rows_q, _window_keep(rows_q, rows_k, window)


def _fwd_kernel(far_ref, q_ref, kw_ref, vw_ref, *refs, window, nr, wpad, scale, block_q):
  # far_ref [R] int32 (SMEM); q_ref [G, Q, D]; kw/vw [N, D]; rung refs [Q, D] each;
  # o_ref [G, Q, D]; lse_ref [G, Q, 1]
  kr_refs, vr_refs, (o_ref, lse_ref) = refs[:nr], refs[nr : 2 * nr], refs[2 * nr :]
  groups = q_ref.shape[0]
  rows_q, keep_QxN = _query_block(block_q, wpad, window)
  kw_NxD, vw_NxD = kw_ref[...], vw_ref[...]
  for g in range(groups):
    q_QxD = q_ref[g]
    s_QxN = jnp.where(keep_QxN, _dot_t(q_QxD, kw_NxD) * scale, MASK_VALUE)
    q32 = q_QxD.astype(jnp.float32)
    s_r = []
    for j in range(nr):
      s_Q = jnp.sum(q32 * kr_refs[j][...].astype(jnp.float32), axis=1) * scale
      s_r.append(jnp.where(rows_q - far_ref[j] >= 0, s_Q, MASK_VALUE))
    m_Q = jnp.max(s_QxN, axis=1)
    for s_Q in s_r:
      m_Q = jnp.maximum(m_Q, s_Q)
    p_QxN = jnp.exp(s_QxN - m_Q[:, None])
    l_Q = jnp.sum(p_QxN, axis=1)
    acc_QxD = _dot(p_QxN.astype(vw_NxD.dtype), vw_NxD)
    for j, s_Q in enumerate(s_r):
      p_Q = jnp.exp(s_Q - m_Q)
      l_Q = l_Q + p_Q
      acc_QxD = acc_QxD + p_Q[:, None] * vr_refs[j][...].astype(jnp.float32)
    o_ref[g] = (acc_QxD / l_Q[:, None]).astype(o_ref.dtype)
    lse_ref[g] = (m_Q + jnp.log(l_Q))[:, None]


def _dq_kernel(
  far_ref, q_ref, do_ref, lse_ref, delta_ref, kw_ref, vw_ref, *refs, window, nr, wpad, scale,
  block_q,
):  # fmt: skip
  kr_refs, vr_refs, (dq_ref,) = refs[:nr], refs[nr : 2 * nr], refs[2 * nr :]
  groups = q_ref.shape[0]
  rows_q, keep_QxN = _query_block(block_q, wpad, window)
  kw_NxD, vw_NxD = kw_ref[...], vw_ref[...]
  for g in range(groups):
    q_QxD, do_QxD = q_ref[g], do_ref[g]
    lse_Q, delta_Q = lse_ref[g][:, 0], delta_ref[g][:, 0]
    s_QxN = _dot_t(q_QxD, kw_NxD) * scale
    p_QxN = jnp.where(keep_QxN, jnp.exp(s_QxN - lse_Q[:, None]), 0.0)
    ds_QxN = p_QxN * (_dot_t(do_QxD, vw_NxD) - delta_Q[:, None])
    dq_QxD = _dot(ds_QxN.astype(kw_NxD.dtype), kw_NxD)
    q32, do32 = q_QxD.astype(jnp.float32), do_QxD.astype(jnp.float32)
    for j in range(nr):
      k_QxD = kr_refs[j][...].astype(jnp.float32)
      s_Q = jnp.sum(q32 * k_QxD, axis=1) * scale
      p_Q = jnp.where(rows_q - far_ref[j] >= 0, jnp.exp(s_Q - lse_Q), 0.0)
      dp_Q = jnp.sum(do32 * vr_refs[j][...].astype(jnp.float32), axis=1)
      dq_QxD = dq_QxD + (p_Q * (dp_Q - delta_Q))[:, None] * k_QxD
    dq_ref[g] = (dq_QxD * scale).astype(dq_ref.dtype)


def _dkv_kernel(
  far_ref, k_ref, v_ref, qw_ref, dow_ref, lsew_ref, deltaw_ref, *refs, window, nr, wpad, scale,
  block_q, seq_len,
):  # fmt: skip
  # k/v [Q, D]; qw/dow [G, N, D] (query rows j0 .. j0 + N); rung refs [G, Q, D] / [G, Q, 1]
  qr, dor, lser, deltar = (refs[i * nr : (i + 1) * nr] for i in range(4))
  dk_ref, dv_ref = refs[4 * nr :]
  groups = qw_ref.shape[0]
  j0 = pl.program_id(2) * block_q
  rows_k = j0 + lax.broadcasted_iota(jnp.int32, (block_q,), 0)
  rows_q = j0 + lax.broadcasted_iota(jnp.int32, (block_q + wpad,), 0)
  keep_NxQ = _window_keep(rows_q, rows_k, window) & (rows_q < seq_len)[:, None]
  k_QxD, v_QxD = k_ref[...], v_ref[...]
  k32, v32 = k_QxD.astype(jnp.float32), v_QxD.astype(jnp.float32)
  dk = jnp.zeros(k_QxD.shape, jnp.float32)
  dv = jnp.zeros(k_QxD.shape, jnp.float32)
  for g in range(groups):
    q_NxD, do_NxD = qw_ref[g], dow_ref[g]
    lse_N, delta_N = lsew_ref[g][:, 0], deltaw_ref[g][:, 0]
    p_NxQ = jnp.where(keep_NxQ, jnp.exp(_dot_t(q_NxD, k_QxD) * scale - lse_N[:, None]), 0.0)
    dv = dv + _dot_tn(p_NxQ.astype(do_NxD.dtype), do_NxD)
    ds_NxQ = p_NxQ * (_dot_t(do_NxD, v_QxD) - delta_N[:, None])
    dk = dk + _dot_tn(ds_NxQ.astype(q_NxD.dtype), q_NxD)
    for j in range(nr):
      q_r = qr[j][g].astype(jnp.float32)
      do_r = dor[j][g].astype(jnp.float32)
      valid = rows_k + far_ref[j] < seq_len
      p_Q = jnp.where(valid, jnp.exp(jnp.sum(q_r * k32, axis=1) * scale - lser[j][g][:, 0]), 0.0)
      dv = dv + p_Q[:, None] * do_r
      ds_Q = p_Q * (jnp.sum(do_r * v32, axis=1) - deltar[j][g][:, 0])
      dk = dk + ds_Q[:, None] * q_r
  dk_ref[...] = (dk * scale).astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


def _geometry(window, far):
  """(window rows rounded to 8, rows of zero padding in front of K / V): the padding covers the
  largest rung, rounded up to a power of two so that layers whose rungs differ share it."""
  if window > MAX_WINDOW:
    raise NotImplementedError(
      f"{window=} > {MAX_WINDOW}: the TPU kernel holds the window tile in VMEM; use a dense impl"
    )
  wpad = _round8(window)
  reach = max((*far, wpad, 8))
  return wpad, 1 << (reach - 1).bit_length()


def _far_table(far):
  return jnp.asarray(far or (0,), jnp.int32)


def _kv_specs(bq, wpad, front, nr, head_dim):
  """Element-offset K/V blocks of query block i: the window rows [i0 - Wp, i0 + Q) and, per
  rung j, rows [i0 - d_j, i0 - d_j + Q), d_j read from the prefetched table; offsets shifted
  by the `front` zero rows."""
  e_d = pl.Element(head_dim)
  win = pl.BlockSpec(
    (None, None, pl.Element(bq + wpad), e_d),
    lambda b, h, i, far: (b, h, i * bq - wpad + front, 0),
  )
  rungs = [
    pl.BlockSpec(
      (None, None, pl.Element(bq), e_d),
      lambda b, h, i, far, j=j: (b, h, i * bq - far[j] + front, 0),
    )
    for j in range(nr)
  ]
  return win, rungs


def _heads_first(x, front=0, back=0):
  return jnp.pad(jnp.swapaxes(x, 1, 2), ((0, 0), (0, 0), (front, back), (0, 0)))


def _call(kernel, name, grid, in_specs, out_specs, out_shape, interpret):
  """A pallas_call whose first operand, the rung table, is prefetched into SMEM: the index
  maps and the kernel read the distances from it, so the kernel does not depend on them."""
  return pl.pallas_call(
    kernel,
    grid_spec=pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=1, grid=grid, in_specs=in_specs, out_specs=out_specs
    ),
    out_shape=out_shape,
    compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel")),
    interpret=interpret,
    name=name,
  )


@functools.partial(jax.jit, static_argnames=("window", "far", "blocks", "interpret"))
def forward(q, k, v, *, window, far, blocks: TpuBlocks, interpret):
  """q [B,T,H,D], k/v [B,T,K,D], T a multiple of block_q -> (o [B,T,H,D], lse [B,H,T,1])."""
  bsz, seq_len, num_heads, head_dim = q.shape
  num_kv = k.shape[2]
  groups, bq, nr = num_heads // num_kv, blocks.block_q, len(far)
  wpad, front = _geometry(window, far)
  qt = _heads_first(q)
  kt, vt = _heads_first(k, front), _heads_first(v, front)
  q_spec = pl.BlockSpec((None, groups, bq, head_dim), lambda b, h, i, far: (b, h, i, 0))
  win, rungs = _kv_specs(bq, wpad, front, nr, head_dim)
  kernel = functools.partial(
    _fwd_kernel, window=window, nr=nr, wpad=wpad, scale=head_dim**-0.5, block_q=bq
  )
  o, lse = _call(
    kernel,
    "fib_attention_fwd_tpu",
    (bsz, num_kv, seq_len // bq),
    [q_spec, win, win, *rungs, *rungs],
    [q_spec, pl.BlockSpec((None, groups, bq, 1), lambda b, h, i, far: (b, h, i, 0))],
    [
      jax.ShapeDtypeStruct(qt.shape, q.dtype),
      jax.ShapeDtypeStruct((bsz, num_heads, seq_len, 1), jnp.float32),
    ],
    interpret,
  )(_far_table(far), qt, kt, vt, *(kt,) * nr, *(vt,) * nr)
  return jnp.swapaxes(o, 1, 2), lse


@functools.partial(jax.jit, static_argnames=("window", "far", "blocks", "interpret"))
def backward(q, k, v, o, lse, do, *, window, far, blocks: TpuBlocks, interpret, dlse=None):
  bsz, seq_len, num_heads, head_dim = q.shape
  num_kv = k.shape[2]
  groups, bq, nr = num_heads // num_kv, blocks.block_q, len(far)
  wpad, pad = _geometry(window, far)
  scale = head_dim**-0.5
  delta = jnp.einsum("bthd,bthd->bht", o.astype(jnp.float32), do.astype(jnp.float32))[..., None]
  if dlse is not None:  # [B, H, T, 1]: a cotangent of the forward's lse as well
    delta = delta - dlse
  statics = dict(window=window, nr=nr, wpad=wpad, scale=scale, block_q=bq)
  grid = (bsz, num_kv, seq_len // bq)
  table = _far_table(far)

  # dQ: the forward's iteration (K/V padded in front).
  qt, dot_ = _heads_first(q), _heads_first(do)
  kf, vf = _heads_first(k, pad), _heads_first(v, pad)
  q_spec = pl.BlockSpec((None, groups, bq, head_dim), lambda b, h, i, far: (b, h, i, 0))
  stat_spec = pl.BlockSpec((None, groups, bq, 1), lambda b, h, i, far: (b, h, i, 0))
  win, rungs = _kv_specs(bq, wpad, pad, nr, head_dim)
  dq = _call(
    functools.partial(_dq_kernel, **statics),
    "fib_attention_dq_tpu",
    grid,
    [q_spec, q_spec, stat_spec, stat_spec, win, win, *rungs, *rungs],
    q_spec,
    jax.ShapeDtypeStruct(qt.shape, q.dtype),
    interpret,
  )(table, qt, dot_, lse, delta, kf, vf, *(kf,) * nr, *(vf,) * nr)

  # dK/dV: the transposed table, query rows j + d (queries padded at the end).
  kt, vt = _heads_first(k), _heads_first(v)
  qb, dob = _heads_first(q, 0, pad), _heads_first(do, 0, pad)
  lseb = jnp.pad(lse, ((0, 0), (0, 0), (0, pad), (0, 0)))
  deltab = jnp.pad(delta, ((0, 0), (0, 0), (0, pad), (0, 0)))
  kv_spec = pl.BlockSpec((None, None, bq, head_dim), lambda b, h, i, far: (b, h, i, 0))
  # Element offsets in every dimension (Mosaic takes all of a block's dims as elements or
  # none): the G heads of kv head h start at element h * G.
  e_g, e_d, e_1 = pl.Element(groups), pl.Element(head_dim), pl.Element(1)
  qwin = pl.BlockSpec(
    (None, e_g, pl.Element(bq + wpad), e_d), lambda b, h, i, far: (b, h * groups, i * bq, 0)
  )
  swin = pl.BlockSpec(
    (None, e_g, pl.Element(bq + wpad), e_1), lambda b, h, i, far: (b, h * groups, i * bq, 0)
  )

  def shifted(last):
    return [
      pl.BlockSpec(
        (None, e_g, pl.Element(bq), last),
        lambda b, h, i, far, j=j: (b, h * groups, i * bq + far[j], 0),
      )
      for j in range(nr)
    ]

  q_r, s_r = shifted(e_d), shifted(e_1)
  dk, dv = _call(
    functools.partial(_dkv_kernel, **statics, seq_len=seq_len),
    "fib_attention_dkv_tpu",
    grid,
    [kv_spec, kv_spec, qwin, qwin, swin, swin, *q_r, *q_r, *s_r, *s_r],
    [kv_spec, kv_spec],
    [jax.ShapeDtypeStruct(kt.shape, k.dtype), jax.ShapeDtypeStruct(vt.shape, v.dtype)],
    interpret,
  )(table, kt, vt, qb, dob, lseb, deltab, *(qb,) * nr, *(dob,) * nr, *(lseb,) * nr, *(deltab,) * nr)
  return jnp.swapaxes(dq, 1, 2), jnp.swapaxes(dk, 1, 2), jnp.swapaxes(dv, 1, 2)
