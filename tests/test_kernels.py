"""Pallas kernels == the float32 reference: outputs and dq, dk, dv on random shapes.

`KernelTest` runs for real on a GPU (`pytest -m gpu` with FIBAX_GPU_TESTS=1);
the interpret subclasses run the same cases on CPU through Pallas' GPU interpreter and
the TPU interpreter (`pltpu.InterpretParams`). Each case draws a fresh shape and pattern:
ragged lengths, T shorter than the largest rung, GQA groups 1/2/4, head dim 16..128,
window-only and pow2 tables, bf16 and f32.

The first CI_CASES seeds run in CI; the rest of the 50 are marked `slow` (interpret mode
compiles each pattern, ~10 s a case on 2 cores): `pytest -m slow tests/test_kernels.py`.
"""

import contextlib
import functools
import os

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import counted_calls

from fibax import attention
from fibax.patterns import LearnedPattern, Pattern
from kernels_pallas import (
  fib_attention,
  fib_attention_learned,
  fib_attention_lse,
  fib_attention_reference,
)
from kernels_pallas.gpu import GpuBlocks

NUM_CASES = 50
CI_CASES = 6
# Relative to the reference's max magnitude; bf16 inputs carry ~3 significant digits.
TOL = {jnp.float32: 2e-4, jnp.bfloat16: 2e-2}


def random_case(seed: int, head_dims=(16, 32, 64, 128), max_len=160):
  rng = np.random.default_rng(seed)
  seq_len = int(rng.integers(1, max_len))
  window = int(rng.integers(0, min(seq_len, 20)))
  kind = rng.choice(["fib", "pow2", "window", "fib_long"])
  if kind == "window":
    pattern = Pattern(window)
  else:
    # fib_long: built for a longer length, so rungs exceed T (clipped by the op).
    built = seq_len * 8 if kind == "fib_long" else seq_len
    base = "pow2" if kind == "pow2" else "fib"
    pattern = Pattern.build(
      base=base, alpha=float(rng.uniform(0.4, 1.6)), window=window, seq_len=max(built, window + 1)
    )
  num_kv = int(rng.choice([1, 2]))
  groups = int(rng.choice([1, 2, 4]))
  return dict(
    batch=int(rng.integers(1, 3)),
    seq_len=seq_len,
    num_heads=num_kv * groups,
    num_kv=num_kv,
    head_dim=int(rng.choice(head_dims)),
    dtype=[jnp.float32, jnp.bfloat16][int(rng.integers(0, 2))],
    pattern=pattern,
  )


def _inputs(case, seed):
  ks = jax.random.split(jax.random.key(seed), 4)
  b, t, h, kv, d = (
    case["batch"],
    case["seq_len"],
    case["num_heads"],
    case["num_kv"],
    case["head_dim"],
  )
  q = jax.random.normal(ks[0], (b, t, h, d), case["dtype"])
  k = jax.random.normal(ks[1], (b, t, kv, d), case["dtype"])
  v = jax.random.normal(ks[2], (b, t, kv, d), case["dtype"])
  w = jax.random.normal(ks[3], (b, t, h, d), jnp.float32)
  return q, k, v, w


def _rel_err(a, b):
  a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
  assert np.all(np.isfinite(a)), "non-finite values"
  return float(np.abs(a - b).max() / (np.abs(b).max() + 1e-6))


def _seeds():
  return [
    pytest.param(s, marks=[] if s < CI_CASES else [pytest.mark.slow]) for s in range(NUM_CASES)
  ]


class KernelTest:
  BACKEND = "gpu"
  HEAD_DIMS = (16, 32, 64, 128)
  BLOCKS = None  # the op's default kernel and blocks
  DTYPE = None  # None: the case's own (bf16 or f32)
  GROUPS = None  # None: the case's own query heads a kv head (1, 2 or 4)

  def check(self, seed):
    case = random_case(seed, self.HEAD_DIMS)
    if self.DTYPE is not None:
      case["dtype"] = self.DTYPE
    if self.GROUPS is not None:
      case["num_heads"] = self.GROUPS * case["num_kv"]
    q, k, v, w = _inputs(case, seed)
    pattern = case["pattern"]

    def loss(fn, q, k, v):
      o = fn(q, k, v)
      return (o.astype(jnp.float32) * w).sum(), o

    kernel = lambda q, k, v: fib_attention(
      q, k, v, pattern, backend=self.BACKEND, blocks=self.BLOCKS
    )
    ref = lambda q, k, v: fib_attention_reference(
      q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32), pattern
    )
    grad = lambda fn: jax.value_and_grad(lambda *a: loss(fn, *a), argnums=(0, 1, 2), has_aux=True)
    (_, o), grads = jax.jit(grad(kernel))(q, k, v)
    assert o.shape == q.shape and o.dtype == q.dtype
    (_, r_o), r_grads = jax.jit(grad(ref))(q, k, v)  # jitted: eager op by op is slow on a GPU
    tol = TOL[case["dtype"]]
    if self.BACKEND == "gpu" and case["dtype"] == jnp.float32:
      tol = 1e-3  # Triton's float32 dot runs on tensor cores in TF32 (~3e-4 relative)
    assert _rel_err(o, r_o) < tol, case
    for name, g, r in zip("qkv", grads, r_grads, strict=True):
      assert g.shape == r.shape and g.dtype == case["dtype"]
      assert _rel_err(g, r) < tol * 2, (name, case)


def _reference_lse(q, k, pattern):
  """log-sum-exp of each query's masked float32 scores [B, H, T] (the oracle's softmax)."""
  groups = q.shape[2] // k.shape[2]
  k = jnp.repeat(k.astype(jnp.float32), groups, axis=2)
  s = jnp.einsum("bthd,bshd->bhts", q.astype(jnp.float32), k) / np.sqrt(q.shape[3])
  s = jnp.where(jnp.asarray(pattern.mask(q.shape[1])), s, -jnp.inf)
  return jax.nn.logsumexp(s, axis=-1)


