"""kernels_pallas/mosaic.py, the Mosaic GPU forward and dq kernels (`GpuBlocks.q_tma`), in Pallas'
Mosaic GPU interpreter against the Triton packed kernels in theirs
(experiments/mosaic_query_check.py). The interpreter gets the query-side tiles a row at a time
into the tiled buffers and the wgmma A operand from shared memory; the GPU path's copies (one
[16, 4, 64] box a tensor into the untiled swizzled view, four 16-row key tiles a step, the
[B, K, T * G] statistics) run only on a GPU (`TestGpuPackedQTmaKernel` in tests/test_kernels.py);
here they are lowered on a CPU."""

import dataclasses
import functools
import json

import jax
import jax.numpy as jnp
import pytest
from conftest import assert_grads_agree, counted_calls, interpreter_grads

from experiments import mosaic_query_check
from fibax.patterns import Pattern
from kernels_pallas import gpu, mosaic
from kernels_pallas.gpu import GpuBlocks


@pytest.mark.parametrize(
  "shape, window, far, dlse, buffers",
  [
    ((1, 128, 8, 2, 64), 12, (13, 21, 34, 55, 89), False, 2),  # rungs past T - j0 skipped
    # One kv head; a rung off an 8-row tile, odd (pytest -m slow: CI time).
    pytest.param((1, 128, 4, 1, 64), 3, (17,), False, 2, marks=pytest.mark.slow),
    ((2, 96, 8, 2, 64), 40, (), True, 2),  # four window chunks, one step of four units; dlse
    # Five chunks and eight rungs, three buffers: chunk units in a second step, units past the
    # last rung, up to four steps (a buffer reused) and blocks of fewer steps than buffers.
    ((1, 128, 8, 2, 64), 60, (61, 67, 73, 79, 85, 97, 103, 109), False, 3),
    # No prefetch: each step's copies issued and waited for in the step.
    pytest.param((1, 128, 8, 2, 64), 12, (13, 21, 34, 55, 89), True, 1, marks=pytest.mark.slow),
  ],
)
def test_the_mosaic_kernels_give_the_triton_kernels_o_lse_dq_and_delta(
  shape, window, far, dlse, buffers
):
  """o within bf16's rounding of p (rounded under another running max: up to 7e-4 measured),
  lse, dq and delta the same sums in another order (up to 1.4e-5 measured); a wrong mask is
  off by 1e-2 or more."""
  o, lse, dq, delta = mosaic_query_check.check(*shape, window, far, dlse=dlse, buffers=buffers)
  assert o < 2e-3
  assert max(lse, dq, delta) < 1e-4


def test_the_mosaic_query_kernels_name_the_calls_they_do_not_take():
  q = jnp.zeros((1, 64, 8, 32), jnp.bfloat16)
  kv = jnp.zeros((1, 64, 2, 32), jnp.bfloat16)  # head_dim 32
  st = jnp.zeros((1, 8, 64), jnp.float32)
  table = jnp.zeros((16,), jnp.int32)
  with pytest.raises(
    ValueError, match="the Mosaic GPU forward kernel does not take this call: head_dim 32"
  ):
    mosaic.forward(q, kv, kv, table, window=4, interpret=True)
  with pytest.raises(
    ValueError, match="the Mosaic GPU dq kernel does not take this call: head_dim 32"
  ):
    mosaic.dq(q, kv, kv, q, q, st, table, window=4, interpret=True)
  q, kv = jnp.zeros((1, 64, 8, 64), jnp.bfloat16), jnp.zeros((1, 64, 2, 64), jnp.bfloat16)
  with pytest.raises(ValueError, match="buffers=5: the Mosaic GPU forward kernel takes 1..4"):
    mosaic.forward(q, kv, kv, table, window=4, buffers=5, interpret=True)
  with pytest.raises(ValueError, match="buffers=0: the Mosaic GPU dq kernel takes 1..4"):
    mosaic.dq(q, kv, kv, q, q, st, table, window=4, buffers=0, interpret=True)


