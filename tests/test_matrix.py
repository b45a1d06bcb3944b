"""experiments/matrix.py: a queue of runs trained and evaluated a few at a time, packed."""

import json
import pathlib
import subprocess
import sys
import tarfile
import textwrap
import time

import pytest
from train_helpers import sotu_dir

MATRIX = pathlib.Path(__file__).resolve().parents[1] / "experiments" / "matrix.py"

CONFIG = '''
"""Micro runs by schedule name, for the queue tests."""

import dataclasses

from fibax.config import AttentionConfig, ModelConfig, RunConfig, TrainConfig


def get_config(name: str = "stagger", steps: int = 3) -> RunConfig:
  model = ModelConfig(
    vocab_size=512, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
    mlp_hidden=86, seq_len=32, compute_dtype="float32",
    attention=AttentionConfig(schedule=name, base="fib", window=4),
  )
  train = TrainConfig(
    batch_size=8, total_steps=steps, warmup_steps=1, log_every=1, eval_every=1000,
    eval_tokens=256, checkpoint_every=1000, data_workers=0, progress_bar=False,
  )
  return RunConfig(model=model, train=train, data_source="sotu", data_dir=DATA_DIR)
'''


@pytest.fixture(scope="module")
def config(tmp_path_factory):
  path = tmp_path_factory.mktemp("matrix_config") / "micro_runs.py"
  data = sotu_dir(tmp_path_factory)
  path.write_text(textwrap.dedent(CONFIG) + f"\nDATA_DIR = {str(data)!r}\n")
  return path


def _matrix(*args, check=True):
  proc = subprocess.run(
    [sys.executable, str(MATRIX), *map(str, args)], capture_output=True, text=True, timeout=600
  )
  if check:
    assert proc.returncode == 0, proc.stderr[-3000:]
  return proc


def test_queue_trains_evaluates_and_packs_each_run(config, tmp_path):
  root = tmp_path / "runs"
  _matrix(
    "run", "--root", root, "--config", config, "--config-args", "steps=4",
    "--set", "train.log_every=2", "--runs", "stagger", "dense", "fixed",
    "--gpus", 0, "--slots-per-gpu", 2, "--length-mult", 1, 2, "--dense-length-mult", 1,
    "--datasets", "validation",
  )  # fmt: skip
  status = json.loads((root / "status.json").read_text())
  assert [r["state"] for r in status["runs"].values()] == ["done"] * 3
  # Two slots on one GPU: the third run started only after one of the first two ended.
  runs = status["runs"]
  assert runs["fixed"]["start"] >= min(runs["stagger"]["end"], runs["dense"]["end"])
  assert runs["stagger"]["start"] < runs["dense"]["end"]  # the first two shared the GPU
  for name, mults in (("stagger", [1, 2]), ("dense", [1]), ("fixed", [1, 2])):
    run = json.loads((root / "results" / name / "run.json").read_text())
    assert (run["steps"], run["tokens"], run["returncode"]) == (4, 4 * 8 * 32, 0)
    assert run["gpu_shared_by"] == 2 and run["wall_s"] > 0
    report = json.loads((root / "results" / name / "results-cap_run.json").read_text())
    assert sorted(r["length_mult"] for r in report["results"]) == mults
    assert all(r["status"] == "ok" and r["ppl"] > 1 for r in report["results"])
    assert report["config"]["train"]["total_steps"] == 4  # --config-args reached the run
    assert report["config"]["train"]["log_every"] == 2  # and so did --set
    for f in (root / "results" / name).iterdir():  # no machine paths in what is kept
      assert str(tmp_path) not in f.read_text(), f
    assert report["checkpoint"] == f"runs/{name}/checkpoints"

  proc = _matrix("poll", "--root", root, "--wait", 0, "--pack", tmp_path / "out" / "r.tar.gz")
  assert "stagger" in proc.stdout and "done" in proc.stdout
  with tarfile.open(tmp_path / "out" / "r.tar.gz") as tar:
    names = set(tar.getnames())
  assert "status.json" in names and "results/dense/results-cap_run.json" in names
  assert not any("checkpoints" in n for n in names)

  # A root that already has a queue is refused: nothing of it is overwritten.
  before = (root / "status.json").read_text()
  proc = _matrix("run", "--root", root, "--config", config, "--runs", "dense", check=False)
  assert proc.returncode == 1 and "already has a queue" in proc.stderr
  assert (root / "status.json").read_text() == before


def test_runs_that_cannot_finish_by_the_deadline_are_skipped(config, tmp_path):
  root = tmp_path / "runs"
  _matrix(
    "run", "--root", root, "--config", config, "--runs", "stagger", "dense", "--deadline-s", 1
  )
  status = json.loads((root / "status.json").read_text())
  assert all(r["state"].startswith("skipped") for r in status["runs"].values())
  assert not (root / "stagger").exists() and not (root / "dense").exists()


