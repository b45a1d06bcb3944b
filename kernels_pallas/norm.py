"""RMSNorm for GPUs in one pass each way: a Pallas kernel lowered through Triton.

Shape key: N rows (batch x sequence), E features, R rows a program, P programs.

y = x * rsqrt(mean(x^2) + eps) * scale, statistics in float32, y in the caller's dtype.
XLA runs this as a reduction and then an elementwise pass (x read twice) and its backward as
several more passes; here the forward reads x once and writes y and the rows' rsqrt, and the
backward reads x, the rows' rsqrt and y's cotangent once and writes x's.

`rms_norm_residual` returns (x, y): x passed through for the residual stream, so that the
backward, given both cotangents, adds the residual's to the norm's input gradient in the same
pass (the add XLA would otherwise run as a pass of its own: in a pre-norm block the residual
stream's cotangent and the norm's meet at x). Measured in the paper model's train step on an
H200: experiments/results/speed_h200_52513de/.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu
from jaxtyping import Array, Float

# Elements of x a program holds (rows x E), in float32 registers of 4 warps: 8 rows of 512
# forward, 16 backward (fewer programs, so fewer partial sums of the scale's gradient).
_FWD_ELEMS = 4096
_BWD_ELEMS = 8192


def rms_norm_reference(
  x_NxE: Float[Array, "N E"], scale_E: Float[Array, " E"], eps: float, dtype=None
) -> Float[Array, "N E"]:
  """The same function in plain JAX (what `fibax.model.RMSNorm` runs without the kernel)."""
  x32 = x_NxE.astype(jnp.float32)
  x32 = x32 * lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
  return (x32 * scale_E[None, :]).astype(dtype or x_NxE.dtype)


def pow2_rows(num_rows: int, most: int) -> int:
  """The largest power of two <= `most` that divides N (Triton's blocks are powers of two)."""
  rows = 1 << (max(1, most).bit_length() - 1)
  while num_rows % rows:
    rows //= 2
  return rows


def _fwd_kernel(x_ref, scale_ref, y_ref, rstd_ref, *, eps):
  x_RxE = x_ref[...].astype(jnp.float32)
  rstd_R = lax.rsqrt(jnp.mean(x_RxE * x_RxE, axis=1) + eps)
  y_ref[...] = (x_RxE * rstd_R[:, None] * scale_ref[...][None, :]).astype(y_ref.dtype)
  rstd_ref[...] = rstd_R


def _bwd_kernel(*refs, residual):
  if residual:
    x_ref, scale_ref, rstd_ref, gy_ref, gx_ref, dx_ref, dscale_ref = refs
  else:
    x_ref, scale_ref, rstd_ref, gy_ref, dx_ref, dscale_ref = refs
  rstd_R = rstd_ref[...]
  xhat_RxE = x_ref[...].astype(jnp.float32) * rstd_R[:, None]
  gy_RxE = gy_ref[...].astype(jnp.float32)
  gs_RxE = gy_RxE * scale_ref[...][None, :]
  # d/dx of x * rstd(x): rstd * (g - xhat * mean(g * xhat)), g = gy * scale.
  c_R = jnp.mean(gs_RxE * xhat_RxE, axis=1)
  dx_RxE = rstd_R[:, None] * (gs_RxE - xhat_RxE * c_R[:, None])
  if residual:
    dx_RxE = dx_RxE + gx_ref[...].astype(jnp.float32)
  dx_ref[...] = dx_RxE.astype(dx_ref.dtype)
  dscale_ref[...] = jnp.sum(gy_RxE * xhat_RxE, axis=0)  # this program's rows' share


def _check(x_NxE, scale_E):
  n, e = x_NxE.shape
  if e & (e - 1):
    raise ValueError(f"features={e} must be a power of two for the Pallas RMSNorm (Triton blocks)")
  if scale_E.shape != (e,):
    raise ValueError(f"scale shape {scale_E.shape} does not match features={e}")
  return n, e


def _params(interpret):
  return None if interpret else plgpu.CompilerParams(num_warps=4, num_stages=1)


def _forward(x_NxE, scale_E, eps, dtype, interpret):
  n, e = _check(x_NxE, scale_E)
  rows = pow2_rows(n, _FWD_ELEMS // e)
  return pl.pallas_call(
    functools.partial(_fwd_kernel, eps=eps),
    grid=(n // rows,),
    in_specs=[pl.BlockSpec((rows, e), lambda i: (i, 0)), pl.BlockSpec((e,), lambda i: (0,))],
    out_specs=[pl.BlockSpec((rows, e), lambda i: (i, 0)), pl.BlockSpec((rows,), lambda i: (i,))],
    out_shape=[
      jax.ShapeDtypeStruct((n, e), dtype),
      jax.ShapeDtypeStruct((n,), jnp.float32),
    ],
    compiler_params=_params(interpret),
    interpret=interpret,
    name="rms_norm_fwd",
  )(x_NxE, scale_E)


def _backward(x_NxE, scale_E, rstd_N, gy_NxE, gx_NxE, interpret):
  n, e = x_NxE.shape
  rows = pow2_rows(n, _BWD_ELEMS // e)
  residual = gx_NxE is not None
  row_spec = pl.BlockSpec((rows, e), lambda i: (i, 0))
  dx_NxE, dscale_PxE = pl.pallas_call(
    functools.partial(_bwd_kernel, residual=residual),
    grid=(n // rows,),
    in_specs=[
      row_spec,
      pl.BlockSpec((e,), lambda i: (0,)),
      pl.BlockSpec((rows,), lambda i: (i,)),
      row_spec,
      *([row_spec] if residual else []),
    ],
    out_specs=[row_spec, pl.BlockSpec((None, e), lambda i: (i, 0))],
    out_shape=[
      jax.ShapeDtypeStruct((n, e), x_NxE.dtype),
      jax.ShapeDtypeStruct((n // rows, e), jnp.float32),
    ],
    compiler_params=_params(interpret),
    interpret=interpret,
    name="rms_norm_bwd",
  )(x_NxE, scale_E, rstd_N, gy_NxE, *([gx_NxE] if residual else []))
  return dx_NxE, jnp.sum(dscale_PxE, axis=0).astype(scale_E.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _norm(x_NxE, scale_E, eps, dtype, interpret):
  return _forward(x_NxE, scale_E, eps, dtype, interpret)[0]


def _norm_fwd(x_NxE, scale_E, eps, dtype, interpret):
  y_NxE, rstd_N = _forward(x_NxE, scale_E, eps, dtype, interpret)
  return y_NxE, (x_NxE, scale_E, rstd_N)


def _norm_bwd(eps, dtype, interpret, res, gy_NxE):
  return _backward(*res, gy_NxE, None, interpret)


_norm.defvjp(_norm_fwd, _norm_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _norm_residual(x_NxE, scale_E, eps, dtype, interpret):
  return x_NxE, _forward(x_NxE, scale_E, eps, dtype, interpret)[0]


def _norm_residual_fwd(x_NxE, scale_E, eps, dtype, interpret):
  y_NxE, rstd_N = _forward(x_NxE, scale_E, eps, dtype, interpret)
  return (x_NxE, y_NxE), (x_NxE, scale_E, rstd_N)


def _norm_residual_bwd(eps, dtype, interpret, res, cotangents):
  gx_NxE, gy_NxE = cotangents
  return _backward(*res, gy_NxE, gx_NxE.astype(res[0].dtype), interpret)


_norm_residual.defvjp(_norm_residual_fwd, _norm_residual_bwd)


def _rows(x):
  return x.reshape(-1, x.shape[-1])


def rms_norm(
  x: Float[Array, "... E"], scale_E: Float[Array, " E"], eps: float, dtype=None, *, interpret=False
) -> Float[Array, "... E"]:
  """RMSNorm over the last axis (E a power of two), y in `dtype` (default x's)."""
  dtype = jnp.dtype(dtype or x.dtype)
  return _norm(_rows(x), scale_E, float(eps), dtype, interpret).reshape(x.shape)


def rms_norm_residual(
  x: Float[Array, "... E"], scale_E: Float[Array, " E"], eps: float, dtype=None, *, interpret=False
) -> tuple[Float[Array, "... E"], Float[Array, "... E"]]:
  """(x, rms_norm(x)): x passed through for the residual stream; the backward adds its
  cotangent to the norm's input gradient in the kernel's one pass."""
  dtype = jnp.dtype(dtype or x.dtype)
  x_pass, y = _norm_residual(_rows(x), scale_E, float(eps), dtype, interpret)
  return x_pass.reshape(x.shape), y.reshape(x.shape)
