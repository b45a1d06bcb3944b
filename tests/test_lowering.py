"""The kernels lower for real hardware on a CPU-only machine: to Triton for an abstract H100,
to Mosaic for a TPU.

Interpret mode runs a kernel's jaxpr, not its lowering: an operation or a block shape that
Pallas cannot lower passes every interpret test and fails only on the accelerator (the TPU
kernels' element-offset blocks did, until every dimension of such a block became an element
dimension). Lowering here catches that; the compilers' own passes (Triton to PTX, Mosaic to
TPU code) still need the hardware.

It also counts the distinct Triton kernels of a layer stack: the packed kernels read their
rung distances from a table that is a kernel input, so layers with different rungs share one
compiled kernel each (forward, dq, dkv), where the row-wise kernels unroll every layer's
rungs into kernels of its own.
"""

import re

import jax
import jax.numpy as jnp
import pytest
from jax._src.mesh import AbstractDevice, AbstractMesh
from jax.extend import core as jax_core
from jax.sharding import AxisType

from fibax.patterns import Pattern
from kernels_pallas import fib_attention
from kernels_pallas.gpu import GpuBlocks

H100 = AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=132, platform="gpu")
ONE_H100 = AbstractMesh((1,), ("x",), axis_types=(AxisType.Auto,), abstract_device=H100)
# Four layers' rungs (Fibonacci scaled by four alphas), three to six of them below T = 256.
LAYERS = [
  Pattern(12, (13, 21, 34)),
  Pattern(12, (16, 26, 42, 68)),
  Pattern(12, (20, 31, 51, 83, 135)),
  Pattern(12, (14, 22, 37, 59, 96, 155)),
]


def _lowered_step(backend: str, patterns, dtype=jnp.bfloat16, blocks=None) -> str:
  """StableHLO text of a layer stack's forward and backward, lowered for `backend`."""
  q = jnp.zeros((2, 256, 8, 64), dtype)
  k = jnp.zeros((2, 256, 2, 64), dtype)

  def loss(q, k, v):
    x = q
    for p in patterns:
      x = fib_attention(x, k, v, p, backend=backend, blocks=blocks)
    return x.astype(jnp.float32).sum()

  step = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
  if backend == "tpu":
    return step.trace(q, k, k).lower(lowering_platforms=("tpu",)).as_text()
  with jax.sharding.use_abstract_mesh(ONE_H100):
    return step.trace(q, k, k).lower(lowering_platforms=("cuda",)).as_text()


def _triton_kernels(kernel: str, patterns, dtype=jnp.bfloat16) -> list[str]:
  """The serialized Triton module of every kernel launch in the lowered step."""
  text = _lowered_step("gpu", patterns, dtype, GpuBlocks(kernel=kernel))
  return re.findall(r'ir = "(.*?)", ', text, re.S)


@pytest.mark.parametrize("kernel", ["rowwise", "packed"])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_forward_and_backward_lower_to_triton(kernel, dtype):
  kernels = _triton_kernels(kernel, LAYERS[-1:], dtype)
  assert len(set(kernels)) == 3  # forward, dq, dkv


def test_packed_layers_share_their_kernels():
  assert len({len(p.far) for p in LAYERS}) > 1 and len(set(LAYERS)) == 4
  assert len(set(_triton_kernels("rowwise", LAYERS))) == 3 * len(LAYERS)
  assert len(set(_triton_kernels("packed", LAYERS))) == 3


