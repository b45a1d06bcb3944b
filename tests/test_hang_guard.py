"""tests/conftest.py's guard: a hung test ends the run with its stack; a bad limit is one line."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

CONFTEST = Path(__file__).with_name("conftest.py")
DEMO = """
import time

def test_quick():
  pass

def test_hangs():
  time.sleep(60)
"""


def _pytest(tmp_path, limit: str, *args):
  shutil.copy(CONFTEST, tmp_path / "conftest.py")
  (tmp_path / "test_demo.py").write_text(DEMO)
  env = {**os.environ, "FIBAX_TEST_HANG_S": limit}
  return subprocess.run(
    [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args],
    cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
  )  # fmt: skip


def test_a_hung_test_ends_the_run_with_every_threads_stack(tmp_path):
  done = _pytest(tmp_path, "2")
  assert done.returncode == 1, done.stdout + done.stderr
  assert "Timeout (0:00:02)!" in done.stderr and "in test_hangs" in done.stderr


def test_a_bad_limit_is_a_one_line_error(tmp_path):
  done = _pytest(tmp_path, "ten", "-k", "quick")
  assert done.returncode == 4  # pytest's usage error: no test ran
  lines = [x for x in (done.stdout + done.stderr).splitlines() if "FIBAX_TEST_HANG_S" in x]
  assert lines == ["ERROR: FIBAX_TEST_HANG_S='ten': seconds (0: no limit)"]
