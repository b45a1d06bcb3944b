"""The decoder-only Transformer of the paper, in Flax linen.

Shape key: B batch, T sequence, E d_model, H query heads, K kv heads, D head dim,
F SwiGLU hidden, V vocabulary.

Each layer's attention pattern comes from the schedule (fibax.patterns) and is rebuilt
for the length the model is applied at, following the config's cap mode; applying the
model at a length other than its training length is the extrapolation experiment.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jaxtyping import Array, Float, Int

from fibax import attention, patterns
from fibax.config import ModelConfig


@functools.cache
def layer_patterns(
  cfg: ModelConfig, seq_len: int
) -> tuple[patterns.Pattern | patterns.LearnedPattern, ...]:
  """The per-layer patterns at run length `seq_len` (cached: built once per trace)."""
  att = cfg.attention
  if att.frozen_alphas is not None:
    if len(att.frozen_alphas) != cfg.num_layers:
      raise ValueError(f"frozen_alphas has {len(att.frozen_alphas)} values for {cfg.num_layers=}")
    return tuple(
      patterns.Pattern.build(
        base=att.base,
        alpha=a,
        window=att.window,
        seq_len=seq_len,
        train_len=cfg.seq_len,
        cap_mode=att.cap_mode,
        num_terms=att.num_terms,
      )
      for a in att.frozen_alphas
    )
  return patterns.model_patterns(
    base=att.base,
    schedule=att.schedule,
    window=att.window,
    num_layers=cfg.num_layers,
    seq_len=seq_len,
    train_len=cfg.seq_len,
    cap_mode=att.cap_mode,
    num_terms=att.num_terms,
  )


def _init(std: float, axes: tuple[str, ...]):
  return nn.with_logical_partitioning(nn.initializers.normal(stddev=std), axes)


class RMSNorm(nn.Module):
  eps: float
  dtype: jnp.dtype
  # `ModelConfig.norm_impl`: "xla" (plain JAX, XLA's fusions) or a fused Pallas kernel,
  # "pallas" (GPU) / "pallas_interpret" (its interpreter): the same function.
  impl: str = "xla"

  @nn.compact
  def __call__(self, x_BxTxE: Array, residual: bool = False):
    """The normalized x in `dtype`; with `residual`, (x, that): x passed on for the residual
    stream, whose cotangent the fused backward adds in its own pass."""
    scale_E = self.param(
      "scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)), (x_BxTxE.shape[-1],)
    )
    if self.impl == "xla":
      y_BxTxE = _rms_norm_xla(x_BxTxE, scale_E, self.eps, self.dtype)
      return (x_BxTxE, y_BxTxE) if residual else y_BxTxE
    return _rms_norm_pallas(x_BxTxE, scale_E, self.eps, self.dtype, self.impl, residual)


def _rms_norm_xla(x_BxTxE, scale_E, eps, dtype):
  x32 = x_BxTxE.astype(jnp.float32)
  x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
  return (x32 * scale_E[None, None, :]).astype(dtype)


def _rms_norm_pallas(x_BxTxE, scale_E, eps, dtype, impl, residual):
  """`kernels_pallas.norm`'s RMSNorm; inside `attention.kernel_mesh`, per batch shard (a
  custom call XLA's partitioner cannot split), the scale whole on every device. On a mesh
  that splits `model` the plain-JAX norm runs instead: each `model` device would run the
  kernel on the same rows, and shard_map's backward would all-reduce x's gradient over
  `model` (one more all-reduce of the residual stream a norm)."""
  from fibax.sharding import DATA, MODEL
  from kernels_pallas import norm

  if impl not in ("pallas", "pallas_interpret"):
    raise ValueError(f"norm impl={impl!r} must be 'xla', 'pallas' or 'pallas_interpret'")
  if impl == "pallas" and jax.default_backend() != "gpu":
    raise ValueError(f"norm impl='pallas' is a GPU kernel; the backend is {jax.default_backend()}")
  mesh = attention.traced_mesh()
  if mesh is not None and mesh.shape[MODEL] > 1:
    y_BxTxE = _rms_norm_xla(x_BxTxE, scale_E, eps, dtype)
    return (x_BxTxE, y_BxTxE) if residual else y_BxTxE
  fn = norm.rms_norm_residual if residual else norm.rms_norm
  fn = functools.partial(fn, eps=eps, dtype=dtype, interpret=impl == "pallas_interpret")
  if mesh is None or mesh.shape[DATA] == 1 or x_BxTxE.shape[0] % mesh.shape[DATA]:
    return fn(x_BxTxE, scale_E)
  P = jax.sharding.PartitionSpec
  rows = P(DATA, None, None)
  # check_vma=False: pallas_call has no replication rule; the scale's cotangent is then summed
  # over the devices, which is its gradient.
  return jax.shard_map(
    fn, mesh=mesh, in_specs=(rows, P()), out_specs=(rows, rows) if residual else rows,
    check_vma=False,
  )(x_BxTxE, scale_E)  # fmt: skip


def rope(x_BxTxHxD: Array, theta: float, positions_BxT: Array | None = None) -> Array:
  """Rotary position embedding (rotate-half form), angles in float32; positions 0 .. T-1
  unless given (decoding one token at each row's own position)."""
  seq_len, head_dim = x_BxTxHxD.shape[1], x_BxTxHxD.shape[3]
  inv_freq = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
  if positions_BxT is None:
    positions_BxT = jnp.arange(seq_len, dtype=jnp.float32)[None, :]
  ang_BxTxD2 = positions_BxT.astype(jnp.float32)[:, :, None] * inv_freq[None, None, :]
  cos, sin = jnp.cos(ang_BxTxD2)[:, :, None, :], jnp.sin(ang_BxTxD2)[:, :, None, :]
  x1, x2 = jnp.split(x_BxTxHxD.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_BxTxHxD.dtype)


class _Kernel(nn.Module):
  """`nn.DenseGeneral`'s kernel [E, *features] (its name, shape, initialization: drawn as
  [E, prod(features)] and reshaped, and partitioning) for a matmul the caller runs."""

  features: tuple[int, ...]
  std: float
  axes: tuple[str, ...]

  @nn.compact
  def __call__(self, in_features: int) -> Array:
    def init(key, shape, dtype=jnp.float32):
      flat = nn.initializers.normal(stddev=self.std)(
        key, (shape[0], int(np.prod(shape[1:]))), dtype
      )
      return flat.reshape(shape)

    shape = (in_features, *self.features)
    return self.param("kernel", nn.with_logical_partitioning(init, self.axes), shape, jnp.float32)


def _project_qkv(x_BxTxE: Array, kernels: list[Array], dtype) -> list[Array]:
  """x @ W for the query, key and value kernels [E, n, D]: one matmul against them side by
  side, so that its backward forms x's gradient in one matmul too (three, as XLA runs them,
  meet in an add that a fused norm's backward cannot take in: 0.42 ms a step at T = 1,024 on
  an H200), unless the heads are split over a `model` mesh axis (each kernel then stays
  where it lives)."""
  from fibax.sharding import MODEL

  x_BxTxE = x_BxTxE.astype(dtype)
  mesh = attention.traced_mesh()
  if mesh is not None and mesh.shape[MODEL] > 1:
    return [jnp.einsum("bte,end->btnd", x_BxTxE, w.astype(dtype)) for w in kernels]
  widths = [int(np.prod(w.shape[1:])) for w in kernels]
  w_ExN = jnp.concatenate([w.reshape(w.shape[0], -1) for w in kernels], axis=1).astype(dtype)
  qkv_BxTxN = jnp.einsum("bte,en->btn", x_BxTxE, w_ExN)
  parts = jnp.split(qkv_BxTxN, np.cumsum(widths)[:-1], axis=-1)
  return [p.reshape(*p.shape[:2], *w.shape[1:]) for p, w in zip(parts, kernels, strict=True)]


class Attention(nn.Module):
  cfg: ModelConfig
  pattern: patterns.Pattern | patterns.LearnedPattern

  @nn.compact
  def __call__(self, x_BxTxE: Array) -> Array:
    cfg, dtype = self.cfg, jnp.dtype(self.cfg.compute_dtype)
    std = cfg.d_model**-0.5
    kernels = [
      _Kernel((n, cfg.head_dim), std, ("embed", axis, "kv"), name=name)(x_BxTxE.shape[-1])
      for name, n, axis in (
        ("query", cfg.num_heads, "heads"),
        ("key", cfg.num_kv_heads, "kv_heads"),
        ("value", cfg.num_kv_heads, "kv_heads"),
      )
    ]
    q_BxTxHxD, k_BxTxKxD, v_BxTxKxD = _project_qkv(x_BxTxE, kernels, dtype)
    q_BxTxHxD = rope(q_BxTxHxD, cfg.rope_theta)
    k_BxTxKxD = rope(k_BxTxKxD, cfg.rope_theta)
    # Keys (after RoPE) and values, collected only when asked for (fibax.generate's prefill).
    self.sow("intermediates", "kv", (k_BxTxKxD, v_BxTxKxD))

    alpha = None
    if isinstance(self.pattern, patterns.LearnedPattern):
      # the paper: alpha = 0.5 + sigmoid(theta), theta initialised at 0 (alpha = 1).
      theta = self.param("theta", nn.with_logical_partitioning(nn.initializers.zeros, ()), ())
      alpha = 0.5 + jax.nn.sigmoid(theta)
      self.sow("intermediates", "alpha", alpha)
    with attention.config_gpu_blocks(cfg.attention.gpu_blocks):
      o_BxTxHxD = attention.attend(
        q_BxTxHxD, k_BxTxKxD, v_BxTxKxD, self.pattern,
        cfg.attention.impl, cfg.attention.dense_impl, alpha, cfg.attention.learned_window,
      )  # fmt: skip

    # the paper: residual output projections further scaled by 1/sqrt(2L).
    out_std = std / np.sqrt(2 * cfg.num_layers)
    return nn.DenseGeneral(
      cfg.d_model,
      axis=(-2, -1),
      use_bias=False,
      dtype=dtype,
      param_dtype=jnp.float32,
      kernel_init=_init(out_std, ("heads", "kv", "embed")),
      name="out",
    )(o_BxTxHxD.astype(dtype))


class _PaddedDense(nn.Module):
  """`nn.Dense` without bias (the same parameter, name, shape, init and computation) whose
  float32 kernel [I, O] enters the matmul zero-padded to [I + pad_in, O + pad_out]: on inputs
  whose extra columns are zero, the same outputs in the first O columns and zeros in the rest."""

  features: int
  pad_in: int
  pad_out: int
  kernel_init: nn.initializers.Initializer
  dtype: jnp.dtype

  @nn.compact
  def __call__(self, x: Array) -> Array:
    shape = (x.shape[-1] - self.pad_in, self.features)
    kernel = self.param("kernel", self.kernel_init, shape, jnp.float32)
    x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
    if self.pad_in or self.pad_out:
      kernel = jnp.pad(kernel, ((0, self.pad_in), (0, self.pad_out)))
    return lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())))


