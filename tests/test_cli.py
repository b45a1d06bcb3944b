"""Every `python -m fibax.*` command: bad input is one line, `<prog>: error: ...`, exit 2."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from fibax import cli

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
  ("module", "args", "message"),
  [
    ("fibax.train", ["--config", "configs/nope.py", "--workdir", "{tmp}/w"], "nope.py"),
    ("fibax.train", ["--workdir", "{tmp}/w"], "the following arguments are required: --config"),
    ("fibax.data", ["prepare", "--source", "{tmp}/nowhere", "--out", "{tmp}/d"], "unknown source"),
    (
      "fibax.data",
      ["prepare", "--source", "sotu", "--out", "gs://bucket/d", "--vocab-size", "512"],
      "cannot prepare data into 'gs://bucket/d': not a local path",
    ),
    ("fibax.data", ["info", "{tmp}"], "manifest.json"),
    ("fibax.eval", ["--checkpoint", "{tmp}/nowhere"], "does not exist"),
    ("fibax.generate", ["--checkpoint", "{tmp}/nowhere", "--prompt", "x"], "does not exist"),
  ],
)
def test_bad_input_is_one_line_with_exit_2(tmp_path, module, args, message):
  args = [a.format(tmp=tmp_path) for a in args]
  proc = subprocess.run(
    [sys.executable, "-m", module, *args], cwd=REPO, capture_output=True, text=True, timeout=300
  )
  lines = proc.stderr.strip().splitlines()
  assert proc.returncode == 2, proc.stderr
  assert len(lines) == 1 and lines[0].startswith(f"python -m {module}: error: "), proc.stderr
  assert message in lines[0]


def test_xla_defaults_are_added_unless_xla_flags_names_them(monkeypatch):
  ours = "--xla_gpu_enable_triton_gemm=false --xla_gpu_enable_cub_radix_sort=false"
  monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
  assert cli.set_xla_defaults() == f"--xla_force_host_platform_device_count=8 {ours}"
  assert cli.set_xla_defaults() == os.environ["XLA_FLAGS"]  # added once
  monkeypatch.setenv("XLA_FLAGS", "--xla_gpu_enable_triton_gemm=true")
  assert cli.set_xla_defaults() == (  # the user's choice, and the other default
    "--xla_gpu_enable_triton_gemm=true --xla_gpu_enable_cub_radix_sort=false"
  )
  monkeypatch.setenv("XLA_FLAGS", "--xla_gpu_enable_triton_gemm_int4=true")  # another flag
  assert cli.set_xla_defaults() == f"--xla_gpu_enable_triton_gemm_int4=true {ours}"
  monkeypatch.delenv("XLA_FLAGS")
  assert cli.set_xla_defaults() == ours
