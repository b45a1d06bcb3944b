"""Evaluation reports (from `fibax.evaluate.evaluate_run`): a printed table, JSON, CSV, and
the per-position NLL curves as .npz beside them.

    check_writable("runs/fib/eval")                 # before evaluating: raises OutputError
    paths = write_report(report, "runs/fib/eval")   # results-cap_run.{json,csv} + _positions.npz
    reports = load_reports(["runs/fib/eval", "runs/dense/eval"])   # for fibax.plots
"""

from __future__ import annotations

import csv
import json
import os
import sys
import tempfile
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from fibax.data.files import is_local
from fibax.evaluate import NUM_BINS

CSV_FIELDS = (
  "label",
  "dataset",
  "variant",
  "cap_mode",
  "length_mult",
  "seq_len",
  "windows",
  "tokens",
  "nll",
  "ppl",
  *(f"bin_{i}" for i in range(NUM_BINS)),
  "batch_size",
  "memory_bytes",
  "seconds",
  "status",
)


def series(report: dict) -> dict[tuple[str, str], dict[int, dict]]:
  """(dataset, variant) -> length multiple -> result."""
  out: dict[tuple[str, str], dict[int, dict]] = {}
  for row in report["results"]:
    out.setdefault((row["dataset"], row["variant"]), {})[row["length_mult"]] = row
  return out


def format_table(report: dict) -> str:
  """Perplexity per (dataset, variant) against length multiple, the change at the largest
  multiple against x1 (as the paper), then the 8-bin position-resolved NLL."""
  mults = sorted({r["length_mult"] for r in report["results"]})
  head = f"{report['label']} (step {report['step']}, cap mode {report['cap_mode']})"
  lines = [head, f"{'dataset':<12}{'variant':<9}" + "".join(f"{'x' + str(m):>10}" for m in mults)]
  lines[-1] += f"{'change':>10}" if len(mults) > 1 else ""
  for (dataset, variant), by_mult in series(report).items():
    cells = []
    for m in mults:
      row = by_mult.get(m)
      if row is None:
        cells.append(f"{'':>10}")
      elif row["status"] == "ok":
        cells.append(f"{row['ppl']:>10.3f}")
      else:
        cells.append(f"{row['status'].split(':')[0].split(' ')[0]:>10}")
    line = f"{dataset:<12}{variant:<9}" + "".join(cells)
    first, last = by_mult.get(mults[0]), by_mult.get(mults[-1])
    if len(mults) > 1 and first and last and first["status"] == last["status"] == "ok":
      line += f"{last['ppl'] / first['ppl'] - 1:>+10.1%}"
    lines.append(line)
  lines.append(f"position-resolved NLL, {NUM_BINS} equal bins over the window (nats):")
  for row in report["results"]:
    if row["status"] == "ok":
      bins = " ".join(f"{b:.3f}" for b in row["bins"])
      lines.append(f"  {row['dataset']:<11}{row['variant']:<9}x{row['length_mult']:<4} {bins}")
  for row in report["results"]:
    if row["status"] != "ok":
      lines.append(f"  {row['dataset']} {row['variant']} x{row['length_mult']}: {row['status']}")
  return "\n".join(lines)


class OutputError(OSError):
  """An output path that cannot be written."""


def check_writable(path: str | os.PathLike, *, is_file: bool = False) -> Path:
  """`path` (absolute), checked to be a directory (with `is_file`: a file) that can be written
  or created, before anything is computed for it. Creates nothing: the deepest directory that
  exists on the way must be one and take a (temporary, unnamed) file.

  Raises:
    OutputError: naming the path and why not (a file in the way, no write permission, or not
      a local path: reports are written to this machine only).
  """
  if not is_local(path):
    raise OutputError(f"out={os.fspath(path)!r} is not a local path; reports are written locally")
  path = Path(path).absolute()
  try:
    if is_file and path.is_dir():
      raise OutputError(f"out={str(path)!r} is a directory, not a file")
    if is_file and path.exists() and not os.access(path, os.W_OK):
      raise OutputError(f"out={str(path)!r} is not writable (a read-only file)")
    existing = path.parent if is_file else path
    while not existing.exists():
      existing = existing.parent
    if existing == path and not existing.is_dir():
      raise OutputError(f"out={str(path)!r} is a file, not a directory")
    if not existing.is_dir():
      raise OutputError(f"out={str(path)!r} cannot be created: {existing} is not a directory")
    with tempfile.TemporaryFile(dir=existing):
      pass
  except OutputError:
    raise
  except OSError as e:
    reason = f"{type(e).__name__}: {e.strerror or e}"
    raise OutputError(f"out={str(path)!r} is not writable ({reason})") from None
  return path


def report_stem(report: dict) -> str:
  return f"results-cap_{report['cap_mode']}"


def write_report(report: dict, out_dir: str | os.PathLike) -> dict[str, Path]:
  """Writes `<stem>.json` (everything but the curves), `<stem>.csv` and
  `<stem>_positions.npz` (one float64[L] mean NLL curve per variant/dataset/xM)."""
  out_dir = Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  stem = report_stem(report)
  paths = {
    "json": out_dir / f"{stem}.json",
    "csv": out_dir / f"{stem}.csv",
    "positions": out_dir / f"{stem}_positions.npz",
  }
  record = {k: v for k, v in report.items() if k != "positions"}
  record.setdefault("command", " ".join(sys.argv))
  paths["json"].write_text(json.dumps(record, indent=1) + "\n")
  with open(paths["csv"], "w", newline="") as f:
    writer = csv.DictWriter(f, CSV_FIELDS, extrasaction="ignore")
    writer.writeheader()
    for row in report["results"]:
      bins = {f"bin_{i}": b for i, b in enumerate(row.get("bins", ()))}
      writer.writerow({**row, **bins})
  np.savez_compressed(paths["positions"], **report["positions"])
  return paths


def load_report(path: str | os.PathLike) -> dict:
  """A report written by `write_report`, its position curves loaded if the .npz is there."""
  path = Path(path)
  try:
    report = json.loads(path.read_text())
  except (OSError, json.JSONDecodeError) as e:
    raise ValueError(f"results={str(path)!r} is not a readable report ({e})") from None
  if not isinstance(report, dict) or "results" not in report:
    raise ValueError(f"results={str(path)!r} is not a fibax.eval report (no 'results')")
  npz = path.with_name(f"{path.stem}_positions.npz")
  report["positions"] = {}
  if npz.is_file():
    with np.load(npz) as curves:
      report["positions"] = {k: curves[k] for k in curves.files}
  return report


def load_reports(paths: Iterable[str | os.PathLike]) -> list[dict]:
  """Reports from JSON files, or from every `results-*.json` in a directory."""
  reports = []
  for p in map(Path, paths):
    if p.is_dir():
      files = sorted(p.glob("results-*.json"))
      if not files:
        raise ValueError(f"results={str(p)!r} holds no results-*.json")
      reports += [load_report(f) for f in files]
    elif p.is_file():
      reports.append(load_report(p))
    else:
      raise ValueError(f"results={str(p)!r} does not exist")
  return reports