@pytest.mark.parametrize("rungs", [1, 15, 16, 31])
def test_the_kernels_rung_table_reads_a_distance_no_unit_reaches_past_its_count(rungs):
  """The query kernels read a step's units past the last rung from the table (up to 3 entries
  past its count) and keep nothing there only because those entries lie beyond every block:
  rung_table's zero padding (a distance-0 rung: the diagonal again) replaced and extended."""
  q, kv = jnp.zeros((1, 64, 8, 64), jnp.bfloat16), jnp.zeros((1, 64, 2, 64), jnp.bfloat16)
  far = tuple(range(13, 13 + 2 * rungs, 2))
  _, _, table = mosaic._checked(q, kv, gpu.rung_table(far, 12), "forward")
  assert table.shape[0] % 32 == 0 and table.shape[0] >= 1 + rungs + 3
  assert table[: 1 + rungs].tolist() == [rungs, *far]
  assert (table[1 + rungs :] == mosaic._NONE).all()


def test_q_tma_is_a_bitmask_of_the_packed_kernels_not_with_ew_rungs_on_the_same_kernel():
  with pytest.raises(ValueError, match=r"q_tma=4 must be a bitmask 0..3 \(1 fwd, 2 dq\)"):
    GpuBlocks(kernel="packed", q_tma=4)
  with pytest.raises(ValueError, match="q_tma=1 is the packed kernel's option"):
    GpuBlocks(q_tma=1)
  with pytest.raises(ValueError, match="q_tma=1 and ew_rungs=1 both set the forward kernel"):
    GpuBlocks(kernel="packed", q_tma=1, ew_rungs=1)
  with pytest.raises(ValueError, match="q_tma=2 and ew_rungs=2 both set the dq kernel"):
    GpuBlocks(kernel="packed", q_tma=2, ew_rungs=2)
  with pytest.raises(ValueError, match="q_tma=2: stages_dq=5, the Mosaic kernel's buffers"):
    GpuBlocks(kernel="packed", q_tma=2, num_stages=5)
  assert GpuBlocks(kernel="packed", q_tma=2, num_stages=5, num_stages_bwd=3).stages_dq == 3
  assert GpuBlocks(kernel="packed", q_tma=1, ew_rungs=2).q_tma == 1  # each kernel one way
  assert GpuBlocks(kernel="packed", q_tma=3, dkv_tma=1).for_kernel("rowwise") == GpuBlocks()


def test_the_check_script_names_bad_arguments():
  with pytest.raises(SystemExit, match="usage"):
    mosaic_query_check.main(["1", "2", "--dlse"])
  with pytest.raises(SystemExit, match="not integers: '1 128 8 2 64 x'"):
    mosaic_query_check.main(["1", "128", "8", "2", "64", "x"])
  with pytest.raises(SystemExit, match="not integers: '1 128 8 2 64 12 13,y'"):
    mosaic_query_check.main(["1", "128", "8", "2", "64", "12", "13,y", "--dlse"])
  with pytest.raises(SystemExit, match="'1 100 8 2 64 12': T = 100 must be a multiple of 16"):
    mosaic_query_check.main(["1", "100", "8", "2", "64", "12"])
  with pytest.raises(SystemExit, match="'1 128 8 2 64 12 5': .*rung distances > W"):
    mosaic_query_check.main(["1", "128", "8", "2", "64", "12", "5"])
  with pytest.raises(SystemExit, match="--buffers 7: 1..4"):
    mosaic_query_check.main(["1", "128", "8", "2", "64", "12", "--buffers", "7"])
  with pytest.raises(SystemExit, match="usage"):
    mosaic_query_check.main(["1", "128", "8", "2", "64", "12", "--buffers"])


