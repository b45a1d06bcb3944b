"""The paper's recipe (the paper) and every run of its matrix (§5), by name.

    python -m fibax.train --config configs/paper.py:fib_stagger_w12 --workdir runs/fib_stagger_w12

`get_config()` returns the default run (fib / stagger, W = 12); `get_config(name)` any run
of `RUNS`; `get_config(name, steps=N)` the same run on a scaled recipe: N steps of the same
batch, with the warmup scaled by N / 13,000 (the cosine then decays to 10% at step N), for
matrices that cannot afford 426M tokens a run:

    python -m fibax.train --config configs/paper.py:fib_stagger_w12,steps=3052 ...  # 100M tokens
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


# 100,007,936 tokens at 32 x 1024 a step: the scaled matrix's recipe (at least 100M tokens).
STEPS_100M = 3052


def _run(base: str, schedule: str, window: int, seed: int = 42, steps: int | None = None):
  model = ModelConfig(attention=AttentionConfig(schedule=schedule, base=base, window=window))
  train = TrainConfig(seed=seed)
  if steps is not None:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
      raise ValueError(f"steps={steps!r} must be a positive integer")
    full = train.total_steps
    warmup = max(1, round(train.warmup_steps * steps / full))
    train = TrainConfig(seed=seed, total_steps=steps, warmup_steps=warmup)
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
  # Beyond the paper's nine replicates: dense and learned at seeds 43 and 44 too, so that the
  # dense-vs-sparse gap and the learned row have a spread of their own.
  runs["fib_learned_w12_seed44"] = ("fib", "learned", 12, 44)
  for seed in (43, 44):
    runs[f"dense_seed{seed}"] = (*runs["dense"][:3], seed)
  return runs


RUNS = _runs()


def get_config(name: str = "fib_stagger_w12", steps: int | None = None) -> RunConfig:
  if name not in RUNS:
    raise ValueError(f"unknown run {name=}; expected one of {sorted(RUNS)}")
  return _run(*RUNS[name], steps=steps)
