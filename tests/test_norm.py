"""The fused RMSNorm kernel (`kernels_pallas.norm`) == plain JAX, and the one-pass loss.

`NormTest` runs for real on a GPU (`pytest -m gpu` with FIBAX_GPU_TESTS=1) and through Pallas'
GPU interpreter on CPU: outputs and the gradients of x and the scale, with and without the
residual pass-through, on random row counts (odd ones too) and feature widths.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fibax import model as M
from fibax.config import AttentionConfig, ModelConfig, mlp_hidden_for
from fibax.steps import logsumexp_online, output_losses
from kernels_pallas.norm import rms_norm, rms_norm_reference, rms_norm_residual

TOL = {np.dtype(jnp.float32): 1e-5, np.dtype(jnp.bfloat16): 2e-2}  # relative to the largest entry


def _case(seed):
  rng = np.random.default_rng(seed)
  lead = (int(rng.integers(1, 4)), int(rng.integers(1, 70)))
  features = int(rng.choice([16, 32, 64, 128, 512]))
  dtype = [jnp.float32, jnp.bfloat16][seed % 2]
  keys = jax.random.split(jax.random.key(seed), 4)
  shape = (*lead, features)
  x = (jax.random.normal(keys[0], shape) * rng.uniform(0.1, 10)).astype(dtype)
  scale = 1 + 0.3 * jax.random.normal(keys[1], (features,))
  gy = jax.random.normal(keys[2], shape).astype(dtype)
  gx = jax.random.normal(keys[3], shape).astype(dtype)
  return x, scale, gy, gx


def _close(got, want, dtype):
  got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
  np.testing.assert_allclose(
    got, want, atol=TOL[np.dtype(dtype)] * max(np.abs(want).max(), 1e-6), rtol=0
  )


def _reference(x, scale, eps=1e-6):
  return rms_norm_reference(x.reshape(-1, x.shape[-1]), scale, eps).reshape(x.shape)


class NormTest:
  INTERPRET = True

  # Seeds 3-5 are `slow` (CI runs 0-2 in the interpreter; `pytest -m gpu` all six for real).
  @pytest.mark.parametrize(
    "seed", [pytest.param(s, marks=pytest.mark.slow) if s >= 3 else s for s in range(6)]
  )
  def test_matches_plain_jax(self, seed):
    x, scale, gy, gx = _case(seed)
    norm = dict(eps=1e-6, interpret=self.INTERPRET)
    _close(rms_norm(x, scale, **norm), _reference(x, scale), x.dtype)

    def loss(fn):
      return lambda x, s: jnp.sum(fn(x, s).astype(jnp.float32) * gy.astype(jnp.float32))

    got = jax.grad(loss(lambda x, s: rms_norm(x, s, **norm)), (0, 1))(x, scale)
    want = jax.grad(loss(_reference), (0, 1))(x, scale)
    for a, b in zip(got, want, strict=True):
      _close(a, b, x.dtype)

    def loss_residual(fn):
      def f(x, s):
        x_pass, y = fn(x, s)
        return jnp.sum(x_pass.astype(jnp.float32) * gx.astype(jnp.float32)) + jnp.sum(
          y.astype(jnp.float32) * gy.astype(jnp.float32)
        )

      return f

    fused = loss_residual(lambda x, s: rms_norm_residual(x, s, **norm))
    got = jax.grad(fused, (0, 1))(x, scale)
    want = jax.grad(loss_residual(lambda x, s: (x, _reference(x, s))), (0, 1))(x, scale)
    for a, b in zip(got, want, strict=True):
      _close(a, b, x.dtype)
    x_pass, _ = rms_norm_residual(x, scale, **norm)
    np.testing.assert_array_equal(np.asarray(x_pass), np.asarray(x))


class TestNormInterpret(NormTest):
  INTERPRET = True


@pytest.mark.gpu
class TestNormGpu(NormTest):
  INTERPRET = False


def test_rejects_features_not_a_power_of_two():
  with pytest.raises(ValueError, match="features=48"):
    rms_norm(jnp.ones((4, 48)), jnp.ones((48,)), 1e-6, interpret=True)
  with pytest.raises(ValueError, match="d_model=48"):
    ModelConfig(d_model=48, norm_impl="pallas")
  with pytest.raises(ValueError, match="norm_impl='triton'"):
    ModelConfig(norm_impl="triton")


def _small(**kw):
  cfg = ModelConfig(
    vocab_size=97, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
    mlp_hidden=mlp_hidden_for(32), seq_len=48, compute_dtype="float32",
    attention=AttentionConfig(schedule="stagger", window=4, impl="xla", dense_impl="xla_dense"),
  )  # fmt: skip
  return dataclasses.replace(cfg, **kw)


def _loss(cfg, tokens):
  def loss(p):
    logits = M.Transformer(cfg).apply({"params": p}, tokens[:, :-1])
    return jnp.mean(
      jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, tokens[:, 1:, None], -1)[..., 0]
    )

  return loss


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_model_with_the_fused_norm_is_the_same_function(dtype):
  """norm_impl='pallas_interpret': the same parameters, loss and gradients as 'xla' in float32
  (to the rounding of the statistics); in bf16 as close to the float32 model's gradients as
  XLA's (the kernel adds the residual stream's cotangent in float32, XLA in bf16)."""
  cfg = _small(compute_dtype=dtype)
  fused = dataclasses.replace(cfg, norm_impl="pallas_interpret")
  tokens = jax.random.randint(jax.random.key(1), (2, 41), 0, 97)
  params = M.init_params(cfg, 0)
  assert jax.tree.structure(params) == jax.tree.structure(M.init_params(fused, 0))
  l_x, g_x = jax.jit(jax.value_and_grad(_loss(cfg, tokens)))(params)
  l_p, g_p = jax.jit(jax.value_and_grad(_loss(fused, tokens)))(params)
  g_ref = jax.jit(jax.grad(_loss(_small(), tokens)))(params)
  assert float(l_p) == pytest.approx(float(l_x), rel=1e-6 if dtype == "float32" else 1e-2)
  for a, b, ref in zip(*(jax.tree.leaves(g) for g in (g_p, g_x, g_ref)), strict=True):
    a, b, ref = (np.asarray(t, np.float32) for t in (a, b, ref))
    if dtype == "float32":
      np.testing.assert_allclose(a, b, atol=1e-5 * np.abs(b).max(), rtol=0)
    else:
      err_fused, err_xla = np.abs(a - ref).max(), np.abs(b - ref).max()
      assert err_fused <= 1.5 * err_xla + 1e-3 * np.abs(ref).max(), (err_fused, err_xla)


def test_fused_norm_takes_the_residual_cotangent_in_its_backward():
  """With the fused norm the residual stream's cotangent and the norm's never meet in an
  add outside the kernel: x has one consumer, `rms_norm_residual`, whose backward adds them;
  plain JAX's backward adds them in an `add_any` of [B, T, E], two a layer. The fused model's
  only such add is that of the MLP norm's output, which gate and up share (the q/k/v
  projections are one matmul: x's gradient comes out of it whole)."""
  tokens = jax.random.randint(jax.random.key(1), (2, 41), 0, 97)

  def residual_adds(cfg):
    params = M.init_params(cfg, 0)
    jaxpr = jax.make_jaxpr(jax.grad(_loss(cfg, tokens)))(params)
    adds = [
      e for e in _eqns(jaxpr.jaxpr)
      if e.primitive.name == "add_any" and e.outvars[0].aval.shape == (2, 40, 32)
    ]  # fmt: skip
    kernels = [
      e for e in _eqns(jaxpr.jaxpr)
      if e.primitive.name == "pallas_call" and "rms_norm_bwd" in str(e.params["name"])
    ]  # fmt: skip
    return len(adds), len(kernels)

  xla_adds, xla_kernels = residual_adds(_small())
  fused_adds, fused_kernels = residual_adds(_small(norm_impl="pallas_interpret"))
  assert fused_adds == 1 * 2 and fused_kernels == 5  # two norms a layer and the final one
  assert xla_adds > fused_adds and xla_kernels == 0


