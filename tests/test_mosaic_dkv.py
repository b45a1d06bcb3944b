"""kernels_pallas/mosaic.py, the Mosaic GPU dkv kernel, in Pallas' Mosaic GPU interpreter against
the Triton packed kernel in its interpreter (experiments/mosaic_dkv_check.py). The interpreter
gets the query-side tiles a row at a time into the tiled buffers (it takes no reshaped copy
destination and keeps a RefUnion's views apart); the GPU path's copies (one [16, 4, 64] box a
tensor into the untiled swizzled view, the [B, K, T, G] statistics) run only on a GPU
(`TestGpuPackedDkvTmaKernel` in tests/test_kernels.py, `speed_suite.sh`'s `tests_dkv_tma`)."""

import functools

import jax
import jax.numpy as jnp
import pytest
from conftest import assert_grads_agree, counted_calls, interpreter_grads

from experiments import mosaic_dkv_check
from fibax.patterns import Pattern
from kernels_pallas import mosaic
from kernels_pallas.gpu import GpuBlocks


@pytest.mark.parametrize(
  "shape, window, far",
  [
    ((1, 128, 8, 2, 64), 12, (13, 21, 34, 55, 89)),  # rungs past T - j0 skipped
    ((1, 128, 4, 1, 64), 3, (17,)),  # one kv head; a rung off an 8-row tile, odd
    ((2, 96, 8, 2, 64), 40, ()),  # three window chunks, the last start clamped
  ],
)
def test_the_mosaic_kernel_gives_the_triton_kernels_dk_and_dv(shape, window, far):
  assert max(mosaic_dkv_check.check(*shape, window, far)) < 1e-5


def test_the_mosaic_kernel_names_the_calls_it_does_not_take():
  assert mosaic.supported((2, 128, 8, 64), 2, jnp.bfloat16) is None
  assert "float32" in mosaic.supported((2, 128, 8, 64), 2, jnp.float32)
  assert "float16" in mosaic.supported((2, 128, 8, 64), 2, jnp.float16)
  assert "8 query heads" in mosaic.supported((2, 128, 16, 64), 2, jnp.bfloat16)
  assert "2 query heads" in mosaic.supported((2, 128, 4, 64), 2, jnp.bfloat16)
  assert "head_dim 32" in mosaic.supported((2, 128, 8, 32), 2, jnp.bfloat16)
  assert "head_dim 128" in mosaic.supported((2, 128, 8, 128), 2, jnp.bfloat16)
  assert "T = 72" in mosaic.supported((2, 72, 8, 64), 2, jnp.bfloat16)
  q = jnp.zeros((1, 64, 8, 32), jnp.bfloat16)
  kv = jnp.zeros((1, 64, 2, 32), jnp.bfloat16)  # head_dim 32
  st = jnp.zeros((1, 8, 64), jnp.float32)
  with pytest.raises(ValueError, match="does not take this call: head_dim 32"):
    mosaic.dkv(q, kv, kv, q, st, st, jnp.zeros((16,), jnp.int32), window=4, interpret=True)


def test_dkv_tma_is_the_packed_kernels_option_and_not_with_ew_dkv():
  with pytest.raises(ValueError, match="dkv_tma=1 is the packed kernel's option"):
    GpuBlocks(dkv_tma=1)
  with pytest.raises(ValueError, match="ew_rungs=4"):
    GpuBlocks(kernel="packed", dkv_tma=1, ew_rungs=4)


def test_the_check_script_names_bad_arguments():
  with pytest.raises(SystemExit, match="usage"):
    mosaic_dkv_check.main(["1", "2"])
  with pytest.raises(SystemExit, match="not integers: '1 128 8 2 64 x'"):
    mosaic_dkv_check.main(["1", "128", "8", "2", "64", "x"])


@pytest.mark.parametrize(
  "heads, dtype, takes",
  [
    (8, jnp.bfloat16, True),
    (4, jnp.bfloat16, False),
    pytest.param(8, jnp.float32, False, marks=pytest.mark.slow),  # CI time
  ],
)
def test_dkv_tma_gives_the_default_gradients_or_falls_back(heads, dtype, takes):
  """GpuBlocks.dkv_tma=1 against 0, with an lse cotangent: the Mosaic kernel where it takes
  the call (G = 4, bf16; the same sums in another order), the Triton kernel's own results
  (bitwise) where it does not (G = 2; float32)."""
  pattern = Pattern.build(base="fib", alpha=1.0, window=6, seq_len=96)
  ks = jax.random.split(jax.random.key(3), 3)
  q = jax.random.normal(ks[0], (1, 96, heads, 64), dtype)
  k, v = (jax.random.normal(x, (1, 96, 2, 64), dtype) for x in ks[1:])
  with counted_calls(mosaic, ["dkv"]) as calls:
    tma = interpreter_grads(GpuBlocks(kernel="packed", dkv_tma=1), q, k, v, pattern)
  base = interpreter_grads(GpuBlocks(kernel="packed"), q, k, v, pattern)
  assert calls == {"dkv": takes}
  assert_grads_agree(tma, base, takes)


def test_the_gpu_path_lowers_on_a_cpu_and_names_its_kernel():
  """The kernel as a GPU runs it (the untiled swizzled copy views, the [16, 4, 64] boxes, the
  [B, K, T, G] statistics), lowered to Mosaic GPU's module on a CPU-only machine; its name is
  the one profiles and Nsight Compute's filter (experiments/profile_kernels.py) look for."""
  q = jax.ShapeDtypeStruct((2, 256, 8, 64), jnp.bfloat16)
  kv = jax.ShapeDtypeStruct((2, 256, 2, 64), jnp.bfloat16)
  stats = jax.ShapeDtypeStruct((2, 8, 256), jnp.float32)
  table = jax.ShapeDtypeStruct((16,), jnp.int32)
  fn = jax.jit(functools.partial(mosaic.dkv, window=12))
  lowered = fn.trace(q, kv, kv, q, stats, stats, table).lower(lowering_platforms=("cuda",))
  text = lowered.as_text()
  assert "mosaic_gpu" in text and "fib_attention_packed_dkv_tma" in text
