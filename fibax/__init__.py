"""fibax: Fibonacci-spaced sparse attention in JAX/Flax (the paper; README, Method).

Data flows one way: patterns (host, NumPy) -> attention ops -> model -> train / eval.
Submodules are imported explicitly (`from fibax import patterns`) so that importing
`fibax` stays cheap and the layering stays one-directional.
"""

__version__ = "0.1.0"
