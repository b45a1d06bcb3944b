"""experiments/bench_attention.py: what it times, on CPU (the GPU numbers come from a device)."""

import argparse
import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import bench_attention
from fibax.patterns import Pattern
from kernels_pallas.gpu import GpuBlocks


def test_forward_backward_takes_the_cotangent_as_an_argument():
  """The weights are a parameter of the compiled backward (not a folded constant): new
  weights give new gradients from the same compiled function."""
  pattern = Pattern.build(base="fib", alpha=1.0, window=4, seq_len=64)
  fn = bench_attention.implementations(pattern, None)["xla"]
  q = jax.random.normal(jax.random.key(0), (1, 64, 8, 16))
  k = jax.random.normal(jax.random.key(1), (1, 64, 2, 16))
  grad = bench_attention.forward_backward(fn)
  w1, w2 = jnp.ones(q.shape), -2 * jnp.ones(q.shape)
  lowered = grad.lower(q, k, k, w1)
  assert len(jax.tree.leaves(lowered.args_info)) == 4
  assert q.size * 4 > len(lowered.as_text())  # no [1, 64, 8, 16] constant in the program
  np.testing.assert_allclose(grad(q, k, k, w2)[0], -2 * grad(q, k, k, w1)[0], rtol=1e-5)
  row = bench_attention.bench_one("xla", fn, q, k, k, w1)
  assert row["fwd_ms"] > 0 and row["fwdbwd_ms"] > 0 and row["fwd_bytes"] > 0


def test_summary_gives_both_kernels_their_ratios_at_their_worst_alpha():
  rows = [
    {"impl": "cudnn_window", "seq_len": 1024, "alpha": None, "fwdbwd_ms": 1.0},
    {"impl": "cudnn_dense", "seq_len": 1024, "alpha": None, "fwdbwd_ms": 2.0},
  ]
  for impl, times in (("pallas", (1.5, 1.2)), ("pallas_packed", (0.8, 0.9))):
    rows += [
      {"impl": impl, "seq_len": 1024, "alpha": a, "fwdbwd_ms": t, "fwd_ms": t / 4,
       "hbm_floor_ms": 0.1}
      for a, t in zip((0.5, 1.5), times, strict=True)
    ]  # fmt: skip
  s = bench_attention.summarize(rows)
  assert s["fwdbwd_ratio_vs_cudnn_window_T1024"] == 1.5
  assert s["packed_fwdbwd_ratio_vs_cudnn_window_T1024"] == 0.9
  assert s["packed_fwdbwd_speedup_vs_cudnn_dense_T1024"] == round(2.0 / 0.9, 3)
  assert s["packed_fwd_ratio_vs_hbm_floor_T1024"] == round(0.9 / 4 / 0.1, 3)


def test_a_bad_block_config_is_named_before_anything_runs(capsys):
  bad_configs = (
    "16,2,16",
    "16,2,x,4",
    "16,2,16,4,2,1,1,1,1,1,1,1,1,1,1,1,1,1",
    "16,2,16,4,0",
    "16,2,16,4,2,-1",
  )
  for bad in (
    *bad_configs,
    "16,2,16,4,2,1,3",
    "16,2,16,4,2,1,2,-2",
    "16,2,16,4,2,1,1,1,5",
    "16,2,16,4,2,1,1,1,0,4",
  ):
    with pytest.raises(SystemExit):
      bench_attention.main(["--sweep", "16,2,16,4", bad])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"bench_attention.py: error: --sweep: bad block config '{bad}'"), err


