"""kernels_pallas/mosaic.py, the Mosaic GPU dkv kernel, in Pallas' Mosaic GPU interpreter against
the Triton packed kernel in its interpreter (experiments/mosaic_dkv_check.py)."""

import jax.numpy as jnp
import pytest

from experiments import mosaic_dkv_check
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
