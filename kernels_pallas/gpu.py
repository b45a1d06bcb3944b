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

from kernels_pallas import mosaic
from kernels_pallas.reference import LOG2E, MASK_VALUE

LN2 = 0.6931471805599453


def _exp(x):
  """exp(x) as 2^(x log2 e), for the row-wise kernels (see `_Softmax`). x is taken to base 2
  after any subtraction (a masked x, MASK_VALUE - m, overflows to -inf there, whose exp2 is 0;
  s * log2 e - m * log2 e could meet -inf - -inf)."""
  return jnp.exp2(x * LOG2E)


@dataclasses.dataclass(frozen=True)
class _Softmax:
  """The packed kernels' exponentials: in base 2 (exp2 = 1, `GpuBlocks.exp2`: scores, maxima
  and lse taken to base 2, so a static rung's entry costs one fma and libdevice's exp2f, one
  ex2.approx) or natural (0: libdevice's expf, a range reduction around the ex2, ~12
  instructions). With base 2 the packed forward's loop of rungs is 340 PTX instructions a step
  instead of 554, dq's 165 instead of 257, in Triton 3.5's passes for sm_90
  (experiments/results/triton35_pipeline_cpu/output_exp2.txt). `scale` is the scores' natural
  scale, 1 / sqrt(D). Masked scores are set after scaling, never scaled themselves."""

  scale: float
  exp2: int = 1

  @property
  def base(self) -> float:  # log2 e, or 1
    return LOG2E if self.exp2 else 1.0

  @property
  def score_scale(self) -> float:  # scores in the base's units
    return self.scale * self.base

  def exp(self, x):
    """e^(x / base): x in the base's units."""
    return jnp.exp2(x) if self.exp2 else jnp.exp(x)

  def probs(self, s, lse):
    """exp(s * scale - lse) for raw scores s and a natural lse (a vector, broadcast as given)."""
    return self.exp(s * self.score_scale - lse * self.base)

  def lse(self, m, l):
    """The natural log-sum-exp of a row from its max m in the base's units and its sum l."""
    return m * (LN2 if self.exp2 else 1.0) + jnp.log(l)


