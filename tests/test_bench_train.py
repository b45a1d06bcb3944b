"""experiments/bench_train.py: the configs it times and the summary the issue's targets name."""

import jax
import jax.numpy as jnp
import pytest

from experiments import bench_train
from kernels_pallas.gpu import default_blocks


def test_run_config_keeps_tokens_per_step_and_sets_the_implementations():
  cfg = bench_train.run_config("fib_stagger_w12", 8192, 32768, "pallas", "cudnn", 2)
  assert (cfg.train.batch_size, cfg.model.seq_len, cfg.train.grad_accum) == (4, 8192, 2)
  assert cfg.model.attention.impl == "pallas" and cfg.model.attention.dense_impl == "cudnn"
  assert cfg.model.d_model == 512 and cfg.model.num_layers == 16  # the paper's model
  with pytest.raises(ValueError, match="--tokens=1000 is not a multiple of T=1024"):
    bench_train.run_config("dense", 1024, 1000, "pallas", "cudnn", 1)


def test_summary_names_the_targets():
  results = [
    {"run": "dense", "seq_len": 1024, "mfu": 0.4, "ms_per_step": 60.0},
    {"run": "fib_stagger_w12", "seq_len": 1024, "mfu": 0.3, "ms_per_step": 50.0},
    {"run": "fib_stagger_w12", "seq_len": 8192, "mfu": 0.3, "ms_per_step": 40.0},
  ]
  assert bench_train.summarize(results) == {
    "mfu_dense_T1024": 0.4,
    "mfu_fib_stagger_w12_T1024": 0.3,
    "mfu_fib_stagger_w12_T8192": 0.3,
    "step_speedup_fib_stagger_w12_vs_dense_T1024": 1.2,
  }


def test_summary_sets_each_variant_against_the_same_variant_and_each_model_at_its_fastest():
  results = [
    {"run": "dense", "seq_len": 1024, "mfu": 0.4, "ms_per_step": 40.0,
     "ms_per_step_no_command_buffers": 42.0},
    {"run": "fib_stagger_w12", "seq_len": 1024, "mfu": 0.3, "ms_per_step": 38.0,
     "ms_per_step_no_command_buffers": 37.0},
  ]  # fmt: skip
  summary = bench_train.summarize(results)
  key = "step_speedup_fib_stagger_w12_vs_dense_T1024"
  assert summary[key] == round(40 / 38, 3)
  assert summary[f"{key}_no_command_buffers"] == round(42 / 37, 3)
  assert summary[f"{key}_fastest"] == round(40 / 37, 3)  # dense with, sparse without


def test_variants_are_timed_in_the_same_rounds_and_the_profile_runs_op_by_op(tmp_path, monkeypatch):
  """`--command-buffers both` compiles the step a second time without command buffers and
  times it beside the default; a profile traces an executable compiled without them."""
  from eval_helpers import micro_run_config

  options = []
  compile_ = jax.stages.Lowered.compile

  def spy(self, compiler_options=None):
    options.append(compiler_options)
    return compile_(self, compiler_options=compiler_options)

  monkeypatch.setattr(jax.stages.Lowered, "compile", spy)
  cfg = micro_run_config(tmp_path, "stagger")
  variants = {"no_command_buffers": bench_train.NO_COMMAND_BUFFERS}
  result = bench_train.bench(cfg, 1, None, None, variants)
  assert options == [None, bench_train.NO_COMMAND_BUFFERS]
  assert result["ms_per_step"] > 0 and result["ms_per_step_no_command_buffers"] > 0
  assert 0 < result["lower_s"] < result["compile_s"] + 0.05  # a part of it (compile_s rounded)
  options.clear()
  result = bench_train.bench(cfg, 1, None, tmp_path / "trace")
  assert options == [None, bench_train.NO_COMMAND_BUFFERS]  # the default timed, op by op traced
  assert "ms_per_step_no_command_buffers" not in result