@pytest.mark.parametrize(
  "options,changed",
  [
    (dict(rung_group=2, rung_group_bwd=1), (0, 0)),  # the default
    (dict(rung_group=1), (1, 0)),  # the forward one rung a step (learned rungs always are)
    (dict(dkv_t=0), (1, 1)),
    (dict(dkv_t=0, rung_group=4, rung_group_bwd=2), (3, 1)),
    (dict(rung_group=1, diagonal=1), (3, 3)),
    (dict(fold=0), (3, 0)),  # static rungs only
    (dict(rung_group_bwd=2, rung_group_dkv=1), (1, 0)),  # dq's groups only
    (dict(ew_rungs=7), (3, 0)),  # static rungs on CUDA cores (each bit's kernel: below)
  ],
)
def test_the_packed_kernels_options_lower_to_triton(options, changed):
  """Static and learned rungs, with dk and dv accumulated as [C, D] (the dkv kernel only),
  rung groups (static rungs only), the diagonal, no folded rungs: three kernels each,
  `changed` (static, learned) of them other than the default's (the option reaches them)."""
  blocks = GpuBlocks(kernel="packed", **options)
  default = GpuBlocks(kernel="packed")
  for irs, n in zip((_static_irs, _learned_irs), changed, strict=True):
    assert len(irs(blocks)) == 3
    assert len(irs(blocks) - irs(default)) == n, irs.__name__


@pytest.mark.parametrize("bit, kernel", [(1, "fwd"), (2, "dq"), (4, "dkv")])
def test_each_ew_rungs_bit_reaches_its_own_kernel(bit, kernel):
  """GpuBlocks.ew_rungs: bit 1 changes the forward kernel only, 2 dq's, 4 dkv's."""

  def kernels(blocks) -> set[tuple[str, str]]:  # (name, Triton module) of each launch
    text = _lowered_step("gpu", LAYERS, blocks=blocks)
    return set(re.findall(r'ir = "(.*?)", name = "(\w+)"', text, re.S))

  changed = kernels(GpuBlocks(kernel="packed", ew_rungs=bit)) - kernels(GpuBlocks(kernel="packed"))
  assert {name for _, name in changed} == {f"fib_attention_packed_{kernel}"}


def _static_irs(blocks) -> set[str]:
  return set(re.findall(r'ir = "(.*?)", ', _lowered_step("gpu", LAYERS, blocks=blocks), re.S))


def _learned_irs(blocks) -> set[str]:
  """The Triton modules of a learned layer's forward and backward (15 rungs)."""
  from kernels_pallas import fib_attention_learned

  q = jnp.zeros((1, 256, 8, 64), jnp.bfloat16)
  k = jnp.zeros((1, 256, 2, 64), jnp.bfloat16)
  lo = jnp.arange(15, dtype=jnp.int32) + 20

  def loss(q, k, v, frac):
    o = fib_attention_learned(q, k, v, 12, lo, frac, lo > 0, backend="gpu", blocks=blocks)
    return o.astype(jnp.float32).sum()

  step = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))
  with jax.sharding.use_abstract_mesh(ONE_H100):
    text = step.trace(q, k, k, jnp.full((15,), 0.5)).lower(lowering_platforms=("cuda",)).as_text()
  return set(re.findall(r'ir = "(.*?)", ', text, re.S))


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_tpu_forward_and_backward_lower_to_mosaic(dtype):
  text = _lowered_step("tpu", LAYERS[-1:], dtype)
  assert text.count("tpu_custom_call") == 3  # forward, dq, dkv


@pytest.mark.parametrize("schedule", ["stagger", "learned"])
@pytest.mark.parametrize("impl", ["pallas", "pallas_packed", "pallas_tpu"])
def test_the_model_train_step_lowers_with_each_kernel(impl, schedule):
  """The whole step (a learned layer's window through the kernel too), for its hardware."""

  from fibax import model as M
  from fibax.config import AttentionConfig, ModelConfig

  cfg = ModelConfig(
    vocab_size=97, d_model=32, num_layers=3, num_heads=4, num_kv_heads=2, head_dim=64,
    mlp_hidden=64, seq_len=256, compute_dtype="bfloat16",
    attention=AttentionConfig(schedule=schedule, window=4, impl=impl, dense_impl="xla_dense"),
  )  # fmt: skip
  tokens = jnp.zeros((2, 257), jnp.int32)
  net = M.Transformer(cfg)
  params = jax.eval_shape(lambda: net.init(jax.random.key(0), tokens[:, :-1])["params"])

  def loss(params):
    logits = net.apply({"params": params}, tokens[:, :-1])
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[:, 1:, None], -1))

  step = jax.jit(jax.value_and_grad(loss))
  if impl == "pallas_tpu":
    text = step.trace(params).lower(lowering_platforms=("tpu",)).as_text()
    assert text.count("tpu_custom_call") >= 3
    return
  with jax.sharding.use_abstract_mesh(ONE_H100):
    text = step.trace(params).lower(lowering_platforms=("cuda",)).as_text()
  kernels = set(re.findall(r'ir = "(.*?)", ', text, re.S))
  # Three layers: the row-wise kernels are per layer, the packed ones shared.
  expected = 3 if impl == "pallas_packed" or schedule == "learned" else 9
  assert len(kernels) == expected


