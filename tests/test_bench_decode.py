"""experiments/bench_decode.py: decode steps after a long context, ring caches against dense."""

import json
import pathlib
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]


def _bench(*args):
  return subprocess.run(
    [sys.executable, str(REPO / "experiments" / "bench_decode.py"), *map(str, args)],
    capture_output=True, text=True, timeout=600, cwd=REPO,
  )  # fmt: skip


def test_sparse_memory_is_flat_and_dense_that_does_not_fit_is_skipped(tmp_path):
  out = tmp_path / "decode.json"
  # 12 MiB to plan for: the sparse model (~6 MB with its rings) fits at every context, the
  # dense one at 2,048 tokens of context but not at 8,192 (17 MB of cache alone).
  proc = _bench(
    "--config", "configs/tiny.py", "--runs", "stagger", "dense", "--contexts", 2048, 8192,
    "--batches", 1, "--steps", 2, "--free-gib", 12 / 1024, "--out", out,
  )  # fmt: skip
  assert proc.returncode == 0, proc.stderr[-3000:]
  report = json.loads(out.read_text())
  rows = {(r["run"], r["context"]): r for r in report["results"]}
  sparse_lo, sparse_hi = rows[("stagger", 2048)], rows[("stagger", 8192)]
  assert sparse_lo["status"] == sparse_hi["status"] == "ok"
  # Past its largest offset the ring does not grow: same rows, same bytes, same estimate.
  assert sparse_lo["cache_rows_max"] == sparse_hi["cache_rows_max"] < 2048
  assert sparse_lo["memory_bytes"] == sparse_hi["memory_bytes"]
  assert report["summary"]["memory_ratio_stagger_B1_2048_to_8192"] == 1.0
  assert rows[("dense", 2048)]["status"] == "ok"
  assert rows[("dense", 2048)]["cache_rows_max"] == 2048 + 2
  dense_hi = rows[("dense", 8192)]
  assert dense_hi["status"].startswith("skipped: caches need") and "compile_s" not in dense_hi
  assert report["summary"]["speedup_stagger_vs_dense_B1_C2048"] > 0
  assert all(r["tokens_per_s"] > 0 for r in report["results"] if r["status"] == "ok")
  assert report["versions"]["jax"] and "bench_decode.py" in report["command"]


def test_bad_input_is_one_line():
  proc = _bench("--config", "configs/tiny.py", "--contexts", 0)
  assert proc.returncode == 1 and "--contexts [0] must all be >= 1" in proc.stderr
  assert len(proc.stderr.strip().splitlines()) == 1