def test_top_device_ops_sums_the_xla_ops_of_device_planes():
  from types import SimpleNamespace as NS

  def line(name, *events):
    return NS(name=name, events=[NS(name=n, duration_ns=d) for n, d in events])

  planes = [
    NS(name="/host:CPU", lines=[line("python", ("fusion.1", 9e9))]),  # host time: not counted
    NS(
      name="/device:GPU:0",
      lines=[
        line("XLA Ops", ("fusion.1", 3e6), ("fib_attention_fwd", 5e6), ("fusion.1", 2e6)),
        line("XLA Modules", ("jit_train", 1e7)),  # the module span: not an op
      ],
    ),
  ]
  top = bench_train.top_device_ops(planes, steps=2)
  assert top == [
    {"op": "fib_attention_fwd", "ms_per_step": 2.5, "share": 0.5},
    {"op": "fusion.1", "ms_per_step": 2.5, "share": 0.5},
  ] or top == [
    {"op": "fusion.1", "ms_per_step": 2.5, "share": 0.5},
    {"op": "fib_attention_fwd", "ms_per_step": 2.5, "share": 0.5},
  ]


def _program_for_sources(x):
  return jnp.tanh(x @ x).sum()  # the line hlo_sources must name


def test_hlo_sources_name_the_op_and_the_python_line_of_each_instruction():
  import inspect

  text = jax.jit(_program_for_sources).lower(jnp.ones((32, 32))).compile().as_text()
  sources = bench_train.hlo_sources(text)
  line = inspect.getsourcelines(_program_for_sources)[1] + 1
  here = f"test_bench_train.py:{line} (_program_for_sources)"
  dots = [v for v in sources.values() if "dot_general" in v]
  assert dots and all(v.endswith(here) for v in dots), sources
  assert any(v.startswith("jit(_program_for_sources)/") for v in sources.values()), sources


def test_top_device_ops_attach_the_events_hlo_op_and_its_source():
  from types import SimpleNamespace as NS

  events = [
    NS(name="sm90_gemm_kernel", duration_ns=4e6, stats=[("hlo_op", "cublas-gemm.3"), ("x", 1)]),
    NS(name="fusion.7", duration_ns=1e6, stats=[]),
    NS(name="sm90_gemm_kernel", duration_ns=2e6, stats=[("hlo_op", "cublas-gemm.3")]),
  ]
  planes = [NS(name="/device:GPU:0", lines=[NS(name="XLA Ops", events=events)])]
  sources = {"cublas-gemm.3": "jit(train)/transpose(jvp(dot_general)) @ model.py:251 (_logits)"}
  top = bench_train.top_device_ops(planes, steps=1, sources=sources)
  assert top == [
    {
      "op": "sm90_gemm_kernel", "ms_per_step": 6.0, "share": 0.8571, "hlo_op": "cublas-gemm.3",
      "source": sources["cublas-gemm.3"],
    },
    {"op": "fusion.7", "ms_per_step": 1.0, "share": 0.1429},
  ]  # fmt: skip


def test_a_kernel_inside_a_command_buffer_finds_its_source_by_its_name():
  """Traced inside XLA's command buffers, a fusion's `hlo_op` is the buffer: its kernel's
  name (the instruction's, ".N" written "_N") finds the source."""
  from types import SimpleNamespace as NS

  events = [
    NS(name="loop_multiply_fusion_15", duration_ns=2e6, stats=[("hlo_op", "command_buffer_6")]),
    NS(name="loop_convert_fusion", duration_ns=1e6, stats=[("hlo_op", "command_buffer_6")]),
    NS(name="nvjet_sm90_tst_128x128_64x6_1x2_h_bz_NNT", duration_ns=1e6, stats=[]),
  ]
  planes = [NS(name="/device:GPU:0", lines=[NS(name="XLA Ops", events=events)])]
  sources = {
    "loop_multiply_fusion.15": "jit(train_step)/layer_0/mlp/mul @ model.py:178 (SwiGLU.__call__)",
    "loop_convert_fusion": "jit(train_step)/convert_element_type @ steps.py:83 (output_losses)",
  }
  rows = bench_train.top_device_ops(planes, steps=1, sources=sources)
  assert [r.get("source") for r in rows] == [*sources.values(), None]
  assert bench_train.kernel_instruction("input_reduce_fusion_65") == "input_reduce_fusion.65"
  assert bench_train.kernel_instruction("memcpy128") == "memcpy128"  # no "_N": as it is
  kinds = bench_train.op_kinds(rows)
  assert (kinds["mlp_elementwise"], kinds["loss"], kinds["matmul"]) == (2.0, 1.0, 1.0)