class LearnedWindowTest:
  """`fib_attention_lse` (o and lse, each with a cotangent) against the oracle, and the
  learned path with its window through the kernel against the learned path in plain JAX:
  outputs and the gradients of q, k, v and alpha."""

  BACKEND = "gpu"
  BLOCKS = None  # the op's default kernel and blocks

  def check_lse(self, seed):
    case = random_case(seed, (16, 32))
    q, k, v, w = _inputs(case, seed)
    pattern = case["pattern"]
    w_lse = jax.random.normal(jax.random.key(seed + 100), (q.shape[0], q.shape[2], q.shape[1]))

    def loss(o, lse):
      return (o.astype(jnp.float32) * w).sum() + (lse * w_lse).sum()

    def kernel(q, k, v):
      return loss(*fib_attention_lse(q, k, v, pattern, backend=self.BACKEND, blocks=self.BLOCKS))

    def oracle(q, k, v):
      q, k, v = (x.astype(jnp.float32) for x in (q, k, v))
      return loss(fib_attention_reference(q, k, v, pattern), _reference_lse(q, k, pattern))

    o, lse = fib_attention_lse(q, k, v, pattern, backend=self.BACKEND, blocks=self.BLOCKS)
    assert lse.shape == (q.shape[0], q.shape[2], q.shape[1]) and lse.dtype == jnp.float32
    tol = TOL[case["dtype"]] * (5 if self.BACKEND == "gpu" else 1)
    assert _rel_err(lse, jax.jit(_reference_lse, static_argnums=2)(q, k, pattern)) < tol, case
    grads = jax.jit(jax.grad(kernel, argnums=(0, 1, 2)))(q, k, v)
    r_grads = jax.jit(jax.grad(oracle, argnums=(0, 1, 2)))(q, k, v)
    for name, g, r in zip("qkv", grads, r_grads, strict=True):
      assert _rel_err(g, r) < tol * 2, (name, case)

  def check_learned(self, seed):
    rng = np.random.default_rng(seed)
    seq_len, window = int(rng.integers(20, 140)), int(rng.integers(0, 14))
    lp = LearnedPattern.build(base="fib", window=window, seq_len=seq_len)
    alpha = jnp.float32(rng.uniform(0.4, 1.6))
    case = dict(batch=2, seq_len=seq_len, num_heads=4, num_kv=2, head_dim=16, dtype=jnp.float32)
    q, k, v, w = _inputs(case, seed)

    def loss(q, k, v, a, backend):
      return (attention.learned(q, k, v, lp, a, backend) * w).sum()

    grad = jax.value_and_grad(loss, argnums=(0, 1, 2, 3))
    got, g_got = jax.jit(grad, static_argnums=4)(q, k, v, alpha, self.BACKEND)
    want, g_want = jax.jit(grad, static_argnums=4)(q, k, v, alpha, None)
    tol = 1e-3 if self.BACKEND == "gpu" else 2e-4  # TF32 dots on a GPU
    assert abs(float(got) - float(want)) < tol * (abs(float(want)) + 1), (seq_len, window, alpha)
    for name, g, r in zip(("q", "k", "v", "alpha"), g_got, g_want, strict=True):
      assert _rel_err(g, r) < tol * 2, (name, seq_len, window, float(alpha))


@pytest.mark.gpu
class TestGpuLearnedWindow(LearnedWindowTest):
  @pytest.mark.parametrize("seed", range(8))
  def test_lse(self, seed):
    self.check_lse(seed)

  @pytest.mark.parametrize("seed", range(8))
  def test_learned(self, seed):
    self.check_learned(seed)


class TestGpuInterpretLearnedWindow(LearnedWindowTest):
  BACKEND = "gpu_interpret"

  @pytest.mark.parametrize("seed", range(3))
  def test_lse(self, seed):
    self.check_lse(seed)

  @pytest.mark.parametrize("seed", range(2))
  def test_learned(self, seed):
    self.check_learned(seed)


class TestGpuPackedInterpretLse(LearnedWindowTest):
  """The packed kernels with an lse cotangent: delta - dlse, formed in the dq kernel."""

  BACKEND = "gpu_interpret"
  BLOCKS = GpuBlocks(kernel="packed")

  # CI runs the first 3 (pytest -m slow the rest); the GPU class below runs all 8.
  @pytest.mark.parametrize(
    "seed", [pytest.param(s, marks=[] if s < 3 else [pytest.mark.slow]) for s in range(8)]
  )
  def test_lse(self, seed):
    self.check_lse(seed)


@pytest.mark.gpu
class TestGpuPackedLse(TestGpuPackedInterpretLse):
  BACKEND = "gpu"

  @pytest.mark.parametrize("seed", range(8))
  def test_lse(self, seed):
    self.check_lse(seed)


class TestTpuInterpretLearnedWindow(LearnedWindowTest):
  BACKEND = "tpu_interpret"

  @pytest.mark.parametrize("seed", range(2))
  def test_lse(self, seed):
    self.check_lse(seed)

  @pytest.mark.parametrize("seed", range(2))
  def test_learned(self, seed):
    self.check_learned(seed)


class LearnedRungsTest:
  """`fib_attention_learned` (the window and the learned rungs in the packed kernels) against
  the learned path in plain JAX in float32: outputs and the gradients of q, k, v and alpha, on
  random lengths (ragged), windows, GQA groups, head dims, dtypes and alphas (rungs skipped,
  clamped at row 0, beyond T)."""

  BACKEND = "gpu"
  BLOCKS = None  # the kernels' defaults

  def check(self, seed, alpha=None, window=None):
    """Random case `seed`; `alpha` and `window` (then T >= 40) in place of its own."""
    rng = np.random.default_rng(seed)
    seq_len, drawn = int(rng.integers(2, 200)), int(rng.integers(0, 16))
    if window is not None:
      seq_len = max(seq_len, 40)
    window = min(drawn if window is None else window, seq_len - 1)
    lp = LearnedPattern.build(base="fib", window=window, seq_len=seq_len)
    alpha = jnp.float32(rng.uniform(0.5, 1.5) if alpha is None else alpha)
    num_kv, groups = int(rng.choice([1, 2])), int(rng.choice([1, 2, 4]))
    dtype = [jnp.float32, jnp.bfloat16][int(rng.integers(0, 2))]
    case = dict(
      batch=int(rng.integers(1, 3)), seq_len=seq_len, num_heads=num_kv * groups, num_kv=num_kv,
      head_dim=int(rng.choice([16, 32, 64])), dtype=dtype,
    )  # fmt: skip
    q, k, v, w = _inputs(case, seed)

    def loss(q, k, v, a, in_kernel, w):
      backend = self.BACKEND if in_kernel else None
      o = attention.learned(q, k, v, lp, a, backend, rungs_in_kernel=in_kernel)
      return (o.astype(jnp.float32) * w).sum(), o

    grad = jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True)
    # The reference's matmuls in true float32 (XLA and Triton take TF32 for float32 on a GPU
    # by default), and the kernel's too for float32 inputs: the alpha gradient sums terms that
    # cancel, so TF32 rounding alone moves it by more than the float32 tolerance.
    exact = jax.default_matmul_precision("highest")
    with exact if dtype == jnp.float32 else contextlib.nullcontext():
      with attention.gpu_blocks(self.BLOCKS):  # traced inside: the kernels take them
        (_, o), g_got = jax.jit(grad, static_argnums=4)(q, k, v, alpha, True, w)
    # The plain-JAX reference runs on the CPU: XLA's GPU compile of it took over 170 s for
    # case 2 on an H200 (its slow-compile alarm; experiments/results/speed_h200x2_4aef62b/),
    # seconds on a CPU.
    cpu = jax.devices("cpu")[0]
    f32 = [jax.device_put(x.astype(jnp.float32), cpu) for x in (q, k, v)]
    with exact:
      (_, r_o), g_want = jax.jit(grad, static_argnums=4)(
        *f32, jax.device_put(alpha, cpu), False, jax.device_put(w, cpu)
      )
    assert o.shape == q.shape and o.dtype == dtype
    tol = TOL[dtype]
    assert _rel_err(o, r_o) < tol, (case, float(alpha))
    for name, g, r in zip(("q", "k", "v", "alpha"), g_got, g_want, strict=True):
      assert _rel_err(g, r) < tol * 2, (name, case, float(alpha))


