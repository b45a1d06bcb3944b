"""Memory and speed of one evaluation forward at long lengths on this device.

For each model and length multiple: XLA's compiled memory estimate against the free memory
(`fibax.evaluate.compile_forward`, the check `python -m fibax.eval` makes before every length,
refusing instead of running out of memory), and where it fits, the time of batch-1 forwards
over random tokens (`fibax.evaluate.evaluate_windows`). Parameters are randomly initialised:
memory and time do not depend on their values.

    python experiments/long_context_memory.py --configs configs/paper.py:dense \\
        configs/paper.py:fib_stagger_w12 --length-mult 1 16 64 --dense-impls dense xla_dense \\
        --out experiments/results/long_context_h100.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

import jax
import numpy as np

from fibax.config_loader import load_config
from fibax.evaluate import InsufficientMemory, compile_forward, evaluate_windows, free_memory_bytes
from fibax.model import init_params


def measure(spec: str, attention: dict, mults: list[int], windows: int) -> list[dict]:
  cfg = load_config(spec).model
  cfg = dataclasses.replace(cfg, attention=dataclasses.replace(cfg.attention, **attention))
  params = init_params(cfg)
  rows = []
  for mult in mults:
    seq_len = cfg.seq_len * mult
    row = {"config": spec, **attention, "length_mult": mult, "seq_len": seq_len}
    row["free_bytes"] = free_memory_bytes()
    try:
      compiled = compile_forward(cfg, params, seq_len, 1)
    except InsufficientMemory as e:
      row["status"] = f"refused: {e}"
    else:
      row["need_bytes"] = compiled[2]
      rng = np.random.default_rng(0)
      tokens = rng.integers(0, cfg.vocab_size, (windows, seq_len + 1), dtype=np.int32)
      cache = {(cfg, seq_len, 1): compiled}
      evaluate_windows(cfg, params, tokens[:1], batch_size=1, compiled=cache)  # warm
      out = evaluate_windows(cfg, params, tokens, batch_size=1, compiled=cache)
      row.update(status="ok", seconds=out["seconds"], tokens_per_s=out["tokens"] / out["seconds"])
      stats = jax.devices()[0].memory_stats() or {}
      row["peak_bytes_in_use"] = stats.get("peak_bytes_in_use")
    print(json.dumps(row), flush=True)
    rows.append(row)
  return rows


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--configs", nargs="+", required=True, help="configs/<file>.py:<run> specs")
  p.add_argument("--length-mult", type=int, nargs="+", default=[1, 16, 64])
  p.add_argument("--impl", default=None, help="integer-offset impl (default: the config's)")
  p.add_argument("--dense-impls", nargs="+", default=["dense"], help="tried for dense configs")
  p.add_argument("--windows", type=int, default=2, help="timed forwards per length")
  p.add_argument("--out", default=None)
  args = p.parse_args(argv)
  rows = []
  for spec in args.configs:
    dense = load_config(spec).model.attention.schedule == "dense"
    variants = [{"dense_impl": d} for d in args.dense_impls] if dense else [{}]
    for attention in variants:
      if args.impl and not dense:
        attention["impl"] = args.impl
      rows += measure(spec, attention, args.length_mult, args.windows)
  device = jax.devices()[0]
  record = {
    "device": f"{device.device_kind} ({device.platform})",
    "jax_version": jax.__version__,
    "command": " ".join(["python", *sys.argv]),
    "rows": rows,
  }
  if args.out:
    with open(args.out, "w") as f:
      json.dump(record, f, indent=1)
      f.write("\n")
  return 0


if __name__ == "__main__":
  sys.exit(main())
