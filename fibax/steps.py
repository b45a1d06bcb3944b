"""The train state, its shardings, the jitted init / train steps, and the jitted NLL sum that
evaluation and training's validation loss share.

Shape key: B global batch, A gradient-accumulation microbatches, T sequence, V vocabulary.

Shardings follow the flax lm1b recipe: `jax.eval_shape(model.init)` gives the parameters'
logical axes, the rules of fibax.sharding turn them into `NamedSharding`s, the optimizer
state inherits them leaf by leaf (`optax.tree_map_params`), and `jax.jit(init,
out_shardings=...)` creates every array where it lives.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import struct
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from fibax import attention, sharding
from fibax import model as model_lib
from fibax.config import ModelConfig, RunConfig
from fibax.model import Transformer
from fibax.optim import lr_schedule, make_optimizer


class TrainState(struct.PyTreeNode):
  step: jax.Array  # int32[]
  params: Any
  opt_state: Any


def params_state(cfg: ModelConfig, mesh: Mesh) -> TrainState:
  """The step and the parameters of a train state as ShapeDtypeStructs with their shardings on
  `mesh`, without the optimizer's state (None): what evaluation restores."""
  boxed = model_lib.abstract_params(cfg)
  params = jax.tree.map(
    lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
    nn.meta.unbox(boxed),
    sharding.param_shardings(boxed, mesh),
  )
  step = jax.ShapeDtypeStruct((), jnp.int32, sharding=sharding.replicated(mesh))
  return TrainState(step=step, params=params, opt_state=None)


@dataclasses.dataclass(frozen=True)
class Steps:
  """Everything jitted for one run; build with `make_steps`."""

  model: Transformer
  abstract_state: TrainState  # ShapeDtypeStructs carrying their shardings (for restore)
  init: Any  # (seed: int) -> TrainState
  train: Any  # (TrainState, batch) -> (TrainState, {"loss", "grad_norm", "lr"})


def token_losses(params, model: Transformer, inputs_BxT, targets_BxT):
  """Cross-entropy at every position, float32[B, T]; with `model.cfg.loss_chunk` = C > 0 the
  logits exist only [B, C, V] at a time (`chunked_losses`)."""
  chunk, grad, lse = model.cfg.loss_chunk, model.cfg.logits_grad, model.cfg.loss_lse
  dtype = model_lib.logits_dtype(model.cfg)
  if not chunk and grad == "float32" and dtype == jnp.float32:
    logits_BxTxV = model.apply({"params": params}, inputs_BxT)
    return optax.softmax_cross_entropy_with_integer_labels(logits_BxTxV, targets_BxT)
  x_BxTxE, embed_VxE = model.apply({"params": params}, inputs_BxT, output_layer=False)
  if not chunk:
    return output_losses(x_BxTxE, embed_VxE, targets_BxT, grad, dtype, lse)
  return chunked_losses(x_BxTxE, embed_VxE, targets_BxT, chunk, grad, dtype, lse)


def output_losses(
  x_BxTxE, embed_VxE, targets_BxT, logits_grad: str = "float32", logits_dtype=jnp.float32,
  loss_lse: str = "two_pass",
):  # fmt: skip
  """The tied output layer and its cross-entropy, float32[B, T], of logits written in
  `logits_dtype` (`ModelConfig.logits_dtype`) and read as float32. `logits_grad="compute"`:
  one custom VJP for both (`_losses_compute_grad`), the same forward, its log-sum-exp in two
  passes or one (`ModelConfig.loss_lse`)."""
  logits_dtype = jnp.dtype(logits_dtype)
  if loss_lse != "two_pass" and loss_lse not in _LSE:
    raise ValueError(f"loss_lse={loss_lse!r} must be 'two_pass' or one of {sorted(_LSE)}")
  if logits_grad == "compute":
    # The mesh as an argument: custom_vjp caches its traces by their arguments, not by the
    # context a kernel's shard_map reads.
    mesh = attention.traced_mesh() if loss_lse.startswith("pallas") else None
    return _losses_compute_grad(x_BxTxE, embed_VxE, targets_BxT, logits_dtype, loss_lse, mesh)
  if loss_lse != "two_pass":
    raise ValueError(f"loss_lse={loss_lse!r} needs logits_grad='compute'")
  logits_BxTxV = model_lib.output_logits(x_BxTxE, embed_VxE, logits_grad, logits_dtype)
  return optax.softmax_cross_entropy_with_integer_labels(
    logits_BxTxV.astype(jnp.float32), targets_BxT
  )