class SwiGLU(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BxTxE: Array) -> Array:
    cfg, dtype = self.cfg, jnp.dtype(self.cfg.compute_dtype)
    std = cfg.d_model**-0.5
    pad = -cfg.mlp_hidden % cfg.mlp_pad if cfg.mlp_pad else 0  # model.mlp_pad
    wide = functools.partial(_PaddedDense, pad_in=0, pad_out=pad, dtype=dtype)
    gate_BxTxF = wide(cfg.mlp_hidden, kernel_init=_init(std, ("embed", "mlp")), name="gate")(
      x_BxTxE
    )
    up_BxTxF = wide(cfg.mlp_hidden, kernel_init=_init(std, ("embed", "mlp")), name="up")(x_BxTxE)
    out_std = std / np.sqrt(2 * cfg.num_layers)
    down = _PaddedDense(cfg.d_model, pad, 0, _init(out_std, ("mlp", "embed")), dtype, name="down")
    return down(nn.silu(gate_BxTxF) * up_BxTxF)


class Block(nn.Module):
  cfg: ModelConfig
  pattern: patterns.Pattern | patterns.LearnedPattern

  @nn.compact
  def __call__(self, x_BxTxE: Array) -> Array:
    cfg, dtype = self.cfg, jnp.dtype(self.cfg.compute_dtype)
    norm = functools.partial(RMSNorm, cfg.norm_eps, dtype, cfg.norm_impl)
    x_BxTxE, h_BxTxE = norm(name="attn_norm")(x_BxTxE, residual=True)
    x_BxTxE = x_BxTxE + Attention(cfg, self.pattern, name="attn")(h_BxTxE)
    x_BxTxE, h_BxTxE = norm(name="mlp_norm")(x_BxTxE, residual=True)
    return x_BxTxE + SwiGLU(cfg, name="mlp")(h_BxTxE)


