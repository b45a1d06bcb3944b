"""Training-step benchmark: steps/s, tokens/s and MFU of the paper model, dense against sparse.

    python experiments/bench_train.py --out experiments/results/bench_train_h100.json

One process, one device. For every (run, T) the full train step of fibax.steps (forward,
backward, AdamW update; the paper's model at vocab 32,768) runs on random tokens at a fixed
number of tokens per step (B = tokens / T). Dense runs use cuDNN attention, sparse runs the
packed Pallas kernel (`--impl pallas` for the row-wise one). MFU is counted against a bf16
matmul peak measured in the same run, before and after the runs, the higher of the two (a
run cut short counts against the first only: `matmul_peak_tflops_used`; and, for reference,
the card's vendor peak). Results are written after every measurement, so a run
cut short keeps what it measured. The process runs with fibax's XLA defaults
(`fibax.cli.XLA_DEFAULTS`: cuBLAS for the matmuls, XLA's own sort, on a GPU) unless XLA_FLAGS
names them.

With `--profile DIR`, a few more steps of each run are traced with `jax.profiler` into
DIR/<run>_T<T>/, and the result gets `profile_kinds` (device time per step by kind of op:
attention, matmul, loss, embedding, ...; `device` their sum, against the step's wall time)
and `profile_top`: the device's XLA operations by time per step (the "XLA Ops" line of each
device plane of the trace; a CPU trace has no device plane; an op's rows for the layers
summed into one, with their count, `instances`), each with the JAX op and the line
of Python it came from where the compiled program says (`hlo_sources`; the program's text is
kept beside the trace). The traced steps run an executable compiled without XLA's command
buffers, op by op, so the trace names every kernel; the timed steps run as fibax compiles the
step (XLA's defaults: on a GPU, with command buffers, which hold the Pallas kernels too, as
a dump of the stagger step's thunks showed: experiments/results/speed_h200_8ec1543/). Their
`device` total is to be set against `ms_per_step_no_command_buffers`: `--command-buffers both`
times the step with and without command buffers in the same rounds (summary: each
sparse/dense ratio for both settings, and `_fastest`, each model at its faster one);
`--xla-variant NAME=OPTION:VALUE,...` likewise times the step compiled with other XLA options
as `ms_per_step_NAME`. The JSON records XLA_FLAGS as the backend read them (when `main` starts
the backend).
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import os
import re
import statistics
import sys
import time
from pathlib import Path

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from configs.paper import get_config
from experiments import bench_attention
from experiments.bench_attention import versions
from fibax import attention, cli, metrics, sharding
from fibax import model as model_lib
from fibax.config_loader import add_overrides_argument, apply_overrides
from fibax.data.files import atomic_write_json
from fibax.steps import make_steps


def matmul_peak_tflops(n: int = 8192, reps: int = 20) -> float:
  """bf16 TFLOP/s of a chain of [n, n] matmuls (the best of 5 rounds)."""
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.bfloat16)
  b = jax.random.normal(jax.random.key(1), (n, n), jnp.bfloat16) / n**0.5

  @jax.jit
  def chain(a):
    for _ in range(reps):
      a = a @ b
    return a

  jax.block_until_ready(chain(a))
  best = float("inf")
  for _ in range(5):
    t0 = time.perf_counter()
    jax.block_until_ready(chain(a))
    best = min(best, time.perf_counter() - t0)
  return 2 * n**3 * reps / best / 1e12


def run_config(name: str, seq_len: int, tokens: int, impl: str, dense_impl: str, accum: int):
  cfg = get_config(name)
  attn = dataclasses.replace(cfg.model.attention, impl=impl, dense_impl=dense_impl)
  model = dataclasses.replace(cfg.model, seq_len=seq_len, attention=attn)
  if tokens % seq_len:
    raise ValueError(f"--tokens={tokens} is not a multiple of T={seq_len}")
  train = dataclasses.replace(
    cfg.train, batch_size=tokens // seq_len, grad_accum=accum, progress_bar=False
  )
  return dataclasses.replace(cfg, model=model, train=train)


def batches(cfg, mesh, data_dir: str | None, count: int = 8) -> list:
  """`count` device batches: uniform random tokens, or the first batches of a prepared data
  directory's training split (real text repeats tokens, which random tokens do not)."""
  shape = (cfg.train.batch_size, cfg.model.seq_len)
  if data_dir is None:
    rng = np.random.default_rng(0)
    host = [
      {
        k: rng.integers(0, cfg.model.vocab_size, shape, dtype=np.int32)
        for k in ("inputs", "targets")
      }
      for _ in range(count)
    ]
  else:
    from fibax.data import train_iterator

    it = train_iterator(data_dir, cfg.model.seq_len, shape[0], cfg.train.seed, worker_count=0)
    host = [next(it) for _ in range(count)]
  return [sharding.global_batch(b, mesh) for b in host]


