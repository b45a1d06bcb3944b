"""The Mosaic GPU kernels' main loops, counted: each kernel (`kernels_pallas.mosaic`'s forward,
dq and dkv) lowered for a GPU on any machine (a CPU will do: no GPU is needed to lower), and the
operations of its Mosaic GPU module's largest loop (an `scf.for` or `scf.while` and all that
it holds) counted by kind, after Mosaic GPU's own lowering (the per-register arithmetic of the
WGMMA layout, before LLVM). A cheap check of a change to an instruction-bound kernel (an
Nsight Compute profile found the forward so) before timing it on a GPU.

  python experiments/mosaic_ops.py [--window 12] [--rungs 13,21,34] [--seq-len 256] [--out FILE]

One JSON line (and FILE, written whole, where given): for each kernel its loop's operation
count and the count of each kind. The table's distances are an input of the kernels, so the
counts depend on the window (static) and not on the rungs or T.
"""

import argparse
import collections
import functools
import json
import re
import sys
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fibax.data.files import atomic_write_json  # noqa: E402
from kernels_pallas import gpu, mosaic  # noqa: E402

_OP = re.compile(r"^\s*(?:%[\w:#]+(?:, %[\w:#]+)* = )?\"?([a-z_]+\.[a-z_.0-9]+)")


def _modules(fn) -> list[str]:
  """The Mosaic GPU modules `fn()` lowers, as text after Mosaic GPU's lowering."""
  from jax.experimental.mosaic.gpu import core

  found, lower = [], core.lower_mgpu_module

  def keep(module, *args, **kwargs):
    out = lower(module, *args, **kwargs)
    found.append(str(module))
    return out

  core.lower_mgpu_module = keep
  try:
    fn()
  finally:
    core.lower_mgpu_module = lower
  return found


def loop_ops(text: str) -> collections.Counter:
  """The operations of the largest loop in an MLIR module's text, by kind: the loop op's line
  and every line indented below it (a `scf.while`'s `} do {` and block labels included)."""
  lines = text.splitlines()
  best: list[str] = []
  for i, line in enumerate(lines):
    if not re.search(r"= scf\.(for|while)\b|^\s*scf\.for\b", line):
      continue
    indent = len(line) - len(line.lstrip())
    j = i + 1
    while j < len(lines):
      inner = lines[j]
      deeper = len(inner) - len(inner.lstrip()) > indent
      if not (deeper or inner.strip().startswith(("} do", "^"))):
        break
      j += 1
    if j - i > len(best):
      best = lines[i:j]
  return collections.Counter(m.group(1) for m in map(_OP.match, best) if m)


def count(window: int, rungs: tuple[int, ...], seq_len: int) -> dict:
  """{kernel: {"ops": N, "by_kind": {kind: n}}} for the forward, dq and dkv at bf16, 8 query
  and 2 kv heads, D = 64 (the shapes the kernels take)."""
  q = jax.ShapeDtypeStruct((1, seq_len, 8, 64), jnp.bfloat16)
  kv = jax.ShapeDtypeStruct((1, seq_len, 2, 64), jnp.bfloat16)
  stats = jax.ShapeDtypeStruct((1, 8, seq_len), jnp.float32)
  table = gpu.rung_table(rungs, window)
  calls = {
    "forward": (mosaic.forward, (q, kv, kv, table)),
    "dq": (mosaic.dq, (q, kv, kv, q, q, stats, table)),
    "dkv": (mosaic.dkv, (q, kv, kv, q, stats, stats, table)),
  }
  found = {}
  for name, (fn, args) in calls.items():
    traced = jax.jit(functools.partial(fn, window=window)).trace(*args)
    (text,) = _modules(lambda traced=traced: traced.lower(lowering_platforms=("cuda",)))
    ops = loop_ops(text)
    found[name] = {"ops": sum(ops.values()), "by_kind": dict(ops.most_common())}
  return found


def main(argv=None) -> None:
  p = argparse.ArgumentParser(prog="mosaic_ops.py", description=__doc__.split("\n\n")[0])
  p.add_argument("--window", type=int, default=12)
  p.add_argument("--rungs", default="13,21,34", help="comma-separated distances > window")
  p.add_argument("--seq-len", type=int, default=256, help="a multiple of 16")
  p.add_argument("--out", default=None)
  args = p.parse_args(argv)
  try:
    rungs = tuple(int(x) for x in args.rungs.split(",") if x)
    gpu.rung_table(rungs, args.window)
  except ValueError as e:
    p.error(f"--rungs {args.rungs!r}: {e}")
  if args.window < 0 or args.seq_len < 16 or args.seq_len % 16:
    p.error(f"--window {args.window}, --seq-len {args.seq_len}: >= 0, a multiple of 16")
  found = {"window": args.window, "rungs": list(rungs), "seq_len": args.seq_len}
  found |= count(args.window, rungs, args.seq_len)
  found["jax"] = jax.__version__
  print(json.dumps(found), flush=True)
  if args.out:
    atomic_write_json(args.out, found)


if __name__ == "__main__":
  main()
