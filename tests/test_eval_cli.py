"""`python -m fibax.eval`: reports, plots, latency, and one-line errors on bad input."""

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from eval_helpers import SEQ_LEN, STEP, damage, largest_state_file, micro_model, saved_run

from fibax.eval import _parse, main
from fibax.eval_report import format_table, load_reports
from fibax.latency import latency_table

REPO = Path(__file__).resolve().parents[1]


def _error_line(capsys) -> str:
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1, err
  assert err[0].startswith("python -m fibax.eval: error: ") or "python -m fibax.eval" in err[0]
  return err[0]


def test_eval_writes_table_json_csv_and_plots(tmp_path_factory, tmp_path, capsys):
  _, workdir = saved_run(tmp_path_factory, "learned")
  out = tmp_path / "eval"
  argv = ["--checkpoint", str(workdir), "--length-mult", "1", "--variants", "trained", "frozen"]
  assert main([*argv, "--max-tokens", "256", "--out", str(out)]) == 0
  stdout = capsys.readouterr().out
  assert "validation  trained" in stdout and "validation  frozen" in stdout

  record = json.loads((out / "results-cap_run.json").read_text())
  assert record["step"] == STEP and record["label"] == workdir.name
  assert record["command"].startswith("python -m fibax.eval --checkpoint")
  trained, frozen = record["results"]
  assert trained["tokens"] == 256 and trained["seq_len"] == SEQ_LEN and len(trained["bins"]) == 8
  # Freshly initialised thetas: every alpha is 1, so freezing leaves the model as it was.
  assert frozen["nll"] == pytest.approx(trained["nll"], abs=1e-5)
  with open(out / "results-cap_run.csv") as f:
    rows = list(csv.DictReader(f))
  assert [r["variant"] for r in rows] == ["trained", "frozen"]
  assert float(rows[0]["ppl"]) == pytest.approx(trained["ppl"])
  assert (out / "ppl_vs_length.png").stat().st_size > 0
  assert (out / "positions_validation_x1.png").stat().st_size > 0

  # The plot subcommand over a set of runs (here the same report twice, under two names).
  other = tmp_path / "other"
  other.mkdir()
  (other / "results-cap_run.json").write_text(json.dumps({**record, "label": "other"}))
  shutil.copy(out / "results-cap_run_positions.npz", other)
  assert main(["plot", str(out), str(other / "results-cap_run.json"), "--out", str(tmp_path)]) == 0
  reports = load_reports([out, other])
  assert [r["label"] for r in reports] == [workdir.name, "other"]
  assert "trained/validation/x1" in reports[1]["positions"]
  assert "+" not in format_table(reports[0]).splitlines()[1]  # one multiple: no change column
  assert (tmp_path / "positions_validation_x1.png").stat().st_size > 0


def test_refused_length_is_reported_not_crashed(tmp_path_factory, tmp_path, capsys):
  _, workdir = saved_run(tmp_path_factory, "stagger")
  argv = ["--checkpoint", str(workdir), "--length-mult", "2", "--max-tokens", "128"]
  assert main([*argv, "--free-memory-gb", "0.00001", "--out", str(tmp_path), "--no-plots"]) == 0
  stdout = capsys.readouterr().out
  assert "refused: stagger sparse model at seq_len=64 needs ~" in stdout
  record = json.loads((tmp_path / "results-cap_run.json").read_text())
  assert record["results"][0]["status"].startswith("refused:")


@pytest.mark.parametrize(
  ("args", "message"),
  [
    (["--length-mult", "0"], "length_mult=0 must be an integer >= 1"),
    (["--length-mult", "2", "-1"], "length_mult=-1 must be an integer >= 1"),
    (["--datasets", "wiki"], "unknown dataset='wiki'"),
    (["--variants", "frozen"], "variant 'frozen' needs a learned schedule"),
    (["--length-mult", "x"], "argument --length-mult: invalid int value: 'x'"),
  ],
)
def test_bad_arguments_are_one_line_errors(tmp_path_factory, capsys, args, message):
  _, workdir = saved_run(tmp_path_factory, "stagger")
  assert main(["--checkpoint", str(workdir), *args]) == 2
  assert message in _error_line(capsys)


def test_missing_or_empty_checkpoint_is_a_one_line_error(tmp_path, capsys):
  assert main(["--checkpoint", str(tmp_path / "nope")]) == 2
  assert "does not exist" in _error_line(capsys)
  assert main(["--checkpoint", str(tmp_path)]) == 2
  assert "no checkpoint in" in _error_line(capsys)
  assert main(["plot", str(tmp_path), "--out", str(tmp_path)]) == 2
  assert "holds no results-*.json" in _error_line(capsys)