# Stats of a device event that name the HLO instruction or JAX op it ran for, where present.
EVENT_STATS = ("hlo_op", "tf_op", "long_name")


# Lines of a device plane that are spans around ops, not ops: the device's idle time is read
# from the others.
SPAN_LINES = ("XLA Modules", "Steps", "Launch Stats", "Source code")


def _op_lines(plane):
  """The lines of a device plane whose events are ops: "XLA Ops" where the trace has it (XLA
  names each op there), else every line but `SPAN_LINES` (a stream's kernels)."""
  ops = [line for line in plane.lines if line.name == "XLA Ops"]
  return ops or [line for line in plane.lines if line.name not in SPAN_LINES]


def top_device_ops(
  planes, steps: int, top: int | None = 25, sources: dict | None = None
) -> list[dict]:
  """The device operations of a trace (`jax.profiler.ProfileData` planes) with the most time
  (all of them for top=None): op name, ms per step and share of all device-op time, most
  first; with the event's EVENT_STATS where it has them, and `source` (`hlo_sources`) where
  the op (or its `hlo_op`) is an instruction of the compiled program. Events are summed by
  name and `hlo_op`: one kernel (a cuBLAS kernel, a "Memset") run for several instructions
  is a row per instruction, each with its own source."""
  totals, stats = collections.Counter(), {}
  for plane in planes:
    if not plane.name.startswith("/device:"):
      continue
    for line in _op_lines(plane):
      for event in line.events:
        found = dict(getattr(event, "stats", ()))
        key = (event.name, str(found.get("hlo_op", "")))
        totals[key] += event.duration_ns
        if key not in stats:
          stats[key] = {k: str(found[k]) for k in EVENT_STATS if k in found}
  total = sum(totals.values())
  sources = sources or {}
  rows = []
  for key, ns in totals.most_common(top):
    row = {"op": key[0], "ms_per_step": round(ns / 1e6 / steps, 3), "share": round(ns / total, 4)}
    row.update(stats[key])
    # The event's instruction, else (inside a command buffer) the kernel's own name, as it is
    # and as the instruction it is named after.
    names = (row.get("hlo_op"), key[0], kernel_instruction(key[0]))
    source = next((sources[n] for n in names if n in sources), None)
    rows.append({**row, "source": source} if source else row)
  return rows


def kernel_instruction(name: str) -> str:
  """The instruction a fusion's kernel is named after: XLA writes its ".N" as "_N"
  (loop_add_multiply_fusion_15 runs loop_add_multiply_fusion.15). A trace taken inside
  command buffers names the buffer as each kernel's `hlo_op`, so the kernel's name is what
  finds its source there."""
  return re.sub(r"_(\d+)$", r".\1", name)


# What each device op is, first match wins: (kind, where to look, pattern).
OP_KINDS = (
  # cuDNN runs only attention here: its helper kernels too (dO.O, dq's conversion: "cudnn::
  # fusion::...", 1.1 ms of the dense step at T = 1,024 on an H200).
  ("attention", "op", r"fib_attention|sdpa|fmha|flash|cudnn"),
  ("matmul", "op hlo_op", r"nvjet|gemm|cutlass|cublas|xmma|matmul"),
  # Before memset_copy: the sorted gradient's sort runs as a kernel the trace calls "Memset".
  (
    "embedding",
    "source",
    r"embedding_grad|_one_hot|_lookup|_sorted_slots|\b(argsort|sort|scatter|gather)\b.* @ "
    r"model\.py:\d+ \(Transformer\.__call__\)",
  ),
  ("memset_copy", "op", r"^(Memset|Memcpy|memcpy|copy)"),
  # The Pallas passes name their kernels: logsumexp (the loss), rms_norm_* (`norm_impl`).
  (
    "loss",
    "op source",
    r"^logsumexp$|output_losses|_classification\.py|_losses_compute|_logits|logsumexp_online",
  ),
  ("optimizer", "source", r"optax|optim\.py|adam|clip|apply_updates|_tree_math\.py"),
  # The model's elementwise and reduction passes, by the module they come from.
  ("mlp_elementwise", "source", r"\(SwiGLU\.__call__\)"),
  # (The fused norm's own passes, the scale's partial sums, by its wrapper's frame: XLA's
  # q/k/v-gradient concatenation carries the norm kernel's metadata, but not that frame.)
  (
    "norm",
    "op source",
    r"^rms_norm_(fwd|bwd)|\(RMSNorm\.__call__\)|\(rms_norm(_residual)?\)",
  ),
  ("rope", "source", r"\(rope\)"),
)


