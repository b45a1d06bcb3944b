"""Decode benchmark: tokens/s and memory of one-token steps after a long context, a sparse
model's ring caches against a dense model's growing cache.

    python experiments/bench_decode.py --out experiments/results/bench_decode_h100.json

For every (run, batch B, context C): the caches that `fibax.generate` would hold after a
prompt of C tokens (`cache_layout(cfg, C + steps)`; a sparse layer keeps its largest offset
+ 1 rows, a dense one every position) are filled with random keys and values, which stand in
for the prefill (a step's cost does not depend on their values), and `--steps` greedy decode
steps (`fibax.generate.decode_step`, one jitted `lax.fori_loop`, caches donated) run from
position C. Time: the median of 3 rounds after a warm-up round. Memory: XLA's estimate for the
compiled loop (parameters, caches and temporaries), checked against the device's free memory
before the caches are allocated; a configuration that would not fit is recorded as skipped
with the bytes it needs, and nothing is run for it. Parameters are randomly initialised.
Results are written after every measurement, so a run cut short keeps what it measured.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp

from experiments.bench_attention import versions
from fibax import cli
from fibax.config_loader import add_overrides_argument, apply_overrides, load_config
from fibax.generate import cache_layout, decode_step, generation_config
from fibax.memory import MEMORY_HEADROOM, free_memory_bytes
from fibax.model import init_params


def cache_shapes(cfg, layout, batch: int) -> tuple:
  dtype = jnp.dtype(cfg.compute_dtype)
  return tuple(
    (jax.ShapeDtypeStruct((batch, rows, cfg.num_kv_heads, cfg.head_dim), dtype),) * 2
    for rows, _ in layout
  )


def decode_loop(cfg, layout, steps: int):
  """`steps` greedy decode steps from positions pos_B; returns (last tokens, caches)."""

  @functools.partial(jax.jit, donate_argnums=(1,))
  def loop(p, caches, token_B, pos_B):
    def body(i, carry):
      token_B, caches = carry
      logits_BxV, caches = decode_step(p, cfg, layout, token_B, pos_B + i, caches)
      return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32), caches

    return jax.lax.fori_loop(0, steps, body, (token_B, caches))

  return loop


def random_caches(shapes, seed: int = 0):
  key = jax.random.key(seed)
  out = []
  for k_shape, v_shape in shapes:
    key, a, b = jax.random.split(key, 3)
    out.append(
      tuple(jax.random.normal(k, s.shape, s.dtype) for k, s in ((a, k_shape), (b, v_shape)))
    )
  return tuple(out)


def measure(cfg, params, batch: int, context: int, steps: int, free: int | None) -> dict:
  layout = cache_layout(cfg, context + steps)
  shapes = cache_shapes(cfg, layout, batch)
  cache_bytes = sum(s.size * s.dtype.itemsize for pair in shapes for s in pair)
  param_bytes = sum(x.nbytes for x in jax.tree.leaves(params))
  row = {
    "batch": batch,
    "context": context,
    "cache_rows_max": max(rows for rows, _ in layout),
    "cache_bytes": cache_bytes,
  }
  free = free_memory_bytes() if free is None else free
  budget = int(free * MEMORY_HEADROOM)
  if cache_bytes + param_bytes > budget:  # decided before compiling anything this size
    return {**row, "status": f"skipped: caches need {cache_bytes / 2**30:.2f} GiB, "
            f"{free / 2**30:.2f} GiB free"}  # fmt: skip
  loop = decode_loop(cfg, layout, steps)
  token = jax.ShapeDtypeStruct((batch,), jnp.int32)
  t0 = time.perf_counter()
  compiled = loop.lower(params, shapes, token, token).compile()
  row["compile_s"] = round(time.perf_counter() - t0, 1)
  stats = compiled.memory_analysis()
  need = None
  if stats is not None:
    need = (
      stats.argument_size_in_bytes
      + stats.output_size_in_bytes
      + stats.temp_size_in_bytes
      - stats.alias_size_in_bytes
    )
    row["memory_bytes"] = need
    if need > budget:
      return {**row, "status": f"skipped: needs {need / 2**30:.2f} GiB, "
              f"{free / 2**30:.2f} GiB free"}  # fmt: skip
  caches = random_caches(shapes)
  token_B = jnp.zeros((batch,), jnp.int32)
  pos_B = jnp.full((batch,), context, jnp.int32)
  token_B, caches = compiled(params, caches, token_B, pos_B)  # warm-up
  jax.block_until_ready(token_B)
  times = []
  for _ in range(3):
    t0 = time.perf_counter()
    token_B, caches = compiled(params, caches, token_B, pos_B)
    jax.block_until_ready(token_B)
    times.append(time.perf_counter() - t0)
  step_s = statistics.median(times) / steps
  return {
    **row,
    "status": "ok",
    "ms_per_step": round(step_s * 1e3, 4),
    "tokens_per_s": round(batch / step_s, 1),
  }


def summarize(results: list[dict]) -> dict:
  """Flatness of each run's decode from the shortest to the longest context it ran, and the
  sparse runs' speed against dense where both ran."""
  ok = [r for r in results if r["status"] == "ok"]
  summary = {}
  for run, batch in sorted({(r["run"], r["batch"]) for r in ok}):
    rows = sorted(
      (r for r in ok if (r["run"], r["batch"]) == (run, batch)), key=lambda r: r["context"]
    )
    lo, hi = rows[0], rows[-1]
    tag = f"{run}_B{batch}_{lo['context']}_to_{hi['context']}"
    summary[f"tokens_per_s_ratio_{tag}"] = round(hi["tokens_per_s"] / lo["tokens_per_s"], 3)
    if "memory_bytes" in lo and "memory_bytes" in hi:
      summary[f"memory_ratio_{tag}"] = round(hi["memory_bytes"] / lo["memory_bytes"], 3)
  dense = {(r["batch"], r["context"]): r for r in ok if r["run"] == "dense"}
  for r in ok:
    d = dense.get((r["batch"], r["context"]))
    if r["run"] != "dense" and d:
      key = f"speedup_{r['run']}_vs_dense_B{r['batch']}_C{r['context']}"
      summary[key] = round(r["tokens_per_s"] / d["tokens_per_s"], 3)
  return summary