@dataclasses.dataclass(frozen=True)
class GpuBlocks:
  """Block rows and warps; the window loop uses block_q x block_q tiles."""

  # Tuned on one H100 at T = 65,536, 8/2 heads, D = 64 (experiments/results/
  # bench_attention_h100.json, "autotune"): small query blocks keep the G = 4 heads'
  # accumulators in registers; the rungs are CUDA-core work, not tensor-core work.
  block_q: int = 16
  # 0: the kernel's (row-wise 2; packed 4, a warpgroup, so the forward's score and value
  # matmuls are wgmma: on an H200 with rung groups of 2 the forward 6-13% faster than at 2
  # warps one rung a step, forward + backward 2-4%, experiments/results/speed_h200_dbf5e70/).
  num_warps: int = 0
  num_stages: int = 2
  block_q_bwd: int = 16
  num_warps_bwd: int = 4
  # Software-pipelining depth of the backward kernels (dq; dkv too unless num_stages_dkv);
  # 0: num_stages. On an H200, 3 stages for all three kernels made the backward slower
  # (experiments/results/bench_attention_h200_sweep.json); 3 for the forward alone moved it by
  # -2.3% to +1.5% (speed_h200_a89cff5/).
  num_stages_bwd: int = 0
  # The dkv kernel's own depth; 0: the backward's. (Triton 3.5's passes for sm_90, a stand-in
  # for XLA's: at 3 stages the transposed dkv kernel needs 55 KB of shared memory a program,
  # 4 programs an SM; dq 32 KB, its occupancy still set by its registers. So the dq kernel can
  # take 3 stages where dkv keeps 2.)
  num_stages_dkv: int = 0
  # "rowwise": the rungs unrolled per layer as row-wise dot products (CUDA cores).
  # "packed": the G heads of a kv head packed into the rows of tensor-core tiles, the rungs a
  # loop over an int32 table that is a kernel input, so layers share one compiled kernel.
  kernel: str = "rowwise"
  # Packed kernels, static rungs: how many rungs one loop step of the forward runs as one
  # tile (their key rows stacked: one score matmul, one online-softmax update), and of the
  # backward kernels. Powers of two; learned rungs always go one at a time. rung_group 0: the
  # kernel's (packed: 2, timed with num_warps above; the row-wise kernel has none);
  # rung_group_bwd 0: one rung a step (backward groups of 2 made forward + backward 0-7% slower
  # on an H200, of 4 16-20%: experiments/results/speed_h200_5fc79c6/, speed_h200_a89cff5/).
  rung_group: int = 0
  rung_group_bwd: int = 0
  # The dkv kernel's own (its groups stack query tiles, U * Q * G packed rows, where the dq
  # kernel's stack key tiles as the forward's do); 0: rung_group_bwd's.
  rung_group_dkv: int = 0
  # Packed kernels, one rung a loop step (static rungs ungrouped, and learned rungs): 1 takes
  # each packed row's one score of a rung tile from the tile's diagonal and runs the softmax
  # on those (one exp a row); 0 runs it on the whole masked tile (one exp an entry, the way
  # rung groups and the window tile run). The same results either way; 0 stays the default
  # until 1 is timed on a GPU.
  diagonal: int = 0
  # Packed dkv kernel: 1 accumulates a key block's dk and dv transposed, [D, C] += q^T ds (a
  # matmul of D rows: a warpgroup's wgmma on a Hopper GPU, q^T read from shared memory as it
  # lies), and transposes once at the end; 0 accumulates [C, D] += ds^T q (C = block_q_bwd
  # rows: mma.sync, its operands through shared memory and ldmatrix). The same sums. On an
  # H200, 1 made the dkv kernel 7-8% faster (Nsight Compute), forward + backward 2-4% faster
  # at T = 1K..64K (experiments/results/speed_h200_a89cff5/).
  dkv_t: int = 1
  # Packed kernels: 1 takes every softmax in base 2 (scores, maxima and lse times log2 e: one
  # fma and one ex2.approx an entry, 2 ulp); 0 in natural units through libdevice's expf (a
  # range reduction around the ex2, ~12 instructions an entry). Triton 3.5's passes for sm_90:
  # the forward's loop of rungs 340 PTX instructions against 554, dq's 165 against 257
  # (experiments/results/triton35_pipeline_cpu/output_exp2.txt). 1 stays the default unless a
  # GPU says otherwise. (The row-wise kernels always take base 2.)
  exp2: int = 1
  # Packed kernels, static rungs: 1 folds the rungs whose keys the window's tile already holds
  # for every row of a program (distance d <= the tile's reach: pow2(Q + W) - Q keys back in
  # the forward and dq kernels, 16 at Q = 16, W = 12; the query chunks' in dkv) into the
  # window's mask, so the rung loops start after them (8 of the stagger model's 144 rungs at
  # T = 1,024, the fib model's rung 13; distances above 31 never fold, the set is an int32
  # bitmask); 0 runs every rung in the loops. The same sums.
  fold: int = 1
  # Packed kernels, static rungs: which kernels run them on CUDA cores, a bitmask (1 the
  # forward, 2 dq, 4 dkv). A static rung gives each packed row one key, so its score is a row's
  # dot product with its own key row (gathered a packed row at a time, [Q * G, D]), and its
  # online-softmax update, dq, dk and dv are elementwise: no tensor-core tile of which one
  # entry a row is used, no shared-memory staging of its operands. The dkv kernel takes its
  # rungs a head at a time ([Q, D] rows into its [Q, D] dk and dv).
  # A kernel whose bit is set runs one rung a step (its rung group does not apply); learned
  # rungs always take tiles. The same sums to float32 rounding for float32 inputs (bf16 ones
  # differ by the tiles' bf16 rounding of p and ds). Slower in every kernel on an H200
  # (forward 1.75-1.83x; backward +0.04-0.10 ms with dkv's bit, +0.12-0.18 with dq's, at
  # B T = 65,536): the loops' loads feed no dot, so Triton pipelines none of them, and they
  # hold more registers (experiments/results/speed_h200x2_4aef62b/). 0 is the default.
  ew_rungs: int = 0
  # Packed kernels, static rungs: 1 takes dk and dv from `kernels_pallas.mosaic`'s Mosaic GPU
  # kernel (Hopper: the query and dO tiles of each step moved by the TMA engine instead of
  # per-thread loads through L1, which bound the Triton dkv kernel), where it takes the call
  # (bf16 inputs, G = 4, D = 64, a Hopper GPU; `mosaic.supported`); the Triton kernel
  # elsewhere and for learned rungs. The same sums up to the order of float32 additions.
  dkv_tma: int = 0
  # Packed kernels, static rungs: which query-major kernels run in `kernels_pallas.mosaic`'s
  # Mosaic GPU kernel, a bitmask (1 the forward, 2 dq): k and v tiles by TMA copies, four
  # key tiles of 16 rows (window chunks or rungs) a step, where it takes the call (as
  # `dkv_tma`); the Triton kernels elsewhere and for learned rungs. The same attention up to the
  # order of float32 sums (and, in the forward, the bf16 rounding of p under another running
  # max). Their k and v tiles' pipeline depth is num_stages (the forward) and stages_dq (dq),
  # 1..4 buffers of a step's 64 keys.
  q_tma: int = 0

  def __post_init__(self):
    if self.kernel not in KERNELS:
      raise ValueError(f"unknown GPU kernel={self.kernel!r}; expected one of {KERNELS}")
    for name, least in (
      ("block_q", 16),
      ("block_q_bwd", 16),
      ("num_warps_bwd", 1),
    ):
      n = getattr(self, name)
      if n < least or n & (n - 1):  # Triton's tiles and warp counts are powers of two
        raise ValueError(f"{name}={n} must be a power of two >= {least}")
    if self.num_warps < 0 or self.num_warps & (self.num_warps - 1):
      raise ValueError(f"num_warps={self.num_warps} must be a power of two or 0 (the kernel's)")
    for name, least, zero in (
      ("num_stages", 1, ""),
      ("num_stages_bwd", 0, " (0: num_stages)"),
      ("num_stages_dkv", 0, " (0: num_stages_bwd)"),
    ):
      if getattr(self, name) < least:
        raise ValueError(f"{name}={getattr(self, name)} must be >= {least}{zero}")
    for name, n, least in (
      ("rung_group", self.rung_group, "the kernel's"),
      ("rung_group_bwd", self.rung_group_bwd, "one rung a step"),
      ("rung_group_dkv", self.rung_group_dkv, "rung_group_bwd's"),
    ):
      if n < 0 or n & (n - 1):
        raise ValueError(f"{name}={n} must be a power of two or 0 ({least})")
    for name in ("diagonal", "dkv_t", "exp2", "fold", "dkv_tma"):
      if getattr(self, name) not in (0, 1):
        raise ValueError(f"{name}={getattr(self, name)} must be 0 or 1")
    if not 0 <= self.q_tma <= 3:
      raise ValueError(f"q_tma={self.q_tma} must be a bitmask 0..3 (1 fwd, 2 dq)")
    if self.kernel != "packed" and self.q_tma:
      raise ValueError(f"q_tma={self.q_tma} is the packed kernel's option; kernel={self.kernel!r}")
    if not 0 <= self.ew_rungs <= 7:
      raise ValueError(f"ew_rungs={self.ew_rungs} must be a bitmask 0..7 (1 fwd, 2 dq, 4 dkv)")
    for bit, name, n in ((1, "num_stages", self.num_stages), (2, "stages_dq", self.stages_dq)):
      if self.q_tma & bit and n > 4:
        raise ValueError(f"q_tma={self.q_tma}: {name}={n}, the Mosaic kernel's buffers, 1..4")
    if self.q_tma & self.ew_rungs & 3:
      raise ValueError(
        f"q_tma={self.q_tma} and ew_rungs={self.ew_rungs} both set the "
        f"{'forward' if self.q_tma & self.ew_rungs & 1 else 'dq'} kernel"
      )
    if self.kernel != "packed" and self.dkv_tma:
      raise ValueError(f"dkv_tma=1 is the packed kernel's option; kernel={self.kernel!r}")
    if self.dkv_tma and self.ew_rungs & 4:
      raise ValueError(f"dkv_tma=1 and ew_rungs={self.ew_rungs} (bit 4) both set the dkv kernel")
    if self.kernel != "packed" and self.ew_rungs:
      raise ValueError(
        f"ew_rungs={self.ew_rungs}: static rungs on CUDA cores are the packed kernel's option; "
        f"kernel={self.kernel!r}"
      )
    if self.kernel != "packed" and (self.group, self.group_bwd, self.group_dkv) != (1, 1, 1):
      raise ValueError(
        f"rung_group={self.rung_group}, rung_group_bwd={self.rung_group_bwd}, "
        f"rung_group_dkv={self.rung_group_dkv}: rung groups are the packed kernel's; "
        f"kernel={self.kernel!r}"
      )

  @property
  def warps(self) -> int:
    """The forward's warps (num_warps, 0 resolved)."""
    return self.num_warps or (4 if self.kernel == "packed" else 2)

  @property
  def group(self) -> int:
    """The forward's rung group (rung_group, 0 resolved)."""
    return self.rung_group or (2 if self.kernel == "packed" else 1)

  @property
  def group_bwd(self) -> int:
    """The backward's rung group, dq's (rung_group_bwd, 0: 1, whatever the forward's)."""
    return self.rung_group_bwd or 1

  @property
  def group_dkv(self) -> int:
    """The dkv kernel's rung group (rung_group_dkv, 0: the backward's)."""
    return self.rung_group_dkv or self.group_bwd

  @property
  def stages_dq(self) -> int:
    return self.num_stages_bwd or self.num_stages

  @property
  def stages_dkv(self) -> int:
    return self.num_stages_dkv or self.stages_dq

  def resolved(self) -> GpuBlocks:
    """These blocks with each 0 that stands for a default or another field's value replaced
    by the value it takes (warps, backward stages, rung groups), and the row-wise kernel's
    fold 0 (it folds no rungs): the same kernels, as a record names them (`blocks_spec`)."""
    return dataclasses.replace(
      self,
      num_warps=self.warps,
      num_stages_bwd=self.stages_dq,
      num_stages_dkv=self.stages_dkv,
      rung_group=self.group,
      rung_group_bwd=self.group_bwd,
      rung_group_dkv=self.group_dkv,
      fold=self.fold if self.kernel == "packed" else 0,
    )

  def for_kernel(self, kernel: str) -> GpuBlocks:
    """These blocks for `kernel`; the row-wise kernel's without the rung groups, ew_rungs,
    dkv_tma and q_tma (it has none of them)."""
    groups = (
      {}
      if kernel == "packed"
      else dict(rung_group=0, rung_group_bwd=0, rung_group_dkv=0, ew_rungs=0, dkv_tma=0, q_tma=0)
    )
    return dataclasses.replace(self, kernel=kernel, **groups)


KERNELS = ("rowwise", "packed")


def default_blocks(kernel: str = "packed") -> GpuBlocks:
  """The blocks a model's `kernel` runs with where no run or config names any
  (`fibax.attention.gpu_blocks_for`): on a Hopper GPU the packed kernel's static rungs in the
  three Mosaic GPU kernels (q_tma=3, dkv_tma=1; each falls back to its Triton kernel where
  `mosaic.supported` refuses a call: another dtype, G or head_dim, learned rungs), with which
  forward + backward is 12-18% faster than the Triton kernels and the paper model's train step
  at T = 1,024 0.883-0.895x the dense one (six processes) on H200s
  (experiments/results/speed_h200x2_7b2e4cf/); elsewhere, and in Pallas' interpreters, the
  Triton kernels (`GpuBlocks` as declared)."""
  blocks = GpuBlocks(kernel=kernel)
  if kernel == "packed" and mosaic.on_hopper():
    return dataclasses.replace(blocks, dkv_tma=1, q_tma=3)
  return blocks


# A block config as a comma-separated spec of integers, these fields in this order (the
# benchmarks' --sweep / --blocks, `model.attention.gpu_blocks`); those left out keep their
# defaults.
SPEC_KEYS = (
  *("block_q", "num_warps", "block_q_bwd", "num_warps_bwd", "num_stages", "num_stages_bwd"),
  *("rung_group", "rung_group_bwd", "diagonal", "dkv_t", "num_stages_dkv", "exp2", "fold"),
  *("rung_group_dkv", "ew_rungs", "dkv_tma", "q_tma"),
)
SPEC_FORMAT = (
  "'bq,warps,bq_bwd,warps_bwd[,stages[,stages_bwd[,group[,group_bwd[,diagonal[,dkv_t"
  "[,stages_dkv[,exp2[,fold[,group_dkv[,ew[,dkv_tma[,q_tma]]]]]]]]]]]]]'"
)