def test_one_kernel_run_for_two_instructions_is_a_row_for_each():
  """A kernel name the trace gives several instructions' work (cuDNN's and a sort's memsets
  are all "Memset 3") is split by `hlo_op`, so each row's source and kind are its own."""
  from types import SimpleNamespace as NS

  events = [
    NS(name="Memset 3", duration_ns=1e6, stats=[("hlo_op", "sort.1")]),
    NS(name="Memset 3", duration_ns=3e6, stats=[("hlo_op", "custom-call.9")]),
    NS(name="Memset 3", duration_ns=1e6, stats=[("hlo_op", "sort.1")]),
  ]
  planes = [NS(name="/device:GPU:0", lines=[NS(name="XLA Ops", events=events)])]
  sources = {
    "sort.1": "jit(train)/jit(argsort)/sort @ model.py:347 (Transformer.__call__)",
    "custom-call.9": "jit(train)/attn/dot_product_attention_bwd @ attention.py:78 (attend)",
  }
  rows = bench_train.top_device_ops(planes, steps=1, sources=sources)
  got = [(r["hlo_op"], r["ms_per_step"]) for r in rows]
  assert got == [("custom-call.9", 3.0), ("sort.1", 2.0)]
  kinds = bench_train.op_kinds(rows)
  assert kinds["embedding"] == 2.0 and kinds["memset_copy"] == 3.0  # not 5 ms of embedding


def test_profile_traces_steps_and_writes_the_trace(tmp_path):
  from eval_helpers import micro_run_config

  result = bench_train.bench(micro_run_config(tmp_path, "stagger"), 1, None, tmp_path / "trace")
  assert list((tmp_path / "trace").rglob("*.xplane.pb"))  # the trace is kept for a viewer
  assert result["profile_top"] == [] and result["ms_per_step"] > 0  # CPU: no device plane
  assert "ENTRY" in next((tmp_path / "trace").glob("program.hlo.txt")).read_text()


def test_mfu_counts_against_the_higher_of_the_two_peak_measurements(tmp_path, monkeypatch):
  """The peak is measured before and after the runs; every MFU is against the higher one, and
  the JSON records both, the flags the backend read, and fibax's XLA defaults among them."""
  import json

  peaks = iter([100.0, 200.0])
  monkeypatch.setattr(bench_train, "matmul_peak_tflops", lambda n: next(peaks))
  monkeypatch.setattr(
    bench_train, "bench", lambda *a: {"ms_per_step": 10.0, "tokens_per_s": 1e6, "compile_s": 1.0}
  )
  monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
  out = tmp_path / "train.json"
  bench_train.main(["--runs", "dense", "--seq-lens", "1024", "--out", str(out)])
  report = json.loads(out.read_text())
  assert report["matmul_peak_tflops_measured"] == 100.0
  assert report["matmul_peak_tflops_measured_after"] == 200.0
  assert report["matmul_peak_tflops_used"] == 200.0
  (r,) = report["results"]
  assert r["mfu"] == round(1e6 * r["model_tflops_per_token"] / 200.0, 4) > 0
  assert report["summary"]["mfu_dense_T1024"] == r["mfu"]
  assert "--xla_gpu_enable_triton_gemm=false" in report["xla_flags"]


def test_a_learned_run_reports_each_layers_alpha_after_its_steps(tmp_path):
  """A learned model's per-layer alphas after the timed steps (each moved off its start, 1),
  none for a static one."""
  from eval_helpers import micro_run_config

  learned = bench_train.bench(micro_run_config(tmp_path, "learned"), 1, None, None)
  alphas = learned["alphas_after"]
  assert len(alphas) == 2 and all(0.5 < a < 1.5 and a != 1.0 for a in alphas)
  static = bench_train.bench(micro_run_config(tmp_path, "stagger"), 1, None, None)
  assert "alphas_after" not in static


