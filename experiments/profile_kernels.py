"""Hardware counters of the attention kernels (Nsight Compute): what limits each one.

    python experiments/profile_kernels.py --out ncu_kernels.json [--lengths 1024 16384]
        [--impls pallas_packed cudnn_window] [--blocks SPEC]

Runs its own workload under `ncu` (on PATH, or the newest under /opt/nvidia/nsight-compute):
one forward and backward of each implementation at each length, at bench_attention.py's shape
(B*T = 65,536, 8 query / 2 kv heads, head dim 64, W = 12, Fibonacci rungs at alpha 1, bf16),
op by op (no command buffers), every attention kernel launch profiled with the clocks left
as they are (`--clock-control none`). Writes the report (`.ncu-rep`, for Nsight Compute's
viewer), its raw metrics as CSV, and a JSON with, per launch: kernel, grid, duration, the
compute and memory throughputs as a share of their peaks (SM, DRAM, L2, L1, LSU wavefronts),
the L1 and L2 hit rates, achieved and theoretical occupancy, registers a thread, shared memory
a block, instructions, shared-memory wavefronts and bank conflicts, global load sectors, and
the warp-stall reasons that take the most cycles.
"""

from __future__ import annotations

import argparse
import csv
import glob
import io
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp

from experiments import bench_attention as ba
from fibax.data.files import atomic_write_bytes, atomic_write_json
from fibax.patterns import Pattern

HERE = Path(__file__).resolve()
IMPLS = ("pallas", "pallas_packed", "cudnn_dense", "cudnn_window", "xla")
KERNELS = r"regex:fib_attention|sdpa|fmha|cudnn"  # Pallas kernels and cuDNN's (helpers too)
SECTIONS = (
  "SpeedOfLight",
  "MemoryWorkloadAnalysis",
  "MemoryWorkloadAnalysis_Tables",  # shared memory's wavefronts and bank conflicts
  "InstructionStats",
  "Occupancy",
  "LaunchStats",
  "WarpStateStats",
  "SchedulerStats",
)
# JSON field: the raw metric names that give it, the first one a report has.
FIELDS = {
  "duration_us": ("gpu__time_duration.sum",),
  "sm_throughput_pct": ("sm__throughput.avg.pct_of_peak_sustained_elapsed",),
  "memory_throughput_pct": ("gpu__compute_memory_throughput.avg.pct_of_peak_sustained_elapsed",),
  "dram_throughput_pct": ("gpu__dram_throughput.avg.pct_of_peak_sustained_elapsed",),
  "l2_throughput_pct": ("lts__throughput.avg.pct_of_peak_sustained_elapsed",),
  "l1_throughput_pct": ("l1tex__throughput.avg.pct_of_peak_sustained_active",),
  "l2_hit_pct": ("lts__t_sector_hit_rate.pct",),
  "l1_hit_pct": ("l1tex__t_sector_hit_rate.pct",),
  "achieved_occupancy_pct": ("sm__warps_active.avg.pct_of_peak_sustained_active",),
  "theoretical_occupancy_pct": ("sm__maximum_warps_per_active_cycle_pct",),
  "issue_active_pct": ("smsp__issue_active.avg.pct_of_peak_sustained_active",),
  "registers_per_thread": ("launch__registers_per_thread",),
  "shared_bytes_per_block": ("launch__shared_mem_per_block",),
  "warp_cycles_per_issue": ("smsp__average_warp_latency_per_inst_issued.ratio",),
  "instructions": ("smsp__inst_executed.sum", "inst_executed"),
  "lsu_wavefronts_pct": ("l1tex__data_pipe_lsu_wavefronts.avg.pct_of_peak_sustained_elapsed",),
  "shared_wavefronts": ("l1tex__data_pipe_lsu_wavefronts_mem_shared.sum",),
  "shared_bank_conflicts": ("l1tex__data_bank_conflicts_pipe_lsu_mem_shared.sum",),
  "global_load_sectors": ("l1tex__t_sectors_pipe_lsu_mem_global_op_ld.sum",),
}
TIME_UNITS = {"ns": 1e-3, "nsecond": 1e-3, "us": 1.0, "usecond": 1.0, "ms": 1e3, "msecond": 1e3}
STALL = "smsp__average_warps_issue_stalled_"  # + reason + "_per_issue_active.ratio"
TOP_STALLS = 5


