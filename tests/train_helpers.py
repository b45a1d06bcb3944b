"""Shared set-up of the training tests: a prepared sotu directory and a micro config file."""

from __future__ import annotations

import textwrap
from pathlib import Path

MICRO_CONFIG = '''
"""A micro model for the training tests (seconds per run on CPU)."""

from fibax.config import AttentionConfig, ModelConfig, RunConfig, TrainConfig


def get_config(data_dir: str = "") -> RunConfig:
  model = ModelConfig(
    vocab_size=512, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
    mlp_hidden=86, seq_len=32, compute_dtype="float32",
    attention=AttentionConfig(schedule="stagger", base="fib", window=4),
  )
  train = TrainConfig(
    batch_size=8, total_steps=24, warmup_steps=4, peak_lr=3e-3, log_every=1,
    eval_every=1000, eval_tokens=256, checkpoint_every=6, keep_checkpoints=3,
    data_workers=0, progress_bar=False,
  )
  return RunConfig(model=model, train=train, data_source="sotu", data_dir=data_dir or None)
'''

VOCAB = 512


def write_micro_config(directory: Path) -> Path:
  path = directory / "micro.py"
  path.write_text(textwrap.dedent(MICRO_CONFIG))
  return path


def losses(workdir: Path) -> dict[int, float]:
  """step -> loss of the train records in metrics.jsonl (the last record wins on repeats)."""
  from fibax.metrics import read_losses

  return read_losses(workdir)


_PREPARED: dict[str, Path] = {}


def sotu_dir(tmp_path_factory) -> Path:
  """sotu prepared with a 512-piece tokenizer, once per test session (shared by the modules)."""
  if "sotu" not in _PREPARED:
    from fibax.data.build import prepare

    out = tmp_path_factory.mktemp("train_data") / "sotu"
    prepare("sotu", out, VOCAB, sample_chars=1_000_000, workers=2, log=lambda _: None)
    _PREPARED["sotu"] = out
  return _PREPARED["sotu"]


_RUNS: dict[str, tuple] = {}


def micro_config(tmp_path_factory, **train_overrides):
  """The micro RunConfig on the shared sotu directory, with TrainConfig fields replaced."""
  import dataclasses

  from fibax.config_loader import load_config

  if "config_file" not in _PREPARED:
    _PREPARED["config_file"] = write_micro_config(tmp_path_factory.mktemp("config"))
  cfg = load_config(f"{_PREPARED['config_file']}:{sotu_dir(tmp_path_factory)}")
  return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, **train_overrides))


def config_file(tmp_path_factory) -> Path:
  micro_config(tmp_path_factory)
  return _PREPARED["config_file"]


def reference_run(tmp_path_factory):
  """(cfg, workdir, summary) of one uninterrupted micro run, shared by the modules."""
  if "reference" not in _RUNS:
    from fibax.train import train

    cfg = micro_config(tmp_path_factory)
    workdir = tmp_path_factory.mktemp("reference")
    _RUNS["reference"] = (cfg, workdir, train(cfg, workdir, log=lambda _: None))
  return _RUNS["reference"]


def data_files(state_dir: Path) -> list[Path]:
  """The OCDBT data files (`.../d/<hash>`) of a saved state, which hold its arrays' bytes.
  Metadata files such as `_sharding` can be larger in a micro model and a restore with a target
  sharding does not read them, so damaging one may go unnoticed."""
  files = [p for p in state_dir.rglob("*") if p.is_file() and p.parent.name == "d"]
  assert files, f"no OCDBT data files under {state_dir}"
  return files


def largest_data_file(state_dir: Path) -> Path:
  """The largest OCDBT data file of a state saved synchronously (one that every restore reads).
  An asynchronous save may leave a process's data files beside the merged ones, which a restore
  need not read: damage all of `data_files` there."""
  return max(data_files(state_dir), key=lambda p: p.stat().st_size)


def damage(path: Path, how: str) -> None:
  """Damages one checkpoint file: truncate it, flip 16 bytes, or delete it."""
  if how == "truncate":
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
  elif how == "flip":
    data = bytearray(path.read_bytes())
    for i in range(len(data) // 3, len(data) // 3 + 16):
      data[i] ^= 0xFF
    path.write_bytes(bytes(data))
  else:
    path.unlink()
