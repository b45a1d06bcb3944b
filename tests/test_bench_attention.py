"""experiments/bench_attention.py: what it times, on CPU (the GPU numbers come from a device)."""

import jax
import jax.numpy as jnp
import numpy as np

from experiments import bench_attention
from fibax.patterns import Pattern


def test_forward_backward_takes_the_cotangent_as_an_argument():
  """The weights are a parameter of the compiled backward (not a folded constant): new
  weights give new gradients from the same compiled function."""
  pattern = Pattern.build(base="fib", alpha=1.0, window=4, seq_len=64)
  fn = bench_attention.implementations(pattern, None)["xla"]
  q = jax.random.normal(jax.random.key(0), (1, 64, 8, 16))
  k = jax.random.normal(jax.random.key(1), (1, 64, 2, 16))
  grad = bench_attention.forward_backward(fn)
  w1, w2 = jnp.ones(q.shape), -2 * jnp.ones(q.shape)
  lowered = grad.lower(q, k, k, w1)
  assert len(jax.tree.leaves(lowered.args_info)) == 4
  assert q.size * 4 > len(lowered.as_text())  # no [1, 64, 8, 16] constant in the program
  np.testing.assert_allclose(grad(q, k, k, w2)[0], -2 * grad(q, k, k, w1)[0], rtol=1e-5)
  row = bench_attention.bench_one("xla", fn, q, k, k, w1)
  assert row["fwd_ms"] > 0 and row["fwdbwd_ms"] > 0 and row["fwd_bytes"] > 0


def test_summary_gives_both_kernels_their_ratios_at_their_worst_alpha():
  rows = [
    {"impl": "cudnn_window", "seq_len": 1024, "alpha": None, "fwdbwd_ms": 1.0},
    {"impl": "cudnn_dense", "seq_len": 1024, "alpha": None, "fwdbwd_ms": 2.0},
  ]
  for impl, times in (("pallas", (1.5, 1.2)), ("pallas_packed", (0.8, 0.9))):
    rows += [
      {"impl": impl, "seq_len": 1024, "alpha": a, "fwdbwd_ms": t, "fwd_ms": t / 4,
       "hbm_floor_ms": 0.1}
      for a, t in zip((0.5, 1.5), times, strict=True)
    ]  # fmt: skip
  s = bench_attention.summarize(rows)
  assert s["fwdbwd_ratio_vs_cudnn_window_T1024"] == 1.5
  assert s["packed_fwdbwd_ratio_vs_cudnn_window_T1024"] == 0.9
  assert s["packed_fwdbwd_speedup_vs_cudnn_dense_T1024"] == round(2.0 / 0.9, 3)
  assert s["packed_fwd_ratio_vs_hbm_floor_T1024"] == round(0.9 / 4 / 0.1, 3)
