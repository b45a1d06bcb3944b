"""experiments/bench_train.py: the configs it times and the summary the issue's targets name."""

import pytest

from experiments import bench_train


def test_run_config_keeps_tokens_per_step_and_sets_the_implementations():
  cfg = bench_train.run_config("fib_stagger_w12", 8192, 32768, "pallas", "cudnn", 2)
  assert (cfg.train.batch_size, cfg.model.seq_len, cfg.train.grad_accum) == (4, 8192, 2)
  assert cfg.model.attention.impl == "pallas" and cfg.model.attention.dense_impl == "cudnn"
  assert cfg.model.d_model == 512 and cfg.model.num_layers == 16  # the paper's model
  with pytest.raises(ValueError, match="--tokens=1000 is not a multiple of T=1024"):
    bench_train.run_config("dense", 1024, 1000, "pallas", "cudnn", 1)


def test_summary_names_the_targets():
  results = [
    {"run": "dense", "seq_len": 1024, "mfu": 0.4, "ms_per_step": 60.0},
    {"run": "fib_stagger_w12", "seq_len": 1024, "mfu": 0.3, "ms_per_step": 50.0},
    {"run": "fib_stagger_w12", "seq_len": 8192, "mfu": 0.3, "ms_per_step": 40.0},
  ]
  assert bench_train.summarize(results) == {
    "mfu_dense_T1024": 0.4,
    "mfu_sparse_T1024": 0.3,
    "mfu_sparse_T8192": 0.3,
    "step_speedup_fib_stagger_w12_vs_dense_T1024": 1.2,
  }
