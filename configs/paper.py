"""The paper's recipe (PAPER.md §4) and every run of its matrix (§5), by name.

    python -m fibax.train --config configs/paper.py:fib_stagger_w12 --workdir runs/fib_stagger_w12

`get_config()` returns the default run (fib / stagger, W = 12); `get_config(name)` any run
of `RUNS`; `get_config(name, scaled=True)` the same run on the scaled recipe (fewer
tokens, same everything else) used for quick matrices.
"""

from fibax.config import AttentionConfig, ModelConfig, RunConfig, TrainConfig

WINDOWS = (6, 8, 10, 12)
SCHEDULES = (
  ("fib", "fixed"),
  ("fib", "learned"),
  ("fib", "stagger"),
  ("fib", "coprime"),
  ("pow2", "stagger"),
)


def _run(base: str, schedule: str, window: int, seed: int = 42, scaled: bool = False) -> RunConfig:
  model = ModelConfig(attention=AttentionConfig(schedule=schedule, base=base, window=window))
  train = TrainConfig(seed=seed)
  if scaled:
    train = TrainConfig(seed=seed, total_steps=1300)
  return RunConfig(model=model, train=train)


def _runs() -> dict[str, tuple]:
  runs = {}
  for (base, schedule), w in ((bs, w) for bs in SCHEDULES for w in WINDOWS):
    runs[f"{base}_{schedule}_w{w}"] = (base, schedule, w, 42)
  runs["pow2_fixed_w8"] = ("pow2", "fixed", 8, 42)
  runs["dense"] = ("fib", "dense", 12, 42)
  for name in ("fib_fixed_w12", "fib_stagger_w12", "fib_coprime_w12", "pow2_stagger_w12"):
    for seed in (43, 44):
      runs[f"{name}_seed{seed}"] = (*runs[name][:3], seed)
  runs["fib_learned_w12_seed43"] = ("fib", "learned", 12, 43)
  return runs


RUNS = _runs()


def get_config(name: str = "fib_stagger_w12", scaled: bool = False) -> RunConfig:
  if name not in RUNS:
    raise ValueError(f"unknown run {name=}; expected one of {sorted(RUNS)}")
  return _run(*RUNS[name], scaled=scaled)