def _next_to_one(window, side):
  """The float32 next to 1 towards `side` (0 or 2), where the rung W + 1 (a Fibonacci number)
  is skipped (below 1) or kept (above): asserted, so these cases keep testing the jump."""
  alpha = np.nextafter(np.float32(1), np.float32(side))
  lp = LearnedPattern.build(base="fib", window=window, seq_len=40)
  lo, frac, keep = (np.asarray(x) for x in attention.learned_table(lp, jnp.float32(alpha)))
  rung = lp.terms.index(window + 1)
  assert keep[rung] == (side > 1) and lo[rung] == window + (side > 1), (window, side)
  assert np.all(frac[keep] > 0.99) if side < 1 else np.all(frac[keep] < 0.01)
  return alpha


def _gpu_seeds():
  """FIBAX_KERNEL_SHARD=i/n runs every n-th seed, so n processes can share the compiles."""
  i, n = (int(x) for x in os.environ.get("FIBAX_KERNEL_SHARD", "0/1").split("/"))
  return [s for s in range(NUM_CASES) if s % n == i]


@pytest.mark.gpu
class TestGpuLearnedRungs(LearnedRungsTest):
  @pytest.mark.parametrize("seed", _gpu_seeds())
  def test_matches_plain_jax(self, seed):
    self.check(seed)

  @pytest.mark.parametrize("seed, window", [(0, 4), (1, 7), (2, 12)])
  @pytest.mark.parametrize("side", [0.0, 2.0])
  def test_next_to_alpha_one(self, seed, window, side):  # as the interpreter's class
    self.check(seed, alpha=_next_to_one(window, side), window=window)


class TestGpuInterpretLearnedRungs(LearnedRungsTest):
  BACKEND = "gpu_interpret"

  @pytest.mark.parametrize("seed", _seeds())
  def test_matches_plain_jax(self, seed):
    self.check(seed)

  @pytest.mark.parametrize("seed, window", [(0, 4), (1, 7), (2, 12)])
  @pytest.mark.parametrize("side", [0.0, 2.0])
  def test_next_to_alpha_one(self, seed, window, side):
    """A learned model starts at alpha = 1, where every rung's floor and the skip rule jump:
    just below 1 each rung b has floor b - 1 and weight ~1, and the rung b = W + 1 (a
    Fibonacci number here) is skipped; just above, floor b and weight ~0. Either side, the
    kernels as the plain-JAX path."""
    self.check(seed, alpha=_next_to_one(window, side), window=window)


@pytest.mark.gpu
class TestGpuLearnedRungsDiagonal(LearnedRungsTest):
  BLOCKS = GpuBlocks(kernel="packed", diagonal=1)

  @pytest.mark.parametrize("seed", _gpu_seeds())
  def test_matches_plain_jax(self, seed):
    self.check(seed)


class TestGpuInterpretLearnedRungsDiagonal(LearnedRungsTest):
  BACKEND = "gpu_interpret"
  BLOCKS = GpuBlocks(kernel="packed", diagonal=1)

  @pytest.mark.parametrize("seed", _seeds())
  def test_matches_plain_jax(self, seed):
    self.check(seed)


def _kernel_matmuls(fn, *args) -> dict[str, int]:
  """The Pallas kernels of `fn`'s jaxpr by name, each with the matmuls (dot_general) of its
  body: one rung's work plus the window's, the rung loop being a `fori_loop`."""

  def dots(jaxpr):
    subs = (jax.extend.core.jaxprs_in_params(e.params) for e in jaxpr.eqns)
    return sum(e.primitive.name == "dot_general" for e in jaxpr.eqns) + sum(
      dots(s) for group in subs for s in group
    )

  def kernels(jaxpr, out):
    for e in jaxpr.eqns:
      if e.primitive.name == "pallas_call":
        out[str(e.params["name"])] = dots(e.params["jaxpr"])
      for sub in jax.extend.core.jaxprs_in_params(e.params):
        kernels(sub, out)
    return out

  return kernels(jax.make_jaxpr(fn)(*args).jaxpr, {})


def test_a_learned_rung_blends_its_tiles_before_its_matmuls():
  """A learned rung's key and value are (1 - f) x[lo] + f x[lo + 1]: blended as tiles, the
  rung costs a static rung's two matmuls in the forward and four in the dkv kernel (one tile
  of queries gives the gradients of both blended rows) plus two for the row before the key
  block (the spill); the dq kernel adds the two score matmuls of its neighbour tile (d/df)."""
  q = jnp.zeros((1, 64, 8, 16), jnp.bfloat16)
  k = jnp.zeros((1, 64, 2, 16), jnp.bfloat16)
  lo = jnp.arange(3, dtype=jnp.int32) + 20

  def learned(q, k, v, frac):
    o = fib_attention_learned(q, k, v, 12, lo, frac, jnp.ones((3,), bool), backend="gpu_interpret")
    return o.astype(jnp.float32).sum()

  def static(q, k, v):
    packed = GpuBlocks(kernel="packed")
    o = fib_attention(q, k, v, Pattern(12, (20, 21, 22)), backend="gpu_interpret", blocks=packed)
    return o.astype(jnp.float32).sum()

  got = _kernel_matmuls(jax.grad(learned, argnums=(0, 1, 2, 3)), q, k, k, jnp.full((3,), 0.5))
  base = _kernel_matmuls(jax.grad(static, argnums=(0, 1, 2)), q, k, k)
  assert base == {
    "fib_attention_packed_fwd": 4,
    "fib_attention_packed_dq": 6,
    "fib_attention_packed_dkv": 8,
  }  # window + one rung: 2 + 2, 3 + 3, 4 + 4
  assert got == {
    "fib_attention_learned_fwd": 4,  # as static: the rung's blended tiles, one matmul each
    "fib_attention_learned_dq": 8,  # + q k_b and do v_b, for the weight's gradient
    # as static, both rows' weights in the rung's two matmuls, + the spill's two (row -1's)
    "fib_attention_learned_dkv": 10,
  }