def test_sweep_summary_picks_the_best_config_per_length_against_its_baselines():
  rows = [
    {"impl": "cudnn_window", "seq_len": 1024, "fwd_ms": 0.2, "fwdbwd_ms": 1.0, "hbm_floor_ms": 0.1},
    {"impl": "pallas_packed", "seq_len": 1024, "fwd_ms": 0.5, "fwdbwd_ms": 0.9,
     "hbm_floor_ms": 0.1, "blocks": [16, 2, 16, 4, 2]},
    {"impl": "pallas_packed", "seq_len": 1024, "fwd_ms": 0.4, "fwdbwd_ms": 1.2,
     "hbm_floor_ms": 0.1, "blocks": [32, 4, 32, 4, 3]},
    {"impl": "pallas_packed", "seq_len": 1024, "error": "ValueError: too big",
     "blocks": [64, 8, 64, 8, 2]},
  ]  # fmt: skip
  assert bench_attention.sweep_summary(rows) == {
    "best_fwd_T1024": {"blocks": [32, 4, 32, 4, 3], "fwd_ms": 0.4, "ratio_vs_hbm_floor": 4.0},
    "best_fwdbwd_T1024": {
      "blocks": [16, 2, 16, 4, 2],
      "fwdbwd_ms": 0.9,
      "ratio_vs_cudnn_window": 0.9,
    },
  }


def test_parse_spec_reads_the_stages_when_given():
  b = bench_attention.parse_spec("32,4,16,8,3")
  assert (b.block_q, b.num_warps, b.block_q_bwd, b.num_warps_bwd, b.num_stages) == (32, 4, 16, 8, 3)
  assert bench_attention.parse_spec("32,4,16,8").num_stages == GpuBlocks().num_stages
  assert bench_attention.parse_spec("32,4,16,8,3").num_stages_bwd == 0  # the backward: 3 too
  assert bench_attention.parse_spec("32,4,16,8,3,2").num_stages_bwd == 2
  assert bench_attention._spec(bench_attention.parse_spec("32,4,16,8,3")) == [
    *(32, 4, 16, 8, 3, 3),
    *(2, 1),  # the packed kernel's: two rungs to a tile forward, one backward
    0,  # its softmax on the whole masked tile
    1,  # dk and dv accumulated transposed
    3,  # the dkv kernel's stages: the backward's
    1,  # the softmax in base 2
    1,  # the rungs in the window's tile folded into its mask
    1,  # the dkv kernel's rung group: the backward's
    0,  # every kernel's static rungs as tensor-core tiles
    0,  # dk and dv from the Triton kernel
    0,  # the forward and dq from the Triton kernels
  ]
  b = bench_attention.parse_spec("16,2,16,4,2,2,4")
  assert (b.kernel, b.rung_group, b.group_bwd) == ("packed", 4, 1)  # backward: 0, one a step
  got = bench_attention._spec(bench_attention.parse_spec("16,2,16,4,2,2,4,2"))
  assert got[6:] == [4, 2, 0, 1, 2, 1, 1, 2, 0, 0, 0]  # group_dkv: the backward's
  assert bench_attention.parse_spec("16,4,16,4,2,2,2,1,0,1,2,1,1,1,0,1").dkv_tma == 1
  b = bench_attention.parse_spec("16,4,16,4,2,2,2,1,0,1,2,1,1,1,0,1,3")
  assert (b.dkv_tma, b.q_tma) == (1, 3)  # all three kernels in Mosaic GPU
  assert bench_attention._spec(b)[14:] == [0, 1, 3]
  assert bench_attention.parse_spec("16,4,16,4,2,2,2,1,0,1,2,1,1,1,2,0,1").q_tma == 1  # fwd
  assert bench_attention.parse_spec("16,2,16,4,2,2,1,1,0").diagonal == 0
  assert bench_attention.parse_spec("16,2,16,4,2,2,1,1,0").dkv_t == 1  # the default
  assert bench_attention.parse_spec("16,2,16,4,2,2,1,1,0,0").dkv_t == 0
  b = bench_attention.parse_spec("16,2,16,4,2,3,1,1,0,1,2")
  assert (b.stages_dq, b.stages_dkv) == (3, 2)  # dq 3 stages, dkv 2
  assert bench_attention._spec(b)[4:] == [2, 3, 1, 1, 0, 1, 2, 1, 1, 1, 0, 0, 0]
  assert bench_attention.parse_spec("16,2,16,4,2,2,1,1,0,1,0,0").exp2 == 0
  assert bench_attention.parse_spec("16,2,16,4,2,2,1,1,0,1,0,1").fold == 1  # the default
  assert bench_attention.parse_spec("16,2,16,4,2,2,1,1,0,1,0,1,0").fold == 0
  b = bench_attention.parse_spec("16,2,16,4,2,2,2,2,0,1,0,1,1,1")
  assert (b.group_bwd, b.group_dkv) == (2, 1)  # dq two rungs a step, dkv one
  assert bench_attention.parse_spec("16,2,16,4,2,2,2,1,0,1,0,1,1,0,4").ew_rungs == 4  # dkv's


