"""Pallas kernels for Fibonacci sparse attention (GPU via Triton, TPU via Mosaic).

Knows nothing of Flax, configs or training: takes q, k, v and a static, hashable
`fibax.patterns.Pattern`, returns o, with a custom VJP.
"""

from kernels_pallas.ops import BACKENDS, fib_attention, fib_attention_learned, fib_attention_lse
from kernels_pallas.reference import fib_attention_reference

__all__ = [
  "BACKENDS",
  "fib_attention",
  "fib_attention_learned",
  "fib_attention_lse",
  "fib_attention_reference",
]