def parse_blocks(spec: str) -> GpuBlocks:
  """SPEC_FORMAT -> the packed kernel's GpuBlocks (`for_kernel` gives the row-wise one the same
  blocks without its options), or a one-line ValueError naming the spec."""
  try:
    vals = [int(x) for x in spec.split(",")]
    if not 4 <= len(vals) <= len(SPEC_KEYS):
      raise ValueError
    return GpuBlocks(kernel="packed", **dict(zip(SPEC_KEYS, vals, strict=False)))
  except ValueError as e:
    why = f" ({e})" if str(e) else ""
    raise ValueError(
      f"bad block config {spec!r}{why}: expected {SPEC_FORMAT} of integers"
    ) from None


def blocks_spec(blocks: GpuBlocks) -> str:
  """`parse_blocks`' inverse up to `GpuBlocks.resolved`: every field of SPEC_KEYS,
  comma-separated, as the kernels take it (a 0 that stands for a default written as that
  default), so that every record names blocks alike. The values are `blocks.kernel`'s: a spec
  of the packed kernel's blocks names its warps and rung groups, which the row-wise kernel
  (another default warp count, no rung groups) would not take as its own."""
  resolved = blocks.resolved()
  return ",".join(str(getattr(resolved, k)) for k in SPEC_KEYS)


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
  corr = _exp(m - m_new)
  p_QxC = _exp(s_QxC - m_new[:, None])
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
      p_Q = jnp.where(valid, _exp(s_rungs[g][j] - m), 0.0)
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
      p_QxC = jnp.where(keep, _exp(s_QxC - lse_g[g][:, None]), 0.0)
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
      p_Q = jnp.where(valid, _exp(s_Q - lse_g[g]), 0.0)
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
      p_QxC = jnp.where(keep, _exp(s_QxC - lse_Q[:, None]), 0.0)
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
      p_Q = jnp.where(valid, _exp(s_Q - lse_Q), 0.0)
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
      q, k, v, rung_table(far, window), window=window, blocks=blocks, interpret=interpret
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
    compiler_params=_params(blocks.warps, blocks.num_stages, interpret),
    interpret=interpret,
    name="fib_attention_fwd",
  )(q, k, v)


@functools.partial(jax.jit, static_argnames=("window", "far", "blocks", "interpret"))
def backward(q, k, v, o, lse, do, *, window, far, blocks: GpuBlocks, interpret: bool, dlse=None):
  """Gradients (dq, dk, dv); T a multiple of block_q_bwd. `dlse` [B, H, T]: a cotangent of
  the forward's lse as well (it is subtracted from delta)."""
  if blocks.kernel == "packed":
    return _backward_packed(
      q, k, v, o, lse, do, rung_table(far, window), window=window, blocks=blocks,
      interpret=interpret,
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
  params_dq = _params(blocks.num_warps_bwd, blocks.stages_dq, interpret)
  params_dkv = _params(blocks.num_warps_bwd, blocks.stages_dkv, interpret)
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
    compiler_params=params_dq,
    interpret=interpret,
    name="fib_attention_dq",
  )(q, k, v, do, lse, delta)
  dk, dv = pl.pallas_call(
    functools.partial(_dkv_kernel, **statics, seq_len=seq_len),
    grid=grid,
    in_specs=[q_all, kv_blk, kv_blk, q_all, stat_all, stat_all],
    out_specs=[kv_blk, kv_blk],
    out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
    compiler_params=params_dkv,
    interpret=interpret,
    name="fib_attention_dkv",
  )(q, k, v, do, lse, delta)
  return dq, dk, dv


# ----------------------------------------------------------------------------------------------
# Packed kernels. M = Q * G packed rows: row m is query row m // G of head m % G, the order of
# a [Q, G, D] block in memory, so the packed load is one contiguous tile. Every score tile is a
# tensor-core matmul of the M packed rows against a tile of keys: the window's tile of
# pow2(Q + W) rows (a band mask), then one Q-row tile per rung (a diagonal mask: query row r
# reads key row r of the tile), in a loop whose distances come from a table that is a kernel
# input, sorted by distance: a program's loop stops at the first rung that reaches none of its
# rows (21% of the rung visits of the stagger model's programs at T = 1,024). The key-major dkv
# kernel packs the queries that read a key block the same way, so its contraction over the
# packed rows sums the G heads' gradients. With `GpuBlocks.rung_group` U > 1, a loop step takes
# U static rungs at once: their Q-row key tiles stacked into one U * Q-row tile (one score
# matmul and one online-softmax update for U rungs; a diagonal mask per rung, rungs past the
# program's count masked), and in dkv their query tiles stacked into U * Q * G packed rows.
# With `GpuBlocks.fold` (the default) the static rungs the window's tile already holds for every
# row of a program (W < d <= its reach, `_window_reach` / `_chunks_reach`) are masked into that
# tile instead (`_folded`, `_band`), and the rung loops start after them.
#
# Learned layers use the same kernels with run-time rungs: rung r has a floor lo_r and a weight
# f_r, and query i reads the key (1 - f) k[i - lo] + f k[max(i - lo - 1, 0)] (and the same blend
# of values), valid where i >= lo and the rung is kept (the tables hold the kept rungs only,
# sorted by floor, so the loops skip the others). Scores and values are linear in the
# blend, so a rung is two integer-offset tiles mixed by f; the dq kernel also returns each
# program's d loss / d f_r, which reaches alpha through f = alpha b - lo.


def rung_table(far: tuple[int, ...], window: int = 0) -> jax.Array:
  """int32 [1 + R rounded up to a power of two >= 16]: the rung count, then the rung
  distances in increasing order (zero padding: the Triton kernels never read it; the Mosaic
  ones read a distance no block reaches in its place, `mosaic._checked`). Layers whose R + 1
  round to the same length share one compiled kernel. The distances are distinct and beyond
  the window (a `Pattern`'s are), as the kernels' folded rungs need: their bitmask is a sum of
  bits."""
  if len(set(far)) != len(far) or any(d <= window for d in far):
    raise ValueError(f"far={far} must be distinct distances > window={window}")
  size = _pow2_at_least(len(far) + 1)
  return jnp.asarray([len(far), *sorted(far)] + [0] * (size - 1 - len(far)), jnp.int32)


def _learned_tables(lo, frac, keep):
  """The kept learned rungs by increasing floor, then the others: (floors, weights, [count,
  0...], the rung of each slot), each padded to a power of two >= 16 (the dq kernel's
  per-rung gradient is a vector of that length, each slot's written at its rung's index, so
  the caller sums the programs' vectors with no permutation after: a scatter of their sum
  was a 1 ms fusion a step in an H200 profile, XLA fusing the sum into the scatter). The
  loops run over the kept rungs only, and only over those whose floor reaches the program's
  rows."""
  order = jnp.argsort(jnp.where(keep, lo, jnp.iinfo(jnp.int32).max), stable=True)
  pad = (0, _pow2_at_least(lo.shape[0]) - lo.shape[0])
  count = jnp.zeros((16,), jnp.int32).at[0].set(jnp.sum(keep.astype(jnp.int32)))
  return (
    jnp.pad(lo[order].astype(jnp.int32), pad),
    jnp.pad(frac[order].astype(jnp.float32), pad),
    count,
    jnp.pad(order.astype(jnp.int32), pad),
  )


def _pow2_at_least(n: int) -> int:
  return max(16, 1 << (n - 1).bit_length())


def _packed(rows: int, groups: int):
  """(query row of each packed row, head of each packed row), both int32 [rows * G]."""
  m = jnp.arange(rows * groups)
  return m // groups, m % groups


def _load_packed(first, rows, groups, cols, tiles, stats, seq_len=None):
  """Query rows first .. first + rows, x G heads, packed: tiles [rows * G, D] from refs
  [., G, D] and stats [rows * G] from refs [G, .]; zero past `seq_len` when given. Returns
  (query row within the tile, absolute row, valid, tiles, stats)."""
  r_M, g_M = _packed(rows, groups)
  rows_M = first + r_M
  valid = None if seq_len is None else rows_M < seq_len
  return (r_M, rows_M, valid, *_gather_packed(rows_M, g_M, valid, cols, tiles, stats, seq_len))


