"""The train step's two fused passes against what XLA runs, in one process.

    python experiments/bench_norm_loss.py --out experiments/results/.../bench_norm_loss.json

- RMSNorm of the paper model's residual stream ([B*T, E] = [32,768, 512] bf16, `--tokens`),
  forward and backward with the residual stream's cotangent, as a pre-norm block meets it:
  plain JAX (`ModelConfig.norm_impl="xla"`'s formula, `kernels_pallas.norm.rms_norm_reference`)
  against the fused Pallas kernel ("pallas").
- The loss's log-sum-exp over bf16 logits [B*T, V] (V = 32,768): optax's max then sum
  (`ModelConfig.loss_lse="two_pass"`) against XLA's one-pass reduction ("online") and the
  Pallas kernel ("pallas", `kernels_pallas.logsumexp`) at each of `--lse-blocks`' rows,
  chunk, stages.

Each beside its HBM floor (the bytes it must move once, over a copy bandwidth measured in the
same run). Prints a table and writes JSON whose `summary` holds the ratios.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time

import jax
import jax.numpy as jnp
import optax

from experiments.bench_attention import copy_bandwidth, timeit, versions
from fibax.data.files import atomic_write_json
from fibax.steps import logsumexp_online
from kernels_pallas import logsumexp as lse_kernel
from kernels_pallas import norm


def _norm_step(impl: str, interpret: bool):
  """(x, scale, gx, gy) -> (dx, dscale) of sum(x_pass * gx + y * gy): a norm's forward and
  backward, the residual's cotangent included."""

  def loss(x, scale, gx, gy):
    if impl == "xla":
      x_pass, y = x, norm.rms_norm_reference(x, scale, 1e-6)
    else:
      x_pass, y = norm.rms_norm_residual(x, scale, 1e-6, interpret=interpret)
    f32 = jnp.float32
    return jnp.sum(x_pass.astype(f32) * gx.astype(f32)) + jnp.sum(y.astype(f32) * gy.astype(f32))

  return jax.jit(jax.grad(loss, argnums=(0, 1)))


def _norm_forward(impl: str, interpret: bool):
  if impl == "xla":
    return jax.jit(lambda x, s: norm.rms_norm_reference(x, s, 1e-6))
  return jax.jit(lambda x, s: norm.rms_norm(x, s, 1e-6, interpret=interpret))