def test_learned_rungs_reach_the_clamp_the_skips_and_beyond_t():
  """The random cases of LearnedRungsTest include a rung clamped at row 0 (lo < T, kept),
  skipped rungs, and a rung whose floor is past T - 1."""
  seen = set()
  for seed in range(CI_CASES):
    rng = np.random.default_rng(seed)
    seq_len, window = int(rng.integers(2, 200)), int(rng.integers(0, 16))
    window = min(window, seq_len - 1)
    lp = LearnedPattern.build(base="fib", window=window, seq_len=seq_len)
    lo, _, keep = (np.asarray(x) for x in attention.learned_table(lp, rng.uniform(0.5, 1.5)))
    seen |= {"kept" for lo_r, k_r in zip(lo, keep, strict=True) if k_r and lo_r < seq_len}
    seen |= {"skipped"} if (~keep).any() else set()
    seen |= {"beyond"} if (lo >= seq_len).any() else set()
  assert seen == {"kept", "skipped", "beyond"}


@pytest.mark.gpu
class TestGpuKernel(KernelTest):
  @pytest.mark.parametrize("seed", _gpu_seeds())
  def test_matches_reference(self, seed):
    self.check(seed)

  def test_long_sequence_paper_pattern(self):
    """T = 4096, 8/2 heads, D = 64, a stagger layer's rungs, bf16."""
    pattern = Pattern.build(base="fib", alpha=1.5, window=12, seq_len=4096)
    case = dict(
      batch=2, seq_len=4096, num_heads=8, num_kv=2, head_dim=64, dtype=jnp.bfloat16, pattern=pattern
    )
    q, k, v, w = _inputs(case, 0)
    o = fib_attention(q, k, v, pattern, backend="gpu")
    assert _rel_err(o, fib_attention_reference(q, k, v, pattern)) < 2e-2


class TestGpuInterpret(KernelTest):
  BACKEND = "gpu_interpret"
  HEAD_DIMS = (16, 32, 64)

  @pytest.mark.parametrize("seed", _seeds())
  def test_matches_reference(self, seed):
    self.check(seed)


@pytest.mark.gpu
class TestGpuPackedKernel(KernelTest):
  BLOCKS = GpuBlocks(kernel="packed")

  @pytest.mark.parametrize("seed", _gpu_seeds())
  def test_matches_reference(self, seed):
    self.check(seed)


class TestGpuPackedInterpret(KernelTest):
  BACKEND = "gpu_interpret"
  HEAD_DIMS = (16, 32, 64)
  BLOCKS = GpuBlocks(kernel="packed")

  @pytest.mark.parametrize("seed", _seeds())
  def test_matches_reference(self, seed):
    self.check(seed)


# The forward one rung a step at 2 warps (the packed default before 20e206b; a setting).
UNGROUPED = GpuBlocks(kernel="packed", num_warps=2, rung_group=1)


@pytest.mark.gpu
class TestGpuPackedUngroupedKernel(KernelTest):
  BLOCKS = UNGROUPED

  @pytest.mark.parametrize("seed", _gpu_seeds())
  def test_matches_reference(self, seed):
    self.check(seed)


class TestGpuPackedUngroupedInterpret(KernelTest):
  BACKEND = "gpu_interpret"
  HEAD_DIMS = (16, 32, 64)
  BLOCKS = UNGROUPED

  @pytest.mark.parametrize("seed", _seeds())
  def test_matches_reference(self, seed):
    self.check(seed)


# Static rungs several at a time (stacked key tiles in the forward and dq kernels, stacked
# query tiles in dkv): groups straddle the program's last live rung and the table's padding.
GROUPED = GpuBlocks(kernel="packed", rung_group=4, rung_group_bwd=2)


@pytest.mark.gpu
class TestGpuPackedGroupedKernel(KernelTest):
  BLOCKS = GROUPED

  @pytest.mark.parametrize("seed", _gpu_seeds())
  def test_matches_reference(self, seed):
    self.check(seed)


class TestGpuPackedGroupedInterpret(KernelTest):
  BACKEND = "gpu_interpret"
  HEAD_DIMS = (16, 32, 64)
  BLOCKS = GROUPED

  @pytest.mark.parametrize("seed", _seeds())
  def test_matches_reference(self, seed):
    self.check(seed)


# One rung a step with its softmax on the tile's diagonal (GpuBlocks.diagonal=1), not on the
# whole masked tile (the default).
# (The diagonal is a path of one rung a step: rung_group=1, the packed default being 2.)
DIAGONAL = GpuBlocks(kernel="packed", rung_group=1, diagonal=1)


@pytest.mark.gpu
class TestGpuPackedDiagonalKernel(KernelTest):
  BLOCKS = DIAGONAL

  @pytest.mark.parametrize("seed", _gpu_seeds())
  def test_matches_reference(self, seed):
    self.check(seed)


class TestGpuPackedDiagonalInterpret(KernelTest):
  BACKEND = "gpu_interpret"
  HEAD_DIMS = (16, 32, 64)
  BLOCKS = DIAGONAL

  @pytest.mark.parametrize("seed", _seeds())
  def test_matches_reference(self, seed):
    self.check(seed)


@functools.cache  # the equality tests share their runs (each a few compiles on CPU)
def _packed_results(seed: int, with_learned: bool = True, **blocks) -> tuple:
  """The packed kernels' outputs and gradients, in the GPU interpreter, on random case `seed`
  (float32) with GpuBlocks(kernel="packed", **blocks): static rungs (o, dq, dk, dv), then
  (with_learned) learned ones at alpha 0.5 + seed / 2 (o, dq, dk, dv, d loss / d
  frac)."""
  case = {**random_case(seed, (16, 32)), "dtype": jnp.float32}
  assert case["pattern"].far  # the static rungs' loop runs
  q, k, v, w = _inputs(case, seed)
  lp = LearnedPattern.build(base="fib", window=case["pattern"].window, seq_len=case["seq_len"])
  lo, frac, keep = attention.learned_table(lp, 0.5 + seed / 2)
  packed = GpuBlocks(kernel="packed", **blocks)

  def static(q, k, v):
    o = fib_attention(q, k, v, case["pattern"], backend="gpu_interpret", blocks=packed)
    return (o * w).sum(), o

  def learned(q, k, v, frac):
    o = fib_attention_learned(
      q, k, v, lp.window, lo, frac, keep, backend="gpu_interpret", blocks=packed
    )
    return (o * w).sum(), o

  (_, o_s), g_s = jax.jit(jax.value_and_grad(static, argnums=(0, 1, 2), has_aux=True))(q, k, v)
  if not with_learned:
    return o_s, *g_s
  (_, o_l), g_l = jax.jit(jax.value_and_grad(learned, argnums=(0, 1, 2, 3), has_aux=True))(
    q, k, v, frac
  )
  return o_s, *g_s, o_l, *g_l


PACKED_RESULTS = ("static o", "dq", "dk", "dv", "learned o", "dq", "dk", "dv", "dfrac")