def op_kinds(rows: list[dict]) -> dict[str, float]:
  """ms per step of each kind of device op (`OP_KINDS`, else "other") over `top_device_ops`
  rows (all of them, for a whole step), and their total, `device`: with the step's wall
  time, how long the device sat idle."""
  out = collections.Counter()
  for r in rows:
    kind = next(
      (
        k
        for k, where, pat in OP_KINDS
        if any(re.search(pat, r.get(field) or "") for field in where.split())
      ),
      "other",
    )
    out[kind] += r["ms_per_step"]
  out["device"] = sum(r["ms_per_step"] for r in rows)
  return {k: round(v, 3) for k, v in sorted(out.items())}


def hlo_sources(hlo_text: str) -> dict[str, str]:
  """Each instruction of a compiled program's text (`compiled.as_text()`) that carries
  metadata -> "<op_name> @ <file>:<line> (<function>)": the JAX op it came from (with the
  Flax module path, e.g. layer_3/mlp/...) and the Python line the program records for it."""
  tables: dict[str, dict[int, str]] = {}
  section = None
  for line in hlo_text.splitlines():
    if line in ("FileNames", "FunctionNames", "FileLocations", "StackFrames"):
      section = tables.setdefault(line, {})
    elif section is not None and (m := re.match(r"(\d+) (.*)", line)):
      section[int(m.group(1))] = m.group(2)
    else:
      section = None

  def field(text, key):
    m = re.search(rf"\b{key}=(\d+)", text)
    return int(m.group(1)) if m else None

  def where(frame):
    frame_text = tables.get("StackFrames", {}).get(frame, "")
    loc = tables.get("FileLocations", {}).get(field(frame_text, "file_location_id"), "")
    path = tables.get("FileNames", {}).get(field(loc, "file_name_id"))
    func = tables.get("FunctionNames", {}).get(field(loc, "function_name_id"), '""').strip('"')
    return path and f"{Path(path.strip('"')).name}:{field(loc, 'line')} ({func})"

  out = {}
  pattern = re.compile(r"\s*(?:ROOT )?%?([\w.-]+) = .*?metadata=\{([^}]*)\}")
  for line in hlo_text.splitlines():
    if not (m := pattern.match(line)):
      continue
    op = re.search(r'op_name="([^"]*)"', m.group(2))
    frame = field(m.group(2), "stack_frame_id")
    place = where(frame) if frame else None
    text = " @ ".join(x for x in (op and op.group(1), place) if x)
    if text:
      out[m.group(1)] = text
  return out


PROFILE_TOP = 80  # rows kept in `profile_top` (a step of the paper model runs ~60-100 kinds)


def by_layer_kind(rows: list[dict]) -> list[dict]:
  """`top_device_ops` rows with each op's rows for the model's layers as one: the same op
  name and source up to the layer index (`layer_3/` -> `layer_*/`), their time summed and
  counted (`instances`), the largest one's stats kept; most time first. One kernel of each
  kind a layer times 16 layers filled 80 rows with 40% of a step's device time; this way 80
  rows hold the whole step."""
  groups: dict[tuple, dict] = {}
  for r in rows:
    source = re.sub(r"\blayer_\d+/", "layer_*/", r.get("source") or "")
    g = groups.setdefault(
      (r["op"], source), {**r, "ms_per_step": 0.0, "share": 0.0, "instances": 0}
    )
    for k in ("ms_per_step", "share"):
      g[k] = round(g[k] + r.get(k, 0.0), 4)
    g["instances"] += 1
    if source:
      g["source"] = source
  return sorted(groups.values(), key=lambda g: -g["ms_per_step"])