def main(argv=None) -> int:
  cli.set_xla_defaults()  # as `python -m fibax.train` runs: cuBLAS matmuls, XLA's sort (GPU)
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--config", default="configs/paper.py", help="a config file with named runs")
  p.add_argument("--runs", nargs="+", default=["fib_stagger_w12", "dense"])
  p.add_argument("--contexts", type=int, nargs="+", default=[1024, 16384, 65536, 1 << 20])
  p.add_argument("--batches", type=int, nargs="+", default=[1, 32])
  p.add_argument("--steps", type=int, default=64, help="decode steps per timed round")
  p.add_argument("--free-gib", type=float, default=None, help="the memory to plan for (tests)")
  add_overrides_argument(p, "config overrides for every run")
  p.add_argument("--out", default=None)
  args = p.parse_args(argv)
  for name, values in (("contexts", args.contexts), ("batches", args.batches)):
    if any(v < 1 for v in values):
      sys.exit(f"bench_decode.py: error: --{name} {values} must all be >= 1")
  if args.steps < 1:
    sys.exit(f"bench_decode.py: error: --steps={args.steps} must be >= 1")
  try:
    cfgs = {
      name: apply_overrides(load_config(f"{args.config}:{name}"), args.overrides).model
      for name in args.runs
    }
  except (ValueError, TypeError, FileNotFoundError) as e:
    sys.exit(f"bench_decode.py: error: {' '.join(str(e).split())}")
  free = None if args.free_gib is None else int(args.free_gib * 2**30)
  report = {
    "command": " ".join(["python", *sys.argv]),
    "versions": versions(),
    "steps": args.steps,
    "results": [],
  }
  for name, cfg in cfgs.items():
    params = init_params(cfg)
    cfg = generation_config(params, cfg)
    for batch in args.batches:
      for context in args.contexts:
        row = {"run": name, **measure(cfg, params, batch, context, args.steps, free)}
        print(json.dumps(row), flush=True)
        report["results"].append(row)
        report["summary"] = summarize(report["results"])
        if args.out:
          out = Path(args.out)
          out.parent.mkdir(parents=True, exist_ok=True)
          tmp = out.with_name(out.name + ".tmp")
          tmp.write_text(json.dumps(report, indent=1) + "\n")
          tmp.replace(out)
  print(json.dumps(report["summary"], indent=1))
  return 0


if __name__ == "__main__":
  sys.exit(main())
