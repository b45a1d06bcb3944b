"""Frozen dataclass configs; the values live in `configs/*.py`."""

from __future__ import annotations

import dataclasses
from typing import Literal, get_args

from fibax import patterns

# Names in fibax.attention.IMPLEMENTATIONS (a test keeps them in step), listed here so that a
# config is checked without importing JAX.
Impl = Literal[
  "reference", "xla", "pallas", "pallas_interpret", "pallas_packed", "pallas_packed_interpret",
  "pallas_tpu", "pallas_tpu_interpret",
]  # fmt: skip
DenseImpl = Literal["dense", "cudnn", "xla_dense", "reference"]
IMPLS: tuple[str, ...] = get_args(Impl)
DENSE_IMPLS: tuple[str, ...] = get_args(DenseImpl)


@dataclasses.dataclass(frozen=True)
class AttentionConfig:
  """How each layer attends (the paper)."""

  schedule: patterns.Schedule = "stagger"
  base: patterns.Base = "fib"
  window: int = 12
  num_terms: int = patterns.FIB_TERMS
  cap_mode: patterns.CapMode = "run"  # run (the paper's) | train (frozen at training length)
  # Implementation of integer-offset layers: reference | xla | pallas | pallas_tpu.
  impl: Impl = "xla"
  # Implementation of dense layers: dense (cuDNN on a GPU for 16-bit inputs, else XLA) |
  # cudnn | xla_dense | reference.
  dense_impl: DenseImpl = "dense"
  # A learned layer's window 0..W: "kernel" (through `impl`'s Pallas kernel when `impl` is a
  # Pallas one, merged with the rungs by log-sum-exp) | "jax" (one plain-JAX softmax over the
  # window and the rungs, as every learned run before the kernel window did). The same
  # function; the rounding differs.
  learned_window: Literal["kernel", "jax"] = "kernel"
  # The Pallas GPU kernels' blocks and options, a spec of integers
  # ('bq,warps,bq_bwd,warps_bwd[,...]', `kernels_pallas.gpu.SPEC_FORMAT`), e.g.
  # "16,4,16,4,2,2,2,1,0,1,2,1,1,1,0,1,3" for the three Mosaic GPU kernels of a Hopper GPU
  # (q_tma=3, dkv_tma=1; the Triton kernels wherever they do not take a call); "" the
  # machine's defaults (`kernels_pallas.gpu.default_blocks`: on a Hopper GPU those Mosaic
  # kernels, elsewhere the Triton ones). A run's `attention.gpu_blocks` context (e.g.
  # bench_train.py --blocks) wins.
  gpu_blocks: str = ""
  # Set by `freeze`: per-layer alphas of a trained learned schedule, rounded into static
  # integer patterns (the paper's offsets, compiled like a static schedule).
  frozen_alphas: tuple[float, ...] | None = None

  def __post_init__(self):
    if self.schedule not in patterns.SCHEDULES:
      raise ValueError(f"unknown schedule={self.schedule!r}; expected one of {patterns.SCHEDULES}")
    if self.base not in patterns.BASES:
      raise ValueError(f"unknown base={self.base!r}; expected one of {patterns.BASES}")
    if self.cap_mode not in patterns.CAP_MODES:
      raise ValueError(f"unknown cap_mode={self.cap_mode!r}; expected {patterns.CAP_MODES}")
    if self.impl not in IMPLS:
      raise ValueError(f"unknown impl={self.impl!r}; expected one of {IMPLS}")
    if self.dense_impl not in DENSE_IMPLS:
      raise ValueError(f"unknown dense_impl={self.dense_impl!r}; expected one of {DENSE_IMPLS}")
    if self.window < 0:
      raise ValueError(f"window={self.window} must be >= 0")
    if self.learned_window not in ("kernel", "jax"):
      raise ValueError(f"unknown learned_window={self.learned_window!r}; expected kernel or jax")
    if self.gpu_blocks:
      from kernels_pallas.gpu import parse_blocks

      parse_blocks(self.gpu_blocks)  # a one-line error naming a bad spec