@pytest.mark.parametrize(
  "spec, why",
  [
    ("16,2,16", "of integers"),
    ("16,2,16,4,2,2,4,2,1,1,1,1,1,1,1,1,1,1", "of integers"),
    ("16,2,16,4,2,2,1,1,0,1,0,1,1,0,0,0,4", "q_tma=4 must be a bitmask 0..3"),
    ("16,2,16,4,2,2,1,1,0,1,0,1,1,0,3,0,2", "q_tma=2 and ew_rungs=3 both set the dq kernel"),
    ("16,2,16,4,2,2,1,1,0,1,0,1,1,0,9", "ew_rungs=9 must be a bitmask"),
    ("16,2,16,4,2,2,1,1,0,1,0,1,1,3", "rung_group_dkv=3 must be a power of two"),
    ("16,2,16,4,2,2,1,1,0,1,0,1,2", "fold=2 must be 0 or 1"),
    ("16,2,16,4,2,2,1,1,0,1,0,2", "exp2=2 must be 0 or 1"),
    ("16,2,16,4,2,2,1,1,0,1,-1", "num_stages_dkv=-1 must be >= 0"),
    ("16,2,16,4,2,2,1,1,0,2", "dkv_t=2 must be 0 or 1"),
    ("16,2,16,4,2,2,1,1,2", "diagonal=2 must be 0 or 1"),
    ("16,2,16,4,2,2,3", "rung_group=3 must be a power of two"),
    ("16,x,16,4", "invalid literal"),
  ],
)
def test_parse_spec_names_a_bad_config(spec, why):
  with pytest.raises(ValueError, match=why):
    bench_attention.parse_spec(spec)


@pytest.mark.parametrize(
  "argv, why",
  [
    (["--rung-group", "-2"], "rung_group=-2 must be a power of two or 0"),
    (["--num-warps", "3"], "num_warps=3 must be a power of two or 0"),
    (["--rung-group", "3"], "rung_group=3 must be a power of two"),
    (["--block-q", "8"], "block_q=8 must be a power of two >= 16"),
    (["--num-warps-bwd", "6"], "num_warps_bwd=6 must be a power of two >= 1"),
    (["--diagonal", "2"], "diagonal=2 must be 0 or 1"),
    (["--dkv-t", "3"], "dkv_t=3 must be 0 or 1"),
    (["--num-stages-dkv", "-2"], "num_stages_dkv=-2 must be >= 0"),
    (["--exp2", "3"], "exp2=3 must be 0 or 1"),
    (["--fold", "-1"], "fold=-1 must be 0 or 1"),
    (["--autotune", "16,2,16,4,2,2,1,2", "--sweep-impl", "pallas"], "rung groups are the packed"),
    (["--autotune", "16,2,16"], "--autotune: bad block config '16,2,16'"),
    (["--ew-rungs", "9"], "ew_rungs=9 must be a bitmask"),
    (
      ["--sweep", "16,2,16,4,2,2,1,1,0,1,2,1,1,0,4", "--sweep-impl", "pallas"],
      "ew_rungs is the packed kernel's option",
    ),
    (["--dkv-tma", "2"], "dkv_tma=2 must be 0 or 1"),
    (
      ["--sweep", "16,2,16,4,2,2,1,1,0,1,2,1,1,0,0,1", "--sweep-impl", "pallas"],
      "dkv_tma is the packed kernel's option",
    ),
    (["--dkv-tma", "1", "--ew-rungs", "4"], "both set the dkv kernel"),
    (["--q-tma", "4"], "q_tma=4 must be a bitmask 0..3"),
    (
      ["--sweep", "16,2,16,4,2,2,1,1,0,1,2,1,1,0,0,0,2", "--sweep-impl", "pallas"],
      "q_tma is the packed kernel's option",
    ),
    (["--q-tma", "1", "--ew-rungs", "5"], "q_tma=1 and ew_rungs=5 both set the forward kernel"),
  ],
)
def test_bad_blocks_of_the_benchmark_are_one_line_errors_before_anything_runs(argv, why, capsys):
  with pytest.raises(SystemExit):
    bench_attention.main(argv)
  err = capsys.readouterr().err.strip().splitlines()[-1]
  assert err.startswith("bench_attention.py: error: ") and why in err, err


