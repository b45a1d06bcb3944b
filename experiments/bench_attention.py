"""Attention benchmark: the Pallas kernel against cuDNN dense, cuDNN sliding window and XLA.

    python experiments/bench_attention.py --out experiments/results/bench_attention_h100.json

T in {1K, 4K, 16K, 64K} at B*T = 65,536, 8 query / 2 kv heads, head dim 64, W = 12,
Fibonacci K = 15, alpha in {0.5, 1, 1.5} for the packed kernel (alpha 1 for the row-wise one
and XLA: `--every-alpha`); forward and forward+backward milliseconds, all in one run, plus
the HBM floor (q, k, v, o bytes once over a copy bandwidth measured in the same run) and
XLA's compiled memory footprint, and the run's own wall time. Prints a table and writes JSON with a
`summary` of the ratios that the targets name.

The packed kernel runs with fibax's default on the machine (`kernels_pallas.gpu.default_blocks`:
on a Hopper GPU the Mosaic GPU kernels) where no block flag is given; block flags tune the
declared `GpuBlocks` (the Triton kernels, unless --q-tma / --dkv-tma name the Mosaic ones).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import subprocess
import sys
import time

import jax
import jax.numpy as jnp

from fibax import attention
from fibax.data.files import atomic_write_json
from fibax.latency import median_ms
from fibax.patterns import Pattern
from kernels_pallas import fib_attention, gpu
from kernels_pallas.gpu import GpuBlocks, default_blocks

HEADS, KV_HEADS, HEAD_DIM, WINDOW = 8, 2, 64, 12


def timeit(fn, *args, reps: int = 20, rounds: int = 5) -> float:
  """Median over rounds of the mean of `reps` back-to-back calls, in ms (async dispatch)."""
  return median_ms(fn, *args, reps=reps, rounds=rounds)


def copy_bandwidth() -> float:
  """Bytes read + written per second by a large device-to-device elementwise copy."""
  x = jax.random.normal(jax.random.key(0), (256 * 1024 * 1024,), jnp.bfloat16)  # 512 MiB
  f = jax.jit(lambda x: x * jnp.bfloat16(1.0009765625))
  ms = timeit(f, x, reps=10)
  return 2 * x.nbytes / (ms * 1e-3)


def footprint(fn, *args) -> int:
  m = jax.jit(fn).lower(*args).compile().memory_analysis()
  if m is None:
    return -1
  return int(m.temp_size_in_bytes + m.argument_size_in_bytes + m.output_size_in_bytes)


def implementations(pattern: Pattern, blocks: GpuBlocks | None):
  window = pattern.window
  rowwise = blocks and blocks.for_kernel("rowwise")
  return {
    "pallas": lambda q, k, v: fib_attention(q, k, v, pattern, backend="gpu", blocks=rowwise),
    "pallas_packed": lambda q, k, v: fib_attention(
      q,
      k,
      v,
      pattern,
      backend="gpu",
      blocks=(blocks or GpuBlocks()).for_kernel("packed"),
    ),
    "cudnn_dense": lambda q, k, v: jax.nn.dot_product_attention(
      q, k, v, is_causal=True, implementation="cudnn"
    ),
    "cudnn_window": lambda q, k, v: jax.nn.dot_product_attention(
      q, k, v, is_causal=True, local_window_size=(window, 0), implementation="cudnn"
    ),
    "xla": lambda q, k, v: attention.xla(q, k, v, pattern),
  }


def forward_backward(fn):
  """Jitted (q, k, v, w) -> (dq, dk, dv) of sum(fn(q, k, v) * w): the cotangent weights are an
  argument, not a constant that XLA would spend seconds folding into the backward."""
  return jax.jit(
    jax.grad(lambda q, k, v, w: (fn(q, k, v).astype(jnp.float32) * w).sum(), argnums=(0, 1, 2))
  )


def bench_one(name, fn, q, k, v, w):
  """Forward and forward+backward ms and the forward's memory footprint."""
  fwd, fwdbwd = jax.jit(fn), forward_backward(fn)
  row = {"impl": name}
  try:
    row["fwd_ms"] = timeit(fwd, q, k, v)
    row["fwdbwd_ms"] = timeit(fwdbwd, q, k, v, w)
    row["fwd_bytes"] = footprint(fn, q, k, v)
  except Exception as e:  # a baseline that cannot run at this size is reported, not fatal
    row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
  return row


