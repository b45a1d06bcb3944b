"""The packed kernels of static rungs in Mosaic GPU, for Hopper: the key-major backward (dk, dv;
`GpuBlocks.dkv_tma=1`, `dkv`) and the query-major forward and dq (`GpuBlocks.q_tma`, 1 and 2;
`forward`, `dq`, `_query_kernel`), each tile moved by the tensor-memory accelerator (TMA).

The forward and dq take a query block of C = 16 rows x the G = 4 heads of a kv head (64 packed
rows, one [16, 4, 64] copy a tensor) against key tiles of C rows, the window's chunks and then
one a live rung (a table input, as in the Triton kernels), four such tiles a step: 64 keys, the
contraction of p v and ds k, which wgmma needs at the 128-byte swizzle (K a multiple of 64).
Each tile is one copy of k and one of v at any row, through the same untiled swizzled view of
the buffer as the dkv kernel's query tiles (below), into one of `buffers` step buffers (the
next steps' copies in flight during this one's wgmmas; `GpuBlocks.num_stages`); each tile's
mask two scalar bounds on its own column slice of the step's scores (a band for a chunk, one
distance for a rung, nothing for the units past the program's last live rung), the steps that
hold window chunks unrolled so that the loop's units are rungs only (`unit`). The forward keeps
an online softmax in base 2 (scores times scale log2 e); dq forms delta = sum_d o do (- dlse)
from its o and dO tiles and writes it for the dkv kernels, as the Triton dq does. p and ds are
wgmma's A operand from registers (the interpreter: from shared memory).

The dkv kernel. The Triton one (`gpu._dkv_packed_kernel`) gathers, for each rung d of a key
block [j0, j0 + C), the query and dO rows j0 + d .. j0 + d + C - 1 of the G heads with per-thread
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

Scope (all three): static rungs, bf16 inputs, G = 4, D = 64, T a multiple of 16, a Hopper GPU
(`supported`); `gpu` falls back to the Triton kernels elsewhere.
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
_KEYS = 64  # key rows of the query-major kernels' step: wgmma's K for p v and ds k
_DIM = 64  # head dim: a row is the 128-byte swizzle, so a tiled tile is row-major (below)
_NONE = 1 << 30  # a rung table's padding: a distance no unit reaches (it keeps nothing)
# p^T and ds^T [C, 64 packed rows] buffers hold dk and dv [C, D] at the end: the same shape.
assert _ROWS == _DIM


def supported(q_shape, kv_heads: int, dtype) -> str | None:
  """None where the Mosaic kernels (all three) run a (q [B, T, H, D], K kv heads, dtype) call;
  else why not."""
  _, seq_len, heads, dim = q_shape
  groups = heads // kv_heads
  if jnp.dtype(dtype) != jnp.dtype(jnp.bfloat16):
    return f"dtype {jnp.dtype(dtype).name} (bf16 only: the one run on a GPU)"
  if groups != 4:
    return f"{groups} query heads a kv head (4 only)"
  if dim != _DIM:
    return f"head_dim {dim} (64 only)"
  if seq_len % (_ROWS // groups):
    return f"T = {seq_len} must be a multiple of {_ROWS // groups}"
  if jax.default_backend() == "gpu":  # (interpreted or lowered on a CPU: no device to ask)
    cc = _compute_capability()
    if cc is not None and not _hopper(cc):
      return f"a GPU of compute capability {cc} (wgmma: 9.x, Hopper)"
  return None


def _compute_capability() -> str | None:
  return getattr(jax.devices()[0], "compute_capability", None)


def _hopper(cc: str) -> bool:
  return 9.0 <= float(cc) < 10.0


def on_hopper() -> bool:
  """Whether this process's first device is a Hopper GPU (compute capability 9.x), where the
  Mosaic kernels are the packed kernel's default (`kernels_pallas.gpu.default_blocks`)."""
  if jax.default_backend() != "gpu":
    return False
  cc = _compute_capability()
  return cc is not None and _hopper(cc)


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