def test_rung_groups_are_refused_for_the_rowwise_sweep(capsys):
  with pytest.raises(SystemExit):
    bench_attention.main(["--sweep", "16,2,16,4,2,2,4", "--sweep-impl", "pallas"])
  assert "--sweep 16,2,16,4,2,2,4: rung groups are the packed kernel's" in capsys.readouterr().err


def _sweep_on_cpu(tmp_path, monkeypatch, *argv) -> dict:
  """bench_attention --sweep ... on a CPU: the GPU kernels and cuDNN cannot run, so their rows
  carry the error, and the report is still written whole (the copy bandwidth, which takes
  half a minute to measure on a CPU, is given)."""
  monkeypatch.setattr(bench_attention, "copy_bandwidth", lambda: 1e12)
  out = tmp_path / "sweep.json"
  bench_attention.main(["--sweep", *argv, "--tokens", "128", "--out", str(out)])
  return json.loads(out.read_text())


def test_the_rowwise_sweep_takes_specs_that_name_no_rung_groups(tmp_path, monkeypatch):
  """A spec without groups means the row-wise kernel's own (none), not the packed default's 2,
  and its row records the blocks the row-wise kernel ran with (0 warps: its own 2)."""
  report = _sweep_on_cpu(
    tmp_path, monkeypatch, "16,0,16,4", "--sweep-impl", "pallas", "--lengths", "64"
  )
  got = [(r["impl"], r.get("blocks")) for r in report["results"]]
  want = [16, 2, 16, 4, 2, 2, 1, 1, 0, 1, 2, 1, 0, 1, 0, 0, 0]
  assert got == [("cudnn_window", None), ("pallas", want)]


def test_the_rowwise_kernel_gets_the_blocks_without_the_rung_groups(monkeypatch):
  seen = []
  monkeypatch.setattr(
    bench_attention, "fib_attention", lambda *a, blocks, **kw: seen.append(blocks)
  )
  blocks = GpuBlocks(kernel="packed", num_warps=8, rung_group=4, rung_group_bwd=2)
  impls = bench_attention.implementations(Pattern(2), blocks)
  impls["pallas"](None, None, None)
  impls["pallas_packed"](None, None, None)
  assert (seen[0].kernel, seen[0].num_warps, seen[0].group, seen[0].group_bwd) == (
    "rowwise",
    8,
    1,
    1,
  )
  assert seen[1] == blocks