@pytest.mark.parametrize("seed", [1, 2, 3])  # cases with rungs (seed 0's is a window only)
def test_a_rungs_diagonal_and_its_whole_tile_give_the_same_attention(seed):
  """GpuBlocks.diagonal: a rung's softmax on its tile's diagonal (each packed row's one key)
  or on the whole masked tile: the same outputs and gradients to float32 rounding, for static
  rungs and for learned ones (and the weights' gradient)."""
  diagonal, tile = _packed_results(seed, diagonal=1), _packed_results(seed, diagonal=0)
  for name, a, b in zip(PACKED_RESULTS, diagonal, tile, strict=True):
    assert _rel_err(a, b) < 1e-5, (name, seed)


# The dkv kernel accumulates dk and dv as [C, D] (GpuBlocks.dkv_t=0), not transposed (the
# default): other matmuls (mma.sync on a Hopper GPU) and no transpose at the end.
DKV_ROWS = GpuBlocks(kernel="packed", dkv_t=0)


@pytest.mark.gpu
class TestGpuPackedDkvRowsKernel(KernelTest):
  BLOCKS = DKV_ROWS

  @pytest.mark.parametrize("seed", _gpu_seeds())
  def test_matches_reference(self, seed):
    self.check(seed)


@pytest.mark.gpu
class TestGpuLearnedRungsDkvRows(LearnedRungsTest):
  BLOCKS = DKV_ROWS

  @pytest.mark.parametrize("seed", _gpu_seeds())
  def test_matches_plain_jax(self, seed):
    self.check(seed)


def _one_key_a_query(case) -> bool:
  pattern = case["pattern"]
  return pattern.window == 0 and not [d for d in pattern.far if d < case["seq_len"]]


# dk and dv of static rungs from the Mosaic GPU kernel (kernels_pallas/mosaic.py: TMA copies),
# on bf16 cases of head dim 64 and G = 4 (the shapes it takes: every case runs it, which the
# check asserts by counting the kernel's traces).
DKV_TMA = GpuBlocks(kernel="packed", dkv_tma=1)


class DkvTmaTest(KernelTest):
  BLOCKS = DKV_TMA
  DTYPE = jnp.bfloat16
  HEAD_DIMS = (64,)
  GROUPS = 4
  MOSAIC = ("dkv",)  # the `kernels_pallas.mosaic` kernels every case runs (traces counted)

  def check(self, seed):
    from kernels_pallas import mosaic

    # One key a query: the reference's dq and dk are exactly 0 and bf16 leaves rounding noise
    # in their place, which a relative error cannot judge (seed 27, T = 1): such a seed takes
    # the case of seed + NUM_CASES instead, so that every seed checks a shape.
    case = random_case(seed, self.HEAD_DIMS)
    while _one_key_a_query(case):
      seed += NUM_CASES
      case = random_case(seed, self.HEAD_DIMS)
    with counted_calls(mosaic, self.MOSAIC) as calls:
      super().check(seed)
    assert all(calls.values()), (calls, case)


@pytest.mark.gpu
class TestGpuPackedDkvTmaKernel(DkvTmaTest):
  @pytest.mark.parametrize("seed", _gpu_seeds())
  def test_matches_reference(self, seed):
    self.check(seed)


class TestGpuPackedDkvTmaInterpret(DkvTmaTest):
  """The Mosaic GPU kernel in Pallas' Mosaic GPU interpreter (the Triton ones in theirs); CI
  runs case 2 (~7 s; case 1 runs in TestGpuPackedQTmaInterpret with this kernel too),
  `pytest -m slow` the rest."""

  BACKEND = "gpu_interpret"

  @pytest.mark.parametrize(
    "seed", [pytest.param(s, marks=[] if s == 2 else [pytest.mark.slow]) for s in range(NUM_CASES)]
  )
  def test_matches_reference(self, seed):
    self.check(seed)


# All three Mosaic GPU kernels (kernels_pallas/mosaic.py): the forward and dq (GpuBlocks.q_tma,
# four 16-row key tiles a step) and dkv, on the same cases as DKV_TMA (each case runs all
# three, the check asserts). The forward's o differs from the Triton forward's at bf16's
# rounding of p (rounded under another running max).
Q_TMA = GpuBlocks(kernel="packed", q_tma=3, dkv_tma=1)


class QTmaTest(DkvTmaTest):
  BLOCKS = Q_TMA
  MOSAIC = ("forward", "dq", "dkv")


@pytest.mark.gpu
class TestGpuPackedQTmaKernel(QTmaTest):
  @pytest.mark.parametrize("seed", _gpu_seeds())
  def test_matches_reference(self, seed):
    self.check(seed)


class TestGpuPackedQTmaInterpret(QTmaTest):
  """The three Mosaic GPU kernels in Pallas' Mosaic GPU interpreter; CI runs case 1 (with
  rungs; case 0 is a window only), `pytest -m slow` the rest."""

  BACKEND = "gpu_interpret"

  @pytest.mark.parametrize(
    "seed", [pytest.param(s, marks=[] if s == 1 else [pytest.mark.slow]) for s in range(NUM_CASES)]
  )
  def test_matches_reference(self, seed):
    self.check(seed)


# CI runs seed 1 (pytest -m slow seeds 2 and 3: CI time)
@pytest.mark.parametrize("seed", [1, *(pytest.param(s, marks=pytest.mark.slow) for s in (2, 3))])
def test_dk_and_dv_accumulated_transposed_give_the_same_attention(seed):
  """GpuBlocks.dkv_t: the dkv kernel's dk and dv accumulated as [C, D] or transposed, [D, C]:
  the same outputs and gradients to float32 rounding, for static rungs one and two to a loop
  step, with the diagonal softmax, and for learned ones (their spills onto the block before
  summed along the other axis)."""
  for options in (dict(rung_group=1), dict(rung_group=2), dict(rung_group=1, diagonal=1)):
    trans = _packed_results(seed, dkv_t=1, **options)
    rows = _packed_results(seed, dkv_t=0, **options)
    for name, a, b in zip(PACKED_RESULTS, trans, rows, strict=True):
      assert _rel_err(a, b) < 1e-6, (name, options, seed)


# Static rungs on CUDA cores in all three kernels (GpuBlocks.ew_rungs): each packed row's own
# key row, no tensor-core tiles.
EW_RUNGS = GpuBlocks(kernel="packed", ew_rungs=7)


@pytest.mark.gpu
class TestGpuPackedEwKernel(KernelTest):
  BLOCKS = EW_RUNGS

  @pytest.mark.parametrize("seed", _gpu_seeds())
  def test_matches_reference(self, seed):
    self.check(seed)