def _eqns(jaxpr):
  """Every equation of a jaxpr and of the jaxprs in its equations' parameters."""
  for e in jaxpr.eqns:
    yield e
    for v in e.params.values():
      for sub in v if isinstance(v, (tuple, list)) else (v,):
        inner = getattr(sub, "jaxpr", sub)
        if hasattr(inner, "eqns"):
          yield from _eqns(inner)


@pytest.mark.parametrize("data, model", [(8, 1), (2, 4)])
def test_fused_norm_runs_per_batch_shard_under_a_mesh(data, model):
  """Inside `attention.kernel_mesh` the kernel runs per batch shard (shard_map), the scale's
  gradient summed over devices: the same gradients as one device, no all-gather. A mesh that
  splits `model` runs the plain-JAX norm (no kernel, so no all-reduce of x's gradient)."""
  from fibax import attention
  from fibax.sharding import make_mesh

  cfg = _small(norm_impl="pallas_interpret")
  tokens = jax.random.randint(jax.random.key(3), (8, 41), 0, 97)
  params = M.init_params(cfg, 0)
  want = jax.jit(jax.grad(_loss(cfg, tokens)))(params)
  mesh = make_mesh(data=data, model=model)
  spec = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data", None))
  sharded = jax.device_put(tokens, spec)

  def grads(p, t):
    return jax.grad(_loss(cfg, t))(p)

  with attention.kernel_mesh(mesh):
    fn = jax.jit(grads)
    jaxpr = jax.make_jaxpr(grads)(params, tokens)
    hlo = fn.lower(params, sharded).compile().as_text()
    got = fn(params, sharded)
  kernels = [
    e for e in _eqns(jaxpr.jaxpr)
    if e.primitive.name == "pallas_call" and "rms_norm" in str(e.params["name"])
  ]  # fmt: skip
  assert len(kernels) == (10 if model == 1 else 0)  # forward and backward of five norms
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
  if model == 1:
    assert " all-gather(" not in hlo and "all-gather-start" not in hlo


