"""The float32 oracle that every kernel is tested against, with the kernels' signature.

Shape key: B batch, T sequence, H query heads, K kv heads, D head dim.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from fibax.patterns import Pattern

LOG2E = 1.4426950408889634  # log2(e): the GPU kernels' softmax in base 2

# The one mask value of every attention path (oracle, XLA, learned, Pallas GPU and TPU, decode):
# large, finite and negative. Finite (as the paper's §3 asks of the learned path) so that a
# fully masked tile of an online softmax gives exp(0) = 1 instead of exp(-inf + inf) = NaN;
# the first real score then resets the accumulators through exp(MASK_VALUE - m) = 0, and every
# row attends d = 0, so one comes. Softmax weights and gradients of masked entries are 0.
MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)


def check_qkv(q: Array, k: Array, v: Array) -> int:
  """Validates q [B,T,H,D], k/v [B,T,K,D]; returns G = H // K."""
  if q.ndim != 4 or k.ndim != 4 or k.shape != v.shape:
    raise ValueError(f"expected q [B,T,H,D], k/v [B,T,K,D]; got {q.shape=} {k.shape=} {v.shape=}")
  if q.shape[0] != k.shape[0] or q.shape[1] != k.shape[1] or q.shape[3] != k.shape[3]:
    raise ValueError(f"q and k disagree on B, T or D: {q.shape=} {k.shape=}")
  num_heads, num_kv = q.shape[2], k.shape[2]
  if num_heads % num_kv:
    raise ValueError(f"{num_heads=} query heads are not divisible by {num_kv=} kv heads")
  return num_heads // num_kv


def fib_attention_reference(
  q: Float[Array, "B T H D"],
  k: Float[Array, "B T K D"],
  v: Float[Array, "B T K D"],
  pattern: Pattern,
) -> Float[Array, "B T H D"]:
  """Float32 dense scores [B, H, T, T] masked with `pattern.mask`: the oracle."""
  groups = check_qkv(q, k, v)
  seq_len, head_dim = q.shape[1], q.shape[3]
  q_BxTxHxD = q.astype(jnp.float32)
  k_BxTxHxD = jnp.repeat(k.astype(jnp.float32), groups, axis=2)
  v_BxTxHxD = jnp.repeat(v.astype(jnp.float32), groups, axis=2)
  s_BxHxTxT = jnp.einsum(
    "bthd,bshd->bhts", q_BxTxHxD, k_BxTxHxD, precision=jax.lax.Precision.HIGHEST
  ) / np.sqrt(head_dim)
  s_BxHxTxT = jnp.where(jnp.asarray(pattern.mask(seq_len)), s_BxHxTxT, MASK_VALUE)
  p_BxHxTxT = jax.nn.softmax(s_BxHxTxT, axis=-1)
  o_BxTxHxD = jnp.einsum(
    "bhts,bshd->bthd", p_BxHxTxT, v_BxTxHxD, precision=jax.lax.Precision.HIGHEST
  )
  return o_BxTxHxD.astype(q.dtype)