def test_blocks_reach_the_kernels_of_every_run_and_the_report(tmp_path, monkeypatch, capsys):
  """--blocks: each run traces under `attention.gpu_blocks` with them (the packed kernel's
  rung groups included) and the JSON records them; a bad config stops before any measurement."""
  import json

  from fibax import attention

  seen = []

  def fake_bench(*a):
    seen.append(attention.gpu_blocks_for("gpu", "packed"))
    return {"ms_per_step": 10.0, "tokens_per_s": 1e6, "compile_s": 1.0}

  monkeypatch.setattr(bench_train, "matmul_peak_tflops", lambda n: 100.0)
  monkeypatch.setattr(bench_train, "bench", fake_bench)
  out = tmp_path / "train.json"
  argv = ["--runs", "dense", "fib_stagger_w12", "--seq-lens", "1024", "--out", str(out)]
  bench_train.main([*argv, "--blocks", "16,2,16,4,3,2,4,2"])
  assert [(b.num_stages, b.num_stages_bwd, b.rung_group, b.group_bwd) for b in seen] == [
    (3, 2, 4, 2)
  ] * 2
  report = json.loads(out.read_text())
  assert report["gpu_blocks"] == [16, 2, 16, 4, 3, 2, 4, 2, 0, 1, 2, 1, 1, 2, 0, 0, 0]
  assert report["gpu_blocks_fields"][6:8] == ["rung_group", "rung_group_bwd"]  # names the list
  assert attention.gpu_blocks_for("gpu", "packed") == default_blocks("packed")  # context ended
  assert report["gpu_blocks_given"]
  bench_train.main(argv)  # no --blocks: the packed kernel's defaults, resolved, are recorded
  report = json.loads(out.read_text())
  tma = [1, 3] if default_blocks("packed").q_tma else [0, 0]  # (a Hopper GPU: the Mosaic ones)
  assert report["gpu_blocks"] == [16, 4, 16, 4, 2, 2, 2, 1, 0, 1, 2, 1, 1, 1, 0, *tma]
  assert not report["gpu_blocks_given"] and len(seen) == 4
  # The configs' own blocks (--set model.attention.gpu_blocks) where --blocks is not given.
  bench_train.main([*argv, "--set", "model.attention.gpu_blocks=16,2,16,4,3,2,4,2"])
  report = json.loads(out.read_text())
  assert report["gpu_blocks"][:8] == [16, 2, 16, 4, 3, 2, 4, 2] and report["gpu_blocks_given"]
  assert seen[-1] == bench_train.bench_attention.parse_spec("16,2,16,4,3,2,4,2")
  del seen[4:]
  with pytest.raises(SystemExit):
    bench_train.main([*argv, "--blocks", "16,2,16,4,2,2,3"])
  err = capsys.readouterr().err.strip().splitlines()[-1]
  assert err.startswith("bench_train.py: error: --blocks: bad block config '16,2,16,4,2,2,3'")
  assert len(seen) == 4


def test_profile_top_sums_an_ops_rows_over_the_layers():
  """One kernel run in every layer is one row of `profile_top`: same op, same source but for
  the layer index; another op or another source stays a row of its own."""
  rows = [
    {"op": "fib_dkv", "ms_per_step": 0.15, "share": 0.1, "hlo_op": "pallas_call.7",
     "source": "jit(train_step)/layer_7/attn/fib_dkv @ ops.py:145 (f)"},
    {"op": "fib_dkv", "ms_per_step": 0.125, "share": 0.05, "hlo_op": "pallas_call.2",
     "source": "jit(train_step)/layer_12/attn/fib_dkv @ ops.py:145 (f)"},
    {"op": "loss", "ms_per_step": 0.2, "share": 0.2, "source": "x @ steps.py:1 (loss)"},
    {"op": "fib_dkv", "ms_per_step": 0.5, "share": 0.3, "source": "other @ ops.py:9 (g)"},
    {"op": "Memset", "ms_per_step": 0.0625, "share": 0.01},
  ]  # fmt: skip
  top = bench_train.by_layer_kind(rows)
  assert [(r["op"], r["ms_per_step"], r["instances"]) for r in top] == [
    ("fib_dkv", 0.5, 1), ("fib_dkv", 0.275, 2), ("loss", 0.2, 1), ("Memset", 0.0625, 1),
  ]  # fmt: skip
  assert top[1]["source"] == "jit(train_step)/layer_*/attn/fib_dkv @ ops.py:145 (f)"
  assert top[1]["hlo_op"] == "pallas_call.7" and top[1]["share"] == 0.15  # the first's stats
  assert "source" not in top[3]


