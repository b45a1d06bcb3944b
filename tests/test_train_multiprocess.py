"""Two CPU processes joined by `jax.distributed.initialize` train like one process."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
from train_helpers import config_file, losses, reference_run, sotu_dir

REPO = Path(__file__).resolve().parents[1]


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_match_one(tmp_path_factory, tmp_path):
  cfg, ref_dir, _ = reference_run(tmp_path_factory)  # 1 process, 8 devices, mesh data = 8
  spec = f"{config_file(tmp_path_factory)}:{sotu_dir(tmp_path_factory)}"
  port = _free_port()
  procs = []
  for pid in range(2):
    env = {
      **os.environ,
      "XLA_FLAGS": "--xla_force_host_platform_device_count=4",  # 2 x 4 = the same 8 devices
      "JAX_PLATFORMS": "cpu",
      "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
      "JAX_NUM_PROCESSES": "2",
      "JAX_PROCESS_ID": str(pid),
    }
    procs.append(
      subprocess.Popen(
        [sys.executable, "-m", "fibax.train", "--config", spec, "--workdir", str(tmp_path)],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
      )
    )
  outputs = [p.communicate(timeout=400)[0] for p in procs]
  for p, out in zip(procs, outputs, strict=True):
    assert p.returncode == 0, out
  assert "on 8 cpu device(s), mesh {'data': 8, 'model': 1}" in outputs[0]
  assert "step 24/24" in outputs[0] and "step 24/24" not in outputs[1]  # process 0 logs
  one, two = losses(ref_dir), losses(tmp_path)
  assert sorted(two) == sorted(one)
  np.testing.assert_allclose(
    [two[s] for s in sorted(two)], [one[s] for s in sorted(one)], rtol=1e-5
  )
  # Each process saved its own data-iterator position with every checkpoint.
  data_files = sorted(p.name for p in (tmp_path / "checkpoints" / "24" / "data").glob("*.json"))
  assert data_files == ["process_0-of-2.json", "process_1-of-2.json"]
