"""Training-loader throughput (tokens/s) on this machine's CPU cores.

    python experiments/bench_loader.py                      # sotu at the tiny config's vocab
    python experiments/bench_loader.py --data data/gutenberg --seconds 5

Prepares `--data` from `--source` first if it holds no manifest. For the tiny config
(T = 256, B = 16) and the paper's (T = 1024, B = 32), and 0-2 grain worker processes,
it prints tokens/s delivered to the consumer and the time to the first batch, against a
baseline of plain contiguous memmap slices (no shuffling, no grain) measured in the same run;
the JSON goes to experiments/results/bench_loader.json.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import time
from pathlib import Path

import grain
import numpy as np

from fibax.data.build import prepare
from fibax.data.pipeline import train_iterator
from fibax.data.shards import MANIFEST, SplitTokens, load_manifest

CONFIGS = {"tiny": (256, 16), "paper": (1024, 32)}
TARGET_TOKENS_PER_S = 3e6


def _rate(next_batch, seconds: float) -> tuple[float, float]:
  """(tokens/s over `seconds` after the first batch, seconds to the first batch)."""
  t0 = time.perf_counter()
  next_batch()
  first_s = time.perf_counter() - t0
  tokens, t0 = 0, time.perf_counter()
  while (elapsed := time.perf_counter() - t0) < seconds:
    tokens += next_batch()
  return tokens / elapsed, first_s


def _baseline(data_dir: Path, seq_len: int, batch_size: int, seconds: float) -> float:
  tokens = SplitTokens(data_dir, "train", verify=False)
  span = batch_size * seq_len + 1
  state = {"start": 0}

  def next_batch() -> int:
    if state["start"] + span > tokens.num_tokens:
      state["start"] = 0
    flat = tokens.read(state["start"], span).astype(np.int32)
    state["start"] += span - 1
    return flat[:-1].reshape(batch_size, seq_len).size

  return _rate(next_batch, seconds)[0]


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--data", default="data/sotu")
  parser.add_argument("--source", default="sotu")
  parser.add_argument("--vocab-size", type=int, default=2048)
  parser.add_argument("--seconds", type=float, default=3.0)
  parser.add_argument("--workers", default="0,1,2", help="comma-separated worker counts")
  parser.add_argument("--out", default="experiments/results/bench_loader.json")
  args = parser.parse_args()
  data_dir = Path(args.data)
  if not (data_dir / MANIFEST).is_file():
    prepare(args.source, data_dir, args.vocab_size)
  manifest = load_manifest(data_dir)

  rows = []
  print(f"{'config':>6} {'T':>5} {'B':>3} {'workers':>7} {'tokens/s':>12} {'first batch':>11}")
  for name, (seq_len, batch_size) in CONFIGS.items():
    base = _baseline(data_dir, seq_len, batch_size, args.seconds)
    print(f"{name:>6} {seq_len:>5} {batch_size:>3} {'memmap':>7} {base:>12,.0f} {'-':>11}")
    for workers in (int(w) for w in args.workers.split(",")):
      it = train_iterator(
        data_dir, seq_len, batch_size, seed=0, worker_count=workers, shard_index=0, shard_count=1
      )
      rate, first_s = _rate(lambda it=it: next(it)["inputs"].size, args.seconds)
      del it
      gc.collect()
      rows.append(
        dict(
          config=name,
          seq_len=seq_len,
          batch_size=batch_size,
          worker_count=workers,
          tokens_per_s=round(rate),
          first_batch_s=round(first_s, 3),
          memmap_baseline_tokens_per_s=round(base),
          ratio_to_baseline=round(rate / base, 3),
        )
      )
      print(f"{name:>6} {seq_len:>5} {batch_size:>3} {workers:>7} {rate:>12,.0f} {first_s:>10.2f}s")
  best = max(r["tokens_per_s"] for r in rows)
  verdict = "met" if best >= TARGET_TOKENS_PER_S else "MISSED"
  print(f"best {best:,} tokens/s; target {TARGET_TOKENS_PER_S:,.0f}: {verdict}")

  result = {
    "benchmark": "fibax.data.pipeline.train_iterator throughput",
    "command": " ".join([Path(sys.executable).name, *sys.argv]),
    "host": {
      "cpu_count": os.cpu_count(),
      "processor": platform.processor() or platform.machine(),
      "platform": platform.platform(),
    },
    "versions": {
      "python": platform.python_version(),
      "numpy": np.__version__,
      "grain": grain.__version__,
    },
    "data": {
      "dir": str(data_dir),
      "source": manifest["source"],
      "vocab_size": manifest["tokenizer"]["vocab_size"],
      "tokens": {s: e["tokens"] for s, e in manifest["splits"].items()},
      "docs": {s: e["docs"] for s, e in manifest["splits"].items()},
    },
    "seconds_per_measurement": args.seconds,
    "target_tokens_per_s": TARGET_TOKENS_PER_S,
    "results": rows,
  }
  out = Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps(result, indent=1) + "\n")
  print(f"wrote {out}")


if __name__ == "__main__":
  main()