class TestGpuPackedEwInterpret(KernelTest):
  BACKEND = "gpu_interpret"
  HEAD_DIMS = (16, 32, 64)
  BLOCKS = EW_RUNGS

  # CI runs seeds 1 and 2, cases with rungs (seed 0's is a window only; pytest -m slow the
  # rest of the 50): the equality test below covers each kernel's bit on its own.
  @pytest.mark.parametrize(
    "seed",
    [pytest.param(s, marks=[] if s in (1, 2) else [pytest.mark.slow]) for s in range(NUM_CASES)],
  )
  def test_matches_reference(self, seed):
    self.check(seed)


@pytest.mark.parametrize("seed", [1, pytest.param(2, marks=pytest.mark.slow), 3])
def test_static_rungs_on_cuda_cores_give_the_same_attention(seed):
  """GpuBlocks.ew_rungs: each kernel's static rungs as row dot products and elementwise
  updates, or as tensor-core tiles: the same outputs and gradients to float32 rounding, one
  kernel at a time and all three, dk and dv accumulated either way, with and without folded
  rungs."""
  tiles = _packed_results(seed, False)
  for options in (
    dict(ew_rungs=1),
    dict(ew_rungs=2),
    dict(ew_rungs=4),
    dict(ew_rungs=7, dkv_t=0, fold=0),
  ):
    ew = _packed_results(seed, False, **options)
    for name, a, b in zip(PACKED_RESULTS, ew, tiles, strict=False):
      assert _rel_err(a, b) < 1e-5, (name, options, seed)


# CI runs seed 1 (pytest -m slow seeds 2 and 3: CI time)
@pytest.mark.parametrize("seed", [1, *(pytest.param(s, marks=pytest.mark.slow) for s in (2, 3))])
def test_the_softmax_in_base_2_gives_the_same_attention(seed):
  """GpuBlocks.exp2: every packed kernel's softmax in base 2 or in natural units: the same
  outputs and gradients (and the learned weights') to float32 rounding, static and learned
  rungs, with the diagonal softmax too."""
  for options in (dict(), dict(rung_group=1), dict(rung_group=1, diagonal=1)):
    base2 = _packed_results(seed, exp2=1, **options)
    natural = _packed_results(seed, exp2=0, **options)
    for name, a, b in zip(PACKED_RESULTS, base2, natural, strict=True):
      assert _rel_err(a, b) < 1e-5, (name, options, seed)


@pytest.mark.parametrize(
  "tma",
  # (dkv_tma alone: pytest -m slow in the interpreters, CI time; q_tma's case runs it too)
  [(0, 0), pytest.param((1, 0), marks=pytest.mark.slow), (1, 3)],
  ids=["triton", "dkv_tma", "q_tma"],
)
@pytest.mark.parametrize("backend", [pytest.param("gpu", marks=pytest.mark.gpu), "gpu_interpret"])
def test_the_same_inputs_give_bitwise_the_same_gradients(backend, tma):
  """The packed kernels' backward has no atomics (dk, dv are summed key block by key block): the
  same inputs give bitwise the same dq, dk, dv and alpha's weights' gradient, run after run, for
  static rungs and learned ones; on a GPU at the paper's shape (T = 1,024, 8 / 2 heads, D = 64,
  W = 12, bf16). `tma`: (dkv_tma, q_tma); with dkv_tma=1 the static rungs' dk, dv come from the
  Mosaic GPU kernel, with q_tma=3 their forward and dq too."""
  dkv_tma, q_tma = tma
  seq_len, batch = (1024, 4) if backend == "gpu" else (64, 1)
  ks = jax.random.split(jax.random.key(7), 4)
  q = jax.random.normal(ks[0], (batch, seq_len, 8, 64), jnp.bfloat16)
  k = jax.random.normal(ks[1], (batch, seq_len, 2, 64), jnp.bfloat16)
  v = jax.random.normal(ks[2], (batch, seq_len, 2, 64), jnp.bfloat16)
  w = jax.random.normal(ks[3], q.shape, jnp.float32)
  pattern = Pattern.build(base="fib", alpha=1.3, window=12, seq_len=seq_len)
  lp = LearnedPattern.build(base="fib", window=12, seq_len=seq_len)
  lo, frac, keep = attention.learned_table(lp, 1.3)
  blocks = GpuBlocks(kernel="packed", dkv_tma=dkv_tma, q_tma=q_tma)

  def static(q, k, v):
    o = fib_attention(q, k, v, pattern, backend=backend, blocks=blocks)
    return (o.astype(jnp.float32) * w).sum()

  def learned(q, k, v, frac):
    o = fib_attention_learned(q, k, v, 12, lo, frac, keep, backend=backend, blocks=blocks)
    return (o.astype(jnp.float32) * w).sum()

  grads = (
    jax.jit(jax.grad(static, argnums=(0, 1, 2))),
    jax.jit(jax.grad(learned, argnums=(0, 1, 2, 3))),
  )
  args = ((q, k, v), (q, k, v, frac))
  from kernels_pallas import mosaic

  with counted_calls(mosaic, ["forward", "dq", "dkv"]) as calls:
    for grad, a in zip(grads, args, strict=True):
      first, again = grad(*a), grad(*a)
      assert any(np.any(np.asarray(g, np.float32)) for g in first)  # not all zeros
      for x, y in zip(first, again, strict=True):
        assert np.asarray(x).tobytes() == np.asarray(y).tobytes()
  # The Mosaic kernels asked for ran (static rungs; a GPU without TMA would fall back).
  assert calls == {"forward": q_tma & 1, "dq": q_tma >> 1, "dkv": dkv_tma}


def test_the_kernels_defaults_resolve_per_kernel():
  """num_warps and rung_group 0: the kernel's own (packed: 4 warps, rung groups of 2 forward;
  row-wise: 2 warps, no groups); rung_group_bwd 0: one rung a step, whatever the forward's."""
  packed, rowwise = GpuBlocks(kernel="packed"), GpuBlocks()
  assert (packed.warps, packed.group, packed.group_bwd) == (4, 2, 1)
  assert (rowwise.warps, rowwise.group, rowwise.group_bwd) == (2, 1, 1)
  assert rowwise.for_kernel("packed") == packed  # the packed kernel's own defaults
  assert packed.for_kernel("rowwise") == rowwise
  assert GpuBlocks(kernel="packed", num_warps=2).warps == 2
  assert GpuBlocks(kernel="packed", rung_group=1).group_bwd == 1
  assert GpuBlocks(kernel="packed", rung_group=4).group_bwd == 1
  assert GpuBlocks(kernel="packed", rung_group_bwd=2).group == 2  # the forward: the default