def test_device_gaps_are_the_idle_time_between_the_device_ops():
  """The gaps between the union of a device's op intervals, by the ops on either side, per
  step: overlapping ops leave no gap, span lines (the module) and host planes are not ops."""
  from types import SimpleNamespace as NS

  def line(name, *events):  # (name, start, end) in microseconds
    spans = [(n, a * 1e3, b * 1e3) for n, a, b in events]
    return NS(
      name=name,
      events=[NS(name=n, start_ns=a, end_ns=b, duration_ns=b - a, stats=()) for n, a, b in spans],
    )

  ops = line("XLA Ops", ("a", 0, 10), ("b", 15, 30), ("c", 20, 25), ("a", 40, 50), ("b", 55, 60))
  planes = [
    NS(name="/host:CPU", lines=[line("python", ("a", 0, 1000))]),
    NS(name="/device:GPU:0", lines=[ops, line("XLA Modules", ("jit_step", 0, 60))]),
  ]
  gaps = bench_train.device_gaps(planes, steps=2)
  assert gaps["idle_ms_per_step"] == 0.01  # 5 + 10 + 5 us over 2 steps
  assert gaps["top"] == [
    {"after": "a", "before": "b", "ms_per_step": 0.005, "per_step": 1.0},
    {"after": "b", "before": "a", "ms_per_step": 0.005, "per_step": 0.5},
  ]  # c ends inside b: the gap after them starts at b's end, and is b's
  # Without an "XLA Ops" line, every line but the spans (a graph's kernels on a stream line).
  stream = [line("Stream #1", ("k", 0, 4), ("k", 10, 12)), line("XLA Modules", ("m", 0, 12))]
  gaps = bench_train.device_gaps([NS(name="/device:GPU:0", lines=stream)], steps=1)
  assert gaps["idle_ms_per_step"] == 0.006
  top = bench_train.top_device_ops([NS(name="/device:GPU:0", lines=stream)], steps=1)
  assert [(r["op"], r["ms_per_step"]) for r in top] == [("k", 0.006)]  # not the module span


def test_op_kinds_sort_every_op_into_one_kind_and_sum_the_device_time():
  def row(op, ms, source=None, hlo_op=None):
    r = {"op": op, "ms_per_step": ms}
    return r | ({"source": source} if source else {}) | ({"hlo_op": hlo_op} if hlo_op else {})

  rows = [
    row("fib_attention_packed_dkv", 2.0),
    row("cudnn_generated_fort_native_sdpa_sm90_flash_bprop", 5.0),
    row("void cudnn::fusion::compute_dot_do_o_specialized<true, 64>(void)", 0.5),
    row("nvjet_sm90_tst_128x128", 3.0, "x @ steps.py:78 (output_losses)"),
    row("loop_convert_fusion_1", 1.5, "y @ steps.py:78 (output_losses)"),
    row("input_reduce_fusion", 1.0, "z @ _classification.py:403 (s)"),
    row("fusion.3", 0.5, hlo_op="cublas-lt-matmul.1"),
    row("Memset 3", 0.25),
    row("Memset 4", 1.0, "jit(argsort)/sort @ model.py:347 (Transformer.__call__)"),  # sorted grad
    row("loop_add_fusion", 0.125, "a @ model.py:178 (SwiGLU.__call__)"),
    row("input_scatter_fusion", 0.5, "b @ model.py:90 (embedding_grad_sorted)"),
    row("input_reduce_fusion_3", 0.25, "c @ model.py:73 (RMSNorm.__call__)"),
    row("input_concatenate_fusion_2", 0.5, "d @ model.py:86 (rope)"),
    row("input_concatenate_fusion", 0.125),
  ]
  assert bench_train.op_kinds(rows) == {
    "attention": 7.5,
    "device": 16.25,
    "embedding": 1.5,
    "loss": 2.5,
    "matmul": 3.5,
    "memset_copy": 0.25,
    "mlp_elementwise": 0.125,
    "norm": 0.25,
    "other": 0.125,
    "rope": 0.5,
  }