def test_sweep_writes_every_config_beside_the_window_at_each_length(tmp_path, monkeypatch):
  """Every row, each failing on a CPU, and the command in the report."""
  report = _sweep_on_cpu(
    tmp_path, monkeypatch, "16,2,16,4", "32,4,32,4,3", "--lengths", "64", "128"
  )
  assert report["impl"] == "pallas_packed" and "--sweep" in report["command"]
  assert report["blocks_fields"][9:] == [
    "dkv_t", "num_stages_dkv", "exp2", "fold", "rung_group_dkv", "ew_rungs",
    "dkv_tma", "q_tma"
  ]  # fmt: skip
  got = [(r["seq_len"], r["impl"], r.get("blocks")) for r in report["results"]]
  default = [16, 2, 16, 4, 2, 2, 2, 1, 0, 1, 2, 1, 1, 1, 0, 0, 0]
  big = [32, 4, 32, 4, 3, 3, 2, 1, 0, 1, 3, 1, 1, 1, 0, 0, 0]
  assert got == [
    (64, "cudnn_window", None), (64, "pallas_packed", default), (64, "pallas_packed", big),
    (128, "cudnn_window", None), (128, "pallas_packed", default), (128, "pallas_packed", big),
  ]  # fmt: skip
  assert report["copy_bandwidth_GBps"] == 1000
  floor = (2 * 128 * 8 + 2 * 128 * 2) * 64 * 2 / 1e12 * 1e3  # q, o, k, v bytes at T = 128
  assert [r["hbm_floor_ms"] for r in report["results"][3:]] == [floor] * 3


def test_main_times_every_alpha_of_the_packed_kernel_only_and_writes_after_every_row(
  tmp_path, monkeypatch
):
  """The packed kernel at every alpha, the row-wise kernel and the baselines at the middle
  one; the JSON is rewritten after every row, so a run stopped midway keeps its rows."""
  monkeypatch.setattr(bench_attention, "copy_bandwidth", lambda: 1e12)
  calls = []

  def fake_bench(name, fn, q, k, v, w):
    if len(calls) == 4:
      raise KeyboardInterrupt  # the run stopped during its fifth and last measurement
    calls.append(name)
    return {"impl": name, "fwd_ms": 1.0, "fwdbwd_ms": 2.0, "fwd_bytes": 1}

  monkeypatch.setattr(bench_attention, "bench_one", fake_bench)
  out = tmp_path / "bench.json"
  args = ["--lengths", "64", "--tokens", "64", "--impls", "pallas", "pallas_packed", "xla"]
  with pytest.raises(KeyboardInterrupt):
    bench_attention.main([*args, "--out", str(out)])
  report = json.loads(out.read_text())
  got = [(r["impl"], r["alpha"]) for r in report["results"]]
  assert got == [("pallas_packed", 0.5), ("pallas", 1.0), ("pallas_packed", 1.0), ("xla", 1.0)]
  assert "fwdbwd_speedup_vs_xla_T64" in report["summary"] and report["wall_s"] >= 0
  assert [p.name for p in tmp_path.iterdir()] == ["bench.json"]  # no temporary file left


def test_the_spec_format_names_every_spec_key_in_balanced_brackets():
  fmt = bench_attention.SPEC_FORMAT
  assert fmt.count("[") == fmt.count("]") == len(bench_attention.SPEC_KEYS) - 4
  assert fmt.count(",") + 1 == len(bench_attention.SPEC_KEYS)