@pytest.mark.parametrize(
  "heads, dtype, q_tma, dkv_tma, takes",
  [
    # (CI runs the grouped path, the mixed one of the Mosaic dq and a fallback; pytest -m slow
    # the rest.)
    pytest.param(8, jnp.bfloat16, 3, 0, True, marks=pytest.mark.slow),
    # Each kernel alone beside the Triton other: the Mosaic forward's lse into the Triton dq,
    # the Triton forward's o into the Mosaic dq.
    pytest.param(8, jnp.bfloat16, 1, 0, True, marks=pytest.mark.slow),
    (8, jnp.bfloat16, 2, 0, True),
    # All three Mosaic kernels (dq and dkv passing their statistics grouped), with the lse
    # cotangent.
    (8, jnp.bfloat16, 3, 1, True),
    (4, jnp.bfloat16, 3, 1, False),
    pytest.param(8, jnp.float32, 3, 1, False, marks=pytest.mark.slow),
  ],
)
def test_q_tma_gives_the_default_gradients_or_falls_back(heads, dtype, q_tma, dkv_tma, takes):
  """GpuBlocks.q_tma (1, 2, 3; with and without dkv_tma=1) against the default, with an lse
  cotangent: the Mosaic forward and dq kernels where they take the call (G = 4, bf16; o to bf16
  rounding, the rest the same sums in another order), the Triton kernels' own results
  (bitwise) where they do not (G = 2; float32)."""
  pattern = Pattern.build(base="fib", alpha=1.0, window=6, seq_len=96)
  ks = jax.random.split(jax.random.key(3), 3)
  q = jax.random.normal(ks[0], (1, 96, heads, 64), dtype)
  k, v = (jax.random.normal(x, (1, 96, 2, 64), dtype) for x in ks[1:])
  with counted_calls(mosaic, ["forward", "dq", "dkv"]) as calls:
    blocks = GpuBlocks(kernel="packed", q_tma=q_tma, dkv_tma=dkv_tma)
    tma = interpreter_grads(blocks, q, k, v, pattern)
  base = interpreter_grads(GpuBlocks(kernel="packed"), q, k, v, pattern)
  assert calls == {
    "forward": takes * (q_tma & 1),
    "dq": takes * (q_tma >> 1),
    "dkv": takes * dkv_tma,
  }
  assert_grads_agree(tma, base, takes)


def test_the_gpu_path_lowers_on_a_cpu_and_names_its_kernels():
  """The kernels as a GPU runs them (the untiled swizzled copy views, the [16, 4, 64] boxes,
  the [B, K, T * G] statistics, the wgmma A operand from registers), lowered to Mosaic GPU's
  module on a CPU-only machine, dq with and without an lse cotangent; their names are the ones
  profiles and Nsight Compute's filter (experiments/profile_kernels.py) look for."""
  q = jax.ShapeDtypeStruct((2, 256, 8, 64), jnp.bfloat16)
  kv = jax.ShapeDtypeStruct((2, 256, 2, 64), jnp.bfloat16)
  stats = jax.ShapeDtypeStruct((2, 8, 256), jnp.float32)
  table = jax.ShapeDtypeStruct((16,), jnp.int32)
  for fn, args, kwargs, name in (
    (mosaic.forward, (q, kv, kv, table), {}, "fwd"),
    (mosaic.dq, (q, kv, kv, q, q, stats, table), {}, "dq"),
    (mosaic.dq, (q, kv, kv, q, q, stats, table), {"dlse": stats}, "dq"),
  ):
    traced = jax.jit(functools.partial(fn, window=12)).trace(*args, **kwargs)
    text = traced.lower(lowering_platforms=("cuda",)).as_text()
    assert "mosaic_gpu" in text and f"fib_attention_packed_{name}_tma" in text, (name, kwargs)
  # The packed backward with both Mosaic backward kernels (their statistics passed grouped):
  # no Triton kernel left in it, whose lowering would need a GPU here.
  blocks = GpuBlocks(kernel="packed", q_tma=3, dkv_tma=1)
  backward = functools.partial(gpu._backward_packed, window=12, blocks=blocks, interpret=False)
  traced = jax.jit(backward).trace(q, kv, kv, q, stats, q, table, dlse=stats)
  text = traced.lower(lowering_platforms=("cuda",)).as_text()
  assert "fib_attention_packed_dq_tma" in text and "fib_attention_packed_dkv_tma" in text