def test_rung_groups_are_checked():
  assert GpuBlocks(kernel="packed", rung_group=2).group_bwd == 1  # 0: one rung a step
  assert GpuBlocks(kernel="packed", rung_group=2, rung_group_bwd=8).group_bwd == 8
  with pytest.raises(ValueError, match="rung_group=3 must be a power of two"):
    GpuBlocks(kernel="packed", rung_group=3)
  with pytest.raises(ValueError, match="rung_group_bwd=-1 must be a power of two or 0"):
    GpuBlocks(kernel="packed", rung_group_bwd=-1)
  with pytest.raises(ValueError, match="rung groups are the packed kernel's; kernel='rowwise'"):
    GpuBlocks(rung_group=2)
  assert GpuBlocks(rung_group_bwd=1).group_bwd == 1  # one rung a step: no group, any kernel
  assert GpuBlocks(kernel="packed", rung_group_bwd=2).group_dkv == 2  # 0: the backward's
  assert GpuBlocks(kernel="packed", rung_group_bwd=2, rung_group_dkv=1).group_dkv == 1
  with pytest.raises(ValueError, match="rung_group_dkv=6 must be a power of two or 0"):
    GpuBlocks(kernel="packed", rung_group_dkv=6)
  with pytest.raises(ValueError, match="rung groups are the packed kernel's; kernel='rowwise'"):
    GpuBlocks(rung_group_dkv=2)
  with pytest.raises(ValueError, match="fold=2 must be 0 or 1"):
    GpuBlocks(kernel="packed", fold=2)
  grouped = GpuBlocks(
    kernel="packed", num_warps=8, rung_group=4, rung_group_bwd=2, rung_group_dkv=1
  )
  assert grouped.for_kernel("packed") == grouped
  assert grouped.for_kernel("rowwise") == GpuBlocks(num_warps=8)  # no rung groups there
  with pytest.raises(ValueError, match="ew_rungs=1: static rungs on CUDA cores are the packed"):
    GpuBlocks(ew_rungs=1)
  assert GpuBlocks(kernel="packed", ew_rungs=4).for_kernel("rowwise") == GpuBlocks()
  with pytest.raises(ValueError, match="block_q_bwd=24 must be a power of two >= 16"):
    GpuBlocks(block_q_bwd=24)
  with pytest.raises(ValueError, match=r"num_warps=3 must be a power of two or 0 \(the kernel's\)"):
    GpuBlocks(num_warps=3)
  with pytest.raises(ValueError, match="num_warps_bwd=0 must be a power of two >= 1"):
    GpuBlocks(num_warps_bwd=0)
  with pytest.raises(ValueError, match="diagonal=2 must be 0 or 1"):
    GpuBlocks(kernel="packed", diagonal=2)
  with pytest.raises(ValueError, match="ew_rungs=8 must be a bitmask"):
    GpuBlocks(kernel="packed", ew_rungs=8)
  with pytest.raises(ValueError, match="dkv_t=-1 must be 0 or 1"):
    GpuBlocks(kernel="packed", dkv_t=-1)
  with pytest.raises(ValueError, match="exp2=2 must be 0 or 1"):
    GpuBlocks(kernel="packed", exp2=2)
  with pytest.raises(ValueError, match=r"num_stages_dkv=-1 must be >= 0 \(0: num_stages_bwd\)"):
    GpuBlocks(num_stages_dkv=-1)
  staged = GpuBlocks(num_stages=3, num_stages_dkv=2)
  assert (staged.stages_dq, staged.stages_dkv) == (3, 2)  # dq: the forward's; dkv its own
  assert GpuBlocks(num_stages=3, num_stages_bwd=4).stages_dkv == 4  # 0: the backward's


class TestTpuInterpret(KernelTest):
  BACKEND = "tpu_interpret"
  HEAD_DIMS = (16, 32, 64, 128)

  @pytest.mark.parametrize("seed", _seeds())
  def test_matches_reference(self, seed):
    self.check(seed)


