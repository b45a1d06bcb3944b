"""The micro learned model of tests/eval_helpers.py (T = 64, W = 4, float32, XLA path) trained
17 steps on random tokens from theta = 0, +-3e-7 and +-1e-5 in every layer (alpha just above or
below 1, where the rung W + 1 = 5 is kept or skipped), and from theta = 0 with the weights
perturbed by 1e-6 (a smooth change): the loss after the steps of each.

  python experiments/results/speed_h200_cd8aba6/cpu_checks/alpha_one.py   # from the repo root
"""

import dataclasses
import sys
import zlib

sys.path.insert(0, ".")
sys.path.insert(0, "tests")

import jax  # noqa: E402
import numpy as np  # noqa: E402
from eval_helpers import micro_model  # noqa: E402

from fibax import sharding  # noqa: E402
from fibax.config import RunConfig, TrainConfig  # noqa: E402
from fibax.steps import make_steps  # noqa: E402


def loss_after(theta0=0.0, weights_eps=0.0, steps=17):
  m = micro_model("learned")
  m = dataclasses.replace(m, seq_len=64, attention=dataclasses.replace(m.attention, window=4))
  train = TrainConfig(batch_size=4, total_steps=100, warmup_steps=20, data_workers=0)
  mesh = sharding.make_mesh(data=1, model=1, devices=jax.devices()[:1])
  run = make_steps(RunConfig(model=m, train=train), mesh)
  state = run.init(0)

  def start(path, x):
    if "theta" in jax.tree_util.keystr(path):
      return x + theta0
    if weights_eps and x.ndim >= 2:
      key = jax.random.fold_in(jax.random.key(1), zlib.crc32(jax.tree_util.keystr(path).encode()))
      return x + weights_eps * jax.random.normal(key, x.shape, x.dtype)
    return x

  state = state.replace(params=jax.tree_util.tree_map_with_path(start, state.params))
  rng = np.random.default_rng(0)
  for _ in range(steps):
    batch = {k: rng.integers(0, m.vocab_size, (4, 64), dtype=np.int32) for k in ("x", "y")}
    batch = {"inputs": batch["x"], "targets": batch["y"]}
    state, metrics = run.train(state, sharding.global_batch(batch, mesh))
  return float(metrics["loss"])


base = loss_after()
print(f"theta 0: {base:.6f}")
for theta in (3e-7, -3e-7, 1e-5, -1e-5):
  print(f"theta {theta:+g}: {loss_after(theta0=theta):.6f}")
print(f"weights + 1e-6 noise: {loss_after(weights_eps=1e-6):.6f}")
