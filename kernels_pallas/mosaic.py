"""The packed kernels' key-major backward (dk, dv of static rungs) in Mosaic GPU, for Hopper:
`GpuBlocks.dkv_tma=1` (`kernels_pallas.gpu`).

The Triton dkv kernel (`gpu._dkv_packed_kernel`) gathers, for each rung d of a key block
[j0, j0 + C), the query and dO rows j0 + d .. j0 + d + C - 1 of the G heads with per-thread
loads through L1, and Nsight Compute finds it bound there on an H200 (79-85% of the LSU's peak,
L2 at 54%). Here each step's tiles come by the tensor-memory accelerator (TMA): one copy a head
and tensor, issued by one thread, the next step's copies in flight while the tensor cores work
on this one's (two buffers). The arithmetic is the Triton kernel's with `dkv_t=1`:

  packed rows m = r * G + g (query row base + r, head g; G = 4), C = 16 key rows a program,
  so a step's tiles are [64, D] (one warpgroup's wgmma), each one copy of [C, G, D];
  s = q k^T and dp = dO v^T, [64, C]; p = 2^(s * scale * log2 e - lse * log2 e) where the
  step's mask keeps (row m reads key c), 0 elsewhere; ds = p (dp - delta);
  dv^T [D, C] += dO^T p and dk^T [D, C] += q^T ds (p and ds through shared memory);

the window's query chunks j0 + n C (a band mask), then the rungs below T - j0 (distances from
`gpu.rung_table`'s int32 table, read from shared memory, so every layer shares one compiled
kernel); a copy starts at row min(j0 + offset, T - C), the mask is in absolute rows; at the end
dk^T and dv^T are stored through a transposed view of [C, D] tiles and copied out.

Mosaic GPU copies into a tiled shared-memory buffer through a tiled view of the GMEM array,
whose start must be a tile's (8 rows): a first version's copies into such buffers were right
on an H200 only from 8-row-aligned starts (wrong at rung 20, an illegal instruction at rung 17;
experiments/results/mosaic_dkv_h200x2/). So the query-side buffers are also viewed untiled
(`_TILED`, `_SWIZZLED` below), which a copy may start anywhere.

Scope: static rungs, bf16 inputs, G = 4, D = 64, T a multiple of 16, a Hopper GPU (`supported`);
`gpu` falls back to the Triton kernel elsewhere.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from kernels_pallas.reference import LOG2E

_ROWS = 64  # packed rows of a step's tile: one warpgroup's wgmma M
_DIM = 64  # head dim: a row is the 128-byte swizzle, so a tiled tile is row-major (below)
# p^T and ds^T [C, 64 packed rows] buffers hold dk and dv [C, D] at the end: the same shape.
assert _ROWS == _DIM


def supported(q_shape, kv_heads: int, dtype) -> str | None:
  """None where the kernel runs a (q [B, T, H, D], K kv heads, dtype) call; else why not."""
  _, seq_len, heads, dim = q_shape
  groups = heads // kv_heads
  if jnp.dtype(dtype) != jnp.dtype(jnp.bfloat16):
    return f"dtype {jnp.dtype(dtype).name} (bf16 only: the one run)"
  if groups != 4:
    return f"{groups} query heads a kv head (4 only)"
  if dim != _DIM:
    return f"head_dim {dim} (64 only)"
  if seq_len % (_ROWS // groups):
    return f"T = {seq_len} must be a multiple of {_ROWS // groups}"
  if jax.default_backend() == "gpu":  # (interpreted or lowered on a CPU: no device to ask)
    cc = getattr(jax.devices()[0], "compute_capability", None)
    if cc is not None and float(cc) < 9.0:
      return f"a GPU of compute capability {cc} (TMA and wgmma: 9.0, Hopper)"
  return None


# Every shared-memory tile: 8-row tiles of 64 bf16 (128 bytes) with the 128-byte swizzle, the
# form wgmma reads. For 64 columns those tiles lie row after row, so the same bytes are also
# an untiled [rows, 64] array with that swizzle: the query-side copies (which start on any row)
# land through that untiled view of the buffer (a `RefUnion` of the two), since Mosaic GPU
# copies into a tiled buffer through a tiled view of the GMEM array, whose start must be a
# tile's. (Pallas' interpreter keeps a union's views apart; there the copies take the tiled
# view, which it copies from any row.)
_TILED = (plgpu.TilingTransform((8, _DIM)), plgpu.SwizzleTransform(128))
_SWIZZLED = (plgpu.SwizzleTransform(128),)


def _kernel(
  table_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref,  # GMEM inputs
  dk_ref, dv_ref,  # GMEM outputs
  tab_s, k_s, v_s, q_u, do_u, lse_s, delta_s, p_s, ds_s, bars, kv_bar, tab_bar,  # scratch
  *, window, groups, block, scale, interpret,
):  # fmt: skip
  (q_in, q_s), (do_in, do_s) = q_u, do_u  # each buffer's copy view and wgmma view
  if interpret:
    q_in, do_in = q_s, do_s
  j0 = lax.axis_index("j") * block
  b, h = lax.axis_index("b"), lax.axis_index("h")
  padded = q_ref.shape[1]
  plgpu.copy_gmem_to_smem(table_ref, tab_s, tab_bar)
  kv_rows = (b, pl.ds(j0, block), h)
  plgpu.copy_gmem_to_smem(k_ref.at[kv_rows], k_s, kv_bar)
  plgpu.copy_gmem_to_smem(v_ref.at[kv_rows], v_s, kv_bar)
  plgpu.barrier_wait(tab_bar)
  chunks = -(-(block + window) // block)
  count = tab_s[0]

  # Rungs below T - j0 reach the block from some query row; the table is sorted.
  def more(n):
    return (n < count) & (tab_s[1 + jnp.minimum(n, tab_s.shape[0] - 2)] < padded - j0)

  live = lax.while_loop(more, lambda n: n + 1, jnp.int32(0))
  steps = chunks + live

  def offset(n):  # the step's query rows start at j0 + offset
    rung = tab_s[1 + jnp.clip(n - chunks, 0, tab_s.shape[0] - 2)]
    return jnp.where(n < chunks, n * block, rung)

  def start(n):
    return jnp.minimum(j0 + offset(n), padded - block)

  def issue(n):
    slot, row0 = n % 2, start(n)
    bar = bars.at[slot]
    heads = pl.ds(h * groups, groups)
    if interpret:  # Pallas' interpreter takes no reshaped destination: a copy a query row
      for r in range(block):
        rows = pl.ds(r * groups, groups)
        for ref, dst in ((q_ref, q_in), (do_ref, do_in)):
          plgpu.copy_gmem_to_smem(ref.at[b, row0 + r, heads], dst.at[slot, rows], bar)
        for ref, dst in ((lse_ref, lse_s), (delta_ref, delta_s)):
          plgpu.copy_gmem_to_smem(ref.at[b, h, row0 + r], dst.at[slot, rows], bar)
      return
    # One copy a tensor: C query rows x the G heads, packed row m = r * G + g in order. The
    # statistics come as [B, K, T, G] (16 bytes a row at G = 4: a copy's start must be
    # 16-byte aligned, which a [B, H, T] row starting at an odd position is not).
    for ref, dst in ((q_ref, q_in), (do_ref, do_in)):
      box = dst.at[slot].reshape(block, groups, _DIM)
      plgpu.copy_gmem_to_smem(ref.at[b, pl.ds(row0, block), heads], box, bar)
    for ref, dst in ((lse_ref, lse_s), (delta_ref, delta_s)):
      box = dst.at[slot].reshape(block, groups)
      plgpu.copy_gmem_to_smem(ref.at[b, h, pl.ds(row0, block)], box, bar)

  issue(0)
  plgpu.barrier_wait(kv_bar)
  shape = (_ROWS, block)
  m_i = plgpu.broadcasted_iota(jnp.int32, shape, 0, layout=plgpu.Layout.WGMMA)
  c_i = plgpu.broadcasted_iota(jnp.int32, shape, 1, layout=plgpu.Layout.WGMMA)
  r_i = m_i // groups  # the packed row's query row within the step's tile
  sc = scale * LOG2E
  # p and ds [64, C] are stored transposed, [C, 64] tiles, so that every wgmma operand takes
  # the 128-byte swizzle (Mosaic GPU: a wgmma's two shared-memory operands share one).
  p_t, ds_t = p_s.transpose((1, 0)), ds_s.transpose((1, 0))

  def step(n, accs):
    dk_acc, dv_acc = accs
    slot = n % 2

    @pl.when(n + 1 < steps)
    def _():
      issue(n + 1)

    plgpu.barrier_wait(bars.at[slot])

    def scores(s_ref, dp_ref):
      plgpu.wgmma(s_ref, q_s.at[slot], k_s.transpose((1, 0)))
      plgpu.wgmma(dp_ref, do_s.at[slot], v_s.transpose((1, 0)))
      return s_ref[...], dp_ref[...]

    s, dp = pl.run_scoped(scores, plgpu.ACC(shape, jnp.float32), plgpu.ACC(shape, jnp.float32))
    row_layout = plgpu.Layout.WGMMA.reduce(1)
    lse = lax.broadcast_in_dim(plgpu.load(lse_s.at[slot], layout=row_layout), shape, [0])
    delta = lax.broadcast_in_dim(plgpu.load(delta_s.at[slot], layout=row_layout), shape, [0])
    off, row0 = offset(n), start(n)
    rows = row0 + r_i
    rel = rows - (j0 + c_i)
    band = (rel >= 0) & (rel <= window)
    # A clamped start's rows below j0 + offset belong to the step before (window chunks).
    keep = jnp.where(n < chunks, band & (rows >= j0 + off), rel == off)
    p = jnp.where(keep, jnp.exp2(s * sc - lse * LOG2E), 0.0)
    ds = p * (dp - delta)
    p_t[...] = p.astype(p_s.dtype)
    ds_t[...] = ds.astype(ds_s.dtype)
    plgpu.commit_smem()
    plgpu.wgmma(dv_acc, do_s.at[slot].transpose((1, 0)), p_t)
    plgpu.wgmma(dk_acc, q_s.at[slot].transpose((1, 0)), ds_t)
    plgpu.wgmma_wait(0)  # p, ds and this slot are written again by the next steps
    return accs

  def loop(dk_acc, dv_acc):
    lax.fori_loop(0, steps, step, (dk_acc, dv_acc))
    return dk_acc[...], dv_acc[...]

  acc_t = plgpu.ACC((_DIM, block), jnp.float32)
  dk_t, dv_t = pl.run_scoped(loop, acc_t, acc_t)
  # dk^T [D, C] stored through the transposed view of a [C, D] tile is dk: one copy out each.
  p_t[...] = (dk_t * scale).astype(p_s.dtype)
  ds_t[...] = dv_t.astype(ds_s.dtype)
  plgpu.commit_smem()
  plgpu.copy_smem_to_gmem(p_s, dk_ref.at[kv_rows])
  plgpu.copy_smem_to_gmem(ds_s, dv_ref.at[kv_rows])
  plgpu.wait_smem_to_gmem(0)


def dkv(q, k, v, do, lse, delta, table, *, window: int, interpret: bool = False):
  """(dk, dv) [B, T, K, D] of the packed kernels' static rungs: q/do [B, T, H, D], k/v
  [B, T, K, D], lse/delta float32 [B, H, T], `table` from `kernels_pallas.gpu.rung_table`.
  dk carries the 1 / sqrt(D) scale."""
  bsz, padded, heads, dim = q.shape
  kv_heads = k.shape[2]
  why = supported(q.shape, kv_heads, q.dtype)
  if why is not None:
    raise ValueError(f"the Mosaic GPU dkv kernel does not take this call: {why}")
  groups = heads // kv_heads
  block = _ROWS // groups
  table = jnp.pad(table, (0, -table.shape[0] % 32))  # a copy moves a multiple of 128 bytes
  lse, delta = (  # [B, K, T, G]
    x.reshape(bsz, kv_heads, groups, padded).transpose(0, 1, 3, 2) for x in (lse, delta)
  )
  kernel = functools.partial(
    _kernel, window=window, groups=groups, block=block, scale=dim**-0.5, interpret=interpret
  )

  def query_side():  # two buffers; a copy view and a wgmma view of the same bytes
    return plgpu.RefUnion(
      plgpu.SMEM((2, _ROWS, _DIM), q.dtype, transforms=_SWIZZLED),
      plgpu.SMEM((2, _ROWS, _DIM), q.dtype, transforms=_TILED),
    )

  scratch = [
    plgpu.SMEM(table.shape, jnp.int32),
    plgpu.SMEM((block, _DIM), q.dtype, transforms=_TILED),  # k
    plgpu.SMEM((block, _DIM), q.dtype, transforms=_TILED),  # v
    query_side(),  # q
    query_side(),  # dO
    plgpu.SMEM((2, _ROWS), jnp.float32),  # lse
    plgpu.SMEM((2, _ROWS), jnp.float32),  # delta
    plgpu.SMEM((block, _ROWS), q.dtype, transforms=_TILED),  # p^T, then dk
    plgpu.SMEM((block, _ROWS), q.dtype, transforms=_TILED),  # ds^T, then dv
    plgpu.Barrier(num_arrivals=4 * block if interpret else 4, num_barriers=2),
    plgpu.Barrier(num_arrivals=2),
    plgpu.Barrier(num_arrivals=1),
  ]
  params = plgpu.CompilerParams(approx_math=True, lowering_semantics=plgpu.LoweringSemantics.Lane)
  return plgpu.kernel(
    kernel,
    out_type=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
    grid=(padded // block, bsz, kv_heads),
    grid_names=("j", "b", "h"),
    scratch_types=scratch,
    compiler_params=params,
    interpret=plgpu.InterpretGPUParams() if interpret else False,
    # The name profiles show (profile_kernels.py's filter and bench_train.py's kinds read
    # "fib_attention"; a partial has no __name__ of its own).
    kernel_name="fib_attention_packed_dkv_tma",
  )(table, q, k, v, do, lse, delta)
