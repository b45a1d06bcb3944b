"""A tiny CPU model on the embedded default corpus (sotu); what the README's main command trains.

python -m fibax.train --config configs/tiny.py --workdir runs/tiny
"""

from fibax.config import AttentionConfig, ModelConfig, RunConfig, TrainConfig, mlp_hidden_for


def get_config(schedule: str = "stagger") -> RunConfig:
  model = ModelConfig(
    vocab_size=2048,
    d_model=128,
    num_layers=4,
    num_heads=4,
    num_kv_heads=2,
    head_dim=32,
    mlp_hidden=mlp_hidden_for(128),
    seq_len=256,
    compute_dtype="float32",
    attention=AttentionConfig(schedule=schedule, base="fib", window=8),
  )
  # About 4 minutes on 2 CPU cores (0.6M tokens); the validation loss uses 32K tokens.
  train = TrainConfig(
    batch_size=8,
    total_steps=300,
    warmup_steps=30,
    peak_lr=3e-3,
    eval_every=100,
    eval_tokens=1 << 15,
    checkpoint_every=100,
    log_every=20,
  )
  return RunConfig(model=model, train=train, data_source="sotu")