def find_ncu() -> str:
  """The ncu binary: on PATH, else the newest Nsight Compute install, else CUDA's; ValueError
  if none."""
  installed = sorted(glob.glob("/opt/nvidia/nsight-compute/*/ncu"), reverse=True)
  installed += glob.glob("/usr/local/cuda/bin/ncu")
  found = shutil.which("ncu") or next(iter(installed), None)
  if found is None:
    raise ValueError(
      "no ncu on PATH, under /opt/nvidia/nsight-compute or in /usr/local/cuda/bin: install "
      "Nsight Compute"
    )
  return found


def _number(text: str) -> float | None:
  try:
    return float(text.replace(",", ""))
  except ValueError:
    return None


def summarize(raw_csv: str) -> list[dict]:
  """Per launch of ncu's raw CSV (a header row from "ID" on, a units row, a row a launch;
  lines before the header, ncu's own notes, are skipped): kernel, grid, block, the FIELDS
  found, and the `TOP_STALLS` warp-stall reasons with the most cycles per issued instruction
  (`stalls`, reason -> cycles)."""
  rows = list(csv.reader(io.StringIO(raw_csv)))
  start = next((i for i, r in enumerate(rows) if r[:1] == ["ID"]), None)  # after any ncu notes
  if start is None:
    raise ValueError(f"no ncu raw report (no ID column) in {raw_csv[:200]!r}")
  header, units, launches = rows[start], rows[start + 1], rows[start + 2 :]
  out = []
  for values in launches:
    got = dict(zip(header, values, strict=True))
    unit = dict(zip(header, units, strict=True))
    row = {
      "kernel": got.get("Kernel Name", ""),
      "grid": got.get("Grid Size", ""),
      "block": got.get("Block Size", ""),
    }
    for field, names in FIELDS.items():
      name = next((n for n in names if _number(got.get(n, "")) is not None), None)
      if name is None:
        continue
      value = _number(got[name])
      if field == "duration_us":  # ns with --print-units base (Nsight Compute 2025.3 on an H200)
        scale = TIME_UNITS.get(unit.get(name, ""))
        if scale is None:
          raise ValueError(f"unknown time unit {unit.get(name)!r} of {name}")
        value *= scale
      row[field] = round(value, 3)
    stalls = {
      n[len(STALL) :].removesuffix("_per_issue_active.ratio"): _number(v)
      for n, v in got.items()
      if n.startswith(STALL) and n.endswith("_per_issue_active.ratio") and _number(v)
    }
    top = sorted(stalls.items(), key=lambda kv: -kv[1])[:TOP_STALLS]
    row["stalls"] = {k: round(v, 3) for k, v in top}
    out.append(row)
  return out


def _implementations(pattern, blocks, backend: str) -> dict:
  """bench_attention's implementations on a GPU; elsewhere (a check of the workload itself)
  the packed kernel alone, run by `backend` (an interpreter)."""
  if backend == "gpu":
    return ba.implementations(pattern, blocks)
  packed = (blocks or ba.GpuBlocks()).for_kernel("packed")

  def pallas_packed(q, k, v):
    return ba.fib_attention(q, k, v, pattern, backend=backend, blocks=packed)

  return {"pallas_packed": pallas_packed}