def device_gaps(planes, steps: int, top: int = 10) -> dict:
  """The device's idle time in a trace, per step: on each device plane, the union of its op
  intervals (the "XLA Ops" line, else every line but `SPAN_LINES`), and the gaps between one
  interval's end and the next one's start, summed (`idle_ms_per_step`) and by the ops on
  either side (`top`: the `top` largest, with how often a step they occur), so that a step's
  wall time beyond its kernels can be placed: the gaps between steps (host dispatch) are
  among them."""
  gaps, counts = collections.Counter(), collections.Counter()
  for plane in planes:
    if not plane.name.startswith("/device:"):
      continue
    spans = sorted((e.start_ns, e.end_ns, e.name) for line in _op_lines(plane) for e in line.events)
    end, last = None, None
    for start, stop, name in spans:
      if end is not None and start > end:
        gaps[(last, name)] += start - end
        counts[(last, name)] += 1
      if end is None or stop > end:
        end, last = stop, name
  rows = [
    {
      "after": a,
      "before": b,
      "ms_per_step": round(ns / 1e6 / steps, 4),
      "per_step": round(counts[(a, b)] / steps, 2),
    }
    for (a, b), ns in gaps.most_common(top)
  ]
  return {"idle_ms_per_step": round(sum(gaps.values()) / 1e6 / steps, 3), "top": rows}


def profile(compiled, state, inputs, steps: int, trace_dir: Path) -> dict:
  """`steps` more steps under `jax.profiler.trace(trace_dir)`: their top device ops
  (`profile_top`), the time of every op by kind (`profile_kinds`) and the device's idle time
  between ops (`profile_gaps`)."""
  with jax.profiler.trace(str(trace_dir)):
    for i in range(steps):
      state, m = compiled(state, inputs[i % len(inputs)])
    jax.block_until_ready(m)
  trace = max(trace_dir.rglob("*.xplane.pb"), key=lambda f: f.stat().st_mtime)
  text = compiled.as_text()
  (trace_dir / "program.hlo.txt").write_text(text)  # beside the trace, for a closer look
  # A list: `.planes` is a one-pass iterator, and the ops, their kinds and the gaps each read it.
  planes = list(jax.profiler.ProfileData.from_file(str(trace)).planes)
  rows = top_device_ops(planes, steps, top=None, sources=hlo_sources(text))
  return {
    "profile_top": by_layer_kind(rows)[:PROFILE_TOP],
    "profile_kinds": op_kinds(rows),
    "profile_gaps": device_gaps(planes, steps),
  }


# XLA's command buffers (CUDA graphs) off: the step op by op. `--command-buffers both` times it
# beside the default (XLA's, with them) in the same rounds; the profile traces it.
NO_COMMAND_BUFFERS = {"xla_gpu_enable_command_buffer": ""}