def _gather_packed(rows_M, g_M, valid, cols, tiles, stats, seq_len=None):
  """Packed rows (query row rows_M[m], head g_M[m]): tiles [M, D] from refs [., G, D] and
  stats [M] from refs [G, .], zero where not `valid` (None: all valid, rows < `seq_len`)."""
  at = rows_M if seq_len is None else jnp.minimum(rows_M, seq_len - 1)
  other = None if valid is None else 0.0
  row_mask = None if valid is None else valid[:, None]
  tiles = [
    plgpu.load(t.at[at[:, None], g_M[:, None], cols[None, :]], mask=row_mask, other=other)
    for t in tiles
  ]
  stats = [plgpu.load(s.at[g_M, at], mask=valid, other=other) for s in stats]
  return tiles, stats


def _window_keys(k_ref, v_ref, i0, rows_M, cols, window, block_q, bits=None):
  """The window's key tile: rows [i0 + Q - CW, i0 + Q), CW = pow2(Q + W), and its band mask
  0 <= i - j <= W against the packed query rows, with the folded rungs' distances (`bits`,
  `_folded`) as well."""
  cw = _pow2_at_least(block_q + window)
  kw_C = i0 + block_q - cw + jnp.arange(cw)
  rel = rows_M[:, None] - kw_C[None, :]
  keep = _band(rel, window, bits) & (kw_C >= 0)[None, :]
  return _rows(k_ref, kw_C, cols, kw_C >= 0), _rows(v_ref, kw_C, cols, kw_C >= 0), keep


def _window_reach(window, block_q):
  """How far back the forward's and dq's window tile reaches for every row of a program:
  pow2(Q + W) - Q (a rung that near is in the tile)."""
  return _pow2_at_least(block_q + window) - block_q


