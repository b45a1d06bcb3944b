"""The Mosaic GPU dkv kernel (kernels_pallas/mosaic.py) against the Triton packed kernel's dk,
dv on one shape, one line: on a GPU for real, on a CPU both in their interpreters.

  python experiments/mosaic_dkv_check.py B T H K D W [d1,d2,...]

Each check is its own process on a GPU: a kernel that faults ends its CUDA context.
"""

import functools

import jax
import jax.numpy as jnp

from kernels_pallas.mosaic import dkv


def check(batch, seq_len, heads, kv_heads, head_dim, window, far) -> list[float]:
  """Relative errors of this kernel's dk, dv against the Triton packed kernel's, bf16 inputs
  (on a CPU: both in their interpreters)."""
  from kernels_pallas import gpu

  interpret = jax.default_backend() == "cpu"
  ks = jax.random.split(jax.random.key(0), 4)
  shape_q = (batch, seq_len, heads, head_dim)
  shape_kv = (batch, seq_len, kv_heads, head_dim)
  q, do = (jax.random.normal(k, shape_q, jnp.bfloat16) for k in ks[:2])
  k, v = (jax.random.normal(k, shape_kv, jnp.bfloat16) for k in ks[2:])
  blocks = gpu.GpuBlocks(kernel="packed")
  table = gpu.rung_table(far, window)
  kw = dict(window=window, blocks=blocks, interpret=interpret)
  o, lse = gpu._forward_packed(q, k, v, table, **kw)
  _, dk, dv = gpu._backward_packed(q, k, v, o, lse, do, table, **kw)
  delta = jnp.einsum("bthd,bthd->bht", o.astype(jnp.float32), do.astype(jnp.float32))
  ours = jax.jit(functools.partial(dkv, window=window, interpret=interpret))
  dk2, dv2 = ours(q, k, v, do, lse, delta, table)
  return [
    float(jnp.linalg.norm((a - b).astype(jnp.float32)) / jnp.linalg.norm(a.astype(jnp.float32)))
    for a, b in ((dk, dk2), (dv, dv2))
  ]


USAGE = "usage: mosaic_dkv_check.py B T H K D W [d1,d2,...] (integers; rung distances > W)"


def main(argv=None) -> None:
  """python experiments/mosaic_dkv_check.py B T H K D W [d1,d2,...]: one check, one line."""
  import sys

  args = sys.argv[1:] if argv is None else argv
  if len(args) not in (6, 7):
    raise SystemExit(USAGE)
  try:
    shape = [int(x) for x in args[:6]]
    far = tuple(int(x) for x in args[6].split(",") if x) if len(args) == 7 else ()
  except ValueError:
    raise SystemExit(f"mosaic_dkv_check.py: not integers: {' '.join(args)!r}; {USAGE}") from None
  errs = check(*shape, far)
  print(" ".join(args), "OK" if max(errs) < 1e-2 else "WRONG", errs, flush=True)


if __name__ == "__main__":
  main()