def logsumexp_online(x_NxV: jax.Array) -> jax.Array:
  """log sum exp over the last axis in float32, in one pass over x: a reduction of running
  (max, sum) pairs, each pair rescaled to the larger max (one exp an entry, as the two-pass
  form's sum takes; the online softmax's normalizer, Milakov & Gimelshein 2018)."""
  x32 = x_NxV.astype(jnp.float32)

  def combine(a, b):
    (m_a, s_a), (m_b, s_b) = a, b
    # exp(smaller max - larger max); 0 apart where both are -inf (the reduction's init).
    e = jnp.exp(jnp.where(m_a == m_b, 0.0, -jnp.abs(m_a - m_b)))
    return jnp.maximum(m_a, m_b), jnp.where(m_a >= m_b, s_a + s_b * e, s_b + s_a * e)

  init = (jnp.array(-jnp.inf, jnp.float32), jnp.array(0.0, jnp.float32))
  m, s = jax.lax.reduce((x32, jnp.ones_like(x32)), init, combine, (x32.ndim - 1,))
  return m + jnp.log(s)


def _logsumexp_pallas(logits_BxTxV: jax.Array, mesh, interpret: bool = False) -> jax.Array:
  """`kernels_pallas.logsumexp` of the logits; on a `mesh` (`attention.kernel_mesh`'s), per
  device (a custom call XLA's partitioner cannot split): rows split over `data`, the
  vocabulary over `model` where they divide, each shard's log-sum-exp then combined over
  `model`."""
  from kernels_pallas.logsumexp import logsumexp

  if not interpret and jax.default_backend() != "gpu":
    raise ValueError(f"loss_lse='pallas' is a GPU kernel; the backend is {jax.default_backend()}")
  fn = functools.partial(logsumexp, interpret=interpret)
  if mesh is None:
    return fn(logits_BxTxV)
  bsz, _, vocab = logits_BxTxV.shape
  data = sharding.DATA if bsz % mesh.shape[sharding.DATA] == 0 else None
  split = vocab % mesh.shape[sharding.MODEL] == 0 and mesh.shape[sharding.MODEL] > 1
  model = sharding.MODEL if split else None

  def per_device(x_BxTxV):
    lse_BxT = fn(x_BxTxV)
    if model is None:
      return lse_BxT
    m_BxT = jax.lax.pmax(lse_BxT, model)
    m_BxT = jnp.where(jnp.isfinite(m_BxT), m_BxT, 0.0)  # every shard -inf: -inf, not NaN
    return m_BxT + jnp.log(jax.lax.psum(jnp.exp(lse_BxT - m_BxT), model))

  return jax.shard_map(
    per_device, mesh=mesh, in_specs=PartitionSpec(data, None, model),
    out_specs=PartitionSpec(data, None), check_vma=False,
  )(logits_BxTxV)  # fmt: skip