def test_learned_kernels_lower_with_any_rung_count():
  """The dq kernel's per-rung gradient vector is a power of two long, whatever R."""
  from kernels_pallas import fib_attention_learned

  q = jnp.zeros((1, 256, 8, 64), jnp.bfloat16)
  k = jnp.zeros((1, 256, 2, 64), jnp.bfloat16)
  for rungs in (1, 15, 40):
    lo = jnp.arange(rungs, dtype=jnp.int32) + 20
    table = (lo, jnp.full((rungs,), 0.5), jnp.ones((rungs,), bool))

    def loss(q, k, v, frac, lo=lo, table=table):
      o = fib_attention_learned(q, k, v, 12, lo, frac, table[2], backend="gpu")
      return o.astype(jnp.float32).sum()

    step = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))
    with jax.sharding.use_abstract_mesh(ONE_H100):
      text = step.trace(q, k, k, table[1]).lower(lowering_platforms=("cuda",)).as_text()
    assert len(set(re.findall(r'ir = "(.*?)", ', text, re.S))) == 3, rungs


def test_tpu_layers_with_as_many_rungs_share_their_kernels():
  """The TPU kernels read the rung distances from a table prefetched into SMEM: layers with
  the same rung count and front padding (the largest rung rounded up to a power of two)
  compile one kernel each for the forward, dq and dkv."""
  same_count = [
    Pattern(12, (13, 21, 34, 55)),
    Pattern(12, (14, 22, 37, 59)),
    Pattern(12, (16, 26, 42, 68)),
    Pattern(12, (20, 31, 51, 83)),
  ]  # largest rungs 55, 59 -> 64 rows of padding; 68, 83 -> 128
  text = _lowered_step("tpu", same_count)
  kernels = re.findall(r"tpu_custom_call.*?backend_config = \"(.*?)\"", text, re.S)
  # At most the 3 kernels of each padding (12 when each layer compiled its own).
  assert len(kernels) == 3 * len(same_count) and len(set(kernels)) <= 6


def test_on_a_mesh_each_device_launches_the_kernels_on_its_own_rows_and_heads():
  """Under `attention.kernel_mesh` (the train step's) the Triton kernels sit in a manual
  (shard_map) region: their operands are one device's share of a data 2 x model 2 mesh, batch
  rows and heads, not the gathered whole."""
  from fibax import attention

  mesh = AbstractMesh(
    (2, 2), ("data", "model"), axis_types=(AxisType.Auto,) * 2, abstract_device=H100
  )
  q = jnp.zeros((4, 256, 8, 64), jnp.bfloat16)
  k = jnp.zeros((4, 256, 2, 64), jnp.bfloat16)

  def loss(q, k, v):
    with attention.kernel_mesh(mesh):
      o = attention.attend(q, k, v, LAYERS[0], "pallas", "xla_dense")
    return o.astype(jnp.float32).sum()

  step = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
  with jax.sharding.use_abstract_mesh(mesh):
    text = step.trace(q, k, k).lower(lowering_platforms=("cuda",)).as_text()
  operands = re.findall(r"custom_call @__gpu\$xla\.gpu\.triton.*?: \(([^)]*)\)", text, re.S)
  assert len(operands) == 3  # forward, dq, dkv
  for types in operands:
    assert types.startswith("tensor<2x256x4x64xbf16>, tensor<2x256x1x64xbf16>"), types