def test_autotune_takes_the_forward_from_the_fastest_forward_and_the_backward_from_the_rest(
  monkeypatch,
):
  """The forward's fields (rows, warps, stages, group, exp2, fold, the forward's bits of ew and
  q_tma) come from the config with the fastest forward; the backward's (rows, warps, stages,
  group, dkv_t, the dkv kernel's stages, dkv_tma, the other bits of ew and q_tma) from the one
  with the fastest forward + backward less its forward."""
  rows = [
    {"fwd_ms": 0.1, "fwdbwd_ms": 0.9,
     "blocks": [32, 4, 16, 4, 3, 2, 2, 1, 0, 1, 2, 0, 0, 1, 3, 1, 0]},
    {"fwd_ms": 0.3, "fwdbwd_ms": 0.5,
     "blocks": [16, 2, 64, 8, 2, 4, 1, 2, 0, 0, 3, 1, 1, 1, 4, 0, 3]},
    {"error": "ValueError: too big", "blocks": [64, 8, 64, 8, 1, 1, 1, 1, 0, 1, 1, 1, 1, 1]},
  ]  # fmt: skip
  monkeypatch.setattr(bench_attention, "sweep", lambda *a, **k: rows)
  args = argparse.Namespace(lengths=[1024])
  got = bench_attention.autotune(args, [])["blocks"]
  assert (got.block_q, got.num_warps, got.num_stages, got.rung_group) == (32, 4, 3, 2)
  assert (got.block_q_bwd, got.num_warps_bwd, got.num_stages_bwd, got.rung_group_bwd) == (
    64, 8, 4, 2,
  )  # fmt: skip
  assert (got.dkv_t, got.stages_dkv, got.exp2, got.fold) == (0, 3, 0, 0)  # exp2, fold: forward's
  assert (got.rung_group_dkv, got.group_dkv) == (1, 1)  # the backward's row's
  assert got.ew_rungs == 1 | 4  # the forward's bit from the forward's row, dq's and dkv's not
  assert got.dkv_tma == 0  # the backward's row's
  assert got.q_tma == 2  # dq's bit from the backward's row, the forward's (0) from the forward's
  rows[0]["blocks"][14:], rows[1]["blocks"][14:] = [0, 0, 3], [0, 1, 0]
  got = bench_attention.autotune(args, [])["blocks"]
  assert (got.q_tma, got.dkv_tma, got.ew_rungs) == (1, 1, 0)  # the forward's row's dq bit not
  args.sweep_impl = "pallas"  # the row-wise kernel's rows name no groups: the packed keeps its own
  got = bench_attention.autotune(args, [])["blocks"]
  assert (got.rung_group, got.rung_group_bwd, got.group, got.group_bwd) == (0, 0, 2, 1)
  assert (got.rung_group_dkv, got.group_dkv) == (0, 1)
  assert got.fold == 1  # the rows record fold 0 (the row-wise kernel folds none): not taken
  assert (got.ew_rungs, got.q_tma) == (0, 0)  # the packed kernel's options: not taken


def test_the_packed_kernel_runs_the_machines_default_unless_block_flags_tune_it(
  tmp_path, monkeypatch
):
  """No block flag: fibax's default on the machine (here a stand-in for a Hopper GPU's, the
  Mosaic kernels); block flags tune the declared blocks (the Triton kernels) unless they name
  the Mosaic ones themselves; what ran is in the JSON."""
  mosaic = GpuBlocks(kernel="packed", q_tma=3, dkv_tma=1)
  monkeypatch.setattr(bench_attention, "default_blocks", lambda kernel: mosaic)
  monkeypatch.setattr(bench_attention, "copy_bandwidth", lambda: 1e12)
  seen = []

  def spy(pattern, blocks):
    seen.append(blocks)
    return {"pallas_packed": None}

  monkeypatch.setattr(bench_attention, "implementations", spy)
  monkeypatch.setattr(
    bench_attention,
    "bench_one",
    lambda name, *a: {"impl": name, "fwd_ms": 1.0, "fwdbwd_ms": 2.0, "fwd_bytes": 1},
  )
  base = ["--lengths", "64", "--tokens", "64", "--impls", "pallas_packed", "--alphas", "1.0"]
  for flags, want in (
    ([], mosaic),
    (["--num-warps", "2"], GpuBlocks(kernel="packed", num_warps=2)),
    (
      ["--num-warps", "2", "--q-tma", "3", "--dkv-tma", "1"],
      dataclasses.replace(mosaic, num_warps=2),
    ),
  ):
    seen.clear()
    bench_attention.main([*base, *flags, "--out", str(tmp_path / "b.json")])
    assert seen and all(b == want for b in seen), (flags, seen)