def test_cases_cover_the_required_shapes():
  cases = [random_case(s) for s in range(NUM_CASES)]
  assert any(c["seq_len"] % 16 for c in cases)  # ragged
  assert any(c["pattern"].max_distance >= c["seq_len"] for c in cases)  # T < largest rung
  assert any(not c["pattern"].far for c in cases)  # window-only
  assert {c["num_heads"] // c["num_kv"] for c in cases} == {1, 2, 4}
  assert {c["head_dim"] for c in cases} >= {64, 128}
  assert {c["dtype"] for c in cases} == {jnp.float32, jnp.bfloat16}


def test_bad_learned_arguments():
  q = jnp.zeros((1, 8, 4, 16))
  lo, frac, keep = jnp.array([3, 5]), jnp.array([0.5, 0.25]), jnp.array([True, True])
  with pytest.raises(ValueError, match="GPU kernels only; got backend='tpu'"):
    fib_attention_learned(q, q, q, 2, lo, frac, keep, backend="tpu")
  with pytest.raises(ValueError, match=r"must be \[R\] with R >= 1; got \(2,\), \(1,\)"):
    fib_attention_learned(q, q, q, 2, lo, frac[:1], keep, backend="gpu_interpret")
  with pytest.raises(ValueError, match=r"got \(0,\)"):
    fib_attention_learned(q, q, q, 2, lo[:0], frac[:0], keep[:0], backend="gpu_interpret")


def test_shapes_triton_cannot_tile_are_refused_before_compiling():
  q, k = jnp.zeros((1, 8, 6, 48)), jnp.zeros((1, 8, 2, 48))
  with pytest.raises(ValueError, match="power-of-two head dim >= 16; got head_dim=48"):
    fib_attention(q, k, k, Pattern(2), backend="gpu")
  q, k = jnp.zeros((1, 8, 6, 64)), jnp.zeros((1, 8, 2, 64))
  with pytest.raises(ValueError, match="per kv head; got groups=3"):
    fib_attention(q, k, k, Pattern(2), backend="gpu", blocks=GpuBlocks(kernel="packed"))
  with pytest.raises(ValueError, match="per kv head; got groups=3"):
    table = (jnp.array([3]), jnp.array([0.5]), jnp.array([True]))
    fib_attention_learned(q, k, k, 2, *table, backend="gpu")
  # The interpreter takes them (the model tests use head dim 8).
  fib_attention(q, k, k, Pattern(2), backend="gpu_interpret", blocks=GpuBlocks(kernel="packed"))


def test_bad_arguments():
  q = jnp.zeros((1, 8, 4, 16))
  k = jnp.zeros((1, 8, 3, 16))
  with pytest.raises(ValueError, match="num_kv=3"):
    fib_attention(q, k, k, Pattern(2), backend="gpu_interpret")
  with pytest.raises(ValueError, match="cuda"):
    fib_attention(q, q, q, Pattern(2), backend="cuda")
  with pytest.raises(ValueError, match="int32"):
    fib_attention(
      q.astype(jnp.int32), q.astype(jnp.int32), q.astype(jnp.int32), Pattern(2), backend="tpu"
    )


def test_a_programs_rung_loop_stops_at_the_rungs_that_reach_its_rows():
  """The tables list the rungs by increasing distance (learned: the kept ones by floor, with
  their count), so the loops run over a prefix: the rungs below the limit (a query block
  [i0, i0 + Q) reads d < i0 + Q; a key block [j0, .) is read through d < T - j0)."""
  from kernels_pallas.gpu import _learned_tables, _rungs_below, rung_table

  table = (rung_table((34, 13, 21, 55)),)
  assert table[0].shape == (16,) and list(table[0][:5]) == [4, 13, 21, 34, 55]
  assert rung_table(tuple(range(20, 60))).shape == (64,)  # R + 1 = 41 -> a power of two
  got = [int(_rungs_below(table, False, limit)) for limit in (0, 13, 14, 35, 56, 10**6)]
  assert got == [0, 0, 1, 3, 4, 4]

  lo = jnp.asarray([0, 1, 1, 2, 4, 6, 10, 17, 27, 44], jnp.int32)
  keep = jnp.asarray([0, 0, 0, 0, 0, 0, 0, 1, 1, 1], bool)  # window 12: the last three kept
  frac = jnp.linspace(0, 0.9, 10)
  tables = _learned_tables(lo[::-1], frac[::-1], keep[::-1])  # floors decreasing
  assert [int(x) for x in tables[0][:3]] == [17, 27, 44] and int(tables[2][0]) == 3
  np.testing.assert_array_equal(np.asarray(tables[1][:3]), np.asarray(frac[7:]))
  assert [int(x) for x in tables[3][:3]] == [2, 1, 0]  # the rung of each slot
  got = [int(_rungs_below(tables, True, limit)) for limit in (17, 18, 28, 45, 10**6)]
  assert got == [0, 1, 2, 3, 3]  # never past the count, though the padding floors are 0


def test_the_rungs_the_window_tile_holds_are_folded_into_its_mask():
  """`_folded`: the static rungs with W < d <= the tile's reach (the table's first ones) as a
  count and a bitmask, which `_band` adds to the window's band; the reach of each kernel's
  window (Q = 16, W = 12: 16 rows back for every row of a program in all three)."""
  from kernels_pallas.gpu import _band, _chunks_reach, _folded, _window_reach, rung_table

  assert _window_reach(12, 16) == _chunks_reach(12, 16) == 16
  assert (_window_reach(20, 16), _chunks_reach(20, 16)) == (48, 32)  # 64-key tile; 3 chunks
  assert (_window_reach(3, 32), _chunks_reach(3, 32)) == (32, 32)
  with pytest.raises(ValueError, match=r"far=\(13, 13\) must be distinct distances > window=12"):
    rung_table((13, 13), 12)  # a repeated bit would carry into the next distance's
  with pytest.raises(ValueError, match="must be distinct distances > window=12"):
    rung_table((12, 20), 12)
  table = rung_table((13, 16, 17, 40))
  count, bits = _folded(table, 12, 16)
  assert int(count) == 2 and int(bits) == (1 << 13) | (1 << 16)
  assert int(_folded(table, 12, 100)[0]) == 3  # reach capped at 31: 40 stays a rung
  assert _folded(table, 16, 16) == (0, None)  # a tile no further than the window: none
  assert int(_folded(rung_table(()), 12, 16)[0]) == 0  # no rungs (zero padding is no rung)
  rel = jnp.arange(-2, 40)
  got = np.asarray(rel)[np.asarray(_band(rel, 12, bits))]
  assert list(got) == [*range(13), 13, 16]  # the band 0..W and the folded distances only
  count, bits = _folded(rung_table((21, 29, 31, 40)), 20, 48)  # bit 31: the int32's sign
  assert int(count) == 3 and int(bits) < 0
  got = np.asarray(rel)[np.asarray(_band(rel, 20, bits))]
  assert list(got) == [*range(21), 21, 29, 31]


@pytest.mark.parametrize("seed", [1, 3, 4])  # folded rungs: (12), (3, 4, 7, 11), (20)
def test_rungs_folded_into_the_window_give_the_same_attention(seed):
  """GpuBlocks.fold: the static rungs the window's tile holds folded into its mask, or run in
  the rung loops: the same outputs and gradients to float32 rounding, rungs two to a forward
  step (the default), one, with the diagonal softmax, and two to a dkv step (static rungs:
  learned ones never fold)."""
  from kernels_pallas.gpu import _folded, _window_reach, rung_table

  pattern = random_case(seed, (16, 32))["pattern"]
  reach = _window_reach(pattern.window, 16)
  assert int(_folded(rung_table(pattern.far), pattern.window, reach)[0]) > 0  # the case folds
  options = (dict(), dict(rung_group=1), dict(rung_group=1, diagonal=1), dict(rung_group_bwd=2))
  for option in options:
    folded = _packed_results(seed, with_learned=False, fold=1, **option)  # (the default)
    looped = _packed_results(seed, with_learned=False, fold=0, **option)
    for name, a, b in zip(PACKED_RESULTS[:4], folded, looped, strict=True):
      assert _rel_err(a, b) < 1e-6, (name, option, seed)


@pytest.mark.parametrize("seed", [1, 3])
def test_dq_and_dkv_take_rung_groups_of_their_own(seed):
  """GpuBlocks.rung_group_dkv: dq two rungs a step with dkv one, and the reverse, give the
  backward of one rung a step in both to float32 rounding."""
  one = _packed_results(seed, with_learned=False, rung_group_bwd=1)  # learned rungs: one a step
  for option in (dict(rung_group_bwd=2, rung_group_dkv=1), dict(rung_group_dkv=2)):
    got = _packed_results(seed, with_learned=False, **option)
    for name, a, b in zip(PACKED_RESULTS[:4], got, one, strict=True):
      assert _rel_err(a, b) < 1e-6, (name, option, seed)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_the_learned_dkv_spill_is_added_to_the_row_before_each_block_without_a_scatter(dtype):
  """`_add_spill`: block n + 1's spill lands on block n's last row, added in float32 and
  rounded once, every other row untouched (bitwise), as one fused pass, not a scatter."""
  from kernels_pallas.gpu import _add_spill

  bsz, num_blocks, block, heads, dim = 2, 5, 4, 3, 8
  ks = jax.random.split(jax.random.key(3), 2)
  x = jax.random.normal(ks[0], (bsz, num_blocks * block, heads, dim), dtype)
  top = jax.random.normal(ks[1], (bsz, heads, num_blocks, dim), jnp.float32)
  got = np.asarray(_add_spill(x, top, block).astype(jnp.float32))
  want = np.asarray(x.astype(jnp.float32)).copy()
  for n in range(num_blocks - 1):
    row = (n + 1) * block - 1
    summed = np.asarray(x[:, row].astype(jnp.float32)) + np.asarray(top[:, :, n + 1])
    want[:, row] = np.asarray(jnp.asarray(summed).astype(dtype).astype(jnp.float32))
  np.testing.assert_array_equal(got, want)
  assert "scatter" not in str(jax.make_jaxpr(_add_spill, static_argnums=2)(x, top, block))