REMAT = ("none", "block", "dots")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """The paper's model."""

  vocab_size: int = 32_768
  d_model: int = 512
  num_layers: int = 16
  num_heads: int = 8
  num_kv_heads: int = 2
  head_dim: int = 64
  mlp_hidden: int = 1366  # round(512 * 8/3 / 2) * 2
  seq_len: int = 1024  # the training length
  rope_theta: float = 1e4
  norm_eps: float = 1e-6
  compute_dtype: str = "bfloat16"
  # How the input embedding's gradient is formed, all the same function: "scatter" (the
  # gather's own transpose: a scatter-add over token ids in the compute dtype), "scatter_f32"
  # (the gather reads the float32 table, so the scatter-add runs in float32), "onehot"
  # (one-hot(tokens)^T @ grad, a matmul accumulated in float32, no atomics) or "sorted", the
  # default (the rows sorted by id and summed a block at a time, then stored once per id:
  # O(N * E), no atomics, deterministic; `fibax.model.embedding_grad_sorted`). Real text
  # repeats ids, and a bf16 scatter-add serializes on repeated rows on a GPU (96 vs 64 ms a
  # step with onehot: experiments/results/embed_grad_h200/); sorted saved another 2.5-2.7 ms
  # a step against onehot (experiments/results/bench_train_h200_options/).
  embed_backward: Literal["scatter", "scatter_f32", "onehot", "sorted"] = "sorted"
  # Positions per chunk of the output layer and its cross-entropy (`fibax.steps.token_losses`):
  # 0 forms the [B, T, V] float32 logits at once; C > 0 scans over chunks of C positions and
  # recomputes each chunk's logits in the backward, so at most [B, C, V] exist at a time.
  loss_chunk: int = 0
  # The dtype of the output layer's backward: "float32" differentiates the float32 logits as
  # they are, so both backward matmuls ([B*T, V] x [V, E] and its transpose) take float32
  # operands (TF32 on a GPU); "compute" forms the logits' cotangent in the compute dtype
  # (what a bf16 autocast backward does; the loss's backward writes softmax - one-hot in bf16
  # in one pass, `fibax.steps.output_losses`), so they run at the bf16 tensor-core rate, still
  # accumulated in float32. The forward and the loss are the same either way.
  logits_grad: Literal["float32", "compute"] = "float32"
  # The dtype the output layer writes its logits in: "float32", or "compute" (the compute
  # dtype, accumulated in float32: what the paper's bf16 autocast does, whose output linear
  # layer returns bf16 logits that the cross-entropy then reads as float32). The loss and its
  # softmax run in float32 either way; "compute" halves the bytes of the [B, T, V] logits,
  # which the loss reads three times (max, sum, backward); their cotangent is then in the
  # compute dtype too, whatever logits_grad says.
  logits_dtype: Literal["float32", "compute"] = "float32"
  # What the backward recomputes instead of keeping from the forward (`nn.remat` on each
  # block): "none" keeps every activation; "block" keeps only each block's input and recomputes
  # the block; "dots" keeps the matmul outputs (projections, MLP) and recomputes the rest
  # (norms, RoPE, attention, activations). The same function and gradients; less memory for
  # more compute.
  remat: Literal["none", "block", "dots"] = "none"
  # Pads the MLP's hidden width (1,366 in the paper's model) to a multiple of this inside the
  # three matmuls, with zero columns of gate and up and zero rows of down: the same
  # parameters, function and gradients (the padded units are silu(0) * 0 = 0 and get zero
  # gradients), in tensor-core-aligned matmuls. 0: no padding.
  mlp_pad: int = 0
  # How the RMSNorms run: "xla" (plain JAX; XLA reads x twice forward and runs the backward
  # as several passes) or "pallas", a fused kernel (`kernels_pallas.norm`, GPU: one pass each
  # way, the residual stream's cotangent added in the backward's pass; d_model a power of
  # two); "pallas_interpret" runs that kernel in Pallas' interpreter (CPU tests). The same
  # function either way (to float32 rounding of its statistics).
  norm_impl: Literal["xla", "pallas", "pallas_interpret"] = "xla"
  # How the loss forms each position's log-sum-exp over the vocabulary, the logits being in
  # memory: "two_pass" (a max, then a sum of exp: the logits read twice, what optax does),
  # "online" (XLA's one-pass reduction of running (max, sum) pairs: compute-bound, 1.18x the
  # two passes' time on an H200, experiments/results/speed_h200_52513de/), or "pallas", a
  # kernel that reads them once, a chunk at a time (`kernels_pallas.logsumexp`, GPU;
  # "pallas_interpret": its interpreter). Only with `logits_grad="compute"` (its custom
  # backward); the same values to float32 rounding.
  loss_lse: Literal["two_pass", "online", "pallas", "pallas_interpret"] = "two_pass"
  attention: AttentionConfig = AttentionConfig()

  def __post_init__(self):
    for name in ("vocab_size", "d_model", "num_layers", "num_heads", "num_kv_heads", "head_dim"):
      if getattr(self, name) < 1:
        raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(
        f"num_heads={self.num_heads} is not divisible by num_kv_heads={self.num_kv_heads}"
      )
    if self.head_dim % 2:
      raise ValueError(f"head_dim={self.head_dim} must be even for RoPE")
    if self.embed_backward not in ("scatter", "scatter_f32", "onehot", "sorted"):
      raise ValueError(
        f"embed_backward={self.embed_backward!r} must be 'scatter', 'scatter_f32', 'onehot' or "
        "'sorted'"
      )
    if self.remat not in REMAT:
      raise ValueError(f"remat={self.remat!r} must be one of {', '.join(REMAT)}")
    if self.logits_grad not in ("float32", "compute"):
      raise ValueError(f"logits_grad={self.logits_grad!r} must be 'float32' or 'compute'")
    if self.logits_dtype not in ("float32", "compute"):
      raise ValueError(f"logits_dtype={self.logits_dtype!r} must be 'float32' or 'compute'")
    if self.mlp_pad < 0:
      raise ValueError(f"mlp_pad={self.mlp_pad} must be >= 0 (0: no padding)")
    if self.norm_impl not in ("xla", "pallas", "pallas_interpret"):
      raise ValueError(
        f"norm_impl={self.norm_impl!r} must be 'xla', 'pallas' or 'pallas_interpret'"
      )
    if self.norm_impl != "xla" and self.d_model & (self.d_model - 1):
      raise ValueError(
        f"d_model={self.d_model} must be a power of two for norm_impl={self.norm_impl!r}"
      )
    if self.loss_lse not in ("two_pass", "online", "pallas", "pallas_interpret"):
      raise ValueError(
        f"loss_lse={self.loss_lse!r} must be 'two_pass', 'online', 'pallas' or 'pallas_interpret'"
      )
    if self.loss_lse != "two_pass" and self.logits_grad != "compute":
      raise ValueError(
        f"loss_lse={self.loss_lse!r} needs logits_grad='compute' (its custom backward); got "
        f"logits_grad={self.logits_grad!r}"
      )
    if self.loss_chunk < 0:
      raise ValueError(f"loss_chunk={self.loss_chunk} must be >= 0 (0: no chunks)")
    if self.attention.window >= self.seq_len:
      raise ValueError(f"window={self.attention.window} must be < seq_len={self.seq_len}")


