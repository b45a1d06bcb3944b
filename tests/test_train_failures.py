"""Training under failure: a busy or unusable workdir, a checkpoint write that fails, a
diverging update at a save step, a crash between checkpoints, a contradicting config, SIGINT,
and a parent killed with SIGKILL. Each test fails without the fix it covers."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest
from etils import epath
from train_helpers import config_file, losses, micro_config, sotu_dir

import fibax.train as train_lib
from fibax import metrics as metrics_lib
from fibax.data import files as files_lib
from fibax.data import shards as shards_lib
from fibax.train import TrainingDiverged, WorkdirError, train

REPO = Path(__file__).resolve().parents[1]


def _spec(tmp_path_factory) -> str:
  return f"{config_file(tmp_path_factory)}:{sotu_dir(tmp_path_factory)}"


def _cli(args, **kwargs):
  return subprocess.Popen(
    [sys.executable, "-m", "fibax.train", *map(str, args)],
    cwd=REPO, env=os.environ.copy(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    text=True, **kwargs,
  )  # fmt: skip


def _wait_for_step(workdir: Path, proc, step: int, timeout: float = 300) -> None:
  deadline = time.monotonic() + timeout
  while proc.poll() is None:
    try:
      if max(losses(workdir), default=0) >= step:
        return
    except (FileNotFoundError, ValueError):
      pass
    assert time.monotonic() < deadline, "the training subprocess made no progress"
    time.sleep(0.01)
  raise AssertionError(f"training ended (exit {proc.returncode}) before step {step}")


def test_a_workdir_held_by_another_training_is_refused(tmp_path_factory, tmp_path):
  cfg = micro_config(tmp_path_factory, total_steps=2)
  workdir = tmp_path / "run"
  workdir.mkdir()
  holder = subprocess.Popen(
    [sys.executable, "-c", textwrap.dedent(f"""
      import fcntl, os, sys, time
      fd = os.open({str(workdir / ".lock")!r}, os.O_RDWR | os.O_CREAT)
      fcntl.flock(fd, fcntl.LOCK_EX)
      os.write(fd, b"4242\\n")
      print("locked", flush=True)
      time.sleep(120)
    """)],
    stdout=subprocess.PIPE, text=True,
  )  # fmt: skip
  try:
    assert holder.stdout.readline().strip() == "locked"
    with pytest.raises(WorkdirError, match=r"in use by another training \(pid 4242\)"):
      train(cfg, workdir, log=lambda _: None)
    assert sorted(p.name for p in workdir.iterdir()) == [".lock"]  # nothing of it written
  finally:
    holder.kill()
    holder.wait()
  assert train(cfg, workdir, log=lambda _: None)["step"] == 2  # free again: it trains


def test_a_workdir_that_is_a_file_is_one_line(tmp_path_factory, tmp_path):
  workdir = tmp_path / "run"
  workdir.write_text("not a directory")
  proc = _cli(["--config", _spec(tmp_path_factory), "--workdir", workdir])
  _, err = proc.communicate(timeout=300)
  assert proc.returncode == 2  # bad input
  assert err.strip() == (
    f"python -m fibax.train: error: workdir {workdir} exists and is not a directory"
  )
  assert workdir.read_text() == "not a directory"


def test_a_failed_checkpoint_write_stops_training_at_once(tmp_path_factory, tmp_path):
  """After the step-6 checkpoint is written, files may not grow past 32 KiB (as on a full
  disk, writes then fail with an OSError): the save at step 12 fails, and the run stops at
  the next step with one line, keeping step 6."""
  workdir = tmp_path / "run"
  script = textwrap.dedent(f"""
    import resource, signal, sys, time
    import fibax.checkpoint
    from fibax.train import main

    save = fibax.checkpoint.Checkpointer.save

    def save_then_fill_the_disk(self, step, *args):
      if step > 6:
        self.wait()
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit: EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (32 << 10, 32 << 10))
        save(self, step, *args)
        time.sleep(2)  # the background write fails meanwhile; the next step must notice
        return
      return save(self, step, *args)

    fibax.checkpoint.Checkpointer.save = save_then_fill_the_disk
    sys.exit(main(["--config", {_spec(tmp_path_factory)!r}, "--workdir", {str(workdir)!r}]))
  """)
  proc = subprocess.run(
    [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300
  )
  assert proc.returncode == 1, proc.stderr[-3000:]
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith(
    f"python -m fibax.train: error: saving a checkpoint in {workdir / 'checkpoints'} failed"
  )
  assert last.endswith("the newest complete one is step 6"), last
  assert "Traceback" not in proc.stderr
  steps = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
  assert steps == [6]
  assert max(losses(workdir)) == 12  # stopped at the first step after the failed save
  logs = []  # once files may grow again, it resumes from step 6
  assert train(micro_config(tmp_path_factory), workdir, log=logs.append)["step"] == 24
  assert any("resuming at step 6" in line for line in logs)


def test_parameters_that_diverge_at_a_save_step_are_not_saved(
  tmp_path_factory, tmp_path, monkeypatch
):
  cfg = micro_config(tmp_path_factory, total_steps=12)
  real_make_steps = train_lib.make_steps

  def make_steps(cfg, mesh):
    steps = real_make_steps(cfg, mesh)

    def diverging(state, batch):
      state, m = steps.train(state, batch)
      nan_at_6 = jnp.where(state.step == 6, jnp.nan, 0.0)
      return state.replace(params=jax.tree.map(lambda x: x + nan_at_6, state.params)), m

    return dataclasses.replace(steps, train=diverging)

  monkeypatch.setattr(train_lib, "make_steps", make_steps)
  workdir = tmp_path / "run"
  with pytest.raises(TrainingDiverged, match="parameters after step 6 are not finite"):
    train(cfg, workdir, log=lambda _: None)
  assert not (workdir / "checkpoints" / "6").exists()


@pytest.mark.parametrize("kind", ["pathlib", "str", "epath", "not_local"])
def test_steps_redone_after_a_crash_are_recorded_once(
  tmp_path_factory, tmp_path, monkeypatch, kind
):
  """The workdir as a pathlib.Path, a string or an etils.epath.Path; `not_local` runs the code
  of a gs:// workdir and data directory (no lock, config.json and metrics.jsonl written whole,
  shards read into memory) on this local one."""
  cfg = micro_config(tmp_path_factory, total_steps=12)
  workdir = tmp_path / "run"
  if kind == "not_local":
    for module in (train_lib, metrics_lib, files_lib, shards_lib):
      monkeypatch.setattr(module, "is_local", lambda _: False)
  given = {"pathlib": workdir, "str": str(workdir)}.get(kind, epath.Path(workdir))
  train(cfg, given, log=lambda _: None)
  first = losses(workdir)
  # As if the process died after logging step 12 but before its checkpoint was complete.
  import shutil

  shutil.rmtree(workdir / "checkpoints" / "12")
  logs = []
  train(cfg, given, log=logs.append)
  assert any("resuming at step 6" in line for line in logs)
  steps = [
    json.loads(line)["step"]
    for line in (workdir / "metrics.jsonl").read_text().splitlines()
    if json.loads(line)["kind"] == "train"
  ]
  assert steps == list(range(1, 13))  # each step once, in order
  assert losses(workdir) == first  # and the redone steps equal the first ones
  assert json.loads((workdir / "config.json").read_text()) == json.loads(
    json.dumps(dataclasses.asdict(cfg))
  )
  names = {p.name for p in workdir.iterdir() if not p.name.startswith("events.out.tfevents")}
  lock = set() if kind == "not_local" else {".lock"}
  assert names == {"checkpoints", "config.json", "metrics.jsonl", *lock}


def test_config_json_is_kept_and_a_contradicting_config_is_refused(tmp_path_factory, tmp_path):
  cfg = micro_config(tmp_path_factory, total_steps=6)
  workdir = tmp_path / "run"
  train(cfg, workdir, log=lambda _: None)
  before = (workdir / "config.json").read_text(), (workdir / "config.json").stat().st_mtime_ns
  # How it runs may change (here the logging cadence); what it computes may not.
  quieter = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, log_every=3))
  assert train(quieter, workdir, log=lambda _: None)["step"] == 6
  after = (workdir / "config.json").read_text(), (workdir / "config.json").stat().st_mtime_ns
  assert after == before  # nothing trained, nothing rewritten
  other = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, peak_lr=1e-3))
  with pytest.raises(WorkdirError, match=r"train.peak_lr=0.001 \(checkpoints: 0.003\)"):
    train(other, workdir, log=lambda _: None)
  fixed = dataclasses.replace(
    cfg, model=dataclasses.replace(
      cfg.model, attention=dataclasses.replace(cfg.model.attention, schedule="fixed")
    )
  )  # fmt: skip
  with pytest.raises(WorkdirError, match=r"model.attention.schedule='fixed'"):
    train(fixed, workdir, log=lambda _: None)  # same shapes: it would otherwise load
  assert (workdir / "config.json").read_text() == before[0]


def test_sigint_saves_like_sigterm(tmp_path_factory, tmp_path):
  workdir = tmp_path / "run"
  proc = _cli(["--config", _spec(tmp_path_factory), "--workdir", workdir])
  _wait_for_step(workdir, proc, 3)
  proc.send_signal(signal.SIGINT)
  out, err = proc.communicate(timeout=120)
  assert proc.returncode == 128 + signal.SIGINT, err[-3000:]
  stopped = max(losses(workdir))
  assert (workdir / "checkpoints" / str(stopped)).is_dir()
  assert f"SIGINT: saved a checkpoint at step {stopped}" in out + err


def _children(pid: int) -> list[int]:
  kids = []
  for stat in Path("/proc").glob("[0-9]*/stat"):
    try:
      fields = stat.read_text().rsplit(")", 1)[1].split()
    except OSError:
      continue
    if int(fields[1]) == pid:
      kids.append(int(stat.parent.name))
  return kids


def _alive(pid: int) -> bool:
  try:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
  except OSError:
    return False


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="needs /proc to list processes")
def test_data_workers_exit_when_training_is_killed(tmp_path_factory, tmp_path):
  workdir = tmp_path / "run"
  proc = _cli([
    "--config", _spec(tmp_path_factory), "--workdir", workdir,
    "--set", "train.data_workers=2", "train.total_steps=100000",
  ])  # fmt: skip
  _wait_for_step(workdir, proc, 2)
  workers = _children(proc.pid)
  assert workers, "no worker processes to watch"
  proc.kill()
  proc.wait()
  deadline = time.monotonic() + 20
  while any(_alive(w) for w in workers) and time.monotonic() < deadline:
    time.sleep(0.1)
  assert not [w for w in workers if _alive(w)], "workers outlived the killed training"
