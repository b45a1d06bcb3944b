"""Attention paths in plain JAX, chosen by a string.

Shape key: B batch, T sequence, H query heads, K key/value heads, G = H // K query heads
per key/value head, D head dim, N attended distances (|D| of the paper), R rungs.

All paths take q [B, T, H, D] and k, v [B, T, K, D] and return o [B, T, H, D] in q's dtype.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AbstractMesh, Mesh
from jax.sharding import PartitionSpec as P
from jaxtyping import Array, Float

from fibax.patterns import LearnedPattern, Pattern
from kernels_pallas.reference import MASK_VALUE, check_qkv, fib_attention_reference


def _shifted(x_BxTxKxD: Array, distances: tuple[int, ...]) -> Array:
  """x[b, t - d] for each d, zero where t - d < 0: [B, T, N, K, D] via static slices."""
  seq_len = x_BxTxKxD.shape[1]
  pad = max(distances)
  x_pad = jnp.pad(x_BxTxKxD, ((0, 0), (pad, 0), (0, 0), (0, 0)))
  return jnp.stack([x_pad[:, pad - d : pad - d + seq_len] for d in distances], axis=2)


def xla(
  q: Float[Array, "B T H D"],
  k: Float[Array, "B T K D"],
  v: Float[Array, "B T K D"],
  pattern: Pattern,
) -> Float[Array, "B T H D"]:
  """Gathers only the listed distances: memory O(T * N * D), never [T, T].

  K/V are not repeated over the G query heads of a group: q is viewed as [B, T, K, G, D].
  """
  groups = check_qkv(q, k, v)
  bsz, seq_len, num_heads, head_dim = q.shape
  num_kv = k.shape[2]
  distances = tuple(d for d in pattern.distances if d < seq_len)
  k_BxTxNxKxD = _shifted(k, distances)
  v_BxTxNxKxD = _shifted(v, distances)
  q_BxTxKxGxD = q.reshape(bsz, seq_len, num_kv, groups, head_dim)
  s_BxTxKxGxN = jnp.einsum(
    "btkgd,btnkd->btkgn", q_BxTxKxGxD, k_BxTxNxKxD, preferred_element_type=jnp.float32
  ) / np.sqrt(head_dim)
  valid_TxN = np.arange(seq_len)[:, None] >= np.asarray(distances)[None, :]
  s_BxTxKxGxN = jnp.where(valid_TxN[None, :, None, None, :], s_BxTxKxGxN, MASK_VALUE)
  p_BxTxKxGxN = jax.nn.softmax(s_BxTxKxGxN, axis=-1)
  o_BxTxKxGxD = jnp.einsum(
    "btkgn,btnkd->btkgd",
    p_BxTxKxGxN.astype(v.dtype),
    v_BxTxNxKxD,
    preferred_element_type=jnp.float32,
  )
  return o_BxTxKxGxD.reshape(bsz, seq_len, num_heads, head_dim).astype(q.dtype)


def _dense(implementation: str | None):
  def attend(q, k, v, pattern: Pattern):
    check_qkv(q, k, v)
    if pattern.window < q.shape[1] - 1 or pattern.far:
      raise NotImplementedError(
        f"dense attention needs a dense pattern; got window={pattern.window}, far={pattern.far}"
      )
    impl = implementation
    if impl is None:  # jax.nn.dot_product_attention's own default is XLA's (jax 0.11.2)
      flash = jax.default_backend() == "gpu" and q.dtype in (jnp.bfloat16, jnp.float16)
      impl = "cudnn" if flash else "xla"
    return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=impl)

  return attend


def learned_table(pattern: LearnedPattern, alpha, ct=jnp.float32):
  """Each rung's run-time floor lo (int32 [R]), weight frac = alpha * b - lo ([R] in `ct`,
  differentiable in alpha) and whether it is kept ([R] bool): a rung is skipped when
  round(t) <= W, lo > cap, or lo is already used by the window or an earlier kept rung.

  Whole-array operations on the [R] rungs (and one [R, R] comparison), a fixed number of
  them whatever R. Written rung by rung (some 260 scalar operations a layer, which XLA fused
  into one multi-output loop fusion), the 16 layers' attention of a learned model compiled in
  37.3 s on an H200, and in 2.9 s since (experiments/results/speed_h200_cd8aba6/)."""
  alpha = jnp.asarray(alpha, ct)
  t_R = alpha * jnp.asarray(pattern.terms, ct)
  lo_R = jnp.floor(t_R)
  lo_i = lo_R.astype(jnp.int32)
  # jnp.round is half-to-even, like Python's round in the paper's code.
  open_R = ~((jnp.round(t_R) <= pattern.window) | (lo_i > pattern.cap) | (lo_i <= pattern.window))
  # An earlier kept rung has this floor iff an earlier open one does: the first open rung of
  # a floor is kept (no earlier kept rung can share its floor).
  before_RxR = np.tri(len(pattern.terms), k=-1, dtype=bool)  # [r, j]: j < r
  taken_R = jnp.any(before_RxR & open_R[None, :] & (lo_i[:, None] == lo_i[None, :]), axis=1)
  return lo_i, t_R - lo_R, open_R & ~taken_R


def _learned_rungs(k, v, pattern: LearnedPattern, alpha, ct):
  """Each rung's interpolated keys and values [B, T, R, K, D] (in `ct`) and validity [T, R].

  Row i - lo (and i - lo - 1) with the index clamped at 0 is row i of k edge-padded by T + 1
  rows at the front, sliced from T + 1 - lo: a shift by a traced offset (a dynamic slice,
  whose transpose is an add into a slice) rather than a gather, whose transpose would
  scatter-add every clamped position onto row 0. A lo past T - 1 (a skipped rung, or one no
  position reaches) is clamped to T: all row 0, masked.
  """
  seq_len = k.shape[1]
  pos_T = jnp.arange(seq_len)
  edge = ((0, 0), (seq_len + 1, 0), (0, 0), (0, 0))
  k_pad, v_pad = jnp.pad(k, edge, mode="edge"), jnp.pad(v, edge, mode="edge")

  def shifted(x_pad, by):
    return jax.lax.dynamic_slice_in_dim(x_pad, seq_len + 1 - by, seq_len, axis=1).astype(ct)

  lo_R, frac_R, keep_R = learned_table(pattern, alpha, ct)
  k_rungs, v_rungs, valid_rungs = [], [], []
  for r in range(len(pattern.terms)):
    lo_c = jnp.clip(lo_R[r], 0, seq_len)
    w_lo, w_hi = 1.0 - frac_R[r], frac_R[r]
    k_rungs.append(w_lo * shifted(k_pad, lo_c) + w_hi * shifted(k_pad, lo_c + 1))
    v_rungs.append(w_lo * shifted(v_pad, lo_c) + w_hi * shifted(v_pad, lo_c + 1))
    valid_rungs.append(keep_R[r] & (pos_T >= lo_R[r]))
  return jnp.stack(k_rungs, axis=2), jnp.stack(v_rungs, axis=2), jnp.stack(valid_rungs, axis=1)


def learned(
  q: Float[Array, "B T H D"],
  k: Float[Array, "B T K D"],
  v: Float[Array, "B T K D"],
  pattern: LearnedPattern,
  alpha: Float[Array, ""],
  window_backend: str | None = None,
  rungs_in_kernel: bool = False,
) -> Float[Array, "B T H D"]:
  """Fractional offsets with linear interpolation of K and V (the paper).

  For rung b: t = alpha * b, lo = floor(t), frac = t - lo, hi = lo + 1 (index clamped at
  0). Keys/values are (1 - frac) x[i - lo] + frac x[i - hi]; validity is judged at lo. A
  rung is skipped when round(t) <= W, lo > cap, or lo is already used by the window or
  an earlier rung. The gradient reaches alpha only through frac (lo is piecewise constant).

  The rungs are gathered in plain JAX in float32. The window 0..W is too, or, given a Pallas
  `window_backend` ("gpu", "tpu" or their "_interpret" modes), it runs through the
  integer-offset kernel (`kernels_pallas.fib_attention_lse`, its P.V in the input dtype as
  for static layers), whose softmax is merged with the rungs' by their log-sum-exps. With
  `rungs_in_kernel` (a GPU `window_backend`), the rungs run in the packed kernels too
  (`kernels_pallas.fib_attention_learned`, from `learned_table`'s run-time floors and weights).
  """
  groups = check_qkv(q, k, v)
  bsz, seq_len, num_heads, head_dim = q.shape
  num_kv = k.shape[2]
  window = min(pattern.window, seq_len - 1)
  if rungs_in_kernel and pattern.terms:
    from kernels_pallas import fib_attention_learned

    lo_R, frac_R, keep_R = learned_table(pattern, alpha)
    blocks = gpu_blocks_for(window_backend, "packed")
    return fib_attention_learned(
      q, k, v, window, lo_R, frac_R, keep_R, backend=window_backend, blocks=blocks
    )
  ct = jnp.promote_types(q.dtype, jnp.float32)  # float32 softmax, float64 under x64
  alpha = jnp.asarray(alpha, ct)
  q_BxTxKxGxD = q.astype(ct).reshape(bsz, seq_len, num_kv, groups, head_dim)
  if pattern.terms:
    k_rungs, v_rungs, valid_TxR = _learned_rungs(k, v, pattern, alpha, ct)

  if window_backend is None:  # one softmax over the window's static slices and the rungs
    win = tuple(range(window + 1))
    k_all, v_all = _shifted(k, win).astype(ct), _shifted(v, win).astype(ct)
    valid_TxN = jnp.asarray(np.arange(seq_len)[:, None] >= np.asarray(win)[None, :])
    if pattern.terms:
      k_all = jnp.concatenate([k_all, k_rungs], axis=2)
      v_all = jnp.concatenate([v_all, v_rungs], axis=2)
      valid_TxN = jnp.concatenate([valid_TxN, valid_TxR], axis=1)
    s_BxTxKxGxN = jnp.einsum("btkgd,btnkd->btkgn", q_BxTxKxGxD, k_all) / np.sqrt(head_dim)
    s_BxTxKxGxN = jnp.where(valid_TxN[None, :, None, None, :], s_BxTxKxGxN, MASK_VALUE)
    p_BxTxKxGxN = jax.nn.softmax(s_BxTxKxGxN, axis=-1)
    o_BxTxKxGxD = jnp.einsum("btkgn,btnkd->btkgd", p_BxTxKxGxN, v_all)
    return o_BxTxKxGxD.reshape(bsz, seq_len, num_heads, head_dim).astype(q.dtype)

  from kernels_pallas import fib_attention_lse

  blocks = gpu_blocks_for(window_backend, None)
  o_w, lse_w_BxHxT = fib_attention_lse(
    q, k, v, Pattern(window), backend=window_backend, blocks=blocks
  )
  if not pattern.terms:
    return o_w
  lse_w = lse_w_BxHxT.astype(ct).transpose(0, 2, 1).reshape(bsz, seq_len, num_kv, groups)
  s_BxTxKxGxR = jnp.einsum("btkgd,btrkd->btkgr", q_BxTxKxGxD, k_rungs) / np.sqrt(head_dim)
  s_BxTxKxGxR = jnp.where(valid_TxR[None, :, None, None, :], s_BxTxKxGxR, MASK_VALUE)
  m = jnp.maximum(lse_w, s_BxTxKxGxR.max(axis=-1))
  lse = m + jnp.log(jnp.exp(lse_w - m) + jnp.exp(s_BxTxKxGxR - m[..., None]).sum(axis=-1))
  p_BxTxKxGxR = jnp.exp(s_BxTxKxGxR - lse[..., None])
  o_BxTxKxGxD = o_w.astype(ct).reshape(q_BxTxKxGxD.shape) * jnp.exp(lse_w - lse)[..., None]
  o_BxTxKxGxD = o_BxTxKxGxD + jnp.einsum("btkgr,btrkd->btkgd", p_BxTxKxGxR, v_rungs)
  return o_BxTxKxGxD.reshape(bsz, seq_len, num_heads, head_dim).astype(q.dtype)


def _pallas(backend: str, kernel: str | None = None):
  def attend(q, k, v, pattern: Pattern):
    # Imported lazily: kernels_pallas pulls in Pallas lowering modules.
    from kernels_pallas import fib_attention

    blocks = gpu_blocks_for(backend, kernel)
    return fib_attention(q, k, v, pattern, backend=backend, blocks=blocks)

  return attend


_GPU_BLOCKS: contextvars.ContextVar = contextvars.ContextVar("fibax_gpu_blocks", default=None)


@contextlib.contextmanager
def gpu_blocks(blocks):
  """While tracing inside this context, the Pallas GPU kernels run with these
  `kernels_pallas.gpu.GpuBlocks` (block rows, warps, stages, rung groups) instead of their
  defaults, each impl keeping its own kernel (the row-wise one without rung groups): one
  run's tuning, e.g. `experiments/bench_train.py --blocks`. None: the defaults. The blocks are
  read when a function is traced, and `jax.jit` keys its cache on the arguments only: a step
  already traced keeps the blocks it was traced with (build the steps inside the context)."""
  token = _GPU_BLOCKS.set(blocks)
  try:
    yield
  finally:
    _GPU_BLOCKS.reset(token)


@contextlib.contextmanager
def config_gpu_blocks(spec: str):
  """`gpu_blocks` of a config's spec (`AttentionConfig.gpu_blocks`), unless "" or a
  `gpu_blocks` context is already set (a run's own, which wins)."""
  if not spec or _GPU_BLOCKS.get() is not None:
    yield
    return
  from kernels_pallas.gpu import parse_blocks

  with gpu_blocks(parse_blocks(spec)):
    yield


def gpu_blocks_for(backend: str | None, kernel: str | None):
  """The GpuBlocks a Pallas call on `backend` runs with: the enclosing `gpu_blocks`' (as
  `kernel`, "rowwise" when None) or the kernel's defaults (`kernels_pallas.gpu.default_blocks`:
  on a Hopper GPU the packed kernel's Mosaic GPU kernels; the declared `GpuBlocks` in Pallas'
  interpreter); None off a GPU backend or where the op's own defaults apply."""
  if backend is None or not backend.startswith("gpu"):
    return None
  from kernels_pallas.gpu import GpuBlocks, default_blocks

  tuned = _GPU_BLOCKS.get()
  if tuned is None and kernel:
    return default_blocks(kernel) if backend == "gpu" else GpuBlocks(kernel=kernel)
  if tuned is None:
    return None
  return tuned.for_kernel(kernel or "rowwise")


def resolved_gpu_blocks(att) -> str:
  """The blocks a packed Pallas GPU impl's layers run with (an `AttentionConfig`'s
  `gpu_blocks`, else the machine's default: on a Hopper GPU the Mosaic kernels), as a spec
  that `gpu_blocks` takes; "" for any other impl. (Read where no `gpu_blocks` context is
  open: a run's own would win.)"""
  backend = PALLAS_BACKENDS.get(att.impl, "")
  if not backend.startswith("gpu") or "packed" not in att.impl:
    return ""
  from kernels_pallas.gpu import blocks_spec

  with config_gpu_blocks(att.gpu_blocks):
    return blocks_spec(gpu_blocks_for(backend, "packed"))


AttentionFn = Callable[[Array, Array, Array, Pattern], Array]

# The kernel backend of each Pallas impl; a learned layer runs its window through it.
PALLAS_BACKENDS = {
  "pallas": "gpu",
  "pallas_interpret": "gpu_interpret",
  "pallas_packed": "gpu",
  "pallas_packed_interpret": "gpu_interpret",
  "pallas_tpu": "tpu",
  "pallas_tpu_interpret": "tpu_interpret",
}

IMPLEMENTATIONS: dict[str, AttentionFn] = {
  "reference": fib_attention_reference,
  "xla": xla,
  **{
    name: _pallas(backend, "packed" if "packed" in name else None)
    for name, backend in PALLAS_BACKENDS.items()
  },
  "dense": _dense(None),
  "cudnn": _dense("cudnn"),
  "xla_dense": _dense("xla"),
}


@functools.cache
def get(name: str) -> AttentionFn:
  """The attention implementation registered under `name`."""
  try:
    return IMPLEMENTATIONS[name]
  except KeyError:
    raise ValueError(
      f"unknown attention impl {name=}; expected one of {sorted(IMPLEMENTATIONS)}"
    ) from None


_KERNEL_MESH: contextvars.ContextVar[Mesh | AbstractMesh | None] = contextvars.ContextVar(
  "fibax_kernel_mesh", default=None
)


@contextlib.contextmanager
def kernel_mesh(mesh: Mesh | AbstractMesh | None):
  """While tracing inside this context, Pallas attention runs under `jax.shard_map` over
  `mesh`: each device calls the kernel on its own batch rows (mesh axis `data`) and heads
  (`model`), as the kernels are custom calls that XLA's partitioner cannot split (it would
  gather the whole batch onto every device). A dimension the axis does not divide stays
  whole on every device of that axis (the sorted input-embedding gradient also runs per batch
  shard under it). `fibax.steps` traces its train step inside it."""
  token = _KERNEL_MESH.set(mesh if mesh is not None and mesh.size > 1 else None)
  try:
    yield
  finally:
    _KERNEL_MESH.reset(token)


def traced_mesh() -> Mesh | AbstractMesh | None:
  """The mesh of the enclosing `kernel_mesh` (None outside one or for a single device)."""
  return _KERNEL_MESH.get()


def _per_device(fn, mesh: Mesh | AbstractMesh, q, k, alpha):
  """`fn(q, k, v[, alpha])` under shard_map over `mesh`: q, k, v split by batch over `data`
  and by heads over `model` where those divide; alpha (a scalar parameter) whole on each."""
  from fibax.sharding import DATA, MODEL

  data = DATA if q.shape[0] % mesh.shape[DATA] == 0 else None
  heads = (
    MODEL if q.shape[2] % mesh.shape[MODEL] == 0 and k.shape[2] % mesh.shape[MODEL] == 0 else None
  )
  qkv = P(data, None, heads, None)
  specs = (qkv, qkv, qkv) + ((P(),) if alpha is not None else ())
  # check_vma=False: pallas_call has no replication rule; a whole input's cotangent (alpha's)
  # is then summed over the devices, which is its gradient.
  return jax.shard_map(fn, mesh=mesh, in_specs=specs, out_specs=qkv, check_vma=False)


def attend(
  q: Float[Array, "B T H D"],
  k: Float[Array, "B T K D"],
  v: Float[Array, "B T K D"],
  pattern: Pattern | LearnedPattern,
  impl: str,
  dense_impl: str,
  alpha: Float[Array, ""] | None = None,
  learned_window: str = "kernel",
) -> Float[Array, "B T H D"]:
  """The one entry point of a layer: `learned` for a LearnedPattern (with its `alpha`; its
  window through `impl`'s kernel when `impl` is a Pallas one and `learned_window` is
  "kernel"), the dense implementation
  `dense_impl` for a pattern that is plain causal attention at this length, the integer-offset
  implementation `impl` otherwise."""
  mesh = _KERNEL_MESH.get()
  if isinstance(pattern, LearnedPattern):
    if alpha is None:
      raise ValueError("a learned pattern needs its alpha")
    backend = PALLAS_BACKENDS.get(impl) if learned_window == "kernel" else None
    in_kernel = backend is not None and impl.startswith("pallas_packed")
    fn = functools.partial(
      learned, pattern=pattern, window_backend=backend, rungs_in_kernel=in_kernel
    )
    if backend is not None and mesh is not None:
      return _per_device(lambda q, k, v, a: fn(q, k, v, alpha=a), mesh, q, k, alpha)(q, k, v, alpha)
    return fn(q, k, v, alpha=alpha)
  is_dense = pattern.window >= q.shape[1] - 1 and not pattern.far
  name = dense_impl if is_dense else impl
  fn = functools.partial(get(name), pattern=pattern)
  if name in PALLAS_BACKENDS and mesh is not None:
    return _per_device(fn, mesh, q, k, None)(q, k, v)
  return fn(q, k, v)