def mlp_hidden_for(d_model: int) -> int:
  """the paper: hidden = round(d * 8/3 / 2) * 2."""
  return round(d_model * 8 / 3 / 2) * 2


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """the paper: 13,000 steps x 32 x 1024 tokens, AdamW (0.9, 0.95), wd 0.1, lr 3e-4."""

  seed: int = 42
  batch_size: int = 32
  total_steps: int = 13_000
  warmup_steps: int = 300
  peak_lr: float = 3e-4
  final_lr_fraction: float = 0.1
  b1: float = 0.9
  b2: float = 0.95
  weight_decay: float = 0.1
  grad_clip: float = 1.0
  grad_accum: int = 1
  eval_every: int = 500
  checkpoint_every: int = 500
  keep_checkpoints: int = 3
  # Validation loss every `eval_every` steps (and at the end) over the first `eval_tokens`
  # validation tokens; 0 turns it off.
  eval_tokens: int = 1 << 20
  log_every: int = 10
  async_checkpoint: bool = True
  # Mesh shape: `mesh_data` = -1 takes every device left after `mesh_model`.
  mesh_data: int = -1
  mesh_model: int = 1
  # jax.distributed.initialize: "auto" (when JAX_COORDINATOR_ADDRESS or a TPU pod is seen),
  # "on" (always, letting JAX detect the cluster), "off".
  distributed: str = "auto"
  # bf16 peak of one device in TFLOP/s for MFU; None looks the card up (fibax.metrics).
  peak_tflops: float | None = None
  data_workers: int = 1  # grain worker processes (0: read in the training process)
  progress_bar: bool = True

  def __post_init__(self):
    if self.batch_size < 1 or self.total_steps < 1:
      raise ValueError(f"batch_size={self.batch_size}, total_steps={self.total_steps} must be >= 1")
    if self.grad_accum < 1 or self.batch_size % self.grad_accum:
      raise ValueError(f"grad_accum={self.grad_accum} must divide batch_size={self.batch_size}")
    for name in ("eval_every", "checkpoint_every", "keep_checkpoints", "log_every", "mesh_model"):
      if getattr(self, name) < 1:
        raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
    if self.mesh_data < 1 and self.mesh_data != -1:
      raise ValueError(f"mesh_data={self.mesh_data} must be >= 1 or -1 (all devices left)")
    if self.distributed not in ("auto", "on", "off"):
      raise ValueError(f"distributed={self.distributed!r} must be one of auto, on, off")


@dataclasses.dataclass(frozen=True)
class RunConfig:
  model: ModelConfig = ModelConfig()
  train: TrainConfig = TrainConfig()
  data_source: str = "gutenberg"
  # A prepared data directory (fibax.data.prepare); None: data/<data_source>, prepared
  # there with the model's vocabulary if missing.
  data_dir: str | None = None