def _lse(kind: str, interpret: bool = False, rows=1, chunk=4096, stages=3):
  if kind == "online":
    return jax.jit(logsumexp_online)
  if kind == "pallas":
    return jax.jit(
      functools.partial(
        lse_kernel.logsumexp, rows=rows, chunk=chunk, num_stages=stages, interpret=interpret
      )
    )
  # optax's loss reads the logits twice (a max, then a sum of exp): its lse as the loss forms it
  return jax.jit(
    lambda x: (
      optax.softmax_cross_entropy_with_integer_labels(
        x.astype(jnp.float32), jnp.zeros(x.shape[:-1], jnp.int32)
      )
      + x[..., 0].astype(jnp.float32)
    )
  )


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--tokens", type=int, default=32_768)
  p.add_argument("--d-model", type=int, default=512)
  p.add_argument("--vocab", type=int, default=32_768)
  p.add_argument("--interpret", action="store_true", help="the kernel's interpreter (CPU check)")
  p.add_argument(
    "--lse-blocks",
    nargs="+",
    default=["1,4096,3", "2,1024,2", "1,2048,2", "4,1024,3", "8,512,2"],
    help="the log-sum-exp kernel's rows,chunk,stages to time (the first is its default)",
  )
  p.add_argument("--out", default=None)
  args = p.parse_args(argv)
  for name in ("tokens", "d_model", "vocab"):
    if getattr(args, name) < 1:
      p.error(f"--{name.replace('_', '-')}={getattr(args, name)} must be >= 1")
  for spec in args.lse_blocks:
    parts = spec.split(",")
    if len(parts) != 3 or not all(t.isdigit() and int(t) > 0 for t in parts):
      p.error(f"--lse-blocks {spec!r} must be rows,chunk,stages (positive integers)")
    if int(parts[1]) & (int(parts[1]) - 1):
      p.error(f"--lse-blocks {spec!r}: chunk={parts[1]} must be a power of two")
  started = time.time()
  keys = jax.random.split(jax.random.key(0), 5)
  n, e, v = args.tokens, args.d_model, args.vocab
  x = jax.random.normal(keys[0], (n, e), jnp.bfloat16)
  scale = 1 + 0.1 * jax.random.normal(keys[1], (e,))
  gx, gy = (jax.random.normal(k, (n, e), jnp.bfloat16) for k in keys[2:4])
  logits = (4 * jax.random.normal(keys[4], (n, v))).astype(jnp.bfloat16)
  bw = copy_bandwidth()
  row = 2 * n * e  # bytes of one [N, E] bf16 array
  floors = {  # bytes each must move once
    "norm_fwd": 2 * row,  # x in, y out
    "norm_fwd_bwd": 2 * row + 4 * row,  # + x, gx, gy in, dx out
    "lse": 2 * n * v,  # the logits once
  }
  results = {}
  for impl in ("xla", "pallas"):
    results[f"norm_fwd_{impl}"] = timeit(_norm_forward(impl, args.interpret), x, scale)
    results[f"norm_fwd_bwd_{impl}"] = timeit(_norm_step(impl, args.interpret), x, scale, gx, gy)
  for kind in ("two_pass", "online"):
    results[f"lse_{kind}"] = timeit(_lse(kind), logits)
  want = _lse("two_pass")(logits)
  lse_max_diff = {"online": float(jnp.max(jnp.abs(_lse("online")(logits) - want)))}
  for spec in args.lse_blocks:
    rows, chunk, stages = (int(t) for t in spec.split(","))
    fn = _lse("pallas", args.interpret, rows, chunk, stages)
    results[f"lse_pallas_{rows}_{chunk}_{stages}"] = timeit(fn, logits)
    lse_max_diff[f"pallas_{rows}_{chunk}_{stages}"] = float(jnp.max(jnp.abs(fn(logits) - want)))
  pallas = {k: ms for k, ms in results.items() if k.startswith("lse_pallas_")}
  best = min(pallas, key=pallas.get)
  floor_ms = {k: b / bw * 1e3 for k, b in floors.items()}
  summary = {
    "norm_fwd_pallas_vs_xla": results["norm_fwd_pallas"] / results["norm_fwd_xla"],
    "norm_fwd_bwd_pallas_vs_xla": results["norm_fwd_bwd_pallas"] / results["norm_fwd_bwd_xla"],
    "lse_online_vs_two_pass": results["lse_online"] / results["lse_two_pass"],
    "lse_pallas_default_vs_two_pass": pallas[f"lse_pallas_{args.lse_blocks[0].replace(',', '_')}"]
    / results["lse_two_pass"],
    "lse_pallas_best": best.removeprefix("lse_pallas_"),
    "lse_pallas_best_vs_two_pass": pallas[best] / results["lse_two_pass"],
    "lse_pallas_best_vs_floor": pallas[best] / floor_ms["lse"],
    "norm_fwd_bwd_pallas_vs_floor": results["norm_fwd_bwd_pallas"] / floor_ms["norm_fwd_bwd"],
    "lse_online_vs_floor": results["lse_online"] / floor_ms["lse"],
  }
  report = {
    "command": "python " + " ".join(sys.argv),
    "versions": versions(),
    "shapes": {"tokens": n, "d_model": e, "vocab": v, "dtype": "bfloat16"},
    "copy_bandwidth_tb_s": bw / 1e12,
    "ms": results,
    "hbm_floor_ms": floor_ms,
    "lse_max_abs_diff_vs_two_pass": lse_max_diff,
    "summary": summary,
    "wall_s": round(time.time() - started, 1),
  }
  for k, ms in results.items():
    print(f"{k:24s} {ms:8.4f} ms")
  print(json.dumps(summary, indent=1))
  if args.out:
    atomic_write_json(args.out, report)
  return report


if __name__ == "__main__":
  main()