def test_compile_attention_times_the_layers_given_and_names_bad_arguments(tmp_path, capsys):
  """experiments/compile_attention.py: the paper model's first layers, each phase timed, the
  line written to --out; its arguments' errors named. (Pallas' interpreters on a CPU.)"""
  from experiments import compile_attention

  out = tmp_path / "c.json"
  spec = "16,4,16,4,2,2,2,1,0,1,2,1,1,1,0,1,3"
  argv = ["--seq-len", "32", "--batch", "1", "--layers", "2", "--blocks", spec, "--interpret"]
  with counted_calls(mosaic, ("forward", "dq", "dkv")) as calls:  # the blocks reach the kernels
    compile_attention.main([*argv, "--out", str(out)])
  assert all(calls.values()), calls
  found = json.loads(out.read_text())
  assert (found["layers"], found["seq_len"], found["blocks"], found["gpu_blocks"]) == (
    2, 32, spec, spec
  )  # fmt: skip
  assert min(found[k] for k in ("trace_s", "lower_s", "compile_s", "first_call_s")) > 0
  # A learned run's layers, as the model calls them: through the learned-rung kernels.
  import kernels_pallas

  with counted_calls(kernels_pallas, ["fib_attention_learned"]) as calls:
    compile_attention.main(["--run", "fib_learned_w12", *argv[:6], "--interpret"])
  found = json.loads(capsys.readouterr().out.splitlines()[-1])
  learned = (found["run"], found["layers"], calls["fib_attention_learned"])
  assert learned == ("fib_learned_w12", 2, 2)
  for bad, why in (
    (["--run", "nope"], "--run: unknown run name='nope'"),
    (["--blocks", "1,2"], "--blocks: bad block config '1,2'"),
    (["--layers", "0"], "--layers 0: >= 1"),
  ):
    with pytest.raises(SystemExit):
      compile_attention.main(bad)
    assert why in capsys.readouterr().err


@pytest.mark.parametrize(
  "cc, hopper", [("9.0", True), ("8.0", False), ("10.0", False), (None, False)]
)
def test_the_mosaic_kernels_are_the_packed_default_on_hopper_only(monkeypatch, cc, hopper):
  """On a GPU of compute capability 9.x the packed kernel's default blocks take the three
  Mosaic kernels (wgmma is Hopper's: not 8.x, not 10.x, whose calls `supported` refuses), a
  model's packed attention runs them unless a run or config names its blocks, and Pallas'
  interpreter keeps the Triton kernels; off a GPU nothing changes."""
  from fibax import attention

  triton = GpuBlocks(kernel="packed")
  monkeypatch.setattr(jax, "default_backend", lambda: "cpu")
  assert gpu.default_blocks("packed") == triton  # off a GPU
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  monkeypatch.setattr(mosaic, "_compute_capability", lambda: cc)
  assert mosaic.on_hopper() is hopper
  why = mosaic.supported((1, 64, 8, 64), 2, jnp.bfloat16)
  assert (why is None) is (hopper or cc is None), why
  if cc is not None and not hopper:
    assert why == f"a GPU of compute capability {cc} (wgmma: 9.x, Hopper)"
  want = GpuBlocks(kernel="packed", dkv_tma=1, q_tma=3) if hopper else triton
  assert gpu.default_blocks("packed") == want
  assert gpu.default_blocks("rowwise") == GpuBlocks()  # the row-wise kernel has no Mosaic ones
  assert attention.gpu_blocks_for("gpu", "packed") == want
  assert attention.gpu_blocks_for("gpu_interpret", "packed") == triton
  assert attention.gpu_blocks_for("gpu", None) is None  # the op's own defaults
  named = gpu.parse_blocks("16,4,16,4,2,2,2,1,0,1,2,1,1,1,0,0,0")
  with attention.gpu_blocks(named):  # a run's or config's blocks win
    assert attention.gpu_blocks_for("gpu", "packed") == named
  # A training run's first line names the blocks its layers run with.
  from fibax.config import AttentionConfig
  from fibax.train import kernel_blocks_note

  tail = "1,3" if hopper else "0,0"
  assert kernel_blocks_note(AttentionConfig(impl="pallas_packed")).endswith(f",0,{tail}")
  spec = "16,4,16,4,2,2,2,1,0,1,2,1,1,1,0,0,0"
  note = kernel_blocks_note(AttentionConfig(impl="pallas_packed", gpu_blocks=spec))
  assert note == f", Pallas GPU blocks {spec}"
  assert kernel_blocks_note(AttentionConfig(impl="xla")) == ""
  assert (
    attention.resolved_gpu_blocks(AttentionConfig(impl="pallas_packed", gpu_blocks=spec)) == spec
  )


