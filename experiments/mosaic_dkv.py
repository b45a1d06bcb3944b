"""A prototype, not part of fibax: the packed kernels' dkv (dk, dv of static rungs) in Mosaic
GPU with TMA copies, and a check that runs it on a GPU beside the Triton kernel.

Why: the Triton dkv kernel (`kernels_pallas.gpu._dkv_packed_kernel`, 2.05 ms of the stagger
model's 32.6 ms train step at T = 1,024 on an H200) gathers, for each rung d of a key block
[j0, j0 + C), the query and dO rows j0 + d .. j0 + d + C - 1 of the G heads with per-thread
loads through L1, and Nsight Compute finds it bound there (79-85% of the LSU's peak, L2 at
54%). Here each step's tiles come by the Hopper tensor-memory accelerator (TMA) instead: one
copy a head and tensor, issued by one thread, the next step's copies in flight while the
tensor cores work on this one's (two buffers). The arithmetic is the Triton kernel's with
`dkv_t=1`:

  packed rows m = g * C + r (head g, query row base + r), C = 64 / G key rows a program, so a
  step's tiles are [64, D] (one warpgroup's wgmma);
  s = q k^T and dp = dO v^T, [64, C]; p = 2^(s * scale * log2 e - lse * log2 e) where the
  step's mask keeps (row m reads key c), 0 elsewhere; ds = p (dp - delta);
  dv^T [D, C] += dO^T p and dk^T [D, C] += q^T ds (p and ds through shared memory);

the window's query chunks j0 + n C (a band mask), then the rungs below T - j0 (distances from
`gpu.rung_table`'s int32 table, read from shared memory); a copy starts at row min(j0 +
offset, T - C), the mask is in absolute rows; at the end dk = (dk^T)^T through one wgmma with an
identity tile (exact), then one copy out.

Status (experiments/results/mosaic_dkv_h200x2/): in Pallas' Mosaic GPU interpreter it matches
the Triton kernel (in its interpreter) on every shape tried, rungs included; it lowers on a
CPU-only machine (Lane semantics; Warpgroup semantics' layout inference refuses the copies'
row offsets). On an H200 it matches the Triton kernel bitwise where every copy starts on a
multiple of 8 rows (window chunks; rungs 24, 32, 64) and is wrong at rung 20 (relative error
0.27) and stops the GPU with an illegal instruction at rung 17: Mosaic GPU copies into a tiled
shared-memory buffer (8-row tiles, which wgmma needs) through a tiled view of the GMEM array,
so a start row that is not a tile's is not expressible (launch_context.py's TileTransform
divides the start by 8). The paper's rungs start anywhere. What would lift it: copies into an
untiled buffer with 128-byte swizzle (for D = 64 the same bytes as the tiled layout) aliased as
the wgmma operand, p and ds stored transposed so every operand takes that swizzle.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

LOG2E = 1.4426950408889634
_ROWS = 64  # packed rows of a step's tile: one warpgroup's wgmma M
_SWIZZLE = 32  # bytes: shared-memory tiles 16 bf16 wide, which the [64, C] p and ds tiles need


def supported(q_shape, kv_heads: int, dtype) -> str | None:  # the prototype's scope
  """None where the kernel runs a (q [B, T, H, D], K kv heads, dtype) call; else why not."""
  _, seq_len, heads, dim = q_shape
  groups = heads // kv_heads
  if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
    return f"dtype {jnp.dtype(dtype).name} (16-bit only)"
  if groups not in (1, 2, 4):
    return f"{groups} query heads a kv head (1, 2 or 4)"
  if dim % 64:
    return f"head_dim {dim} (a multiple of 64)"
  if seq_len % (_ROWS // groups):
    return f"T = {seq_len} (a multiple of {_ROWS // groups})"
  return None


def _tiles():
  return (plgpu.TilingTransform((8, _SWIZZLE // 2)), plgpu.SwizzleTransform(_SWIZZLE))


def _kernel(
  table_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref,  # GMEM inputs
  dk_ref, dv_ref,  # GMEM outputs
  tab_s, k_s, v_s, q_s, do_s, lse_s, delta_s, p_s, ds_s, dk_s, dv_s, bars, kv_bar, tab_bar,
  *, window, groups, block, scale, interpret,
):  # fmt: skip
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
    for g in range(groups):
      head = h * groups + g
      rows = pl.ds(g * block, block)
      plgpu.copy_gmem_to_smem(q_ref.at[b, pl.ds(row0, block), head], q_s.at[slot, rows], bar)
      plgpu.copy_gmem_to_smem(do_ref.at[b, pl.ds(row0, block), head], do_s.at[slot, rows], bar)
    # The G heads' statistics as one [G, C] box: packed row m = g * C + r in order (a copy
    # moves a multiple of 128 bytes; C rows of one head are 64 at C = 16). Pallas' GPU
    # interpreter takes no reshaped destination: there, one copy a head, the same bytes.
    for ref, dst in ((lse_ref, lse_s), (delta_ref, delta_s)):
      if interpret:
        for g in range(groups):
          src = ref.at[b, h * groups + g, pl.ds(row0, block)]
          plgpu.copy_gmem_to_smem(src, dst.at[slot, pl.ds(g * block, block)], bar)
      else:
        src = ref.at[b, pl.ds(h * groups, groups), pl.ds(row0, block)]
        plgpu.copy_gmem_to_smem(src, dst.at[slot].reshape(groups, block), bar)

  issue(0)
  plgpu.barrier_wait(kv_bar)
  shape = (_ROWS, block)
  m_i = plgpu.broadcasted_iota(jnp.int32, shape, 0, layout=plgpu.Layout.WGMMA)
  c_i = plgpu.broadcasted_iota(jnp.int32, shape, 1, layout=plgpu.Layout.WGMMA)
  r_i = m_i % block  # the packed row's query row within the step's tile
  sc = scale * LOG2E

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
    lse = lax.broadcast_in_dim(plgpu.load(lse_s.at[slot], (), layout=row_layout), shape, [0])
    delta = lax.broadcast_in_dim(plgpu.load(delta_s.at[slot], (), layout=row_layout), shape, [0])
    off, row0 = offset(n), start(n)
    rows = row0 + r_i
    rel = rows - (j0 + c_i)
    band = (rel >= 0) & (rel <= window)
    # A clamped start's rows below j0 + offset belong to the step before (window chunks).
    keep = jnp.where(n < chunks, band & (rows >= j0 + off), rel == off)
    p = jnp.where(keep, jnp.exp2(s * sc - lse * LOG2E), 0.0)
    ds = p * (dp - delta)
    p_s[...] = p.astype(p_s.dtype)
    ds_s[...] = ds.astype(ds_s.dtype)
    plgpu.commit_smem()
    plgpu.wgmma(dv_acc, do_s.at[slot].transpose((1, 0)), p_s)
    plgpu.wgmma(dk_acc, q_s.at[slot].transpose((1, 0)), ds_s)
    plgpu.wgmma_wait(0)  # p, ds and this slot are written again by the next steps
    return accs

  dim = k_s.shape[1]

  def loop(dk_acc, dv_acc):
    lax.fori_loop(0, steps, step, (dk_acc, dv_acc))
    return dk_acc[...], dv_acc[...]

  acc_t = plgpu.ACC((dim, block), jnp.float32)
  dk_t, dv_t = pl.run_scoped(loop, acc_t, acc_t)

  # (x^T)^T = I x^T^T: an identity [64, C] times the [C, D] view of x^T, rows 0..C-1 exact.
  p_s[...] = jnp.where(m_i == c_i, 1.0, 0.0).astype(p_s.dtype)  # [64, C]; rows >= C zero
  out_s = q_s.at[0]
  for x_t, t_s, out_ref, mult in ((dk_t, dk_s, dk_ref, scale), (dv_t, dv_s, dv_ref, 1.0)):
    t_s[...] = (x_t * mult).astype(t_s.dtype)
    plgpu.commit_smem()

    def transpose(acc_ref, t_s=t_s):
      plgpu.wgmma(acc_ref, p_s, t_s.transpose((1, 0)))
      return acc_ref[...]

    x = pl.run_scoped(transpose, plgpu.ACC((_ROWS, dim), jnp.float32))
    out_s[...] = x.astype(out_s.dtype)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(out_s.at[pl.ds(0, block)], out_ref.at[kv_rows])
    plgpu.wait_smem_to_gmem(0)


def dkv(q, k, v, do, lse, delta, table, *, window: int, interpret: bool = False):
  """(dk, dv) [B, T, K, D] of the packed kernels' static rungs: q/do [B, T, H, D], k/v
  [B, T, K, D], lse/delta float32 [B, H, T], `table` from `kernels_pallas.gpu.rung_table`.
  dk carries the 1 / sqrt(D) scale. On a GPU, right only where every rung is a multiple of 8
  (module docstring)."""
  bsz, padded, heads, dim = q.shape
  kv_heads = k.shape[2]
  why = supported(q.shape, kv_heads, q.dtype)
  if why is not None:
    raise ValueError(f"the Mosaic GPU dkv kernel does not take this call: {why}")
  groups = heads // kv_heads
  block = _ROWS // groups
  tiles = _tiles()
  table = jnp.pad(table, (0, -table.shape[0] % 32))  # a copy moves a multiple of 128 bytes
  kernel = functools.partial(
    _kernel, window=window, groups=groups, block=block, scale=dim**-0.5, interpret=interpret
  )
  scratch = [
    plgpu.SMEM(table.shape, jnp.int32),
    plgpu.SMEM((block, dim), q.dtype, transforms=tiles),  # k
    plgpu.SMEM((block, dim), q.dtype, transforms=tiles),  # v
    plgpu.SMEM((2, _ROWS, dim), q.dtype, transforms=tiles),  # q, two buffers
    plgpu.SMEM((2, _ROWS, dim), q.dtype, transforms=tiles),  # dO
    plgpu.SMEM((2, _ROWS), jnp.float32),  # lse
    plgpu.SMEM((2, _ROWS), jnp.float32),  # delta
    plgpu.SMEM((_ROWS, block), q.dtype, transforms=tiles),  # p
    plgpu.SMEM((_ROWS, block), q.dtype, transforms=tiles),  # ds
    plgpu.SMEM((dim, block), q.dtype, transforms=tiles),  # dk^T at the end
    plgpu.SMEM((dim, block), q.dtype, transforms=tiles),  # dv^T
    plgpu.Barrier(
      num_arrivals=(4 if interpret else 2) * groups + (0 if interpret else 2), num_barriers=2
    ),
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
  )(table, q, k, v, do, lse, delta)


def check(batch, seq_len, heads, kv_heads, head_dim, window, far) -> list[float]:
  """Relative errors of this kernel's dk, dv against the Triton packed kernel's, bf16 inputs
  (on a CPU: both in their interpreters)."""
  from kernels_pallas import gpu

  interpret = jax.default_backend() == "cpu"
  ks = jax.random.split(jax.random.key(0), 4)
  shape_q = (batch, seq_len, heads, head_dim)
  shape_kv = (batch, seq_len, kv_heads, head_dim)
  q, do = (jax.random.normal(k, shape_q, jnp.bfloat16) for k in ks[:2])
  k, v = (jax.random.normal(k, shape_kv, jnp.bfloat16) for k in ks[2:])
  blocks = gpu.GpuBlocks(kernel="packed")
  table = gpu.rung_table(far, window)
  kw = dict(window=window, blocks=blocks, interpret=interpret)
  o, lse = gpu._forward_packed(q, k, v, table, **kw)
  _, dk, dv = gpu._backward_packed(q, k, v, o, lse, do, table, **kw)
  delta = jnp.einsum("bthd,bthd->bht", o.astype(jnp.float32), do.astype(jnp.float32))
  ours = jax.jit(functools.partial(dkv, window=window, interpret=interpret))
  dk2, dv2 = ours(q, k, v, do, lse, delta, table)
  return [
    float(jnp.linalg.norm((a - b).astype(jnp.float32)) / jnp.linalg.norm(a.astype(jnp.float32)))
    for a, b in ((dk, dk2), (dv, dv2))
  ]


def main(argv=None) -> None:
  """python experiments/mosaic_dkv.py B T H K D W [d1,d2,...]: one check, one line."""
  import sys

  args = sys.argv[1:] if argv is None else argv
  if len(args) not in (6, 7):
    raise SystemExit("usage: mosaic_dkv.py B T H K D W [d1,d2,...] (rung distances > W)")
  shape = [int(x) for x in args[:6]]
  far = tuple(int(x) for x in args[6].split(",") if x) if len(args) == 7 else ()
  errs = check(*shape, far)
  print(" ".join(args), "OK" if max(errs) < 1e-2 else "WRONG", errs, flush=True)


if __name__ == "__main__":
  main()
