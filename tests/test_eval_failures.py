"""`python -m fibax.eval` failing cleanly: an output that cannot be written is found before
anything is loaded or computed, a non-finite perplexity is refused without a report, and an
unusable checkpoint prints one line and nothing else."""

import errno
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from eval_helpers import STEP, saved_run

from fibax.checkpoint import META
from fibax.eval import main

REPO = Path(__file__).resolve().parents[1]


def _error_line(capsys) -> str:
  captured = capsys.readouterr()
  err = captured.err.strip().splitlines()
  assert len(err) == 1, err
  assert err[0].startswith("python -m fibax.eval: error: "), err[0]
  return err[0]


def _never(*args, **kwargs):
  raise AssertionError("loaded or computed despite an output that cannot be written")


@pytest.mark.parametrize(
  "where", ["file", "under_file", "read_only_dir", "default_is_file", "not_local"]
)
def test_unwritable_output_fails_before_anything_is_computed(
  tmp_path_factory, tmp_path, capsys, monkeypatch, where
):
  _, workdir = saved_run(tmp_path_factory, "stagger")
  blocker = tmp_path / "blocker"
  blocker.write_text("not a directory")
  argv = ["--checkpoint", str(workdir), "--length-mult", "1", "2"]
  if where == "file":
    out = blocker
  elif where == "under_file":
    out = blocker / "eval"
  elif where == "not_local":
    out = "gs://bucket/eval"  # reports are written to local directories only
  elif where == "read_only_dir":
    (tmp_path / "ro").mkdir(mode=0o555)
    out = tmp_path / "ro" / "eval"
    if os.geteuid() == 0:  # root writes anyway: what anyone else gets there is simulated
      real = tempfile.TemporaryFile

      def refused(*args, dir=None, **kwargs):
        if Path(dir) == tmp_path / "ro":
          raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))
        return real(*args, dir=dir, **kwargs)

      monkeypatch.setattr(tempfile, "TemporaryFile", refused)
  else:  # the default, <workdir>/eval, is a regular file
    workdir = shutil.copytree(workdir, tmp_path / "run")
    out = workdir / "eval"
    out.write_text("not a directory")
    argv[1] = str(workdir)
  argv += [] if where == "default_is_file" else ["--out", str(out)]
  monkeypatch.setattr("fibax.eval.evaluate_checkpoint", _never)
  monkeypatch.setattr("fibax.evaluate.evaluate_run", _never)
  monkeypatch.setattr("fibax.restore.load_run", _never)

  assert main(argv) == 1
  line = _error_line(capsys)
  assert f"out={str(out)!r}" in line
  if where == "read_only_dir":
    assert "is not writable (PermissionError: Permission denied)" in line
  assert ("pass --out DIR" in line) == (where == "default_is_file")
  assert capsys.readouterr().out == ""  # not one length evaluated
  assert blocker.read_text() == "not a directory"


def test_plot_and_latency_check_their_output_first(tmp_path_factory, tmp_path, capsys, monkeypatch):
  _, workdir = saved_run(tmp_path_factory, "stagger")
  blocker = tmp_path / "blocker"
  blocker.write_text("not a directory")
  monkeypatch.setattr("fibax.eval.load_reports", _never)
  monkeypatch.setattr("fibax.plots.plot_all", _never)
  monkeypatch.setattr("fibax.eval.load_run", _never)
  monkeypatch.setattr("fibax.latency.latency_table", _never)

  assert main(["plot", str(workdir), "--out", str(blocker)]) == 1
  assert f"out={str(blocker)!r} is a file, not a directory" in _error_line(capsys)
  out = blocker / "latency.json"
  assert main(["latency", "--checkpoint", str(workdir), "--out", str(out)]) == 1
  assert f"out={str(out)!r} cannot be created: {blocker} is not a directory" in _error_line(capsys)
  assert main(["latency", "--checkpoint", str(workdir), "--out", str(tmp_path)]) == 1
  assert f"out={str(tmp_path)!r} is a directory, not a file" in _error_line(capsys)


def test_non_finite_nll_is_refused_without_a_report(tmp_path_factory, tmp_path, capsys):
  """A diverged run (every parameter nan, the checkpoint itself intact)."""
  _, workdir = saved_run(tmp_path_factory, "stagger", nan_params=True)
  out = tmp_path / "eval"
  argv = ["--checkpoint", str(workdir), "--length-mult", "2", "--max-tokens", "256"]
  assert main([*argv, "--out", str(out)]) == 1
  line = _error_line(capsys)
  assert "non-finite NLL (nll=nan) on dataset validation at length x2 (seq_len=64)" in line
  assert line.endswith(f"of {workdir.name} step {STEP}; no report written")
  assert not out.exists() or not any(out.iterdir())


def _cli(*argv: str) -> subprocess.CompletedProcess:
  return subprocess.run(
    [sys.executable, "-m", "fibax.eval", *argv],
    cwd=REPO,
    env=os.environ.copy(),
    capture_output=True,
    text=True,
    timeout=120,
  )


@pytest.mark.parametrize("case", ["no_checkpoint", "config_mismatch"])
def test_unusable_checkpoint_cli_prints_exactly_one_line(tmp_path_factory, tmp_path, case):
  """The real process: no traceback and nothing of orbax's or absl's logging on stderr."""
  _, workdir = saved_run(tmp_path_factory, "stagger")
  if case == "no_checkpoint":
    (tmp_path / "checkpoints").mkdir()
    expected = f"python -m fibax.eval: error: no checkpoint in {tmp_path / 'checkpoints'}"
  else:  # the record's config asks for wider arrays than the state holds
    shutil.copytree(workdir, tmp_path, dirs_exist_ok=True)
    record_path = tmp_path / "checkpoints" / str(STEP) / META / "metadata"
    record = json.loads(record_path.read_text())
    record["config"]["model"]["d_model"] = 48
    record_path.write_text(json.dumps(record))
    expected = (
      f"python -m fibax.eval: error: checkpoint step {STEP} in {tmp_path / 'checkpoints'} "
      "is unreadable"
    )
  proc = _cli("--checkpoint", str(tmp_path), "--length-mult", "4")
  assert proc.returncode == 2, proc.stderr
  assert proc.stderr.count("\n") == 1, proc.stderr
  assert proc.stderr.startswith(expected), proc.stderr
  assert proc.stdout == ""