@pytest.mark.parametrize("data, model", [(1, 1), (2, 2)])
def test_a_train_steps_layers_share_each_mosaic_kernel(data, model):
  """The stagger model's train step lowered for a GPU with the three Mosaic kernels: each
  kernel is in the module once (one Mosaic GPU module a kernel, lowered and compiled once),
  called by all 16 layers, whose rung tables are the kernels' inputs; on a mesh of data and
  model axes too (the kernels per device under shard_map, a device's 4 heads of its kv head)."""
  import re

  from configs.paper import get_config
  from fibax import attention, sharding
  from fibax.steps import make_steps

  cfg = get_config("fib_stagger_w12")
  attn = dataclasses.replace(cfg.model.attention, impl="pallas_packed")
  cfg = dataclasses.replace(
    cfg,
    model=dataclasses.replace(cfg.model, seq_len=256, attention=attn),
    train=dataclasses.replace(cfg.train, batch_size=2),
  )
  mesh = sharding.make_mesh(data=data, model=model, devices=jax.devices()[: data * model])
  with attention.gpu_blocks(GpuBlocks(kernel="packed", q_tma=3, dkv_tma=1)):
    steps = make_steps(cfg, mesh)
    batch_sh = sharding.batch_sharding(mesh)
    batch = {
      k: jax.ShapeDtypeStruct((2, 256), jnp.int32, sharding=batch_sh) for k in ("inputs", "targets")
    }
    text = steps.train.trace(steps.abstract_state, batch).lower(lowering_platforms=("cuda",))
    text = text.as_text()
  assert cfg.model.num_layers == 16
  calls = re.findall(r"call @(\w+)", text)
  assert calls.count("mosaic_gpu_v2") == 3, calls  # forward, dq, dkv: one module each
  assert calls.count("_forward_packed") == calls.count("_backward_packed") == 16  # every layer
  for name in ("fwd", "dq", "dkv"):
    assert f"fib_attention_packed_{name}_tma" in text


def test_mosaic_ops_counts_each_kernels_loop_the_same_at_any_length_and_rungs(capsys):
  """experiments/mosaic_ops.py: each Mosaic kernel's main loop, lowered for a GPU on a CPU and
  counted by kind (the loop found: it holds the TMA copies and the wgmmas); the rungs are a
  table input and T only the grid, so neither moves the counts."""
  from experiments import mosaic_ops

  a = mosaic_ops.count(12, (13, 21, 34), 256)
  b = mosaic_ops.count(12, (17, 55, 89, 144, 233), 512)
  assert a == b
  for name, loop in a.items():
    kinds = loop["by_kind"]
    assert loop["ops"] == sum(kinds.values()) > 1000, name
    assert kinds["nvvm.cp.async.bulk.tensor.shared.cluster.global"] > 0, name  # TMA copies
    assert kinds["nvvm.wgmma.fence.aligned"] > 0, name
  with pytest.raises(SystemExit):
    mosaic_ops.main(["--rungs", "5"])  # not beyond the window
  assert "--rungs '5'" in capsys.readouterr().err


def test_blocks_spec_is_parse_blocks_inverse_with_each_default_resolved():
  spec = "16,4,16,4,2,2,2,1,0,1,2,1,1,1,0,1,3"
  assert gpu.blocks_spec(gpu.parse_blocks(spec)) == spec
  # The declared defaults' zeros (warps, backward stages, rung groups) come back as the values
  # they stand for: the same kernels, named as every record names them.
  blocks = GpuBlocks(kernel="packed", q_tma=2)
  back = gpu.parse_blocks(gpu.blocks_spec(blocks))
  assert back == blocks.resolved() == back.resolved() != blocks
  assert (back.num_warps, back.rung_group, back.rung_group_bwd, back.num_stages_bwd) == (4, 2, 1, 2)
  props = ("warps", "group", "group_bwd", "group_dkv", "stages_dq", "stages_dkv")
  assert all(getattr(back, p) == getattr(blocks, p) for p in props)
  assert gpu.blocks_spec(blocks) == "16,4,16,4,2,2,2,1,0,1,2,1,1,1,0,0,2"
  # The row-wise kernel folds no rungs and has no rung groups: 0 and 1 whatever was declared.
  rowwise = GpuBlocks(kernel="rowwise", fold=1)
  assert gpu.blocks_spec(rowwise) == "16,2,16,4,2,2,1,1,0,1,2,1,0,1,0,0,0"
