"""Pallas kernels == the float32 reference: outputs and dq, dk, dv on random shapes.

`KernelTest` runs for real on a GPU (`pytest -m gpu` with FIBAX_GPU_TESTS=1);
the interpret subclasses run the same cases on CPU through Pallas' GPU interpreter and
the TPU interpreter (`pltpu.InterpretParams`). Each case draws a fresh shape and pattern:
ragged lengths, T shorter than the largest rung, GQA groups 1/2/4, head dim 16..128,
window-only and pow2 tables, bf16 and f32.

The first CI_CASES seeds run in CI; the rest of the 50 are marked `slow` (interpret mode
compiles each pattern, ~10 s a case on 2 cores): `pytest -m slow tests/test_kernels.py`.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fibax.patterns import Pattern
from kernels_pallas import fib_attention, fib_attention_reference

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

  def check(self, seed):
    case = random_case(seed, self.HEAD_DIMS)
    q, k, v, w = _inputs(case, seed)
    pattern = case["pattern"]

    def loss(fn, q, k, v):
      o = fn(q, k, v)
      return (o.astype(jnp.float32) * w).sum(), o

    kernel = lambda q, k, v: fib_attention(q, k, v, pattern, backend=self.BACKEND)
    ref = lambda q, k, v: fib_attention_reference(
      q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32), pattern
    )
    grad = lambda fn: jax.value_and_grad(lambda *a: loss(fn, *a), argnums=(0, 1, 2), has_aux=True)
    (_, o), grads = jax.jit(grad(kernel))(q, k, v)
    assert o.shape == q.shape and o.dtype == q.dtype
    (_, r_o), r_grads = grad(ref)(q, k, v)
    tol = TOL[case["dtype"]]
    if self.BACKEND == "gpu" and case["dtype"] == jnp.float32:
      tol = 1e-3  # Triton's float32 dot runs on tensor cores in TF32 (~3e-4 relative)
    assert _rel_err(o, r_o) < tol, case
    for name, g, r in zip("qkv", grads, r_grads, strict=True):
      assert g.shape == r.shape and g.dtype == case["dtype"]
      assert _rel_err(g, r) < tol * 2, (name, case)


def _gpu_seeds():
  """FIBAX_KERNEL_SHARD=i/n runs every n-th seed, so n processes can share the compiles."""
  i, n = (int(x) for x in os.environ.get("FIBAX_KERNEL_SHARD", "0/1").split("/"))
  return [s for s in range(NUM_CASES) if s % n == i]


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