def bench(
  cfg,
  steps_timed: int,
  data_dir: str | None = None,
  trace_dir: Path | None = None,
  variants: dict[str, dict] | None = None,
  profile_default: bool = False,
):
  """Compile time, time per step (the median of 3 rounds of `steps_timed` steps) and memory of
  one config's train step as fibax compiles it. `variants` {name: compile options}: the same
  step compiled again with those options (`NO_COMMAND_BUFFERS`) and timed in the same
  rounds, each round running every executable in turn (so a drift of the card's clocks moves
  them alike), as `ms_per_step_<name>`. The profile traces the step op by op, or with
  `profile_default` as timed (with command buffers on a GPU: their kernels' names, but not
  which instruction each ran for, and the idle time between them inside the graph)."""
  mesh = sharding.make_mesh(data=1, model=1, devices=jax.devices()[:1])
  steps = make_steps(cfg, mesh)
  state = steps.init(cfg.train.seed)
  shape = (cfg.train.batch_size, cfg.model.seq_len)
  inputs = batches(cfg, mesh, data_dir)
  t0 = time.perf_counter()  # tracing and lowering count, as in a first call of the step
  lowered = steps.train.lower(state, inputs[0])
  t1 = time.perf_counter()
  compiled = {"": lowered.compile()}
  compile_s = time.perf_counter() - t0
  lower_s = t1 - t0
  for name, variant in (variants or {}).items():
    compiled[name] = lowered.compile(compiler_options=variant)
  # The profile's executable: op by op, so the trace names every kernel (or the timed one).
  profiled = compiled[""] if profile_default else None
  if trace_dir is not None and profiled is None:
    profiled = compiled.get("no_command_buffers") or lowered.compile(
      compiler_options=NO_COMMAND_BUFFERS
    )
  memory = compiled[""].memory_analysis()
  for step in {id(s): s for s in [*compiled.values(), profiled] if s is not None}.values():
    for i in range(2):  # warm-up
      state, m = step(state, inputs[i % len(inputs)])
  jax.block_until_ready(m)
  times = collections.defaultdict(list)
  for _ in range(3):
    for name, step in compiled.items():
      t0 = time.perf_counter()
      for i in range(steps_timed):
        state, m = step(state, inputs[i % len(inputs)])
      jax.block_until_ready(m)
      times[name].append((time.perf_counter() - t0) / steps_timed)
  step_s = statistics.median(times[""])
  traced = {} if trace_dir is None else profile(profiled, state, inputs, steps_timed, trace_dir)
  return {
    "compile_s": round(compile_s, 1),
    # Of which tracing and lowering (Python: the model, and Pallas' kernels to their modules);
    # the rest is XLA's compile (the Triton and Mosaic GPU kernels' own included).
    "lower_s": round(lower_s, 2),
    "ms_per_step": round(step_s * 1e3, 2),
    **{f"ms_per_step_{k}": round(statistics.median(t) * 1e3, 2) for k, t in times.items() if k},
    "steps_per_s": round(1 / step_s, 3),
    "tokens_per_s": round(shape[0] * shape[1] / step_s),
    "loss_after": float(m["loss"]),
    # A learned model's alphas after the steps: it starts at alpha = 1, where each rung's
    # floor and the skip rule jump, so the side of 1 a layer's alpha takes early decides which
    # rungs it keeps, and with them the loss (experiments/results/speed_h200_cd8aba6/).
    **(
      {"alphas_after": list(model_lib.learned_alphas(state.params, cfg.model))}
      if cfg.model.attention.schedule == "learned"
      else {}
    ),
    "temp_bytes": None if memory is None else int(memory.temp_size_in_bytes),
    **traced,
  }


# Names a variant may not take: the command-buffer setting's own, and the summary's.
RESERVED_VARIANTS = ("no_command_buffers", "command_buffers", "fastest")


def parse_xla_variant(spec: str) -> tuple[str, dict]:
  """'NAME=OPTION:VALUE[,OPTION:VALUE]' -> (NAME, {OPTION: VALUE}), VALUE true/false as a bool,
  an integer as an int, else the string; a ValueError naming `spec` otherwise (a reserved
  NAME, an option named twice)."""
  name, sep, rest = spec.partition("=")
  pairs = [x.partition(":") for x in rest.split(",")] if rest else []
  if not sep or not re.fullmatch(r"[a-z0-9_]+", name) or not pairs:
    raise ValueError(f"bad variant {spec!r}: expected NAME=OPTION:VALUE[,OPTION:VALUE]")
  if name in RESERVED_VARIANTS:
    raise ValueError(
      f"variant name {name!r} in {spec!r} is reserved ({', '.join(RESERVED_VARIANTS)})"
    )
  options = {}
  for key, colon, value in pairs:
    if not colon or not re.fullmatch(r"xla_[a-z0-9_]+", key) or not value:
      raise ValueError(f"bad option {key + colon + value!r} in {spec!r}: expected xla_...:VALUE")
    if key in options:
      raise ValueError(f"option {key} named twice in {spec!r}")
    low = value.lower()
    options[key] = (
      low == "true"
      if low in ("true", "false")
      else int(value)
      if re.fullmatch(r"-?[0-9]+", value)
      else value
    )
  return name, options


def parse_xla_variants(specs: list[str]) -> dict[str, dict]:
  """Every --xla-variant, by name; a ValueError for a name given twice."""
  variants = {}
  for spec in specs:
    name, options = parse_xla_variant(spec)
    if name in variants:
      raise ValueError(f"variant name {name!r} given twice")
    variants[name] = options
  return variants