def _chunks_reach(window, block_q):
  """The same for the dkv kernel's window, ceil((Q + W) / Q) chunks of Q query rows: every
  key row of a block sees the queries up to (chunks - 1) Q rows on."""
  return (-(-(block_q + window) // block_q) - 1) * block_q


def _folded(table_ref, window, reach, on=True):
  """The static rungs a window tile reaching `reach` rows back holds (distance d <= reach; the
  table's first ones, as it is sorted): (how many, a bitmask of their distances), or (0,
  None) where none can be (reach <= W) or folding is off (not `on`: `GpuBlocks.fold` 0, or
  learned rungs). Distances above 31 are never folded (an int32 mask)."""
  reach = min(reach, 31)
  if not on or reach <= window:
    return 0, None
  t = table_ref[...]
  idx = jnp.arange(t.shape[0])
  fold = (idx >= 1) & (idx < 1 + table_ref[0]) & (t <= reach)
  bits = jnp.sum(jnp.where(fold, jnp.left_shift(1, jnp.clip(t, 0, 31)), 0))
  return jnp.sum(fold.astype(jnp.int32)), bits


def _band(rel, window, bits=None):
  """0 <= rel <= W, or rel one of the folded rungs' distances (`bits`: bit d for d <= 31)."""
  keep = (rel >= 0) & (rel <= window)
  if bits is None:
    return keep
  on = (jnp.right_shift(bits, jnp.clip(rel, 0, 31)) & 1) == 1
  return keep | ((rel >= 0) & (rel <= 31) & on)


def _rung_keys(k_ref, v_ref, i0, lo, cols, block_q):
  """Key and value tiles of a learned rung with floor `lo` for query rows i0 + c, and the
  tiles one row further back (clamped at row 0): (valid, [k_a, v_a, k_b, v_b])."""
  ka = i0 + jnp.arange(block_q) - lo
  valid = ka >= 0
  rows = [ka, jnp.maximum(ka - 1, 0)]
  return valid, [_rows(ref, r, cols, valid) for r in rows for ref in (k_ref, v_ref)]


def _group_rungs(table_ref, n, group, per, live, first=0):
  """Static rungs first + n * U .. first + n * U + U - 1 (U = `group`; `first`: the folded
  ones) laid out `per` rows (or columns) each: for each row, its rung's distance, its index
  within the rung's rows, and whether the rung is live (below `live`, the program's count; the
  padding's distances are 0), or None where every one is (U = 1: the loop runs over the live
  rungs only). The U distances are scalar loads (a vector gather of the table made the
  backward 13% slower at T = 16,384 on an H200)."""
  m = jnp.arange(group * per)
  at = 1 + first + n * group
  if group == 1:
    return table_ref[at], m, None
  u_M = m // per
  d = table_ref[jnp.minimum(at, table_ref.shape[0] - 1)]
  for u in range(1, group):
    d = jnp.where(u_M == u, table_ref[jnp.minimum(at + u, table_ref.shape[0] - 1)], d)
  return d, m % per, first + n * group + u_M < live


def _and(live, cond):
  return cond if live is None else live & cond


def _group_keys(table_ref, n, group, live, i0, r_M, k_ref, v_ref, cols, block_q, first=0):
  """A static rung group's key and value tiles [U * Q, D] for query rows i0 + c (rung u's Q
  rows stacked), and their mask against the packed query rows: query row r reads row r of
  each rung's tile (a diagonal per rung)."""
  d_C, c_C, live_C = _group_rungs(table_ref, n, group, block_q, live, first)
  rows_C = i0 + c_C - d_C
  valid = _and(live_C, rows_C >= 0)
  keep = (r_M[:, None] == c_C[None, :]) & valid[None, :]
  return _rows(k_ref, rows_C, cols, valid), _rows(v_ref, rows_C, cols, valid), keep


def _steps(live, first, group):
  """Loop steps of U = `group` rungs over the live rungs past the `first` (folded) ones."""
  return (jnp.maximum(live - first, 0) + group - 1) // group


def _rungs_below(tables, learned, limit):
  """How many rungs, in increasing distance (or floor), are below `limit`: a program's loop
  stops there, the rungs past it reaching none of its rows (a query block [i0, i0 + Q) reads
  rungs d < i0 + Q; a key block [j0, .) is read through rungs d < T - j0)."""
  t = tables[0][...]
  idx = jnp.arange(t.shape[0])
  first, count = (0, tables[2][0]) if learned else (1, tables[0][0])
  live = (idx >= first) & (idx < first + count) & (t < limit)
  return jnp.sum(live.astype(jnp.int32))


def _blend(a_CxD, b_CxD, f):
  """A learned rung's key or value tile (1 - f) a + f b (the definition: keys and values are
  interpolated between the rows at the floor and one past it), formed in float32 and used in
  the tiles' dtype, so each rung costs one matmul where scores blended would cost two."""
  mix = (1 - f) * a_CxD.astype(jnp.float32) + f * b_CxD.astype(jnp.float32)
  return mix.astype(a_CxD.dtype)


def _rowdot(x_MxD, y_MxD):
  """Each row's dot product, in float32: [M]."""
  return jnp.sum(x_MxD.astype(jnp.float32) * y_MxD.astype(jnp.float32), axis=1)


def _ew_keys(table_ref, n, rows_M, k_ref, v_ref, cols):
  """Static rung n's key and value rows for each packed query row (row rows_M - d, gathered a
  packed row at a time: [M, D] each, zero before row 0) and whether each exists: [M]."""
  rows = rows_M - table_ref[1 + n]
  valid = rows >= 0
  return _rows(k_ref, rows, cols, valid), _rows(v_ref, rows, cols, valid), valid


def _diag(x_MxC, eye):
  """Each row's one entry on `eye` (a rung tile's diagonal: packed row m's key): [M]."""
  return jnp.sum(jnp.where(eye, x_MxC, 0.0), axis=1)


def _on_diag(x_M, eye):
  """[M] back onto the tile's diagonal, zero elsewhere: [M, C]."""
  return jnp.where(eye, x_M[:, None], 0.0)


def _static_rung(table_ref, n, i0, r_M, k_ref, v_ref, cols, block_q):
  """Static rung n's key and value tiles for query rows i0 + c (query row r reads row r of
  each), and whether each packed row's key exists (row i0 + r - d >= 0): [M]."""
  d = table_ref[1 + n]
  rows_C = i0 + jnp.arange(block_q) - d
  valid = rows_C >= 0
  return _rows(k_ref, rows_C, cols, valid), _rows(v_ref, rows_C, cols, valid), i0 + r_M - d >= 0


def _fwd_window(q_MxD, k_CxD, v_CxD, keep, sm: _Softmax):
  """The online softmax's carry after the window tile (every query attends d = 0); scores
  and their max in the base's units (scale * base), so p = sm.exp(s - m)."""
  s_MxC = jnp.where(keep, plgpu.dot(q_MxD, k_CxD, trans_b=True) * sm.score_scale, MASK_VALUE)
  m_M = jnp.max(s_MxC, axis=1)
  p_MxC = sm.exp(s_MxC - m_M[:, None])
  return plgpu.dot(p_MxC.astype(v_CxD.dtype), v_CxD), m_M, jnp.sum(p_MxC, axis=1)


def _dq_tile(q_MxD, do_MxD, lse_M, delta_M, k_CxD, v_CxD, keep, sm: _Softmax):
  """(dq / scale) of one integer-offset key tile (the window, or a static rung)."""
  p = jnp.where(keep, sm.probs(plgpu.dot(q_MxD, k_CxD, trans_b=True), lse_M[:, None]), 0)
  ds = p * (plgpu.dot(do_MxD, v_CxD, trans_b=True) - delta_M[:, None])
  return plgpu.dot(ds.astype(k_CxD.dtype), k_CxD)


def _dot_t(w_MxC, y_MxD, kv_t=0):
  """w^T y [C, D], or (kv_t = 1) its transpose y^T w [D, C]; w cast to y's dtype."""
  w_MxC = w_MxC.astype(y_MxD.dtype)
  if kv_t:
    return plgpu.dot(y_MxD, w_MxC, trans_a=True)
  return plgpu.dot(w_MxC, y_MxD, trans_a=True)


def _dkv_tile(dk, dv, q_M, do_M, lse_M, delta_M, k_CxD, v_CxD, keep, sm: _Softmax, kv_t=0):
  """Adds the packed queries' gradients to a key block's (dk / scale, dv), [C, D] or (kv_t)
  [D, C] each."""
  s = plgpu.dot(q_M, k_CxD, trans_b=True)
  dp = plgpu.dot(do_M, v_CxD, trans_b=True)
  p = jnp.where(keep, sm.probs(s, lse_M[:, None]), 0)
  ds = p * (dp - delta_M[:, None])
  return dk + _dot_t(ds, q_M, kv_t), dv + _dot_t(p, do_M, kv_t)


def _dq_diag(q_MxD, do_MxD, lse_M, delta_M, k_CxD, v_CxD, eye, valid_M, sm: _Softmax):
  """`_dq_tile` of a rung tile whose packed rows each read one key (on `eye`, where
  `valid_M`): the softmax on the diagonal's scores only."""
  s_M = _diag(plgpu.dot(q_MxD, k_CxD, trans_b=True), eye)
  dp_M = _diag(plgpu.dot(do_MxD, v_CxD, trans_b=True), eye)
  p_M = jnp.where(valid_M, sm.probs(s_M, lse_M), 0.0)
  ds_M = p_M * (dp_M - delta_M)
  return plgpu.dot(_on_diag(ds_M, eye).astype(k_CxD.dtype), k_CxD)


def _dkv_diag(dk, dv, q_M, do_M, lse_M, delta_M, k_CxD, v_CxD, eye, valid_M, sm: _Softmax, kv_t=0):
  """`_dkv_tile` of packed queries that each read one key of the block (on `eye`); [C, D] or
  (kv_t) [D, C] as there."""
  s_M = _diag(plgpu.dot(q_M, k_CxD, trans_b=True), eye)
  dp_M = _diag(plgpu.dot(do_M, v_CxD, trans_b=True), eye)
  p_M = jnp.where(valid_M, sm.probs(s_M, lse_M), 0.0)
  ds_M = p_M * (dp_M - delta_M)
  return (
    dk + _dot_t(_on_diag(ds_M, eye), q_M, kv_t),
    dv + _dot_t(_on_diag(p_M, eye), do_M, kv_t),
  )


def _fwd_packed_kernel(
  *refs, window, groups, scale, block_q, group=1, num_rungs=None, diagonal=0, exp2=1, fold=0,
  ew=0,
):  # fmt: skip
  # tables: [S] int32 (static: count, then distances) or lo/frac/count (learned);
  # q_ref/o_ref [Q, G, D]; k_ref/v_ref [T, D]; lse_ref [G, Q]
  learned = num_rungs is not None
  tables, (q_ref, k_ref, v_ref, o_ref, lse_ref) = refs[:-5], refs[-5:]
  i0 = pl.program_id(0) * block_q
  cols = jnp.arange(k_ref.shape[1])
  r_M, _, _, (q_MxD,), _ = _load_packed(0, block_q, groups, cols, [q_ref], [])
  rows_M = i0 + r_M
  sm = _Softmax(scale, exp2)  # scores and maxima in the base's units: p = sm.exp(s - m)
  first, bits = _folded(tables[0], window, _window_reach(window, block_q), fold and not learned)
  window_keys = _window_keys(k_ref, v_ref, i0, rows_M, cols, window, block_q, bits)
  carry = _fwd_window(q_MxD, *window_keys, sm)
  diag = r_M[:, None] == jnp.arange(block_q)[None, :]

  def tile(carry, k_CxD, v_CxD, keep):  # the online softmax over one more key tile
    acc, m, l = carry
    s = jnp.where(keep, plgpu.dot(q_MxD, k_CxD, trans_b=True) * sm.score_scale, MASK_VALUE)
    m_new = jnp.maximum(m, jnp.max(s, axis=1))
    corr = sm.exp(m - m_new)
    p = sm.exp(s - m_new[:, None])
    pv_D = plgpu.dot(p.astype(v_CxD.dtype), v_CxD)
    return acc * corr[:, None] + pv_D, m_new, l * corr + jnp.sum(p, axis=1)

  def one_key(carry, k_CxD, v_CxD, valid_M):  # `tile` where each row reads one key: diag's
    acc, m, l = carry
    s_M = jnp.where(
      valid_M, _diag(plgpu.dot(q_MxD, k_CxD, trans_b=True), diag) * sm.score_scale, MASK_VALUE
    )
    m_new = jnp.maximum(m, s_M)
    corr = sm.exp(m - m_new)
    p_M = sm.exp(s_M - m_new)
    pv_D = plgpu.dot(_on_diag(p_M, diag).astype(v_CxD.dtype), v_CxD)
    return acc * corr[:, None] + pv_D, m_new, l * corr + p_M

  def rung(j, carry):
    lo, f = tables[0][j], tables[1][j]
    valid, (k_a, v_a, k_b, v_b) = _rung_keys(k_ref, v_ref, i0, lo, cols, block_q)
    k_CxD, v_CxD = _blend(k_a, k_b, f), _blend(v_a, v_b, f)
    if diagonal:
      return one_key(carry, k_CxD, v_CxD, rows_M - lo >= 0)
    return tile(carry, k_CxD, v_CxD, diag & valid[None, :])

  def rung_group(n, carry):
    if diagonal and group == 1:
      keys = _static_rung(tables[0], first + n, i0, r_M, k_ref, v_ref, cols, block_q)
      return one_key(carry, *keys)
    keys = _group_keys(tables[0], n, group, live, i0, r_M, k_ref, v_ref, cols, block_q, first)
    return tile(carry, *keys)

  def ew_rung(n, carry):  # `one_key` on CUDA cores: each packed row's own key and value row
    acc, m, l = carry
    k_M, v_M, valid_M = _ew_keys(tables[0], first + n, rows_M, k_ref, v_ref, cols)
    s_M = jnp.where(valid_M, _rowdot(q_MxD, k_M) * sm.score_scale, MASK_VALUE)
    m_new = jnp.maximum(m, s_M)
    corr = sm.exp(m - m_new)
    p_M = sm.exp(s_M - m_new)
    acc = acc * corr[:, None] + p_M[:, None] * v_M.astype(jnp.float32)
    return acc, m_new, l * corr + p_M

  live = _rungs_below(tables, learned, i0 + block_q)
  if learned:
    acc, m_M, l_M = lax.fori_loop(0, live, rung, carry)
  elif ew:
    acc, m_M, l_M = lax.fori_loop(0, _steps(live, first, 1), ew_rung, carry)
  else:
    acc, m_M, l_M = lax.fori_loop(0, _steps(live, first, group), rung_group, carry)
  r_M, g_M = _packed(block_q, groups)
  o = (acc / l_M[:, None]).astype(o_ref.dtype)
  plgpu.store(o_ref.at[r_M[:, None], g_M[:, None], cols[None, :]], o)
  plgpu.store(lse_ref.at[g_M, r_M], sm.lse(m_M, l_M))


def _dq_packed_kernel(
  *refs,
  window,
  groups,
  scale,
  block_q,
  group=1,
  num_rungs=None,
  with_dlse=False,
  diagonal=0,
  exp2=1,
  fold=0,
  ew=0,
):
  # q/o/do/dq [Q, G, D]; k/v [T, D]; lse/dlse/delta [G, Q]; learned: dfrac [R_pad], this
  # program's d loss / d f_r. delta_i = sum_d o_i do_i (- dlse_i) is formed here, from the
  # tiles this program loads anyway, and written for the dkv kernel (an XLA fusion over o and
  # do was 0.37 ms of the stagger step's H200 profile).
  learned = num_rungs is not None
  tables = refs[: 4 if learned else 1]
  ins = refs[len(tables) : len(tables) + 6 + with_dlse]
  q_ref, k_ref, v_ref, o_ref, do_ref, lse_ref = ins[:6]
  outs = refs[len(tables) + len(ins) :]  # dq, delta, learned: dfrac
  i0 = pl.program_id(0) * block_q
  cols = jnp.arange(k_ref.shape[1])
  r_M, _, _, (q_MxD, do_MxD, o_MxD), stats = _load_packed(
    0, block_q, groups, cols, [q_ref, do_ref, o_ref], [lse_ref, *ins[6:]]
  )
  lse_M = stats[0]
  delta_M = jnp.sum(o_MxD.astype(jnp.float32) * do_MxD.astype(jnp.float32), axis=1)
  if with_dlse:
    delta_M = delta_M - stats[1]
  rows_M = i0 + r_M
  first, bits = _folded(tables[0], window, _window_reach(window, block_q), fold and not learned)
  k_CxD, v_CxD, keep = _window_keys(k_ref, v_ref, i0, rows_M, cols, window, block_q, bits)
  sm = _Softmax(scale, exp2)
  dq = _dq_tile(q_MxD, do_MxD, lse_M, delta_M, k_CxD, v_CxD, keep, sm)
  diag = r_M[:, None] == jnp.arange(block_q)[None, :]
  slots = jnp.arange(outs[-1].shape[0]) if learned else None

  live = _rungs_below(tables, learned, i0 + block_q)

  def rung_group(n, dq):
    if diagonal and group == 1:
      keys = _static_rung(tables[0], first + n, i0, r_M, k_ref, v_ref, cols, block_q)
      return dq + _dq_diag(q_MxD, do_MxD, lse_M, delta_M, *keys[:2], diag, keys[2], sm)
    keys = _group_keys(tables[0], n, group, live, i0, r_M, k_ref, v_ref, cols, block_q, first)
    return dq + _dq_tile(q_MxD, do_MxD, lse_M, delta_M, *keys, sm)

  def ew_rung(n, dq):  # `_dq_diag` on CUDA cores: each packed row's own key and value row
    k_M, v_M, valid_M = _ew_keys(tables[0], first + n, rows_M, k_ref, v_ref, cols)
    p_M = jnp.where(valid_M, sm.probs(_rowdot(q_MxD, k_M), lse_M), 0.0)
    ds_M = p_M * (_rowdot(do_MxD, v_M) - delta_M)
    return dq + ds_M[:, None] * k_M.astype(jnp.float32)

  def rung(j, carry):
    dq, dfrac = carry
    lo, f = tables[0][j], tables[1][j]
    valid, (k_a, v_a, k_b, v_b) = _rung_keys(k_ref, v_ref, i0, lo, cols, block_q)
    scores = (
      plgpu.dot(q_MxD, k_a, trans_b=True) * scale,
      plgpu.dot(do_MxD, v_a, trans_b=True),
      plgpu.dot(q_MxD, k_b, trans_b=True) * scale,
      plgpu.dot(do_MxD, v_b, trans_b=True),
    )
    if diagonal:  # each packed row's one key: [M] vectors
      s_a, dp_a, s_b, dp_b = (_diag(x, diag) for x in scores)
      keep, lse, delta = rows_M - lo >= 0, lse_M, delta_M
    else:
      s_a, dp_a, s_b, dp_b = scores
      keep, lse, delta = diag & valid[None, :], lse_M[:, None], delta_M[:, None]
    p = jnp.where(keep, sm.exp(((1 - f) * s_a + f * s_b - lse) * sm.base), 0.0)
    ds = p * ((1 - f) * dp_a + f * dp_b - delta)
    # Each packed row's d loss / d f, into the rung's own column: row sums only, the sum
    # over rows once after the loop, not a whole-tile sum a rung (the same time on an H200,
    # 2.66 against 2.57 ms a step: experiments/results/speed_h200_8ec1543/).
    d = ds * (s_b - s_a) + p * (dp_b - dp_a)
    d_M, ds = (d, _on_diag(ds, diag)) if diagonal else (jnp.sum(d, axis=1), ds)
    dq = dq + plgpu.dot(ds.astype(k_a.dtype), _blend(k_a, k_b, f))
    return dq, dfrac + jnp.where(slots[None, :] == tables[3][j], d_M[:, None], 0.0)

  if learned:
    dfrac = jnp.zeros((q_MxD.shape[0], outs[-1].shape[0]), jnp.float32)
    dq, dfrac = lax.fori_loop(0, live, rung, (dq, dfrac))
    outs[2][...] = jnp.sum(dfrac, axis=0)
  elif ew:
    dq = lax.fori_loop(0, _steps(live, first, 1), ew_rung, dq)
  else:
    dq = lax.fori_loop(0, _steps(live, first, group), rung_group, dq)
  r_M, g_M = _packed(block_q, groups)
  plgpu.store(
    outs[0].at[r_M[:, None], g_M[:, None], cols[None, :]], (dq * scale).astype(outs[0].dtype)
  )
  plgpu.store(outs[1].at[g_M, r_M], delta_M)


def _dkv_packed_kernel(
  *refs,
  window,
  groups,
  scale,
  block_q,
  seq_len,
  group=1,
  num_rungs=None,
  diagonal=0,
  kv_t=0,
  exp2=1,
  fold=0,
  ew=0,
):
  # q/do [T, G, D]; k/v/dk/dv [C, D] (learned: also k/v [T, D], for the rows before the block,
  # and the spills dk_top/dv_top [D]); lse/delta [G, T]. Key block [j0, j0 + C). A static
  # rung d reaches row j from query j + d. A learned rung (floor lo, weight f) blends query
  # i's key from rows i - lo (weight 1 - f) and i - lo - 1 (weight f, row 0 when that is
  # -1): the queries j0 + lo + c, c < C, read the block's rows c and c - 1, so one tile of
  # them gives both rows' gradients, and row -1's share (query j0 + lo) spills to the last
  # row of the block before, which `_add_spill` adds.
  learned = num_rungs is not None
  tables = refs[: 4 if learned else 1]
  rest = refs[len(tables) :]
  if learned:
    q_ref, k_ref, v_ref, kall_ref, vall_ref, do_ref, lse_ref, delta_ref = rest[:8]
    dk_ref, dv_ref, dk_top_ref, dv_top_ref = rest[8:]
  else:
    q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref = rest
  j0 = pl.program_id(0) * block_q
  cols = jnp.arange(k_ref.shape[1])
  k_CxD, v_CxD = k_ref[...], v_ref[...]
  sm = _Softmax(scale, exp2)
  c_C = jnp.arange(block_q)
  first, bits = _folded(tables[0], window, _chunks_reach(window, block_q), fold and not learned)

  def queries(row0, rows):
    return _load_packed(
      row0, rows, groups, cols, [q_ref, do_ref], [lse_ref, delta_ref], seq_len=seq_len
    )

  # The window: query rows j0 .. j0 + C - 1 + W, Q rows (x G heads) at a time, so the packed
  # tile stays Q * G rows (a pow2(Q + W) * G-row tile overflows shared memory at large W).
  def window_chunk(n, carry):
    _, qr_M, valid, (q_w, do_w), (lse_w, delta_w) = queries(j0 + n * block_q, block_q)
    rel = qr_M[:, None] - (j0 + c_C)[None, :]
    keep = _band(rel, window, bits) & valid[:, None]
    return _dkv_tile(*carry, q_w, do_w, lse_w, delta_w, k_CxD, v_CxD, keep, sm, kv_t)

  # The gradients accumulate as dk, dv [C, D], or (kv_t) transposed, [D, C].
  zeros = jnp.zeros((k_ref.shape[1], block_q) if kv_t else (block_q, k_ref.shape[1]), jnp.float32)
  chunks = -(-(block_q + window) // block_q)
  dk, dv = lax.fori_loop(0, chunks, window_chunk, (zeros, zeros))

  # Static rungs, U at a time: the queries j0 + d_u + c of rungs u = 0 .. U - 1 (x G heads)
  # packed into one U * Q * G-row tile, query row c of each rung reading key row c.
  def rung_group(n, carry):
    d_M, m_M, live_M = _group_rungs(tables[0], n, group, block_q * groups, live, first)
    r_M, g_M = m_M // groups, m_M % groups
    rows_M = j0 + d_M + r_M
    valid = _and(live_M, rows_M < seq_len)
    (q_M, do_M), (lse_M, delta_M) = _gather_packed(
      rows_M, g_M, valid, cols, [q_ref, do_ref], [lse_ref, delta_ref], seq_len
    )
    eye = r_M[:, None] == c_C[None, :]
    if diagonal and group == 1:  # (valid: rows_M < seq_len, no group padding)
      return _dkv_diag(*carry, q_M, do_M, lse_M, delta_M, k_CxD, v_CxD, eye, valid, sm, kv_t)
    keep = eye & valid[:, None]
    return _dkv_tile(*carry, q_M, do_M, lse_M, delta_M, k_CxD, v_CxD, keep, sm, kv_t)

  def ew_rungs(live):
    # Static rungs on CUDA cores, head by head: rung d's query rows j0 + d + c of head g read
    # key row c, so dk, dv [C, D] take each head's rows elementwise (no [C * G, D]
    # accumulators: fewer registers).
    c_C = jnp.arange(block_q)

    def ew_rung(n, carry):
      dk_C, dv_C = carry
      rows_C = j0 + tables[0][1 + first + n] + c_C
      valid = rows_C < seq_len
      for g in range(groups):
        g_C = jnp.full((block_q,), g, jnp.int32)
        (q_C, do_C), (lse_C, delta_C) = _gather_packed(
          rows_C, g_C, valid, cols, [q_ref, do_ref], [lse_ref, delta_ref], seq_len
        )
        p_C = jnp.where(valid, sm.probs(_rowdot(q_C, k_CxD), lse_C), 0.0)
        ds_C = p_C * (_rowdot(do_C, v_CxD) - delta_C)
        dk_C = dk_C + ds_C[:, None] * q_C.astype(jnp.float32)
        dv_C = dv_C + p_C[:, None] * do_C.astype(jnp.float32)
      return dk_C, dv_C

    zeros_C = jnp.zeros((block_q, k_ref.shape[1]), jnp.float32)
    return lax.fori_loop(0, _steps(live, first, 1), ew_rung, (zeros_C, zeros_C))

  if not learned:
    live = _rungs_below(tables, False, seq_len - j0)
    if ew:
      dk_r, dv_r = ew_rungs(live)
      dk, dv = _kv_rows(dk, kv_t) + dk_r, _kv_rows(dv, kv_t) + dv_r
    else:
      dk, dv = lax.fori_loop(0, _steps(live, first, group), rung_group, (dk, dv))
      dk, dv = _kv_rows(dk, kv_t), _kv_rows(dv, kv_t)
    dk_ref[...] = (dk * scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)
    return

  rows = jnp.maximum(j0 + c_C - 1, 0)  # each row's neighbour in a blend: the row before
  k_prev, v_prev = _rows(kall_ref, rows, cols, c_C >= 0), _rows(vall_ref, rows, cols, c_C >= 0)
  first_block = j0 == 0

  def learned_rung(j, carry):
    dk, dv, dk_top, dv_top = carry  # [C, D] each ([D, C]: kv_t); the spills' only in key row 0
    lo, f = tables[0][j], tables[1][j]
    r_M, _, valid, (q_M, do_M), (lse_M, delta_M) = queries(j0 + lo, block_q)
    floor = r_M[:, None] == c_C[None, :]
    k_b, v_b = _blend(k_CxD, k_prev, f), _blend(v_CxD, v_prev, f)
    s = plgpu.dot(q_M, k_b, trans_b=True)
    dp = plgpu.dot(do_M, v_b, trans_b=True)
    if diagonal:  # one key a row, the floor's: the softmax on those
      p_M = jnp.where(valid, sm.probs(_diag(s, floor), lse_M), 0.0)
      ds_M = p_M * (_diag(dp, floor) - delta_M)
    else:
      p = jnp.where(floor & valid[:, None], sm.probs(s, lse_M[:, None]), 0)
      ds = p * (dp - delta_M[:, None])
      p_M, ds_M = jnp.sum(p, axis=1), jnp.sum(ds, axis=1)
    # Each query row's gradient to the block's rows: 1 - f at its floor, f at the row before
    # (its floor itself for query lo of the first block, the clamp at row 0).
    prev = (r_M[:, None] - 1 == c_C[None, :]) | (
      first_block & (r_M == 0)[:, None] & (c_C == 0)[None, :]
    )
    w_MxC = (1 - f) * floor + f * prev
    # Row -1's share (query row 0's weight f), the spill, in column 0 of a tile of its own:
    # one more matmul each instead of a sum over the packed rows each rung (a cross-warp
    # reduction): 4.1 ms a step against 6.0 on an H200 (the static dkv: 2.3 ms;
    # experiments/results/speed_h200_8ec1543/).
    top_MxC = jnp.where(((r_M == 0) & ~first_block)[:, None] & (c_C == 0)[None, :], f, 0.0)
    dk = dk + _dot_t(ds_M[:, None] * w_MxC, q_M, kv_t)
    dv = dv + _dot_t(p_M[:, None] * w_MxC, do_M, kv_t)
    dk_top = dk_top + _dot_t(ds_M[:, None] * top_MxC, q_M, kv_t)
    dv_top = dv_top + _dot_t(p_M[:, None] * top_MxC, do_M, kv_t)
    return dk, dv, dk_top, dv_top

  trip = _rungs_below(tables, True, seq_len - j0)
  dk, dv, dk_top, dv_top = lax.fori_loop(0, trip, learned_rung, (dk, dv, zeros, zeros))
  dk_ref[...] = (_kv_rows(dk, kv_t) * scale).astype(dk_ref.dtype)
  dv_ref[...] = _kv_rows(dv, kv_t).astype(dv_ref.dtype)
  dk_top_ref[...] = jnp.sum(dk_top, axis=1 if kv_t else 0) * scale  # only key row 0 is not 0
  dv_top_ref[...] = jnp.sum(dv_top, axis=1 if kv_t else 0)


def _kv_rows(x, kv_t):
  """A key block's accumulated gradient as [C, D] (kv_t: it is [D, C])."""
  return x.T if kv_t else x


def _add_spill(x_BxTxKxD, top_BxKxNxD, block: int):
  """Adds each key block's spill (`_dkv_packed_kernel`) to the last row of the block before
  it, in float32; the first block's spill is zero. Written as a reshape and a concatenation,
  one elementwise pass that XLA fuses (0.21 ms a step in the learned model's H200 profile,
  experiments/results/speed_h200_31c4e80/), not a scatter into every block's last row."""
  bsz, seq_len, heads, dim = x_BxTxKxD.shape
  x_BxNxCxKxD = x_BxTxKxD.reshape(bsz, seq_len // block, block, heads, dim)
  # Block n + 1's spill onto block n's last row; nothing onto the last block's.
  add_BxNxKxD = jnp.pad(jnp.swapaxes(top_BxKxNxD[:, :, 1:], 1, 2), ((0, 0), (0, 1), (0, 0), (0, 0)))
  last = (x_BxNxCxKxD[:, :, -1].astype(jnp.float32) + add_BxNxKxD).astype(x_BxTxKxD.dtype)
  x_BxNxCxKxD = jnp.concatenate([x_BxNxCxKxD[:, :, :-1], last[:, :, None]], axis=2)
  return x_BxNxCxKxD.reshape(x_BxTxKxD.shape)


def _packed_specs(seq_len, groups, head_dim, bq, tables):
  """BlockSpecs of the packed kernels, by name."""
  return dict(
    table=[pl.BlockSpec(t.shape, lambda i, b, h: (0,)) for t in tables],
    q_blk=pl.BlockSpec((None, bq, groups, head_dim), lambda i, b, h: (b, i, h, 0)),
    q_all=pl.BlockSpec((None, seq_len, groups, head_dim), lambda i, b, h: (b, 0, h, 0)),
    kv_blk=pl.BlockSpec((None, bq, None, head_dim), lambda i, b, h: (b, i, h, 0)),
    kv_all=pl.BlockSpec((None, seq_len, None, head_dim), lambda i, b, h: (b, 0, h, 0)),
    stat_blk=pl.BlockSpec((None, groups, bq), lambda i, b, h: (b, h, i)),
    stat_all=pl.BlockSpec((None, groups, seq_len), lambda i, b, h: (b, h, 0)),
  )


def _packed_forward(q, k, v, tables, *, window, blocks, interpret, num_rungs=None):
  bsz, seq_len, num_heads, head_dim = q.shape
  num_kv = k.shape[2]
  groups = num_heads // num_kv
  bq = blocks.block_q
  if blocks.q_tma & 1 and num_rungs is None and mosaic.supported(q.shape, num_kv, q.dtype) is None:
    return mosaic.forward(
      q, k, v, tables[0], window=window, buffers=blocks.num_stages, interpret=interpret
    )
  sp = _packed_specs(seq_len, groups, head_dim, bq, tables)
  kernel = functools.partial(
    _fwd_packed_kernel, window=window, groups=groups, scale=head_dim**-0.5, block_q=bq,
    group=blocks.group, num_rungs=num_rungs, diagonal=blocks.diagonal, exp2=blocks.exp2,
    fold=blocks.fold, ew=blocks.ew_rungs & 1,
  )  # fmt: skip
  return pl.pallas_call(
    kernel,
    grid=(seq_len // bq, bsz, num_kv),
    in_specs=[*sp["table"], sp["q_blk"], sp["kv_all"], sp["kv_all"]],
    out_specs=[sp["q_blk"], sp["stat_blk"]],
    out_shape=[
      jax.ShapeDtypeStruct(q.shape, q.dtype),
      jax.ShapeDtypeStruct((bsz, num_heads, seq_len), jnp.float32),
    ],
    compiler_params=_params(blocks.warps, blocks.num_stages, interpret),
    interpret=interpret,
    name="fib_attention_learned_fwd" if num_rungs is not None else "fib_attention_packed_fwd",
  )(*tables, q, k, v)


def _packed_backward(q, k, v, o, lse, do, tables, *, window, blocks, interpret, dlse, num_rungs):
  learned = num_rungs is not None
  bsz, seq_len, num_heads, head_dim = q.shape
  num_kv = k.shape[2]
  groups = num_heads // num_kv
  bq = blocks.block_q_bwd
  params_dq = _params(blocks.num_warps_bwd, blocks.stages_dq, interpret)
  params_dkv = _params(blocks.num_warps_bwd, blocks.stages_dkv, interpret)
  statics = dict(
    window=window, groups=groups, scale=head_dim**-0.5, block_q=bq, group=blocks.group_bwd,
    num_rungs=num_rungs, diagonal=blocks.diagonal, exp2=blocks.exp2, fold=blocks.fold,
  )  # fmt: skip
  sp = _packed_specs(seq_len, groups, head_dim, bq, tables)
  grid = (seq_len // bq, bsz, num_kv)
  kind = "learned" if learned else "packed"
  # Learned: each program's d loss / d f_r, summed over programs below.
  rungs_pad = tables[0].shape[0]
  dfrac_spec = pl.BlockSpec((None, None, None, rungs_pad), lambda i, b, h: (b, h, i, 0))
  dfrac_shape = jax.ShapeDtypeStruct((bsz, num_kv, seq_len // bq, rungs_pad), jnp.float32)
  takes = not learned and mosaic.supported(q.shape, num_kv, q.dtype) is None
  if blocks.q_tma & 2 and takes:
    # With the Mosaic dkv kernel too, the statistics stay as both keep them ([B, K, T * G]).
    grouped = bool(blocks.dkv_tma)
    if grouped:
      lse, dlse = (None if x is None else mosaic.group_stats(x, num_kv) for x in (lse, dlse))
    dq_out = mosaic.dq(
      q, k, v, o, do, lse, tables[0], window=window, dlse=dlse, grouped=grouped,
      buffers=blocks.stages_dq, interpret=interpret,
    )  # fmt: skip
    if grouped:
      dk, dv = mosaic.dkv(
        q, k, v, do, lse, dq_out[1], tables[0], window=window, grouped=True, interpret=interpret
      )
      return dq_out[0], dk, dv
  else:
    dq_out = pl.pallas_call(
      functools.partial(
        _dq_packed_kernel, **statics, with_dlse=dlse is not None, ew=blocks.ew_rungs >> 1 & 1
      ),
      grid=grid,
      in_specs=[*sp["table"], sp["q_blk"], sp["kv_all"], sp["kv_all"], sp["q_blk"], sp["q_blk"]]
      + [sp["stat_blk"]] * (1 if dlse is None else 2),
      out_specs=[sp["q_blk"], sp["stat_blk"], *([dfrac_spec] if learned else [])],
      out_shape=[
        jax.ShapeDtypeStruct(q.shape, q.dtype),
        jax.ShapeDtypeStruct(lse.shape, jnp.float32),  # delta
        *([dfrac_shape] if learned else []),
      ],
      compiler_params=params_dq,
      interpret=interpret,
      name=f"fib_attention_{kind}_dq",
    )(*tables, q, k, v, o, do, lse, *([] if dlse is None else [dlse]))
  delta = dq_out[1]
  if blocks.dkv_tma and takes:
    dk, dv = mosaic.dkv(q, k, v, do, lse, delta, tables[0], window=window, interpret=interpret)
    return dq_out[0], dk, dv
  # Learned: K and V also whole, for the rows before the block (a blend's other row), and
  # each program's spill onto the row before its block.
  kv_specs = [sp["kv_blk"], sp["kv_blk"], *([sp["kv_all"], sp["kv_all"]] if learned else [])]
  top_spec = pl.BlockSpec((None, None, None, head_dim), lambda i, b, h: (b, h, i, 0))
  top_shape = jax.ShapeDtypeStruct((bsz, num_kv, seq_len // bq, head_dim), jnp.float32)
  dkv = pl.pallas_call(
    functools.partial(
      _dkv_packed_kernel,
      **{**statics, "group": blocks.group_dkv},
      seq_len=seq_len,
      kv_t=blocks.dkv_t,
      ew=blocks.ew_rungs >> 2 & 1,
    ),
    grid=grid,
    in_specs=[*sp["table"], sp["q_all"], *kv_specs, sp["q_all"], sp["stat_all"], sp["stat_all"]],
    out_specs=[sp["kv_blk"], sp["kv_blk"], *([top_spec, top_spec] if learned else [])],
    out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)]
    + ([top_shape, top_shape] if learned else []),
    compiler_params=params_dkv,
    interpret=interpret,
    name=f"fib_attention_{kind}_dkv",
  )(*tables, q, k, v, *((k, v) if learned else ()), do, lse, delta)
  if learned:
    dk, dv = _add_spill(dkv[0], dkv[2], bq), _add_spill(dkv[1], dkv[3], bq)
    return dq_out[0], dk, dv, dq_out[2].sum(axis=(0, 1, 2))[:num_rungs]
  return dq_out[0], dkv[0], dkv[1]


@functools.partial(jax.jit, static_argnames=("window", "blocks", "interpret"))
def _forward_packed(q, k, v, table, *, window, blocks: GpuBlocks, interpret: bool):
  return _packed_forward(q, k, v, (table,), window=window, blocks=blocks, interpret=interpret)


@functools.partial(jax.jit, static_argnames=("window", "blocks", "interpret"))
def _backward_packed(q, k, v, o, lse, do, table, *, window, blocks, interpret, dlse=None):
  return _packed_backward(
    q, k, v, o, lse, do, (table,), window=window, blocks=blocks, interpret=interpret, dlse=dlse,
    num_rungs=None,
  )  # fmt: skip


@functools.partial(jax.jit, static_argnames=("window", "blocks", "interpret"))
def learned_forward(q, k, v, lo, frac, keep, *, window, blocks: GpuBlocks, interpret: bool):
  """A learned layer's attention: the window 0..W and rungs r with run-time (lo_r, f_r,
  keep_r) [R]; q [B,T,H,D], k/v [B,T,K,D], T a multiple of block_q -> (o, lse [B,H,T])."""
  tables = _learned_tables(lo, frac, keep)
  return _packed_forward(
    q, k, v, tables, window=window, blocks=blocks, interpret=interpret, num_rungs=lo.shape[0]
  )


@functools.partial(jax.jit, static_argnames=("window", "blocks", "interpret"))
def learned_backward(q, k, v, o, lse, do, lo, frac, keep, *, window, blocks, interpret):
  """(dq, dk, dv, dfrac [R]) of `learned_forward`."""
  return _packed_backward(
    q, k, v, o, lse, do, _learned_tables(lo, frac, keep), window=window, blocks=blocks,
    interpret=interpret, dlse=None, num_rungs=lo.shape[0],
  )  # fmt: skip