_REMAT_POLICIES = {
  "block": jax.checkpoint_policies.nothing_saveable,
  "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def _remat_block(remat: str):
  """Block, or Block under `nn.remat` with the policy of `ModelConfig.remat` (the same
  parameter names either way, so checkpoints do not depend on it)."""
  if remat == "none":
    return Block
  return nn.remat(Block, policy=_REMAT_POLICIES[remat])


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _lookup(table_VxE: Array, tokens_BxT: Array, backward: str) -> Array:
  """table[tokens], whose gradient is formed without a scatter-add over repeated ids
  (`ModelConfig.embed_backward`): real text repeats tokens, and a GPU scatter-add then
  serializes on the repeated rows. "onehot": one-hot(tokens)^T @ g, a float32-accumulated
  matmul; "sorted": `embedding_grad_sorted`."""
  del backward
  return jnp.take(table_VxE, tokens_BxT, axis=0)


def _lookup_fwd(table_VxE, tokens_BxT, backward):
  return _lookup(table_VxE, tokens_BxT, backward), (tokens_BxT, table_VxE.shape[0])


def _lookup_bwd(backward, res, g_BxTxE):
  tokens_BxT, vocab = res
  if backward == "sorted":
    d_VxE = _embedding_grad_sorted_sharded(tokens_BxT, g_BxTxE, vocab)
  else:
    onehot_BxTxV = jax.nn.one_hot(tokens_BxT, vocab, dtype=g_BxTxE.dtype)
    d_VxE = jnp.einsum("btv,bte->ve", onehot_BxTxV, g_BxTxE, preferred_element_type=jnp.float32)
  return d_VxE.astype(g_BxTxE.dtype), None


_lookup.defvjp(_lookup_fwd, _lookup_bwd)


def _embedding_grad_sorted_sharded(tokens_BxT: Array, g_BxTxE: Array, vocab: int) -> Array:
  """`embedding_grad_sorted` of all rows; inside `attention.kernel_mesh` (a train step over
  several devices), each device sorts its own batch rows and the tables are summed over the
  `data` axis, so no device gathers the global batch."""
  from fibax.sharding import DATA

  def rows(t_BxT, g):
    return embedding_grad_sorted(t_BxT.reshape(-1), g.reshape(-1, g.shape[-1]), vocab)

  mesh = attention.traced_mesh()
  if mesh is None or mesh.shape[DATA] == 1 or tokens_BxT.shape[0] % mesh.shape[DATA]:
    return rows(tokens_BxT, g_BxTxE)
  P = jax.sharding.PartitionSpec
  return jax.shard_map(
    lambda t, g: lax.psum(rows(t, g), DATA),
    mesh=mesh,
    in_specs=(P(DATA, None), P(DATA, None, None)),
    out_specs=P(),
  )(tokens_BxT, g_BxTxE)


def embedding_grad_sorted(ids_N: Array, g_NxE: Array, vocab: int, block: int = 128) -> Array:
  """sum of g's rows by id, [vocab, E] float32, with no two writes to one row.

  The rows are sorted by id and cut into blocks of `block`; in each block a one-hot matmul
  (float32-accumulated) sums the rows of each of its ids into one slot. An id whose rows run
  over several blocks has its partial sums carried forward, block to block, by an associative
  scan, into the slot of the last block it reaches; the slots, now of distinct ids, are then
  stored (not added) into the table. The cost is a sort of N ids plus O(N * block * E) FLOPs
  (`block` fixed: linear in N) whatever the ids, and the result does not depend on the order
  of atomics: the same inputs give the same bits."""
  index_S, sums_SxE = _sorted_slots(ids_N, g_NxE, vocab, block)
  out_VxE = jnp.zeros((vocab, g_NxE.shape[1]), jnp.float32)
  return out_VxE.at[index_S].set(sums_SxE, mode="drop", unique_indices=True)


def _sorted_slots(ids_N: Array, g_NxE: Array, vocab: int, block: int) -> tuple[Array, Array]:
  """`embedding_grad_sorted`'s slots: their table rows, distinct (a slot with nothing to store
  has an index past the table, of its own), and their float32 sums."""
  n, e = g_NxE.shape
  ids_N = ids_N.astype(jnp.int32)  # unsigned ids would wrap the -1 of unused slots below
  pad = -n % block
  order = jnp.argsort(ids_N, stable=True)
  sid_N = jnp.concatenate([ids_N[order], jnp.full((pad,), vocab, jnp.int32)])
  xs_N = jnp.concatenate([g_NxE[order], jnp.zeros((pad, e), g_NxE.dtype)])
  nb = sid_N.shape[0] // block
  sid_BxR, xs_BxRxE = sid_N.reshape(nb, block), xs_N.reshape(nb, block, e)
  starts_BxR = jnp.concatenate([jnp.ones((nb, 1), bool), sid_BxR[:, 1:] != sid_BxR[:, :-1]], axis=1)
  slot_BxR = jnp.cumsum(starts_BxR, axis=1) - 1  # a row's slot: its id's rank in the block
  onehot_BxRxS = slot_BxR[..., None] == jnp.arange(block)[None, None]
  sums_BxSxE = jnp.einsum(
    "brs,bre->bse",
    onehot_BxRxS.astype(g_NxE.dtype),
    xs_BxRxE,
    preferred_element_type=jnp.float32,
    # float32 g: not rounded to TF32 on a GPU; bf16 g: the measured bf16 matmul
    precision=lax.Precision.HIGHEST if g_NxE.dtype == jnp.float32 else None,
  )
  slot_id_BxS = jnp.max(jnp.where(onehot_BxRxS, sid_BxR[..., None], -1), axis=1)
  last_B = slot_BxR[:, -1]  # the block's last used slot, which holds its last row's id
  # cont[b]: block b's first id continues block b-1's last one (padding never continues).
  cont_B = jnp.concatenate(
    [jnp.zeros((1,), bool), (sid_BxR[1:, 0] == sid_BxR[:-1, -1]) & (sid_BxR[1:, 0] < vocab)]
  )
  tail_BxE = jnp.take_along_axis(sums_BxSxE, last_B[:, None, None], axis=1)[:, 0]
  # carry[b] = cont[b] * (tail[b-1] + (block b-1 is one slot) * carry[b-1]): an affine scan.
  a_B = (cont_B[1:] & (last_B[:-1] == 0)).astype(jnp.float32)
  b_BxE = cont_B[1:, None] * tail_BxE[:-1]

  def compose(first, second):
    (a1, b1), (a2, b2) = first, second
    return a1 * a2, a2[..., None] * b1 + b2

  if nb > 1:
    _, carry_BxE = jax.lax.associative_scan(compose, (a_B, b_BxE))
    sums_BxSxE = sums_BxSxE.at[1:, 0].add(carry_BxE)
  # Nothing to store: an unused slot (-1), the padding's (vocab), or a block's last slot when
  # the next block continues its id (its sum moved on with the carry).
  moved_B = jnp.concatenate([cont_B[1:], jnp.zeros((1,), bool)])
  last_BxS = jnp.arange(block)[None] == last_B[:, None]
  dropped_BxS = (slot_id_BxS < 0) | (slot_id_BxS >= vocab) | (last_BxS & moved_B[:, None])
  past_BxS = vocab + jnp.arange(nb * block).reshape(nb, block)  # one index each, all distinct
  index_BxS = jnp.where(dropped_BxS, past_BxS, slot_id_BxS)
  return index_BxS.reshape(-1), sums_BxSxE.reshape(-1, e)


class Transformer(nn.Module):
  """Tied-embedding decoder; logits in float32."""

  cfg: ModelConfig

  @nn.compact
  def __call__(
    self,
    tokens_BxT: Int[Array, "B T"],
    logits_at_B: Array | None = None,
    output_layer: bool = True,
  ) -> Float[Array, "B T V"]:
    """Logits at every position, or only at `logits_at_B[b]` of each row ([B, 1, V]: a
    prompt's last position, without the [B, T, V] tensor). Without the `output_layer`: the
    final normalized states [B, T, E] and the tied output matrix [V, E] in the compute dtype,
    for a loss that forms the logits a chunk at a time."""
    cfg, dtype = self.cfg, jnp.dtype(self.cfg.compute_dtype)
    embed = nn.Embed(
      cfg.vocab_size,
      cfg.d_model,
      dtype=dtype,
      param_dtype=jnp.float32,
      embedding_init=_init(cfg.d_model**-0.5, ("vocab", "embed")),
      name="embed",
    )
    if cfg.embed_backward in ("onehot", "sorted"):
      x_BxTxE = _lookup(embed.embedding.astype(dtype), tokens_BxT, cfg.embed_backward)
    elif cfg.embed_backward == "scatter_f32":  # the cast after the gather: f32 cotangents
      x_BxTxE = jnp.take(embed.embedding, tokens_BxT, axis=0).astype(dtype)
    else:
      x_BxTxE = embed(tokens_BxT)
    block = _remat_block(cfg.remat)
    for layer, pattern in enumerate(layer_patterns(cfg, tokens_BxT.shape[1])):
      x_BxTxE = block(cfg, pattern, name=f"layer_{layer}")(x_BxTxE)
    if logits_at_B is not None:
      x_BxTxE = jnp.take_along_axis(x_BxTxE, logits_at_B[:, None, None], axis=1)
    x_BxTxE = RMSNorm(cfg.norm_eps, dtype, cfg.norm_impl, name="final_norm")(x_BxTxE)
    if not output_layer:
      return x_BxTxE, embed.embedding.astype(dtype)
    logits = output_logits(
      x_BxTxE, embed.embedding.astype(dtype), cfg.logits_grad, logits_dtype(cfg)
    )
    return logits.astype(jnp.float32)


def logits_dtype(cfg: ModelConfig) -> jnp.dtype:
  """The dtype the output layer writes its logits in (`ModelConfig.logits_dtype`)."""
  return jnp.dtype(jnp.float32 if cfg.logits_dtype == "float32" else cfg.compute_dtype)


def output_logits(
  x_BxTxE: Array, embed_VxE: Array, grad: str = "float32", dtype=jnp.float32
) -> Float[Array, "B T V"]:
  """The tied output layer: logits in `dtype` (the matmul accumulated in float32;
  `ModelConfig.logits_dtype`). `grad="compute"`: the backward rounds their cotangent to the
  inputs' dtype before its two matmuls (`ModelConfig.logits_grad`)."""
  dtype = jnp.dtype(dtype)
  if grad == "compute":
    return _logits_compute_grad(x_BxTxE, embed_VxE, dtype)
  return _logits(x_BxTxE, embed_VxE, dtype)


def _logits(x_BxTxE: Array, embed_VxE: Array, dtype=jnp.float32) -> Array:
  return jnp.einsum("bte,ve->btv", x_BxTxE, embed_VxE, preferred_element_type=dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _logits_compute_grad(x_BxTxE: Array, embed_VxE: Array, dtype) -> Array:
  return _logits(x_BxTxE, embed_VxE, dtype)


def _logits_fwd(x_BxTxE, embed_VxE, dtype):
  return _logits(x_BxTxE, embed_VxE, dtype), (x_BxTxE, embed_VxE)


def _logits_bwd(dtype, res, g_BxTxV):
  x_BxTxE, embed_VxE = res
  return logits_input_grads(g_BxTxV.astype(x_BxTxE.dtype), x_BxTxE, embed_VxE)


def logits_input_grads(g_BxTxV: Array, x_BxTxE: Array, embed_VxE: Array) -> tuple[Array, Array]:
  """(dx, d embed) of the tied output layer for the logits' cotangent in the compute dtype:
  its two matmuls at that dtype's rate, accumulated in float32."""
  dx = jnp.einsum("btv,ve->bte", g_BxTxV, embed_VxE, preferred_element_type=jnp.float32)
  de = jnp.einsum("btv,bte->ve", g_BxTxV, x_BxTxE, preferred_element_type=jnp.float32)
  return dx.astype(x_BxTxE.dtype), de.astype(embed_VxE.dtype)


_logits_compute_grad.defvjp(_logits_fwd, _logits_bwd)


def _init_boxed(cfg: ModelConfig, key: Array):
  return Transformer(cfg).init(key, jnp.zeros((1, cfg.seq_len), jnp.int32))["params"]


def abstract_params(cfg: ModelConfig):
  """The parameters' shapes and dtypes (`ShapeDtypeStruct`s, still boxed with their logical
  partitioning for `fibax.sharding`), without computing anything."""
  return jax.eval_shape(functools.partial(_init_boxed, cfg), jax.random.key(0))


def init_params(cfg: ModelConfig, key: Array | int = 0):
  """Freshly initialised parameters (unboxed) from a key or an integer seed."""
  if isinstance(key, int):
    key = jax.random.key(key)
  return nn.meta.unbox(jax.jit(_init_boxed, static_argnums=0)(cfg, key))


def count_params(params) -> tuple[int, int]:
  """(total, non-embedding) parameter counts; the learned thetas count as non-embedding."""
  leaves = jax.tree_util.tree_leaves_with_path(nn.meta.unbox(params))
  total = sum(int(np.prod(x.shape)) for _, x in leaves)
  embed = sum(int(np.prod(x.shape)) for path, x in leaves if "embed" in jax.tree_util.keystr(path))
  return total, total - embed


def learned_alphas(params, cfg: ModelConfig) -> tuple[float, ...]:
  """The per-layer alphas of a learned-schedule model, 0.5 + sigmoid(theta)."""
  p = nn.meta.unbox(params)
  return tuple(
    float(0.5 + jax.nn.sigmoid(p[f"layer_{i}"]["attn"]["theta"])) for i in range(cfg.num_layers)
  )
