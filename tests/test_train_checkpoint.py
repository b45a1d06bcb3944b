"""Checkpoints: exact resume after a real SIGTERM, and falling back past a damaged checkpoint."""

import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from etils import epath
from train_helpers import config_file, damage, data_files, losses, reference_run, sotu_dir

from fibax.checkpoint import CheckpointError
from fibax.train import PREEMPTED_EXIT_CODE, train

REPO = Path(__file__).resolve().parents[1]


def _last_step(workdir: Path) -> int:
  try:
    return max(losses(workdir), default=0)
  except (FileNotFoundError, ValueError):  # not written yet, or a line half written
    return 0


def test_sigterm_then_resume_is_bitwise_exact(tmp_path_factory, tmp_path):
  cfg, ref_dir, _ = reference_run(tmp_path_factory)
  reference = losses(ref_dir)
  kill_after = random.randint(2, 12)
  workdir = tmp_path / "run"
  spec = f"{config_file(tmp_path_factory)}:{sotu_dir(tmp_path_factory)}"
  proc = subprocess.Popen(
    [sys.executable, "-m", "fibax.train", "--config", spec, "--workdir", str(workdir)],
    cwd=REPO,
    env=os.environ.copy(),  # the same 8 fake CPU devices as this process (conftest)
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
    text=True,
  )
  deadline = time.monotonic() + 300
  while _last_step(workdir) < kill_after and proc.poll() is None:
    assert time.monotonic() < deadline, "the training subprocess made no progress"
    time.sleep(0.005)
  proc.send_signal(signal.SIGTERM)
  output, _ = proc.communicate(timeout=120)
  assert proc.returncode == PREEMPTED_EXIT_CODE, output
  stopped = _last_step(workdir)
  assert kill_after <= stopped < cfg.train.total_steps, (kill_after, stopped)
  assert (workdir / "checkpoints" / str(stopped)).is_dir()
  assert f"SIGTERM: saved a checkpoint at step {stopped}" in output

  logs = []
  summary = train(cfg, workdir, log=logs.append)
  assert f"resuming at step {stopped}" in logs[0]
  assert summary["step"] == cfg.train.total_steps
  # Every loss, before the signal and after the resume, equals the uninterrupted run's bit for
  # bit (JSON round-trips the float32 values exactly).
  assert losses(workdir) == reference, f"killed after step {stopped}"


def _damage_state(step_dir: Path, how: str) -> None:
  """Damages every data file of a step saved by training (asynchronously: a process's files may
  lie beside the merged ones, and a restore reads only one of the two)."""
  for path in data_files(step_dir / "state"):
    damage(path, how)


@pytest.mark.parametrize("how", ["truncate", "flip", "delete"])
def test_damaged_latest_checkpoint_falls_back_to_the_previous(tmp_path_factory, tmp_path, how):
  cfg, ref_dir, _ = reference_run(tmp_path_factory)
  reference = losses(ref_dir)
  workdir = tmp_path / "run"
  shutil.copytree(ref_dir / "checkpoints", workdir / "checkpoints")
  assert sorted(int(p.name) for p in (workdir / "checkpoints").iterdir()) == [12, 18, 24]
  _damage_state(workdir / "checkpoints" / "24", how)

  logs = []
  summary = train(cfg, workdir, log=logs.append)
  text = "\n".join(logs)
  assert "checkpoint step 24 in" in text and "is unreadable" in text
  assert "resuming from step 18 instead" in text
  assert [p.name.split("-")[0] for p in (workdir / "checkpoints_corrupt").iterdir()] == ["24"]
  assert summary["step"] == 24
  redone = losses(workdir)
  assert sorted(redone) == list(range(19, 25))
  assert all(redone[s] == reference[s] for s in redone)


def test_an_unreadable_step_that_cannot_be_moved_aside_is_one_error(
  tmp_path_factory, tmp_path, monkeypatch
):
  """As on gs:// through gcsfs, where a folder with no object in it does not exist and epath
  renames only into an existing folder."""
  cfg, ref_dir, _ = reference_run(tmp_path_factory)
  workdir = tmp_path / "run"
  shutil.copytree(ref_dir / "checkpoints", workdir / "checkpoints")
  _damage_state(workdir / "checkpoints" / "24", "truncate")

  def refused(self, target):
    raise FileNotFoundError(f"folder {target.parent} does not exist")

  monkeypatch.setattr(type(epath.Path(workdir)), "rename", refused)
  with pytest.raises(
    CheckpointError,
    match=r"could not move unreadable step\(s\) \[24\] out of .*checkpoints \(FileNotFoundError",
  ):
    train(cfg, workdir, log=lambda _: None)
  assert sorted(int(p.name) for p in (workdir / "checkpoints").iterdir()) == [12, 18, 24]


def test_no_readable_checkpoint_is_an_error(tmp_path_factory, tmp_path):
  cfg, ref_dir, _ = reference_run(tmp_path_factory)
  workdir = tmp_path / "run"
  shutil.copytree(ref_dir / "checkpoints", workdir / "checkpoints")
  for step in (12, 18, 24):
    _damage_state(workdir / "checkpoints" / str(step), "truncate")
  with pytest.raises(CheckpointError, match=r"no readable checkpoint in .*steps \[24, 18, 12\]"):
    train(cfg, workdir, log=lambda _: None)