def versions() -> dict:
  dev = jax.devices()[0]
  try:
    smi = subprocess.run(
      ["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
      capture_output=True,
      text=True,
    ).stdout.strip()
  except FileNotFoundError:  # no NVIDIA driver (CPU, TPU)
    smi = None
  return {
    "device": dev.device_kind,
    "nvidia_smi": smi,
    "jax": jax.__version__,
    "jaxlib": jax.lib.__version__ if hasattr(jax.lib, "__version__") else None,
    "python": platform.python_version(),
  }


def main(argv=None):
  ap = argparse.ArgumentParser(prog="bench_attention.py", description=__doc__.splitlines()[0])
  ap.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 16384, 65536])
  ap.add_argument("--alphas", type=float, nargs="+", default=[0.5, 1.0, 1.5])
  ap.add_argument("--tokens", type=int, default=65536)
  ap.add_argument(
    "--impls", nargs="+", default=["pallas", "pallas_packed", "cudnn_dense", "cudnn_window", "xla"]
  )
  ap.add_argument(
    "--every-alpha",
    nargs="*",
    default=["pallas_packed"],
    help="implementations timed at every alpha; the others (baselines, and the row-wise "
    "kernel, whose compiles dominate the run) at the middle one",
  )
  ap.add_argument("--block-q", type=int, default=None)
  ap.add_argument(
    "--num-warps",
    type=int,
    default=None,
    help="the forward's (0: the kernel's: packed 4, row-wise 2)",
  )
  ap.add_argument("--block-q-bwd", type=int, default=None)
  ap.add_argument("--num-warps-bwd", type=int, default=None)
  ap.add_argument("--num-stages", type=int, default=None, help="software pipelining depth")
  ap.add_argument(
    "--num-stages-bwd", type=int, default=None, help="the backward kernels' (default: --num-stages)"
  )
  ap.add_argument(
    "--num-stages-dkv", type=int, default=None, help="the dkv kernel's (default: --num-stages-bwd)"
  )
  ap.add_argument(
    "--exp2",
    type=int,
    default=None,
    help="1: the packed kernels' softmax in base 2 (the default); 0: natural, libdevice's expf",
  )
  ap.add_argument(
    "--rung-group",
    type=int,
    default=None,
    help="the packed kernels' static rungs run this many to a tile (forward; 0: the kernel's, 2)",
  )
  ap.add_argument(
    "--rung-group-bwd",
    type=int,
    default=None,
    help="the same for the backward kernels (0: one rung a step)",
  )
  ap.add_argument(
    "--rung-group-dkv",
    type=int,
    default=None,
    help="the same for the dkv kernel alone (0: --rung-group-bwd's)",
  )
  ap.add_argument(
    "--diagonal",
    type=int,
    default=None,
    help="1: a rung's softmax on its tile's diagonal; 0: on the whole masked tile (the default)",
  )
  ap.add_argument(
    "--dkv-t",
    type=int,
    default=None,
    help="1: the packed dkv kernel accumulates dk and dv transposed, [D, block_q_bwd] (wgmma on "
    "a Hopper GPU; the default); 0: as [block_q_bwd, D]",
  )
  ap.add_argument(
    "--fold",
    type=int,
    default=None,
    help="1: the packed kernels fold the static rungs the window's tile already holds into "
    "its mask (the default); 0: every rung in the rung loops",
  )
  ap.add_argument(
    "--ew-rungs",
    type=int,
    default=None,
    help="the packed kernels whose static rungs run on CUDA cores (row dot products, no "
    "tensor-core tiles), a bitmask: 1 forward, 2 dq, 4 dkv; 0 none (the default)",
  )
  ap.add_argument(
    "--dkv-tma",
    type=int,
    default=None,
    help="1: the packed kernels' static dk and dv through the Mosaic GPU kernel (TMA copies; "
    "bf16, G = 4, D = 64, a Hopper GPU); 0: the Triton kernel (the default)",
  )
  ap.add_argument(
    "--q-tma",
    type=int,
    default=None,
    help="the packed kernels' static forward (1) and dq (2) through the Mosaic GPU kernel, a "
    "bitmask (TMA copies; bf16, G = 4, D = 64, a Hopper GPU); 0: the Triton kernels (the "
    "default)",
  )
  ap.add_argument("--out", default=None)
  ap.add_argument(
    "--sweep",
    nargs="+",
    default=None,
    help=f"block configs {SPEC_FORMAT} (group: static rungs to a tile, packed kernel; diagonal, "
    "dkv_t, exp2, fold: 1 or 0, as --diagonal, --dkv-t, --exp2, --fold; stages_dkv: the dkv "
    "kernel's, 0: stages_bwd; group_dkv: the dkv kernel's group, 0: group_bwd; ew: the kernels "
    "whose static rungs run on CUDA cores, a bitmask, 1 fwd, 2 dq, 4 dkv; dkv_tma: 1 or 0, as "
    "--dkv-tma; q_tma: a bitmask, as --q-tma) to time for "
    "--sweep-impl at each length and the first alpha, "
    "beside the cuDNN window, then write them (--out)",
  )
  ap.add_argument("--sweep-impl", default="pallas_packed", choices=("pallas", "pallas_packed"))
  ap.add_argument(
    "--autotune",
    nargs="*",
    default=None,
    help="pick block_q/warps/stages/group/exp2/fold/ew bit 1/q_tma bit 1 (forward) and "
    "block_q_bwd/warps_bwd/stages/group/group_dkv/dkv_t/stages_dkv/ew bits 2, 4/q_tma bit 2/"
    "dkv_tma separately from these "
    "configs, timed on --sweep-impl's kernel at the longest length, alpha 1, then run the "
    "benchmark (both kernels) with them",
  )
  started = time.perf_counter()
  args = ap.parse_args(argv)
  command = "python " + " ".join([sys.argv[0], *(argv or sys.argv[1:])])
  # Every block config is checked before anything runs, each error one line naming it.
  specs = {}
  for flag, given in (("--sweep", args.sweep), ("--autotune", args.autotune)):
    try:
      specs[flag] = [parse_spec(x) for x in given or ()]
    except ValueError as e:
      ap.error(f"{flag}: {e}")
    grouped = [
      x
      for x, b in zip(given or (), specs[flag], strict=True)
      if max(b.rung_group, b.rung_group_bwd, b.rung_group_dkv) > 1
    ]
    if args.sweep_impl == "pallas" and grouped:
      ap.error(f"{flag} {grouped[0]}: rung groups are the packed kernel's (--sweep-impl pallas)")
    ew = [x for x, b in zip(given or (), specs[flag], strict=True) if b.ew_rungs]
    if args.sweep_impl == "pallas" and ew:
      ap.error(f"{flag} {ew[0]}: ew_rungs is the packed kernel's option (--sweep-impl pallas)")
    tma = [x for x, b in zip(given or (), specs[flag], strict=True) if b.dkv_tma]
    if args.sweep_impl == "pallas" and tma:
      ap.error(f"{flag} {tma[0]}: dkv_tma is the packed kernel's option (--sweep-impl pallas)")
    tma = [x for x, b in zip(given or (), specs[flag], strict=True) if b.q_tma]
    if args.sweep_impl == "pallas" and tma:
      ap.error(f"{flag} {tma[0]}: q_tma is the packed kernel's option (--sweep-impl pallas)")
  if args.sweep:
    return sweep_report(args, specs["--sweep"], command)
  given = {k: getattr(args, k) for k in SPEC_KEYS if getattr(args, k) is not None}
  try:
    dataclasses.replace(GpuBlocks(kernel="packed"), **given)  # the flags, checked
  except ValueError as e:
    ap.error(str(e))
  tuned = autotune(args, specs["--autotune"]) if args.autotune is not None else None
  # Else, with no block flag, fibax's default on this machine (on a Hopper GPU the Mosaic
  # kernels); with some, the declared GpuBlocks (the Triton kernels unless --q-tma / --dkv-tma
  # say otherwise), which the flags tune.
  defaults = tuned["blocks"] if tuned else GpuBlocks(kernel="packed")
  if not tuned and not given:
    defaults = default_blocks("packed")
  try:  # the flags over the tuned blocks (e.g. --ew-rungs 1 where it chose q_tma=1)
    blocks = dataclasses.replace(defaults, **given)
  except ValueError as e:
    ap.error(f"the flags over the autotuned {defaults}: {e}")
  bw = copy_bandwidth()
  results = []
  for seq_len in args.lengths:
    batch = max(1, args.tokens // seq_len)
    ks = jax.random.split(jax.random.key(seq_len), 4)
    q = jax.random.normal(ks[0], (batch, seq_len, HEADS, HEAD_DIM), jnp.bfloat16)
    k = jax.random.normal(ks[1], (batch, seq_len, KV_HEADS, HEAD_DIM), jnp.bfloat16)
    v = jax.random.normal(ks[2], (batch, seq_len, KV_HEADS, HEAD_DIM), jnp.bfloat16)
    w = jax.random.normal(ks[3], q.shape, jnp.float32)
    floor_ms = (2 * q.nbytes + k.nbytes + v.nbytes) / bw * 1e3
    for alpha in args.alphas:
      pattern = Pattern.build(base="fib", alpha=alpha, window=WINDOW, seq_len=seq_len)
      impls = implementations(pattern, blocks)
      for name in args.impls:
        if name not in args.every_alpha and alpha != args.alphas[len(args.alphas) // 2]:
          continue  # cuDNN ignores alpha; XLA and the row-wise kernel: the middle alpha
        row = bench_one(name, impls[name], q, k, v, w)
        row.update(
          seq_len=seq_len,
          batch=batch,
          alpha=alpha if not name.startswith("cudnn") else None,
          keys_per_query=len(pattern.distances),
          hbm_floor_ms=floor_ms,
        )
        results.append(row)
        write_report(args, command, blocks, bw, tuned, results, started)
        print(
          f"T={seq_len:6d} B={batch:3d} alpha={alpha:3.1f} {name:13s} "
          + (
            f"fwd {row['fwd_ms']:8.3f} ms  fwd+bwd {row['fwdbwd_ms']:8.3f} ms  "
            f"mem {row['fwd_bytes'] / 2**20:8.1f} MiB  floor {floor_ms:.3f} ms"
            if "error" not in row
            else row["error"]
          ),
          flush=True,
        )

  print(json.dumps(write_report(args, command, blocks, bw, tuned, results, started), indent=1))


def write_report(args, command, blocks, bw, tuned, results, started) -> dict:
  """The report so far, written whole to `args.out` (replaced after every row, never half
  written, so a run cut short keeps what it measured); returns its summary."""
  summary = summarize(results)
  report = {
    "command": command,
    "versions": versions(),
    "copy_bandwidth_GBps": bw / 1e9,
    "blocks": blocks.__dict__,
    # What each kernel ran with (0 fields resolved: the kernel's own), as SPEC_KEYS lists.
    "blocks_resolved": {k: _spec(blocks.for_kernel(k)) for k in ("packed", "rowwise")},
    "shape": dict(
      heads=HEADS, kv_heads=KV_HEADS, head_dim=HEAD_DIM, window=WINDOW, tokens=args.tokens
    ),
    "summary": summary,
    "autotune": tuned and {"candidates": tuned["rows"], "chosen": tuned["blocks"].__dict__},
    "wall_s": round(time.perf_counter() - started, 1),
    "results": results,
  }
  if args.out:
    atomic_write_json(args.out, report)
  return summary


AUTOTUNE = ("16,1,16,1", "16,2,16,2", "16,4,16,4", "32,4,32,2", "32,2,32,4")


# The spec of a block config, as `kernels_pallas.gpu.parse_blocks` reads it (also
# `model.attention.gpu_blocks`).
SPEC_KEYS, SPEC_FORMAT, parse_spec = gpu.SPEC_KEYS, gpu.SPEC_FORMAT, gpu.parse_blocks


def _spec(b: GpuBlocks) -> list[int]:
  """`gpu.blocks_spec` as a list: SPEC_KEYS' values, resolved (the row-wise kernel's fold 0)."""
  return [int(x) for x in gpu.blocks_spec(b).split(",")]


def autotune(args, specs: list[GpuBlocks]) -> dict:
  specs = specs or [parse_spec(x) for x in AUTOTUNE]
  rows = sweep(args, specs, [max(args.lengths)], alpha=1.0)
  ok = [r for r in rows if "error" not in r]
  fwd = min(ok, key=lambda r: r["fwd_ms"])
  bwd = min(ok, key=lambda r: r["fwdbwd_ms"] - r["fwd_ms"])
  blocks = GpuBlocks(
    block_q=fwd["blocks"][0],
    num_warps=fwd["blocks"][1],
    block_q_bwd=bwd["blocks"][2],
    num_warps_bwd=bwd["blocks"][3],
    num_stages=fwd["blocks"][4],
    num_stages_bwd=bwd["blocks"][5],
    kernel="packed",
    # A row-wise sweep has no rung groups or folded rungs to choose from (its rows record
    # none): the packed kernel keeps its own.
    **(
      dict(rung_group=0, rung_group_bwd=0, rung_group_dkv=0)
      if getattr(args, "sweep_impl", None) == "pallas"
      else dict(
        rung_group=fwd["blocks"][6],
        rung_group_bwd=bwd["blocks"][7],
        rung_group_dkv=bwd["blocks"][13],
        fold=fwd["blocks"][12],  # one setting for the three kernels: the forward's row's
        ew_rungs=fwd["blocks"][14] & 1 | bwd["blocks"][14] & 6,  # each kernel's bit, its row's
        q_tma=fwd["blocks"][16] & 1 | bwd["blocks"][16] & 2,
      )
    ),
    dkv_t=bwd["blocks"][9],
    dkv_tma=bwd["blocks"][15],
    num_stages_dkv=bwd["blocks"][10],
    exp2=fwd["blocks"][11],
  )
  print(f"autotune chose {blocks}", flush=True)
  return {"rows": rows, "blocks": blocks}


def _inputs(seq_len: int, tokens: int, seed: int = 0):
  batch = max(1, tokens // seq_len)
  ks = jax.random.split(jax.random.key(seed), 4)
  q = jax.random.normal(ks[0], (batch, seq_len, HEADS, HEAD_DIM), jnp.bfloat16)
  k = jax.random.normal(ks[1], (batch, seq_len, KV_HEADS, HEAD_DIM), jnp.bfloat16)
  v = jax.random.normal(ks[2], (batch, seq_len, KV_HEADS, HEAD_DIM), jnp.bfloat16)
  return batch, (q, k, v, jax.random.normal(ks[3], q.shape, jnp.float32))


def sweep(args, specs: list[GpuBlocks], lengths, alpha, floor_bw=None, on_row=None) -> list[dict]:
  """--sweep-impl with each block config at each length (and the given alpha); with
  `floor_bw` (copy bytes/s) each row also gets the HBM floor and the cuDNN window's row.
  `on_row(rows)` after each row (so a run cut short keeps what it measured)."""
  rows = []
  on_row = on_row or (lambda rows: None)
  for seq_len in lengths:
    batch, (q, k, v, w) = _inputs(seq_len, args.tokens)
    pattern = Pattern.build(base="fib", alpha=alpha, window=WINDOW, seq_len=seq_len)
    base = dict(seq_len=seq_len, batch=batch, alpha=alpha)
    if floor_bw is not None:
      base["hbm_floor_ms"] = (2 * q.nbytes + k.nbytes + v.nbytes) / floor_bw * 1e3
      row = bench_one("cudnn_window", implementations(pattern, None)["cudnn_window"], q, k, v, w)
      rows.append({**row, **base, "alpha": None})
      print(f"T={seq_len} cudnn_window {rows[-1]}", flush=True)
      on_row(rows)
    for blocks in specs:
      impl = implementations(pattern, blocks)[args.sweep_impl]
      ran = _spec(blocks.for_kernel("rowwise") if args.sweep_impl == "pallas" else blocks)
      row = {**bench_one(args.sweep_impl, impl, q, k, v, w), **base, "blocks": ran}
      rows.append(row)
      print(f"T={seq_len} alpha={alpha} blocks={ran} {row}", flush=True)
      on_row(rows)
  return rows


def sweep_summary(rows) -> dict:
  """Per length: the block config with the fastest forward (and its ratio to the HBM floor)
  and the one with the fastest forward + backward (and its ratio to the cuDNN window)."""
  out = {}
  for seq_len in sorted({r["seq_len"] for r in rows}):
    at = [r for r in rows if r["seq_len"] == seq_len and "error" not in r]
    ours = [r for r in at if "blocks" in r]
    window = [r for r in at if r["impl"] == "cudnn_window"]
    if not ours:
      continue
    fwd, fb = min(ours, key=lambda r: r["fwd_ms"]), min(ours, key=lambda r: r["fwdbwd_ms"])
    out[f"best_fwd_T{seq_len}"] = {"blocks": fwd["blocks"], "fwd_ms": fwd["fwd_ms"]}
    if "hbm_floor_ms" in fwd:
      out[f"best_fwd_T{seq_len}"]["ratio_vs_hbm_floor"] = round(
        fwd["fwd_ms"] / fwd["hbm_floor_ms"], 3
      )
    out[f"best_fwdbwd_T{seq_len}"] = {"blocks": fb["blocks"], "fwdbwd_ms": fb["fwdbwd_ms"]}
    if window:
      ratio = fb["fwdbwd_ms"] / window[0]["fwdbwd_ms"]
      out[f"best_fwdbwd_T{seq_len}"]["ratio_vs_cudnn_window"] = round(ratio, 3)
  return out


def sweep_report(args, specs: list[GpuBlocks], command: str) -> dict:
  """The sweep's JSON, rewritten whole after every row."""
  bw = copy_bandwidth()
  report = {
    "command": command,
    "versions": versions(),
    "copy_bandwidth_GBps": bw / 1e9,
    "impl": args.sweep_impl,
    "blocks_fields": list(SPEC_KEYS),  # what each position of a row's "blocks" is
    "shape": dict(
      heads=HEADS, kv_heads=KV_HEADS, head_dim=HEAD_DIM, window=WINDOW, tokens=args.tokens
    ),
  }

  def save(rows):
    report.update(summary=sweep_summary(rows), results=rows)
    if args.out:
      atomic_write_json(args.out, report)

  save(sweep(args, specs, args.lengths, args.alphas[0], floor_bw=bw, on_row=save))
  print(json.dumps(report["summary"], indent=1))
  return report


def summarize(results) -> dict:
  def get(impl, seq_len, key, alpha=None):
    vals = [
      r[key]
      for r in results
      if r["impl"] == impl
      and r["seq_len"] == seq_len
      and key in r
      and (alpha is None or r["alpha"] == alpha)
    ]
    return max(vals) if vals else None  # worst case over alphas

  out = {}
  for seq_len in sorted({r["seq_len"] for r in results}):
    d_fb, w_fb = get("cudnn_dense", seq_len, "fwdbwd_ms"), get("cudnn_window", seq_len, "fwdbwd_ms")
    x_fb = get("xla", seq_len, "fwdbwd_ms")
    for impl, prefix in (("pallas", ""), ("pallas_packed", "packed_")):
      p_fb, p_f = get(impl, seq_len, "fwdbwd_ms"), get(impl, seq_len, "fwd_ms")
      floor = get(impl, seq_len, "hbm_floor_ms")
      if p_fb and d_fb:
        out[f"{prefix}fwdbwd_speedup_vs_cudnn_dense_T{seq_len}"] = d_fb / p_fb
      if p_fb and w_fb:
        out[f"{prefix}fwdbwd_ratio_vs_cudnn_window_T{seq_len}"] = p_fb / w_fb
      if p_f and floor:
        out[f"{prefix}fwd_ratio_vs_hbm_floor_T{seq_len}"] = p_f / floor
      if p_fb and x_fb:
        out[f"{prefix}fwdbwd_speedup_vs_xla_T{seq_len}"] = x_fb / p_fb
  out["note"] = (
    "pallas figures (packed_: the packed-GQA kernels) are the worst over the alphas each was "
    "benched at (--every-alpha: all of them; the others: the middle one)"
  )
  return {k: (round(v, 3) if isinstance(v, float) else v) for k, v in out.items()}


if __name__ == "__main__":
  main()