def _query_kernel(
  table_ref, q_ref, k_ref, v_ref, *refs, dq_mode, window, groups, block, scale, with_dlse,
  buffers, interpret,
):  # fmt: skip
  """The forward (o, lse) or dq (dq, delta) of one query block [j0, j0 + C) x the G heads of
  kv head h, 64 packed rows. Its key tiles of C rows are units: the window's chunks (keys from
  j0 - n C, a band mask), then one a live rung (a diagonal mask); a step takes 4 units as one
  [64, D] key tile (64 keys: the contraction of p v and ds k, wgmma's K at the 128-byte
  swizzle), each unit one TMA copy of k and of v into the step's buffer, the next `buffers` - 1
  steps' in flight during this one's wgmmas."""
  n_in = (3 + with_dlse) if dq_mode else 0  # o, do, lse[, dlse]
  ins, (out_a, out_b), scratch = refs[:n_in], refs[n_in : n_in + 2], refs[n_in + 2 :]
  tab_s, q_u, *side, k_u, v_u, stat_s, out_s, bars, q_bar, tab_bar = scratch[: 9 + 2 * dq_mode]
  a_s = scratch[-1] if interpret else None  # the interpreter's wgmma A operand
  (q_in, q_s), (k_in, k_s), (v_in, v_s) = q_u, k_u, v_u  # each buffer's copy and wgmma views
  side = [(u[1] if interpret else u[0], u[1]) for u in side]  # dq: o, do
  if interpret:
    q_in, k_in, v_in = q_s, k_s, v_s
  units = _KEYS // block
  j0 = lax.axis_index("j") * block
  b, h = lax.axis_index("b"), lax.axis_index("h")
  heads = pl.ds(h * groups, groups)
  rows_g = pl.ds(j0 * groups, _ROWS)  # the block's packed rows of [B, K, T * G] statistics
  plgpu.copy_gmem_to_smem(table_ref, tab_s, tab_bar)
  tiles = [(q_ref, q_in), *((ref, buf[0]) for ref, buf in zip(ins[:2], side, strict=True))]
  for ref, dst in tiles:  # one [C, G, D] box a tensor (interpreter: a copy a query row)
    if interpret:
      for r in range(block):
        src = ref.at[b, j0 + r, heads]
        plgpu.copy_gmem_to_smem(src, dst.at[pl.ds(r * groups, groups)], q_bar)
    else:
      box = dst.reshape(block, groups, _DIM)
      plgpu.copy_gmem_to_smem(ref.at[b, pl.ds(j0, block), heads], box, q_bar)
  for n, ref in enumerate(ins[2:]):  # lse[, dlse]
    plgpu.copy_gmem_to_smem(ref.at[b, h, rows_g], stat_s.at[n], q_bar)
  plgpu.barrier_wait(tab_bar)
  chunks = 1 + -(-window // block)
  count = tab_s[0]
  last = tab_s.shape[0] - 2

  # Rungs that reach a row of the block (d <= j0 + C - 1); the table is sorted.
  def more(n):
    return (n < count) & (tab_s[1 + jnp.minimum(n, last)] < j0 + block)

  live = lax.while_loop(more, lambda n: n + 1, jnp.int32(0))
  steps = (chunks + live + units - 1) // units

  def unit(i):
    """Unit i's first key row and the bounds of y = m // G - c (packed row m, key column c of
    the unit) it keeps, `prologue`'s mask. A unit index known when tracing (a Python int: the
    first steps', unrolled) may be a window chunk; a traced one is a rung's (`_NONE`-padded
    table: units past the table's rungs keep nothing, as do rungs beyond the block's rows)."""
    if isinstance(i, int) and i < chunks:  # keys from j0 - i C, distances 0..W from a row
      off = i * block
      start = jnp.maximum(j0 - off, 0)
      # A chunk whose start would be below row 0 lies wholly before it: it keeps nothing.
      return start, jnp.where(j0 >= off, -off, _NONE), window - off
    off = tab_s[1 + i - chunks]
    start = jnp.maximum(j0 - off, 0)
    y = start + off - j0  # = max(off - j0, 0): 0 from a start at j0 - off, else off - j0
    return start, y, y

  def issue(n):
    slot = n % buffers
    for u in range(units):
      rows = pl.ds(unit(n * units + u)[0], block)
      for ref, dst in ((k_ref, k_in), (v_ref, v_in)):
        dst_u = dst.at[slot, pl.ds(u * block, block)]
        plgpu.copy_gmem_to_smem(ref.at[b, rows, h], dst_u, bars.at[slot])

  for n in range(buffers - 1):  # the first steps' copies (steps past the last issue none)
    pl.when(n < steps)(functools.partial(issue, n))

  plgpu.barrier_wait(q_bar)
  shape = (_ROWS, _KEYS)
  # A unit's mask: its key column c (row start + c of C) is kept for the packed row m (query
  # row j0 + m // G) where the distance j0 + m // G - start - c lies in lo..hi, i.e. where
  # y = m // G - c lies in start + lo - j0 .. start + hi - j0: two scalar bounds a unit
  # against one [64, C] tile y, each unit's columns a static slice of the step's scores (the
  # WGMMA layout's registers: slicing and joining them is free).
  unit_shape = (_ROWS, block)
  y_i = plgpu.broadcasted_iota(jnp.int32, unit_shape, 0, layout=plgpu.Layout.WGMMA) // groups
  y_i = y_i - plgpu.broadcasted_iota(jnp.int32, unit_shape, 1, layout=plgpu.Layout.WGMMA)
  row_layout = plgpu.Layout.WGMMA.reduce(1)
  sc = scale * LOG2E  # scores in base 2

  def wgmma_value(a, b_ref, out_shape=shape):
    def body(acc_ref):
      plgpu.wgmma(acc_ref, a, b_ref)
      return acc_ref[...]

    return pl.run_scoped(body, plgpu.ACC(out_shape, jnp.float32))

  def accumulate(acc, a, b_ref):  # acc + a @ b, a [64, 64] from registers
    if interpret:  # Pallas' interpreter takes a wgmma's A operand from shared memory only,
      a_s[...] = a  # and no accumulator given a value (`ACC.init`): a product, then a sum
      return acc + wgmma_value(a_s, b_ref, acc.shape)
    return pl.run_state(lambda acc_ref: plgpu.wgmma(acc_ref, a, b_ref))(plgpu.ACC.init(acc))

  def prologue(n):
    """Issue step n + buffers - 1's copies (into the buffer step n - 1 read), wait for step
    n's; (its buffer, its mask as a function of [64 packed rows, 64 keys] scores)."""
    slot = n % buffers

    @pl.when(n + buffers - 1 < steps)
    def _():
      issue(n + buffers - 1)

    plgpu.barrier_wait(bars.at[slot])
    bounds = [unit(n * units + u)[1:] for u in range(units)]

    def masked(x, fill):  # x [64 packed rows, 64 keys] with `fill` where the mask drops
      return jnp.concatenate(
        [
          jnp.where((y_i >= lo) & (y_i <= hi), x[:, u * block : (u + 1) * block], fill)
          for u, (lo, hi) in enumerate(bounds)
        ],
        axis=1,
      )

    return slot, masked

  def run(step, carry):
    """The steps: those holding window chunks unrolled (`unit`'s static units), the rest
    (rungs only) a loop."""
    unrolled = -(-chunks // units)  # (always at most `steps`)
    for n in range(unrolled):
      carry = step(n, carry)
    return lax.fori_loop(unrolled, steps, step, carry)

  zeros = plgpu.layout_cast(jnp.zeros((_ROWS, _DIM), jnp.float32), plgpu.Layout.WGMMA)
  if dq_mode:
    (_, o_s), (_, do_s) = side
    o = plgpu.load(o_s, layout=plgpu.Layout.WGMMA).astype(jnp.float32)
    do = plgpu.load(do_s, layout=plgpu.Layout.WGMMA).astype(jnp.float32)
    delta = jnp.sum(o * do, axis=1)  # FlashAttention-2's D_i, here rather than in XLA
    if with_dlse:
      delta = delta - plgpu.load(stat_s.at[1], layout=row_layout)
    lse2 = plgpu.load(stat_s.at[0], layout=row_layout) * LOG2E
    lse2_b, delta_b = (lax.broadcast_in_dim(x, shape, [0]) for x in (lse2, delta))

    def step(n, dq):
      slot, masked = prologue(n)
      s = wgmma_value(q_s, k_s.at[slot].transpose((1, 0)))
      dp = wgmma_value(do_s, v_s.at[slot].transpose((1, 0)))
      p = masked(jnp.exp2(s * sc - lse2_b), 0.0)
      ds = p * (dp - delta_b)
      return accumulate(dq, ds.astype(q_s.dtype), k_s.at[slot])

    acc = run(step, zeros) * scale
    stat = delta
  else:
    m0, l0 = (
      plgpu.layout_cast(jnp.full((_ROWS,), x, jnp.float32), row_layout) for x in (-jnp.inf, 0.0)
    )

    def step(n, carry):
      acc, m, l = carry
      slot, masked = prologue(n)
      s = masked(wgmma_value(q_s, k_s.at[slot].transpose((1, 0))), -jnp.inf)
      # Step 0 holds every row's own key (unit 0, distance 0): m is finite after it. The scale
      # after the max (a positive factor: the same maximum) and in p's exponent, s sc - m, one
      # fused multiply-add an entry (Mosaic GPU allows the contraction).
      m_new = jnp.maximum(m, jnp.max(s, axis=1) * sc)
      corr = jnp.exp2(m - m_new)
      p = jnp.exp2(s * sc - lax.broadcast_in_dim(m_new, shape, [0]))
      l = l * corr + jnp.sum(p, axis=1)
      acc = acc * lax.broadcast_in_dim(corr, acc.shape, [0])
      return accumulate(acc, p.astype(q_s.dtype), v_s.at[slot]), m_new, l

    acc, m, l = run(step, (zeros, m0, l0))
    acc = acc / lax.broadcast_in_dim(l, acc.shape, [0])
    stat = (m + jnp.log2(l)) * (1.0 / LOG2E)  # natural log-sum-exp
  # The result [64, D] through the query buffer (no wgmma reads it now), the row statistics
  # (lse or delta) through their own, each one copy out.
  q_s[...] = acc.astype(q_s.dtype)
  out_s[...] = stat
  plgpu.commit_smem()
  if interpret:
    for r in range(block):
      src = q_s.at[pl.ds(r * groups, groups)]
      plgpu.copy_smem_to_gmem(src, out_a.at[b, j0 + r, heads])
  else:
    dst = out_a.at[b, pl.ds(j0, block), heads]
    plgpu.copy_smem_to_gmem(q_in.reshape(block, groups, _DIM), dst)
  plgpu.copy_smem_to_gmem(out_s, out_b.at[b, h, rows_g])
  plgpu.wait_smem_to_gmem(0)


def group_stats(x, kv_heads):
  """[B, H, T] statistics -> [B, K, T * G]: a block's packed rows m = r * G + g in order."""
  bsz, heads, seq_len = x.shape
  groups = heads // kv_heads
  x = x.reshape(bsz, kv_heads, groups, seq_len).transpose(0, 1, 3, 2)
  return x.reshape(bsz, kv_heads, seq_len * groups)


def _stats(x, q, kv_heads: int, grouped: bool):
  """Row statistics as the kernels take them, [B, K, T * G]: given so (`grouped`) or [B, H, T];
  a one-line error naming a shape that is neither."""
  bsz, seq_len, heads, _ = q.shape
  want = (bsz, kv_heads, seq_len * heads // kv_heads) if grouped else (bsz, heads, seq_len)
  if x.shape != want:
    raise ValueError(f"row statistics of shape {x.shape}: expected {want} (grouped={grouped})")
  return x if grouped else group_stats(x, kv_heads)


def _ungroup_stats(x, groups):
  """`group_stats`'s inverse: [B, K, T * G] -> [B, H, T]."""
  bsz, kv_heads, rows = x.shape
  x = x.reshape(bsz, kv_heads, rows // groups, groups).transpose(0, 1, 3, 2)
  return x.reshape(bsz, kv_heads * groups, rows // groups)


def _checked(q, k, table, name):
  """(G, the block's query rows C, the table padded for its copy), or a one-line error naming
  why the `name` kernel does not take the call."""
  why = supported(q.shape, k.shape[2], q.dtype)
  if why is not None:
    raise ValueError(f"the Mosaic GPU {name} kernel does not take this call: {why}")
  groups = q.shape[2] // k.shape[2]
  # Entries past the count `_NONE` (the query kernels read up to 3 past it: a step's units
  # past the last rung); a copy moves a multiple of 128 bytes.
  size = table.shape[0]
  table = jnp.where(jnp.arange(size) > table[0], _NONE, table)
  return groups, _ROWS // groups, jnp.pad(table, (0, 3 + -(size + 3) % 32), constant_values=_NONE)


def _query_call(q, k, v, table, ins, *, dq_mode, window, buffers, interpret):
  bsz, padded, _, dim = q.shape
  kv_heads = k.shape[2]
  name = "dq" if dq_mode else "forward"
  groups, block, table = _checked(q, k, table, name)
  if not 1 <= buffers <= 4:
    raise ValueError(f"buffers={buffers}: the Mosaic GPU {name} kernel takes 1..4")
  kernel = functools.partial(
    _query_kernel, dq_mode=dq_mode, window=window, groups=groups, block=block,
    scale=dim**-0.5, with_dlse=len(ins) == 4, buffers=buffers, interpret=interpret,
  )  # fmt: skip

  def buffer(n=None):  # a copy view and a wgmma view of the same bytes
    shape = (_ROWS, _DIM) if n is None else (n, _KEYS, _DIM)
    return plgpu.RefUnion(
      plgpu.SMEM(shape, q.dtype, transforms=_SWIZZLED),
      plgpu.SMEM(shape, q.dtype, transforms=_TILED),
    )

  tiles = 1 + 2 * dq_mode  # q[, o, do]
  stats = len(ins) - 2 if dq_mode else 0
  arrivals = tiles * (block if interpret else 1) + stats
  scratch = [
    plgpu.SMEM(table.shape, jnp.int32),
    *(buffer() for _ in range(tiles)),
    buffer(buffers),  # k
    buffer(buffers),  # v
    plgpu.SMEM((max(stats, 1), _ROWS), jnp.float32),  # lse[, dlse]
    plgpu.SMEM((_ROWS,), jnp.float32),  # the row statistics out (lse or delta)
    plgpu.Barrier(num_arrivals=2 * (_KEYS // block), num_barriers=buffers),  # k, v: a copy a unit
    plgpu.Barrier(num_arrivals=arrivals),
    plgpu.Barrier(num_arrivals=1),
    *([plgpu.SMEM((_ROWS, _KEYS), q.dtype)] if interpret else []),
  ]
  params = plgpu.CompilerParams(approx_math=True, lowering_semantics=plgpu.LoweringSemantics.Lane)
  stat_shape = jax.ShapeDtypeStruct((bsz, kv_heads, padded * groups), jnp.float32)
  return plgpu.kernel(
    kernel,
    out_type=[jax.ShapeDtypeStruct(q.shape, q.dtype), stat_shape],
    grid=(padded // block, bsz, kv_heads),
    grid_names=("j", "b", "h"),
    scratch_types=scratch,
    compiler_params=params,
    interpret=plgpu.InterpretGPUParams() if interpret else False,
    kernel_name=f"fib_attention_packed_{'dq' if dq_mode else 'fwd'}_tma",
  )(table, q, k, v, *ins)


def forward(q, k, v, table, *, window: int, buffers: int = 2, interpret: bool = False):
  """(o [B, T, H, D], lse float32 [B, H, T]) of static rungs: q [B, T, H, D], k/v [B, T, K, D],
  `table` from `kernels_pallas.gpu.rung_table`. `buffers`: the k and v tiles' pipeline depth
  (`GpuBlocks.num_stages`), 1..4 (1: each step's copies waited for before its wgmmas)."""
  o, lse = _query_call(
    q, k, v, table, (), dq_mode=False, window=window, buffers=buffers, interpret=interpret
  )
  return o, _ungroup_stats(lse, q.shape[2] // k.shape[2])


def dq(
  q, k, v, o, do, lse, table, *, window: int, dlse=None, grouped: bool = False,
  buffers: int = 2, interpret: bool = False,
):  # fmt: skip
  """(dq [B, T, H, D], delta float32 [B, H, T]) of static rungs, delta = sum_d o do - dlse
  (the dkv kernels' input); lse/dlse [B, H, T]. dq carries the 1 / sqrt(D) scale. `grouped`:
  lse, dlse and delta as the kernels keep them, [B, K, T * G] (`group_stats`; for `dkv`'s
  `grouped`: no transposes between the two). `buffers` as `forward`'s."""
  kv_heads = k.shape[2]
  stats = [_stats(x, q, kv_heads, grouped) for x in (lse, *(() if dlse is None else (dlse,)))]
  dq_, delta = _query_call(
    q,
    k,
    v,
    table,
    (o, do, *stats),
    dq_mode=True,
    window=window,
    buffers=buffers,
    interpret=interpret,
  )
  return dq_, delta if grouped else _ungroup_stats(delta, q.shape[2] // kv_heads)


def dkv(
  q, k, v, do, lse, delta, table, *, window: int, grouped: bool = False, interpret: bool = False
):  # fmt: skip
  """(dk, dv) [B, T, K, D] of the packed kernels' static rungs: q/do [B, T, H, D], k/v
  [B, T, K, D], lse/delta float32 [B, H, T] (`grouped`: [B, K, T * G], as `dq` gives delta),
  `table` from `kernels_pallas.gpu.rung_table`. dk carries the 1 / sqrt(D) scale."""
  bsz, padded, _, dim = q.shape
  kv_heads = k.shape[2]
  groups, block, table = _checked(q, k, table, "dkv")
  lse, delta = (  # [B, K, T, G]
    _stats(x, q, kv_heads, grouped).reshape(bsz, kv_heads, padded, groups) for x in (lse, delta)
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