_LSE = {
  "online": lambda logits, mesh: logsumexp_online(logits),
  "pallas": _logsumexp_pallas,
  "pallas_interpret": functools.partial(_logsumexp_pallas, interpret=True),
}


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _losses_compute_grad(x_BxTxE, embed_VxE, targets_BxT, logits_dtype, loss_lse, mesh):
  """Cross-entropy of the logits x E^T (written in `logits_dtype`, read as float32); its
  backward forms the logits' cotangent (softmax - one-hot) x g directly in the compute dtype,
  in one pass over the saved logits, then runs the output layer's two matmuls at that
  dtype's rate (`ModelConfig.logits_grad`: what autodiff followed by a rounding gives, up to
  rounding, with no float32 cotangent of [B, T, V] written and read again)."""
  return _losses_compute_fwd(x_BxTxE, embed_VxE, targets_BxT, logits_dtype, loss_lse, mesh)[0]


def _losses_compute_fwd(x_BxTxE, embed_VxE, targets_BxT, logits_dtype, loss_lse, mesh):
  logits_BxTxV = model_lib.output_logits(x_BxTxE, embed_VxE, dtype=logits_dtype)
  logits32 = logits_BxTxV.astype(jnp.float32)
  label_BxT = jnp.take_along_axis(logits32, targets_BxT[..., None], axis=-1)[..., 0]
  if loss_lse != "two_pass":
    lse_BxT = _LSE[loss_lse](logits_BxTxV, mesh)
    losses_BxT = lse_BxT - label_BxT
  else:
    losses_BxT = optax.softmax_cross_entropy_with_integer_labels(logits32, targets_BxT)
    lse_BxT = losses_BxT + label_BxT  # the loss is lse - the target's logit
  return losses_BxT, (x_BxTxE, embed_VxE, targets_BxT, logits_BxTxV, lse_BxT)


def _losses_compute_bwd(logits_dtype, loss_lse, mesh, res, g_BxT):
  x_BxTxE, embed_VxE, targets_BxT, logits_BxTxV, lse_BxT = res
  onehot = jax.nn.one_hot(targets_BxT, logits_BxTxV.shape[-1], dtype=jnp.bool_)
  p_BxTxV = jnp.exp(logits_BxTxV.astype(jnp.float32) - lse_BxT[..., None])
  g_BxTxV = ((p_BxTxV - onehot) * g_BxT[..., None]).astype(x_BxTxE.dtype)
  return *model_lib.logits_input_grads(g_BxTxV, x_BxTxE, embed_VxE), None


_losses_compute_grad.defvjp(_losses_compute_fwd, _losses_compute_bwd)


def chunked_losses(
  x_BxTxE, embed_VxE, targets_BxT, chunk: int, logits_grad: str = "float32",
  logits_dtype=jnp.float32, loss_lse: str = "two_pass",
):  # fmt: skip
  """The output layer and its cross-entropy over chunks of `chunk` positions (the last one
  padded), in a `lax.scan` whose body is rematerialized: the backward recomputes a chunk's
  logits instead of keeping [B, T, V] of them."""
  bsz, seq_len, _ = x_BxTxE.shape
  num = -(-seq_len // chunk)
  pad = num * chunk - seq_len
  x_BxTxE = jnp.pad(x_BxTxE, ((0, 0), (0, pad), (0, 0)))
  targets_BxT = jnp.pad(targets_BxT, ((0, 0), (0, pad)))
  x_NxBxCxE = x_BxTxE.reshape(bsz, num, chunk, -1).swapaxes(0, 1)
  targets_NxBxC = targets_BxT.reshape(bsz, num, chunk).swapaxes(0, 1)

  @jax.checkpoint
  def body(_, chunk_in):
    x_BxCxE, targets_BxC = chunk_in
    return None, output_losses(x_BxCxE, embed_VxE, targets_BxC, logits_grad, logits_dtype, loss_lse)

  _, losses_NxBxC = jax.lax.scan(body, None, (x_NxBxCxE, targets_NxBxC))
  return losses_NxBxC.swapaxes(0, 1).reshape(bsz, num * chunk)[:, :seq_len]


@functools.cache
def nll_sum_fn(cfg: ModelConfig):
  """Jitted (params, inputs [B, T], targets [B, T], weights [B]) -> float32[T]: the NLL at each
  position summed over the rows, each row weighted (0 for padding). One per model config."""
  model = Transformer(cfg)

  def nll_sum(params, inputs_BxT, targets_BxT, weights_B):
    losses_BxT = token_losses(params, model, inputs_BxT, targets_BxT)
    return jnp.einsum("bt,b->t", losses_BxT, weights_B)

  return jax.jit(nll_sum)


def _grads(params, model, batch, accum: int, mesh: Mesh):
  """Mean loss and gradient over the batch, in `accum` sequential microbatches."""

  def loss_fn(p, mb):
    return token_losses(p, model, mb["inputs"], mb["targets"]).mean()

  if accum == 1:
    return jax.value_and_grad(loss_fn)(params, batch)

  # Microbatch a takes rows a, A + a, 2A + a, ...: each device's contiguous block of rows
  # splits into A equal parts without moving data between devices.
  def split(x_BxT):
    x_AxBAxT = x_BxT.reshape(-1, accum, x_BxT.shape[1]).swapaxes(0, 1)
    spec = NamedSharding(mesh, PartitionSpec(None, sharding.DATA))
    return jax.lax.with_sharding_constraint(x_AxBAxT, spec)

  def body(carry, mb):
    loss, grads = jax.value_and_grad(loss_fn)(params, mb)
    return jax.tree.map(jnp.add, carry, (loss, grads)), None

  zero = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, params))
  (loss, grads), _ = jax.lax.scan(body, zero, jax.tree.map(split, batch))
  return loss / accum, jax.tree.map(lambda g: g / accum, grads)