@pytest.mark.parametrize("how", ["flip", "truncate"])
def test_corrupt_checkpoint_is_a_one_line_error(tmp_path_factory, tmp_path, capsys, how):
  _, workdir = saved_run(tmp_path_factory, "stagger")
  broken = tmp_path / "broken"
  shutil.copytree(workdir, broken)
  damage(largest_state_file(broken), how)
  assert main(["--checkpoint", str(broken)]) == 2
  line = _error_line(capsys)
  assert f"checkpoint step {STEP} in {broken / 'checkpoints'} is unreadable" in line
  assert sorted(p.name for p in (broken / "checkpoints").iterdir()) == [str(STEP)]  # not moved


def test_corrupt_checkpoint_cli_prints_exactly_one_line(tmp_path_factory, tmp_path):
  """The real process: nothing else (orbax's or asyncio's logging) reaches stderr."""
  _, workdir = saved_run(tmp_path_factory, "stagger")
  broken = tmp_path / "broken"
  shutil.copytree(workdir, broken)
  damage(largest_state_file(broken), "delete")
  proc = subprocess.run(
    [sys.executable, "-m", "fibax.eval", "--checkpoint", str(broken), "--length-mult", "4"],
    cwd=REPO,
    env=os.environ.copy(),
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert proc.returncode == 2, proc.stderr
  assert proc.stderr.count("\n") == 1, proc.stderr
  assert proc.stderr.startswith(f"python -m fibax.eval: error: checkpoint step {STEP} in ")


def test_subcommands_are_argparse_subparsers_beside_the_default_evaluation(capsys):
  assert main(["--help"]) == 0
  help_text = capsys.readouterr().out
  assert "{plot,latency}" in help_text and "--checkpoint" in help_text
  for name in ("plot", "latency"):
    assert main([name, "--help"]) == 0
    assert capsys.readouterr().out.startswith(f"usage: python -m fibax.eval {name} ")

  # No subcommand: the evaluation, as before (options in any order, lists of any length).
  argv = ["--length-mult", "1", "2", "4", "--checkpoint", "runs/x", "--datasets", "validation"]
  args, rest = _parse([*argv, "sotu", "--out", "o"])
  assert args.command is None and rest == [*argv, "sotu", "--out", "o"]
  assert args.checkpoint == "runs/x" and args.length_mult == [1, 2, 4] and args.out == "o"
  assert args.datasets == ["validation", "sotu"]
  latency = ["--config", "c.py", "--batch", "1", "8", "--out", "t.json"]
  args, rest = _parse(["latency", *latency])
  assert args.command == "latency" and rest == latency
  assert args.config == "c.py" and args.checkpoint is None and args.batch == [1, 8]
  assert args.out == "t.json"
  args, rest = _parse(["plot", "a", "b", "--out", "p"])
  assert args.command == "plot" and args.results == ["a", "b"] and args.out == "p"


@pytest.mark.parametrize(
  ("argv", "message"),
  [
    ([], "the following arguments are required: --checkpoint"),
    (["frobnicate"], "invalid choice: 'frobnicate' (choose from 'plot', 'latency')"),
    (["--max-tokens", "5", "plot", "a", "--out", "b"], "the subcommand comes first"),
    (["plot", "--out", "b"], "the following arguments are required: results"),
    (["latency", "--seq-len", "8"], "one of the arguments --checkpoint --config is required"),
  ],
)
def test_usage_errors_are_one_line_with_exit_2(capsys, argv, message):
  assert main(argv) == 2
  line = _error_line(capsys)
  assert line.startswith("python -m fibax.eval") and message in line, line


def test_latency_of_static_learned_and_frozen_on_cpu():
  table = latency_table(
    micro_model("learned"), seq_len=SEQ_LEN, batch_sizes=(2,), reps=1, rounds=1, log=print
  )
  rows = {r["variant"]: r for r in table["rows"]}
  assert set(rows) == {"static", "learned", "frozen"}
  assert rows["static"]["vs_static"] == 1.0 and table["frozen_alphas"] == [1.0, 1.0]
  assert table["learned_alphas"] == "initial"  # no learned_params: a fresh model's
  assert table["gpu_blocks"] == ""  # not a packed Pallas GPU impl: no blocks
  for row in rows.values():
    assert row["ms"] > 0 and row["tokens_per_s"] == pytest.approx(2 * SEQ_LEN / row["ms"] * 1e3)
