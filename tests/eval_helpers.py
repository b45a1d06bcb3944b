"""Shared set-up of the evaluation tests: a small prepared corpus and micro checkpoints saved with
the trainer's checkpoint code (random initialisation: the tests check the mechanics, not quality).
"""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path

from train_helpers import damage, largest_data_file  # noqa: F401  (damage is re-exported for the eval tests)

from fibax.config import AttentionConfig, ModelConfig, RunConfig, TrainConfig

VOCAB = 512
SEQ_LEN = 32
STEP = 7

_CACHE: dict = {}


def micro_model(schedule: str = "learned", **attention) -> ModelConfig:
  return ModelConfig(
    vocab_size=VOCAB,
    d_model=32,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=8,
    mlp_hidden=86,
    seq_len=SEQ_LEN,
    compute_dtype="float32",
    attention=AttentionConfig(schedule=schedule, base="fib", window=4, **attention),
  )


def micro_run_config(data_dir: Path, schedule: str = "learned") -> RunConfig:
  train = TrainConfig(batch_size=4, total_steps=10, warmup_steps=2, data_workers=0)
  return RunConfig(
    model=micro_model(schedule), train=train, data_source="directory", data_dir=str(data_dir)
  )


def corpus_dir(tmp_path_factory) -> Path:
  """40 documents of pseudo-words (~10K tokens each), 25% held out for validation, prepared
  once per test session."""
  if "corpus" not in _CACHE:
    from fibax.data.build import prepare

    root = tmp_path_factory.mktemp("eval_corpus")
    rng = random.Random(0)
    letters = "abcdefghijklmnopqrstuvwxyz"
    words = ["".join(rng.choice(letters) for _ in range(rng.randint(2, 7))) for _ in range(400)]
    (root / "text").mkdir()
    for i in range(40):
      (root / "text" / f"doc{i:02d}.txt").write_text(" ".join(rng.choices(words, k=3000)))
    out = root / "data"
    prepare(
      str(root / "text"), out, VOCAB, validation=0.25, test=0.1, workers=1, log=lambda _: None
    )
    _CACHE["corpus"] = out
  return _CACHE["corpus"]


def saved_run(
  tmp_path_factory, schedule: str = "learned", nan_params: bool = False
) -> tuple[RunConfig, Path]:
  """(config, workdir) of a randomly initialised micro model saved at step STEP by
  `fibax.checkpoint.Checkpointer`, as `fibax.train` saves it; with `nan_params` every parameter
  is nan (a diverged run, its checkpoint intact)."""
  key = f"{schedule}_nan" if nan_params else schedule
  if key not in _CACHE:
    import jax
    import jax.numpy as jnp

    from fibax import sharding
    from fibax.checkpoint import Checkpointer
    from fibax.data import train_iterator
    from fibax.steps import make_steps

    data_dir = corpus_dir(tmp_path_factory)
    cfg = micro_run_config(data_dir, schedule)
    steps = make_steps(cfg, sharding.make_mesh(1, 1))
    state = steps.init(cfg.train.seed)
    if nan_params:
      state = state.replace(params=jax.tree.map(lambda x: x * jnp.nan, state.params))
    data_iter = train_iterator(
      data_dir, SEQ_LEN, cfg.train.batch_size, cfg.train.seed, worker_count=0, vocab_size=VOCAB
    )
    workdir = tmp_path_factory.mktemp(f"run_{key}")
    ckpt = Checkpointer(workdir / "checkpoints", keep=2, async_save=False, log=lambda _: None)
    ckpt.save(STEP, state, data_iter, {"config": dataclasses.asdict(cfg)})
    ckpt.close()
    _CACHE[key] = (cfg, workdir)
  return _CACHE[key]


def largest_state_file(workdir: Path) -> Path:
  return largest_data_file(workdir / "checkpoints" / str(STEP) / "state")
