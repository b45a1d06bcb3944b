"""experiments/reproduce.py: the paper's tables with our numbers beside theirs."""

import importlib.util
import json
import math
import pathlib
import subprocess
import sys

import pytest

from fibax import eval_report

PATH = pathlib.Path(__file__).resolve().parents[1] / "experiments" / "reproduce.py"
spec = importlib.util.spec_from_file_location("reproduce", PATH)
reproduce = importlib.util.module_from_spec(spec)
spec.loader.exec_module(reproduce)


def _report(label, ppl_by_mult, bins=None, variant="trained"):
  results = [
    {
      "dataset": "validation",
      "variant": variant,
      "length_mult": m,
      "status": "ok",
      "ppl": p,
      "nll": math.log(p),
      "bins": list(bins or [math.log(p)] * 8),
    }
    for m, p in ppl_by_mult.items()
  ]
  # A result of another dataset and a failed length must not enter the tables.
  results.append({**results[0], "dataset": "sotu", "ppl": 1.0})
  results.append({**results[0], "length_mult": 16, "status": "would not fit", "ppl": None})
  return {"label": label, "results": results}


REPORTS = {
  "dense": _report("dense", {1: 20.0, 2: 40.0, 4: 80.0}),
  "fib_fixed_w8": _report("fib_fixed_w8", {1: 30.0, 2: 29.0, 4: 28.5}, [4.0] * 4 + [3.9] * 4),
  "fib_stagger_w8": _report("fib_stagger_w8", {1: 27.0, 2: 27.0, 4: 27.0}, [3.9] * 8),
  "fib_coprime_w8": _report("fib_coprime_w8", {1: 28.0, 2: 28.0, 4: 29.0}),
  "fib_learned_w8": _report("fib_learned_w8", {1: 29.0, 2: 28.0, 4: 27.0}),
}
REPORTS["fib_learned_w8"]["results"] += _report("", {1: 29.5, 4: 27.5}, variant="frozen")["results"]


def test_tables_put_ours_beside_the_papers():
  md, data = reproduce.build_tables(REPORTS, "validation", "a test scale")
  assert "a test scale" in md
  assert "| fib / stagger | 27.00 / 42.53 |" in md
  assert "| fib / fixed | 30.00 / 44.08 |" in md
  assert "Dense: 20.00 / 33.37. Best sparse is +35.0% against dense (paper +25.9%)." in md
  order = ["fib_stagger", "fib_coprime", "fib_learned", "fib_fixed"]
  assert data["orderings"][8] == {"ours": order, "paper": order}
  # Learned: the trained (dynamic) and the frozen perplexity side by side; x2 not evaluated.
  assert data["frozen"] == {"fib_learned_w8": {1: 29.5, 4: 27.5}}
  assert "| fib_learned_w8 | 29.00 | 29.50 | 28.00 |  | 27.00 | 27.50 |" in md
  # Extrapolation: the change at the largest multiple, against the paper's.
  assert data["extrapolation"]["dense"]["change"] == pytest.approx(3.0)
  assert "| dense | 20.00 / 33.37 | 40.00 / 49.15 | 80.00 / 100.36 | +300.0% / +200.7% |" in md
  assert data["extrapolation"]["fib_coprime_w8"]["change"] == pytest.approx(1 / 28)
  # Position bins: the fixed - stagger gap per bin, ours and the paper's.
  assert data["position_bins"]["gap"] == pytest.approx([0.1] * 4 + [0.0] * 4)
  assert "| gap, paper | +0.022 | +0.039 |" in md


def test_tables_only_rebuilds_from_written_reports(tmp_path, capsys):
  for name, report in REPORTS.items():
    (tmp_path / name / "eval").mkdir(parents=True)
    path = tmp_path / name / "eval" / "results-cap_run.json"
    path.write_text(json.dumps({**report, "positions": {}}))
  out = tmp_path / "tables"
  reproduce.main(
    [
      "--config",
      "configs/tiny_paper.py",
      "--runs",
      *REPORTS,
      "--root",
      str(tmp_path),
      "--tables-only",
      "--out",
      str(out),
    ]
  )
  assert (out / "tables.md").read_text() == reproduce.build_tables(
    {n: eval_report.load_report(tmp_path / n / "eval" / "results-cap_run.json") for n in REPORTS},
    "validation",
    "runs of configs/tiny_paper.py",
  )[0]
  assert json.loads((out / "tables.json").read_text())["runs"] == list(REPORTS)


@pytest.mark.parametrize(
  ("args", "message"),
  [
    (["--runs", "dense", "fib_zigzag_w8"], "unknown run name='fib_zigzag_w8'"),
    (["--runs", "dense", "--length-mult", "0", "1"], "length_mult=0 must be an integer >= 1"),
  ],
)
def test_bad_input_is_one_line_before_anything_runs(tmp_path, args, message):
  root = tmp_path / "runs"
  proc = subprocess.run(
    [
      sys.executable,
      str(PATH),
      "--config",
      str(PATH.parents[1] / "configs" / "tiny_paper.py"),
      *args,
      "--root",
      str(root),
      "--out",
      str(tmp_path / "tables"),
    ],
    capture_output=True,
    text=True,
  )
  assert proc.returncode == 1 and message in proc.stderr
  assert len(proc.stderr.strip().splitlines()) == 1
  assert not root.exists() and not (tmp_path / "tables").exists()