@functools.lru_cache(maxsize=4)
def make_steps(cfg: RunConfig, mesh: Mesh) -> Steps:
  """Cached per (config, mesh), so a notebook or test that trains the same config again
  reuses the compiled steps."""
  train_cfg = cfg.train
  model = Transformer(cfg.model)
  optimizer = make_optimizer(train_cfg)
  schedule = lr_schedule(train_cfg)
  data_size = mesh.shape[sharding.DATA]
  if train_cfg.batch_size % (data_size * train_cfg.grad_accum):
    raise ValueError(
      f"batch_size={train_cfg.batch_size} is not divisible by mesh data={data_size} x "
      f"grad_accum={train_cfg.grad_accum}"
    )

  def init(seed):
    # The first of two keys, as when a second one seeded dropout: the same initial parameters
    # for a seed as before it went (the model has no dropout).
    init_key = jax.random.split(jax.random.key(seed))[0]
    params = model_lib.init_params(cfg.model, init_key)
    return TrainState(
      step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params)
    )

  boxed = model_lib.abstract_params(cfg.model)
  param_sh = sharding.param_shardings(boxed, mesh)
  abstract = jax.eval_shape(init, 0)
  rep = sharding.replicated(mesh)
  opt_sh = optax.tree_map_params(
    optimizer, lambda _, s: s, abstract.opt_state, param_sh, transform_non_params=lambda _: rep
  )
  state_sh = TrainState(step=rep, params=param_sh, opt_state=opt_sh)
  abstract = jax.tree.map(
    lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, state_sh
  )
  batch_sh = sharding.batch_sharding(mesh)

  def train_step(state: TrainState, batch):
    with attention.kernel_mesh(mesh):  # Pallas kernels per device (traced here)
      loss, grads = _grads(state.params, model, batch, train_cfg.grad_accum, mesh)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    new_state = state.replace(
      step=state.step + 1, params=optax.apply_updates(state.params, updates), opt_state=opt_state
    )
    metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), "lr": schedule(state.step)}
    return new_state, metrics

  return Steps(
    model=model,
    abstract_state=abstract,
    init=jax.jit(init, static_argnums=0, out_shardings=state_sh),
    train=jax.jit(
      train_step,
      in_shardings=(state_sh, batch_sh),
      out_shardings=(state_sh, rep),
      donate_argnums=0,
    ),
  )
