"""XLA's CPU compile of the gradient of 16 layers' learned rung tables alone, for the tree given
(a checkout: this one, or an older commit's copy):

  python experiments/results/speed_h200_cd8aba6/cpu_checks/table_compile.py TREE

Prints the tree, the compile time in seconds and the traced function's jaxpr length in lines.
"""

import sys
import time

sys.path.insert(0, sys.argv[1])

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from fibax import attention  # noqa: E402
from fibax.patterns import LearnedPattern  # noqa: E402

lp = LearnedPattern.build(base="fib", window=12, seq_len=1024)


def f(alphas):
  total = 0.0
  for i in range(16):
    lo, frac, keep = attention.learned_table(lp, alphas[i])
    total = total + jnp.sum(jnp.where(keep, frac * lo, 0.0))
  return total


alphas = jnp.linspace(0.5, 1.5, 16)
t0 = time.perf_counter()
jax.jit(jax.grad(f)).trace(alphas).lower().compile()
seconds = time.perf_counter() - t0
print(sys.argv[1], "compile", round(seconds, 3), len(str(jax.make_jaxpr(f)(alphas)).splitlines()))