def workload(args) -> None:
  """One forward and backward of each implementation at each length (the profiled process)."""
  blocks = ba.parse_spec(args.blocks) if args.blocks else None
  for seq_len in args.lengths:
    batch = max(1, args.tokens // seq_len)
    ks = jax.random.split(jax.random.key(seq_len), 4)
    q = jax.random.normal(ks[0], (batch, seq_len, ba.HEADS, ba.HEAD_DIM), jnp.bfloat16)
    kv = (batch, seq_len, ba.KV_HEADS, ba.HEAD_DIM)
    k = jax.random.normal(ks[1], kv, jnp.bfloat16)
    v = jax.random.normal(ks[2], kv, jnp.bfloat16)
    w = jax.random.normal(ks[3], q.shape, jnp.float32)
    pattern = Pattern.build(base="fib", alpha=1.0, window=ba.WINDOW, seq_len=seq_len)
    impls = _implementations(pattern, blocks, args.backend)
    for name in [n for n in args.impls if n in impls]:
      grads = ba.forward_backward(impls[name])(q, k, v, w)
      jax.block_until_ready(grads)
      print(f"T={seq_len} {name}: ran", file=sys.stderr, flush=True)


def main(argv=None):
  ap = argparse.ArgumentParser(prog="profile_kernels.py", description=__doc__.splitlines()[0])
  ap.add_argument("--lengths", type=int, nargs="+", default=[1024, 16384])
  ap.add_argument("--tokens", type=int, default=65536, help="B*T of each length")
  ap.add_argument("--impls", nargs="+", choices=IMPLS, default=["pallas_packed", "cudnn_window"])
  ap.add_argument("--blocks", default=None, help="the packed kernels' blocks, as --sweep takes")
  ap.add_argument("--out", required=True, help="the JSON; the raw CSV goes beside it")
  ap.add_argument("--report", default=None, help="the .ncu-rep (default: beside --out)")
  ap.add_argument("--workload", action="store_true", help=argparse.SUPPRESS)
  ap.add_argument("--backend", default="gpu", help=argparse.SUPPRESS)
  args = ap.parse_args(argv)
  if args.blocks:
    try:
      ba.parse_spec(args.blocks)
    except ValueError as e:
      ap.error(f"--blocks: {e}")
  if args.workload:
    return workload(args)
  try:
    ncu = find_ncu()
  except ValueError as e:
    ap.error(str(e))
  if args.report and not args.report.endswith(".ncu-rep"):
    ap.error(f"--report {args.report}: must end in .ncu-rep (ncu adds that suffix)")
  out = Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  report = Path(args.report or out.with_suffix(".ncu-rep"))
  report.parent.mkdir(parents=True, exist_ok=True)
  own = list(argv if argv is not None else sys.argv[1:])
  env = dict(os.environ)
  # Op by op: no command buffers, so every kernel is its own launch.
  env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_gpu_enable_command_buffer=").strip()
  env["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"  # room for ncu's replay buffers
  root = str(HERE.parents[1])  # the workload runs as `-m experiments.profile_kernels`
  env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
  cmd = [ncu, "--clock-control", "none", "--kernel-name", KERNELS, "--force-overwrite"]
  cmd += [x for s in SECTIONS for x in ("--section", s)]
  cmd += ["-o", str(report.with_suffix("").resolve()), sys.executable]
  cmd += ["-m", "experiments.profile_kernels"]
  cmd += [*own, "--workload"]
  rc = subprocess.run(cmd, env=env, cwd=root).returncode
  if rc:
    ap.error(f"ncu exited with {rc} (its output above); nothing written")
  # Base units (bytes, nanoseconds), so each field's unit is the one its name says.
  got = subprocess.run(
    [ncu, "--import", str(report.resolve()), "--csv", "--page", "raw", "--print-units", "base"],
    capture_output=True,
    text=True,
  )
  why = (got.stderr.strip().splitlines() or ["no output"])[-1]
  if got.returncode:
    ap.error(f"ncu --import {report} exited with {got.returncode}: {why}")
  try:
    launches = summarize(got.stdout)
  except ValueError as e:
    ap.error(f"{e} ({why})")
  atomic_write_bytes(out.with_suffix(".csv"), got.stdout.encode())
  atomic_write_json(
    out,
    {
      "command": "python " + " ".join([str(HERE.relative_to(HERE.parents[1])), *own]),
      "versions": ba.versions(),
      "ncu": ncu,
      "shape": {
        "tokens": args.tokens,
        "heads": ba.HEADS,
        "kv_heads": ba.KV_HEADS,
        "head_dim": ba.HEAD_DIM,
        "window": ba.WINDOW,
        "alpha": 1.0,
      },  # fmt: skip
      "lengths": args.lengths,
      "launches": launches,
    },
  )
  for r in launches:
    print(r, flush=True)


if __name__ == "__main__":
  main()
