"""The optimizer of the paper: AdamW (0.9, 0.95), weight decay 0.1 on matrices only,
linear warmup then cosine decay to 10% of peak, global-norm clipping at 1.0."""

from __future__ import annotations

import jax
import optax

from fibax.config import TrainConfig


def lr_schedule(cfg: TrainConfig) -> optax.Schedule:
  """0 at step 0, `peak_lr` at `warmup_steps`, `final_lr_fraction * peak_lr` at `total_steps`.

  A run shorter than its warmup follows the warmup line and stops there (the recipe cut short,
  not rescaled).
  """
  decay = optax.cosine_decay_schedule(
    cfg.peak_lr, max(cfg.total_steps - cfg.warmup_steps, 1), alpha=cfg.final_lr_fraction
  )
  if cfg.warmup_steps == 0:
    return decay
  warmup = optax.linear_schedule(0.0, cfg.peak_lr, cfg.warmup_steps)
  return optax.join_schedules([warmup, decay], [cfg.warmup_steps])


def decay_mask(params):
  """the paper: no weight decay on norm gains and other 1-D (or scalar) parameters."""
  return jax.tree.map(lambda p: p.ndim > 1, params)


def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
  return optax.chain(
    optax.clip_by_global_norm(cfg.grad_clip),
    optax.adamw(
      lr_schedule(cfg), b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay, mask=decay_mask
    ),
  )