def test_bad_impls_raise():
  """A misspelt impl, or a GPU kernel asked for on another backend: a one-line error."""
  x = jnp.ones((1, 4, 32))
  if jax.default_backend() != "gpu":
    with pytest.raises(ValueError, match="norm impl='pallas' is a GPU kernel; the backend is"):
      M.RMSNorm(1e-6, jnp.float32, "pallas").init(jax.random.key(0), x)
    with pytest.raises(ValueError, match="loss_lse='pallas' is a GPU kernel"):
      output_losses(
        x, jnp.ones((8, 32)), jnp.zeros((1, 4), jnp.int32), "compute", jnp.float32, "pallas"
      )
  with pytest.raises(ValueError, match="impl='triton'"):
    M.RMSNorm(1e-6, jnp.float32, "triton").init(jax.random.key(0), x)
  with pytest.raises(ValueError, match="loss_lse='fused'"):
    output_losses(
      x, jnp.ones((8, 32)), jnp.zeros((1, 4), jnp.int32), "compute", jnp.float32, "fused"
    )


def test_logsumexp_online_is_logsumexp_in_one_pass():
  x = jax.random.normal(jax.random.key(0), (3, 5, 1000)) * 30
  x = x.at[0, 0].set(-jnp.inf).at[0, 0, 7].set(4.0)  # one finite entry in a row
  x = x.at[1, 1, :500].set(-jnp.inf)
  want = jax.nn.logsumexp(x, axis=-1)
  np.testing.assert_allclose(np.asarray(logsumexp_online(x)), np.asarray(want), rtol=1e-6)
  assert float(logsumexp_online(x)[0, 0]) == 4.0
  xb = x.astype(jnp.bfloat16)
  want_b = jax.nn.logsumexp(xb.astype(jnp.float32), axis=-1)
  np.testing.assert_allclose(np.asarray(logsumexp_online(xb)), np.asarray(want_b), rtol=1e-6)
  # one reduction over the vocabulary (optax's: a max, then a sum)
  eqns = jax.make_jaxpr(logsumexp_online)(x).jaxpr.eqns
  assert [e.primitive.name for e in eqns].count("reduce") == 1
  assert not any(e.primitive.name in ("reduce_max", "reduce_sum") for e in eqns)


@pytest.mark.parametrize("lse", ["online", "pallas_interpret"])
def test_one_pass_losses_are_the_two_pass_loss(lse):
  """ModelConfig.loss_lse 'online' (XLA) and 'pallas' (the kernel): the same losses and
  gradients as 'two_pass' (float32 rounding), and a config error without
  logits_grad='compute'."""
  keys = jax.random.split(jax.random.key(4), 3)
  x = jax.random.normal(keys[0], (2, 16, 32), jnp.bfloat16)
  embed = jax.random.normal(keys[1], (300, 32), jnp.bfloat16)
  targets = jax.random.randint(keys[2], (2, 16), 0, 300)
  got, want = (
    jax.value_and_grad(
      lambda x, e, kind=kind: output_losses(x, e, targets, "compute", jnp.bfloat16, kind).mean(),
      (0, 1),
    )(x, embed)
    for kind in (lse, "two_pass")
  )
  assert float(got[0]) == pytest.approx(float(want[0]), rel=1e-6)
  for a, b in zip(got[1], want[1], strict=True):
    np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), atol=1e-2)
  with pytest.raises(ValueError, match="logits_grad='float32'"):
    ModelConfig(loss_lse=lse)
  with pytest.raises(ValueError, match="loss_lse='fused'"):
    ModelConfig(loss_lse="fused", logits_grad="compute")


@pytest.mark.parametrize("data, model", [(8, 1), (2, 4)])
def test_pallas_lse_runs_per_device_under_a_mesh(data, model):
  """Inside `attention.kernel_mesh` the log-sum-exp kernel runs per device, rows over `data`
  and the vocabulary over `model` (the shards' results combined): the one-device losses."""
  from fibax import attention
  from fibax.sharding import make_mesh

  keys = jax.random.split(jax.random.key(5), 3)
  x = jax.random.normal(keys[0], (8, 8, 32), jnp.bfloat16)
  embed = jax.random.normal(keys[1], (96, 32), jnp.bfloat16)
  targets = jax.random.randint(keys[2], (8, 8), 0, 96)

  def losses():  # a new function each time: jit caches traces by function, not by context
    return lambda x, e: output_losses(x, e, targets, "compute", jnp.bfloat16, "pallas_interpret")

  want = jax.jit(losses())(x, embed)
  mesh = make_mesh(data=data, model=model)
  with attention.kernel_mesh(mesh):
    jaxpr = str(jax.make_jaxpr(losses())(x, embed))
    got = jax.jit(losses())(x, embed)
  assert "shard_map" in jaxpr
  assert ("psum" in jaxpr) == (model > 1)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6)
