"""The one-pass log-sum-exp kernel (`kernels_pallas.logsumexp`) == jax.nn.logsumexp in float32.

`LogsumexpTest` runs for real on a GPU (`pytest -m gpu` with FIBAX_GPU_TESTS=1) and through
Pallas' GPU interpreter on CPU: random row counts (one, odd ones), vocabularies below a chunk,
not a multiple of it and a multiple of it, bf16 and float32, logits scaled up to 50, and rows
of -inf. The kernel also lowers to Triton for an abstract H100 on a CPU-only machine.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax._src.mesh import AbstractDevice, AbstractMesh
from jax.sharding import AxisType

from kernels_pallas.logsumexp import logsumexp

H100 = AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=132, platform="gpu")
ONE_H100 = AbstractMesh((1,), ("x",), axis_types=(AxisType.Auto,), abstract_device=H100)
CHUNK = 128  # small chunks, so that small vocabularies take several of them


def _reference(x):
  return jax.nn.logsumexp(x.astype(jnp.float32), axis=-1)


def _close(got, want):
  assert got.dtype == jnp.float32 and got.shape == want.shape
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-5)


def _case(seed):
  """Logits of a random shape: V below a chunk, not a multiple of it, or a multiple of it."""
  rng = np.random.default_rng(seed)
  n = [1, int(rng.integers(1, 20)) * 2 + 1, int(rng.integers(1, 20)) * 2][seed % 3]
  vocab = [
    int(rng.integers(1, CHUNK)),
    int(rng.integers(1, 4)) * CHUNK + int(rng.integers(1, CHUNK)),
    int(rng.integers(1, 4)) * CHUNK,
  ][(seed // 2) % 3]
  shape = (n, vocab) if seed % 2 else (2, n, vocab)  # leading dims flattened and restored
  dtype = [jnp.float32, jnp.bfloat16][seed % 2]
  scale = float(rng.uniform(0.1, 50))
  x = (jax.random.normal(jax.random.key(seed), shape) * scale).astype(dtype)
  return x, int(rng.choice([1, 2, 3, 4, 8]))


class LogsumexpTest:
  INTERPRET: bool

  @pytest.mark.parametrize("seed", range(6))
  def test_matches_jax(self, seed):
    x, rows = _case(seed)
    _close(logsumexp(x, rows=rows, chunk=CHUNK, interpret=self.INTERPRET), _reference(x))

  def test_rows_of_minus_inf(self):
    x = jax.random.normal(jax.random.key(7), (4, 3 * CHUNK + 5)) * 20
    x = x.at[0].set(-jnp.inf).at[0, 2 * CHUNK + 1].set(3.5)  # one finite entry, in chunk 2
    x = x.at[1, : CHUNK + 7].set(-jnp.inf)  # a first chunk (and more) of -inf
    x = x.at[2].set(-jnp.inf)  # -inf throughout: lse is -inf, not NaN
    x = x.at[3].set(-jnp.inf).at[3, -1].set(-2.0)  # the one finite entry in the masked chunk
    got = logsumexp(x, rows=4, chunk=CHUNK, interpret=self.INTERPRET)
    assert not np.isnan(np.asarray(got)).any()
    assert got[0] == 3.5 and got[2] == -jnp.inf and got[3] == -2.0
    _close(got, _reference(x))

  def test_default_blocks_and_infinite_entries(self):
    """The default blocks (4,096 entries a step) on a vocabulary that is a multiple of them
    and one that is not; a row with a +inf entry gives +inf, as jax.nn.logsumexp does."""
    for vocab in (8192, 9000):
      x = jax.random.normal(jax.random.key(vocab), (3, vocab), jnp.bfloat16) * 8
      _close(logsumexp(x, interpret=self.INTERPRET), _reference(x))
    x = jax.random.normal(jax.random.key(1), (2, 300)).at[1, 5].set(jnp.inf)
    got = logsumexp(x, chunk=CHUNK, interpret=self.INTERPRET)
    assert float(got[1]) == jnp.inf and np.isfinite(float(got[0]))


class TestLogsumexpInterpret(LogsumexpTest):
  INTERPRET = True


@pytest.mark.gpu
class TestLogsumexpGpu(LogsumexpTest):
  INTERPRET = False


@pytest.mark.parametrize("shape", [(32768, 32768), (64, 1000)])  # whole chunks; a masked one
def test_lowers_to_triton(shape):
  x = jax.ShapeDtypeStruct(shape, jnp.bfloat16)
  with jax.sharding.use_abstract_mesh(ONE_H100):
    text = jax.jit(logsumexp).trace(x).lower(lowering_platforms=("cuda",)).as_text()
  assert "xla.gpu.triton" in text
  assert re.findall(r'name = "(\w+)"', text) == ["logsumexp"]


@pytest.mark.parametrize("kwargs", [dict(chunk=100), dict(chunk=0), dict(rows=0), dict(rows=-2)])
def test_bad_arguments_raise(kwargs):
  with pytest.raises(ValueError, match=next(iter(kwargs))):
    logsumexp(jnp.zeros((4, 256)), interpret=True, **kwargs)
