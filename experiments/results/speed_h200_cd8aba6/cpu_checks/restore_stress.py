"""Stress of the damaged-checkpoint restore that hung once in CI: the micro run's checkpoints
(steps 12, 18, 24) copied, every data file of all three truncated, and `train` asked to resume
(it must raise CheckpointError), 150 times in one process; each iteration's index and elapsed
seconds on stderr. A pytest file, for the test suite's fixtures:

  cp experiments/results/speed_h200_cd8aba6/cpu_checks/restore_stress.py tests/test_zz_stress.py
  python -m pytest -q -s tests/test_zz_stress.py    # alone, and after test_train*.py
  rm tests/test_zz_stress.py
"""

import shutil
import sys
import time

import pytest
from train_helpers import damage, data_files, reference_run

from fibax.checkpoint import CheckpointError
from fibax.train import train


def test_stress(tmp_path_factory, tmp_path):
  cfg, ref_dir, _ = reference_run(tmp_path_factory)
  t0 = time.time()
  for i in range(150):
    workdir = tmp_path / f"run{i}"
    shutil.copytree(ref_dir / "checkpoints", workdir / "checkpoints")
    for step in (12, 18, 24):
      for path in data_files(workdir / "checkpoints" / str(step) / "state"):
        damage(path, "truncate")
    with pytest.raises(CheckpointError):
      train(cfg, workdir, log=lambda _: None)
    shutil.rmtree(workdir)
    print(i, round(time.time() - t0, 1), file=sys.stderr, flush=True)