def summarize(results: list[dict]) -> dict:
  by = {(r["run"], r["seq_len"]): r for r in results}
  summary = {}
  for r in results:  # every run's own (was "mfu_sparse_T*": the last sparse run's)
    summary[f"mfu_{r['run']}_T{r['seq_len']}"] = r["mfu"]
  for (run, seq_len), r in by.items():
    dense = by.get(("dense", seq_len))
    if run == "dense" or not dense:
      continue
    key = f"step_speedup_{run}_vs_dense_T{seq_len}"
    summary[key] = round(dense["ms_per_step"] / r["ms_per_step"], 3)
    variants = [k for k in r if k.startswith("ms_per_step_") and k in dense]
    for k in variants:  # the same variant of both (e.g. both without command buffers)
      summary[f"{key}_{k.removeprefix('ms_per_step_')}"] = round(dense[k] / r[k], 3)
    if variants:  # each at its fastest variant
      keys = ["ms_per_step", *variants]
      best_dense, best = min(dense[k] for k in keys), min(r[k] for k in keys)
      summary[f"{key}_fastest"] = round(best_dense / best, 3)
  return summary


def main(argv=None):
  p = argparse.ArgumentParser(prog="bench_train.py", description=__doc__.split("\n\n")[0])
  p.add_argument("--runs", nargs="+", default=["dense", "fib_stagger_w12"])
  p.add_argument("--seq-lens", nargs="+", type=int, default=[1024, 8192])
  p.add_argument("--tokens", type=int, default=32768, help="tokens per step (B = tokens / T)")
  p.add_argument("--impl", default="pallas_packed", help="sparse attention implementation")
  p.add_argument("--dense-impl", default="cudnn", help="dense attention implementation")
  p.add_argument("--grad-accum", type=int, default=1)
  p.add_argument("--steps", type=int, default=5, help="timed steps per round (3 rounds)")
  p.add_argument("--peak-n", type=int, default=8192, help="matmul size of the peak measurement")
  p.add_argument(
    "--data", default=None, help="a prepared data directory: time real batches, not random ones"
  )
  p.add_argument("--profile", type=Path, default=None, help="trace a few steps of each run here")
  p.add_argument(
    "--profile-as-timed",
    action="store_true",
    help="trace the step as timed (with XLA's command buffers), not op by op",
  )
  p.add_argument(
    "--command-buffers",
    choices=("default", "both"),
    default="default",
    help="both: also time each step compiled without XLA's command buffers, in the same rounds",
  )
  p.add_argument(
    "--xla-variant",
    action="append",
    default=[],
    metavar="NAME=OPTION:VALUE[,OPTION:VALUE]",
    help="also time each step compiled with these XLA debug options (e.g. "
    "cub_sort=xla_gpu_enable_cub_radix_sort:true), in the same rounds, as "
    "ms_per_step_NAME; repeatable",
  )
  p.add_argument(
    "--blocks",
    default=None,
    help=f"the Pallas GPU kernels' blocks, {bench_attention.SPEC_FORMAT} as "
    "bench_attention.py --sweep takes them (default: the kernels')",
  )
  add_overrides_argument(p, "config overrides for every run")
  p.add_argument("--out", default=None)
  args = p.parse_args(argv)
  if args.profile_as_timed and args.profile is None:
    p.error("--profile-as-timed: traces nothing without --profile DIR")
  try:
    blocks = None if args.blocks is None else bench_attention.parse_spec(args.blocks)
  except ValueError as e:
    p.error(f"--blocks: {e}")
  try:
    xla_variants = parse_xla_variants(args.xla_variant)
  except ValueError as e:
    p.error(f"--xla-variant: {e}")
  if args.data is not None and not (Path(args.data) / "manifest.json").is_file():
    raise FileNotFoundError(
      f"--data {args.data} has no manifest.json (python -m fibax.data prepare)"
    )

  # fibax's XLA defaults (cli.XLA_DEFAULTS), as `python -m fibax.train` runs; read when the
  # backend starts, which is below.
  cli.set_xla_defaults()
  # Every config is checked before anything is measured or written.
  configs = [
    (
      run,
      seq_len,
      apply_overrides(
        run_config(run, seq_len, args.tokens, args.impl, args.dense_impl, args.grad_accum),
        args.overrides,
      ),
    )
    for seq_len in args.seq_lens
    for run in args.runs
  ]
  # The configs' own blocks (`--set model.attention.gpu_blocks=...`) where --blocks is not
  # given (--blocks wins: its context is the run's), so that the report records what ran.
  specs = {cfg.model.attention.gpu_blocks for _, _, cfg in configs}
  if blocks is None and specs != {""}:
    if len(specs) > 1:
      p.error(f"the runs' model.attention.gpu_blocks differ: {sorted(specs)}")
    blocks = bench_attention.parse_spec(specs.pop())
  peak = matmul_peak_tflops(args.peak_n)
  vendor = metrics.peak_tflops(jax.devices()[0].device_kind)
  print(f"measured bf16 matmul peak {peak:.0f} TFLOP/s (vendor {vendor})", flush=True)
  report = {
    "command": " ".join(["python", *sys.argv]),
    "versions": {**versions(), "flax": flax.__version__, "optax": optax.__version__},
    "xla_flags": os.environ.get("XLA_FLAGS", ""),
    "tokens_per_step": args.tokens,
    "overrides": args.overrides,
    # The packed kernel's blocks, resolved (this machine's defaults unless --blocks or the
    # configs name some); a row-wise call (impl=pallas) takes them without rung groups and
    # Mosaic kernels and with its own warps where num_warps is 0.
    "gpu_blocks": bench_attention._spec(blocks or bench_attention.default_blocks("packed")),
    "gpu_blocks_given": blocks is not None,
    "gpu_blocks_fields": list(bench_attention.SPEC_KEYS),  # what each position is
    "batches": "random tokens"
    if args.data is None
    else f"the first training batches of {args.data}",
    "matmul_peak_tflops_measured": round(peak, 1),
    "matmul_peak_tflops_vendor": vendor,
    "results": [],
  }
  for run, seq_len, cfg in configs:
    flops = metrics.flops_per_token(cfg.model)
    r = {
      "run": run,
      "seq_len": seq_len,
      "batch": cfg.train.batch_size,
    }
    both = args.command_buffers == "both"
    variants = {**({"no_command_buffers": NO_COMMAND_BUFFERS} if both else {}), **xla_variants}
    with attention.gpu_blocks(blocks):
      r.update(
        bench(
          cfg,
          args.steps,
          args.data,
          args.profile and args.profile / f"{run}_T{seq_len}",
          variants,
          args.profile_as_timed,
        )
      )
      if both:  # the default's own setting, by name
        r["ms_per_step_command_buffers"] = r["ms_per_step"]
    r["model_tflops_per_token"] = flops / 1e12
    r["mfu_vs_vendor_peak"] = (
      None if vendor is None else round(r["tokens_per_s"] * flops / (vendor * 1e12), 4)
    )
    report["results"].append(r)
    _set_mfu(report, peak)
    print(json.dumps(r), flush=True)
    _write(report, args.out)
  # The peak again, after the runs: the higher of the two counts (a card's clocks vary
  # between runs; a low first measurement would flatter every MFU).
  after = matmul_peak_tflops(args.peak_n)
  report["matmul_peak_tflops_measured_after"] = round(after, 1)
  print(f"measured bf16 matmul peak after the runs {after:.0f} TFLOP/s", flush=True)
  _set_mfu(report, max(peak, after))
  _write(report, args.out)
  print(json.dumps(report["summary"], indent=1))


def _set_mfu(report: dict, peak: float):
  """Each result's MFU against `peak` (TFLOP/s), the peak used, and the summary."""
  report["matmul_peak_tflops_used"] = round(peak, 1)
  for r in report["results"]:
    r["mfu"] = round(r["tokens_per_s"] * r["model_tflops_per_token"] / peak, 4)
  report["summary"] = summarize(report["results"])


def _write(report: dict, out: str | None):
  """Replaces `out` whole (never left half written)."""
  if out:
    atomic_write_json(out, report)


if __name__ == "__main__":
  try:
    main()
  except (ValueError, FileNotFoundError) as e:  # a bad run name, length or path: one line
    sys.exit(f"bench_train.py: error: {' '.join(str(e).split())}")