def test_alone_runs_keep_their_gpu_and_busy_gpus_wait(config, tmp_path):
  root = tmp_path / "runs"
  ended = tmp_path / "bench_ended"  # the busy process's last act: when it ended
  bench = subprocess.Popen(
    [
      sys.executable,
      "-c",
      f"import time; time.sleep(4); open({str(ended)!r}, 'w').write(repr(time.time()))",
    ]
  )
  _matrix(
    "run", "--root", root, "--config", config, "--runs", "fixed", "stagger", "dense",
    "--alone", "fixed", "--gpus", 0, "--slots-per-gpu", 2, "--gpu-busy", f"0={bench.pid}",
    "--length-mult", 1, "--dense-length-mult", 1, "--datasets", "validation",
  )  # fmt: skip
  bench_end = time.time() if bench.poll() is None else None
  bench.wait()
  runs = json.loads((root / "status.json").read_text())["runs"]
  assert [r["state"] for r in runs.values()] == ["done"] * 3
  assert bench_end is None  # the busy process ended before the queue did
  assert runs["fixed"]["gpu_shared_by"] == 1 and runs["stagger"]["gpu_shared_by"] == 2
  assert runs["fixed"]["start"] >= float(ended.read_text())  # it waited for the busy GPU
  # The alone run had the GPU to itself; the other two then shared it.
  assert runs["stagger"]["start"] >= runs["fixed"]["end"]
  assert runs["dense"]["start"] < runs["stagger"]["end"]


@pytest.mark.parametrize(
  ("args", "message"),
  [
    (["--runs", "stagger", "zigzag"], "unknown schedule='zigzag'"),
    (["--runs", "stagger", "stagger"], "names a run twice"),
    (["--runs", "stagger", "--length-mult", 0], "length_mult=0 must be an integer >= 1"),
    (["--runs", "stagger", "--slots-per-gpu", 0], "--slots-per-gpu=0 must be >= 1"),
    (["--runs", "stagger", "--alone", "fixed"], "--alone names runs not in --runs: ['fixed']"),
    (["--runs", "stagger", "--gpu-busy", "1=5"], "--gpu-busy names GPUs not in --gpus: [1]"),
    (["--runs", "stagger", "--gpu-busy", "x"], "--gpu-busy 'x': expected GPU=PID"),
  ],
)
def test_bad_input_is_one_line_before_anything_runs(config, tmp_path, args, message):
  root = tmp_path / "runs"
  proc = _matrix("run", "--root", root, "--config", config, *args, check=False)
  assert proc.returncode == 1 and message in proc.stderr, proc.stderr
  assert len(proc.stderr.strip().splitlines()) == 1
  assert not root.exists()


def test_deadline_estimate_follows_the_step_cost():
  """A learned run costs more than a sparse one, a one-hot embedding gradient less, and a GPU
  shared by two runs takes twice the steps' time."""
  import importlib.util

  spec = importlib.util.spec_from_file_location("matrix", MATRIX)
  matrix = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(matrix)
  paper = str(MATRIX.parents[1] / "configs" / "paper.py")

  def estimate(name, *overrides, shared=1):
    return matrix.estimate_seconds(
      matrix.run_config(paper, "steps=3052", list(overrides), name), shared
    )

  stagger = estimate("fib_stagger_w12")  # the sorted embedding gradient, the default
  assert (
    estimate("fib_learned_w12")
    > estimate("fib_stagger_w12", "model.embed_backward=scatter")
    > stagger
    == estimate("fib_stagger_w12", "model.embed_backward=onehot")
  )
  assert estimate("fib_stagger_w12", shared=2) - stagger == pytest.approx(
    stagger - matrix.FIXED_SECONDS["other_onehot"]
  )


def test_a_run_that_fits_only_alone_takes_an_empty_gpu():
  """Near the deadline, a sparse run that two to a GPU would not finish still starts on an
  empty GPU and keeps it; on a busy GPU it waits; a learned run never shares."""
  import importlib.util

  spec = importlib.util.spec_from_file_location("matrix", MATRIX)
  matrix = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(matrix)
  paper = str(MATRIX.parents[1] / "configs" / "paper.py")
  names = ["fib_learned_w6", "fib_fixed_w6", "fib_stagger_w6"]
  configs = {n: matrix.run_config(paper, "steps=3052", [], n) for n in names}
  one = matrix.estimate_seconds(configs["fib_fixed_w6"], 1)
  two = matrix.estimate_seconds(configs["fib_fixed_w6"], 2)
  learned = matrix.estimate_seconds(configs["fib_learned_w6"], 1)
  alone = {"fib_learned_w6"}

  def choose(queue, busy, left):
    return matrix.choose_run(queue, configs, alone, 2, busy, 0.0, left)

  sparse = names[1:]
  assert choose(sparse, 0, two) == ("fib_fixed_w6", 2)  # both fit shared: share
  assert choose(sparse, 1, two) == ("fib_fixed_w6", 2)
  assert choose(sparse, 0, (one + two) / 2) == ("fib_fixed_w6", 1)  # only alone: keep the GPU
  assert choose(sparse, 1, (one + two) / 2) == (None, 1)  # not beside another run
  assert choose(sparse, 0, one - 1) == (None, 0)  # nothing can finish: skip the rest
  assert choose(names, 0, learned) == ("fib_learned_w6", 1)
  assert choose(names, 1, learned) == ("fib_fixed_w6", 2)  # the learned run waits
  assert choose(names, 0, None) == ("fib_learned_w6", 1)