def test_both_settings_name_the_defaults_time_too(tmp_path, monkeypatch):
  """`--command-buffers both`: the step as fibax compiles it is also recorded under its own
  setting's name, beside the other setting, so the summary compares like with like."""
  import json

  monkeypatch.setattr(bench_train, "matmul_peak_tflops", lambda n: 100.0)
  seen = []

  def fake_bench(cfg, steps_timed, data, trace, variants, profile_default=False):
    seen.append(variants)
    return {"ms_per_step": 10.0, "ms_per_step_no_command_buffers": 12.0, "tokens_per_s": 1e6}

  monkeypatch.setattr(bench_train, "bench", fake_bench)
  out = tmp_path / "train.json"
  argv = ["--runs", "dense", "--seq-lens", "1024", "--out", str(out), "--command-buffers", "both"]
  bench_train.main(argv)
  (r,) = json.loads(out.read_text())["results"]
  assert seen == [{"no_command_buffers": bench_train.NO_COMMAND_BUFFERS}]  # the default has them
  assert r["ms_per_step_command_buffers"] == 10.0 and r["ms_per_step_no_command_buffers"] == 12.0
  bench_train.main(argv[:-2])
  assert seen[-1] == {}
  variant = ["--xla-variant", "cub_off=xla_gpu_enable_cub_radix_sort:false,xla_gpu_x:7"]
  bench_train.main([*argv, *variant])
  assert seen[-1] == {
    "no_command_buffers": bench_train.NO_COMMAND_BUFFERS,
    "cub_off": {"xla_gpu_enable_cub_radix_sort": False, "xla_gpu_x": 7},
  }


def test_xla_variants_are_parsed_and_bad_ones_are_one_line_errors(tmp_path, capsys):
  parse = bench_train.parse_xla_variant
  assert parse("a=xla_b:true") == ("a", {"xla_b": True})
  got = parse("a_2=xla_b:False,xla_c:12,xla_d:x,xla_e:-3,xla_f:1.5")
  assert got == ("a_2", {"xla_b": False, "xla_c": 12, "xla_d": "x", "xla_e": -3, "xla_f": "1.5"})
  out = tmp_path / "x.json"
  for bad, why in (
    (["nothing"], "bad variant 'nothing'"),
    (["A=xla_b:1"], "bad variant 'A=xla_b:1'"),
    (["a="], "bad variant 'a='"),
    (["a=b:1"], "bad option 'b:1' in 'a=b:1'"),
    (["a=xla_b"], "bad option 'xla_b' in 'a=xla_b'"),
    (["a=xla_b:1,xla_b:2"], "option xla_b named twice"),
    (["a=xla_b:1", "a=xla_c:1"], "variant name 'a' given twice"),
    *(([f"{n}=xla_b:1"], f"variant name '{n}'") for n in bench_train.RESERVED_VARIANTS),
  ):
    argv = ["--runs", "dense", "--out", str(out)]
    for spec in bad:
      argv += ["--xla-variant", spec]
    with pytest.raises(SystemExit):
      bench_train.main(argv)
    err = capsys.readouterr().err.strip().splitlines()[-1]  # (argparse's usage before it)
    assert f"error: --xla-variant: {why}" in err, err
    assert not out.exists()


def test_profile_as_timed_needs_a_profile_folder(tmp_path, capsys):
  with pytest.raises(SystemExit):
    bench_train.main(["--runs", "dense", "--profile-as-timed", "--out", str(tmp_path / "x.json")])
  err = capsys.readouterr().err.strip().splitlines()[-1]
  assert err.endswith("error: --profile-as-timed: traces nothing without --profile DIR")
  assert not (tmp_path / "x.json").exists()


def test_profile_reads_every_device_plane_for_the_ops_and_for_the_gaps(tmp_path, monkeypatch):
  """A trace's `.planes` can be read once: the top ops and the idle gaps both see the device
  plane (the gaps read 0 on a GPU while the ops were found, when they shared one iterator)."""
  from types import SimpleNamespace as NS

  def event(name, a, b):  # microseconds
    return NS(name=name, start_ns=a * 1e3, end_ns=b * 1e3, duration_ns=(b - a) * 1e3, stats=())

  stream = NS(name="Stream #14", events=[event("k", 0, 4), event("m", 10, 12)])
  plane = NS(name="/device:GPU:0", lines=[stream])
  monkeypatch.setattr(
    jax.profiler.ProfileData, "from_file", lambda path: NS(planes=(p for p in [plane]))
  )
  x = jnp.ones(4)
  compiled = jax.jit(lambda s, b: (s + b, s.sum())).lower(x, x).compile()
  result = bench_train.profile(compiled, x, [x], 1, tmp_path / "trace")
  assert [r["op"] for r in result["profile_top"]] == ["k", "m"]
  assert result["profile_gaps"]["idle_ms_per_step"] == 0.006
  assert result["profile_gaps"]["top"][0]["after"] == "k"