@pytest.mark.parametrize("kernel", ["rowwise", "packed"])
def test_the_dkv_kernel_takes_its_own_pipeline_depth(kernel):
  """GpuBlocks.num_stages_dkv reaches the dkv kernel's launch, and only it: the dq kernel keeps
  the backward's depth, the forward its own."""
  blocks = GpuBlocks(kernel=kernel, num_stages=3, num_stages_bwd=4, num_stages_dkv=2)
  text = _lowered_step("gpu", LAYERS[-1:], blocks=blocks)
  stages = dict(re.findall(r'name = "fib_attention_(?:packed_)?(\w+)", num_stages = (\d+)', text))
  assert stages == {"fwd": "3", "dq": "4", "dkv": "2"}


@pytest.mark.parametrize(
  "kernel, warps",
  [
    ("rowwise", {"fwd": "2", "dq": "4", "dkv": "4"}),
    ("packed", {"fwd": "4", "dq": "4", "dkv": "4"}),
  ],
)
def test_each_kernel_launches_with_its_own_default_warps(kernel, warps):
  """GpuBlocks' num_warps 0 resolves per kernel: the packed forward at 4 warps (one warpgroup),
  the row-wise one at 2; the backward kernels at num_warps_bwd."""
  text = _lowered_step("gpu", LAYERS[-1:], blocks=GpuBlocks(kernel=kernel))
  got = dict(
    re.findall(
      r'name = "fib_attention_(?:packed_)?(\w+)", num_stages = \d+ : i32, num_warps = (\d+)', text
    )
  )
  assert got == warps


def _kernel_primitives(closed) -> dict[str, set[str]]:
  """Each pallas_call's name -> the primitives of its kernel body, nested jaxprs included."""

  def walk(jaxpr, into):
    for eqn in jaxpr.eqns:
      into.add(eqn.primitive.name)
      for sub in jax_core.jaxprs_in_params(eqn.params):
        walk(sub, into)

  found = {}

  def kernels(jaxpr):
    for eqn in jaxpr.eqns:
      if eqn.primitive.name == "pallas_call":
        walk(eqn.params["jaxpr"], found.setdefault(eqn.params["name"], set()))
      for sub in jax_core.jaxprs_in_params(eqn.params):
        kernels(sub)

  kernels(closed.jaxpr)
  return found


@pytest.mark.parametrize(
  "kernel, exp2, want, not_want",
  [("rowwise", 1, "exp2", "exp"), ("packed", 1, "exp2", "exp"), ("packed", 0, "exp", "exp2")],
)
def test_the_kernels_exponentiate_as_asked(kernel, exp2, want, not_want):
  """Every GPU kernel's softmax takes exp2 (libdevice's exp2f: one ex2.approx), not exp
  (libdevice's expf: a range reduction around the ex2, ~12 instructions an element; the packed
  forward's rung loop was 554 PTX instructions with it, 340 without, in the Triton 3.5
  stand-in); the packed kernels take exp again with GpuBlocks.exp2=0. Static rungs, and (the
  packed kernels) learned ones."""
  from kernels_pallas import fib_attention_learned

  q = jnp.zeros((1, 64, 8, 64), jnp.bfloat16)
  k = jnp.zeros((1, 64, 2, 64), jnp.bfloat16)
  blocks = GpuBlocks(kernel=kernel, exp2=exp2)
  lo = jnp.arange(3, dtype=jnp.int32) + 20

  def static(q, k, v):
    o = fib_attention(q, k, v, LAYERS[0], backend="gpu", blocks=blocks)
    return o.astype(jnp.float32).sum()

  def learned(q, k, v, frac):
    o = fib_attention_learned(q, k, v, 12, lo, frac, lo > 0, backend="gpu", blocks=blocks)
    return o.astype(jnp.float32).sum()

  found = _kernel_primitives(jax.make_jaxpr(jax.grad(static, argnums=(0, 1, 2)))(q, k, k))
  if kernel == "packed":
    grad = jax.grad(learned, argnums=(0, 1, 2, 3))
    found |= _kernel_primitives(jax.make_jaxpr(grad)(q, k, k, jnp.full((3,), 0.5)))
  assert len(found) == (6 if kernel == "packed" else 3), found.keys()  # forward, dq, dkv
  for name, prims in found.items():
    assert want in prims and not_want not in prims, (name, sorted(prims))
