"""The Mosaic GPU forward and dq kernels (kernels_pallas/mosaic.py) against the Triton packed
kernels' o, lse and dq, and their delta against sum_d o do (- dlse) in XLA, on one shape, one
line: on a GPU for real, on a CPU both in their interpreters.

  python experiments/mosaic_query_check.py B T H K D W [d1,d2,...] [--dlse] [--buffers N]

--buffers: the Mosaic kernels' k and v pipeline depth (`GpuBlocks.num_stages`; default 2).
Each check is its own process on a GPU: a kernel that faults ends its CUDA context.
"""

import functools

import jax
import jax.numpy as jnp

from kernels_pallas import mosaic

NAMES = ("o", "lse", "dq", "delta")


def check(
  batch, seq_len, heads, kv_heads, head_dim, window, far, dlse=False, buffers=2
) -> list[float]:
  """Relative errors of the Mosaic kernels' (o, lse, dq, delta) against the Triton packed
  kernels' o, lse, dq and XLA's delta, bf16 inputs (on a CPU: both in their interpreters);
  `dlse`: a cotangent of lse as well; `buffers`: the Mosaic kernels' pipeline depth."""
  from kernels_pallas import gpu

  interpret = jax.default_backend() == "cpu"
  ks = jax.random.split(jax.random.key(0), 5)
  shape_q = (batch, seq_len, heads, head_dim)
  shape_kv = (batch, seq_len, kv_heads, head_dim)
  q, do = (jax.random.normal(k, shape_q, jnp.bfloat16) for k in ks[:2])
  k, v = (jax.random.normal(k, shape_kv, jnp.bfloat16) for k in ks[2:4])
  table = gpu.rung_table(far, window)
  kw = dict(window=window, blocks=gpu.GpuBlocks(kernel="packed"), interpret=interpret)
  o, lse = gpu._forward_packed(q, k, v, table, **kw)
  d_lse = jax.random.normal(ks[4], lse.shape) if dlse else None
  dq, _, _ = gpu._backward_packed(q, k, v, o, lse, do, table, dlse=d_lse, **kw)
  delta = jnp.einsum("bthd,bthd->bht", o.astype(jnp.float32), do.astype(jnp.float32))
  delta = delta if d_lse is None else delta - d_lse
  mine = dict(window=window, buffers=buffers, interpret=interpret)
  fwd = jax.jit(functools.partial(mosaic.forward, **mine))
  bwd = jax.jit(functools.partial(mosaic.dq, **mine))
  ours = (*fwd(q, k, v, table), *bwd(q, k, v, o, do, lse, table, dlse=d_lse))
  return [
    float(jnp.linalg.norm((a - b).astype(jnp.float32)) / jnp.linalg.norm(a.astype(jnp.float32)))
    for a, b in zip((o, lse, dq, delta), ours, strict=True)
  ]


USAGE = (
  "usage: mosaic_query_check.py B T H K D W [d1,d2,...] [--dlse] [--buffers N] (integers; "
  "rung distances > W; N in 1..4)"
)


def main(argv=None) -> None:
  """python experiments/mosaic_query_check.py B T H K D W [d1,d2,...] [--dlse] [--buffers N]:
  one line."""
  import sys

  args = sys.argv[1:] if argv is None else argv
  dlse = "--dlse" in args
  nums = [a for a in args if a != "--dlse"]
  buffers = "2"
  if "--buffers" in nums:
    at = nums.index("--buffers")
    if at + 1 == len(nums):
      raise SystemExit(USAGE)
    buffers = nums[at + 1]
    del nums[at : at + 2]
  if not buffers.isdigit():
    raise SystemExit(f"mosaic_query_check.py: --buffers {buffers!r}: not an integer; {USAGE}")
  buffers = int(buffers)
  if len(nums) not in (6, 7):
    raise SystemExit(USAGE)
  try:
    shape = [int(x) for x in nums[:6]]
    far = tuple(int(x) for x in nums[6].split(",") if x) if len(nums) == 7 else ()
  except ValueError:
    raise SystemExit(f"mosaic_query_check.py: not integers: {' '.join(nums)!r}; {USAGE}") from None
  batch, seq_len, heads, kv_heads, head_dim, window = shape
  why = None
  if min(shape[:5]) < 1 or heads % kv_heads or window < 0 or any(d <= window for d in far):
    why = "sizes >= 1, H a multiple of K, W >= 0 and rung distances > W"
  if not 1 <= buffers <= 4:
    why = f"--buffers {buffers}: 1..4"
  why = why or mosaic.supported((batch, seq_len, heads, head_dim), kv_heads, jnp.bfloat16)
  if why:
    raise SystemExit(f"mosaic_query_check.py: {' '.join(args)!r}: {why}")
  errs = check(*shape, far, dlse=dlse, buffers=buffers)
  # o within bf16's rounding (p rounded under another running max: up to ~1e-3), the rest the
  # same sums in another order (up to ~2e-5): tests/test_mosaic_query.py's bounds.
  ok = errs[0] < 2e-3 and max(errs[1:]) < 1e-4
  found = dict(zip(NAMES, errs, strict=True))
  print(" ".join(args), "OK" if ok else "WRONG", found, flush=True)


if __name__ == "__main__":
  main()
