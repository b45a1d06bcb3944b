"""Offset schedules of the paper: host-side NumPy, no JAX arrays.

One hashable `Pattern` per layer yields the sorted distance list, the dense causal
boolean mask used by the reference path, and the tables the kernels iterate. Nothing
else in fibax derives distances.

Notation: T = the length the model is run at, W = local window, b = a base term,
alpha = the layer's scale, L = number of layers.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal, get_args

import numpy as np

Base = Literal["fib", "pow2"]
Schedule = Literal["fixed", "learned", "stagger", "coprime", "dense"]
# "run": the cap T-1 and the pow2 base use the length the model is run at (the paper's
# code, the default for reproduction). "train": the pattern is built at the training
# length whatever length the model is run at, so extrapolation sees the trained offsets.
CapMode = Literal["run", "train"]

BASES: tuple[str, ...] = get_args(Base)
SCHEDULES: tuple[str, ...] = get_args(Schedule)
CAP_MODES: tuple[str, ...] = get_args(CapMode)
FIB_TERMS = 15  # the paper: K = 15 terms, 1 .. 987.


def fibonacci_base(num_terms: int = FIB_TERMS) -> tuple[int, ...]:
  """The first `num_terms` of 1, 2, 3, 5, 8, ... (the paper)."""
  if num_terms < 1:
    raise ValueError(f"{num_terms=} must be >= 1")
  terms = [1, 2]
  while len(terms) < num_terms:
    terms.append(terms[-1] + terms[-2])
  return tuple(terms[:num_terms])


def pow2_base(seq_len: int) -> tuple[int, ...]:
  """Reach-matched powers of two 1, 2, 4, ... <= seq_len - 1 (the paper)."""
  if seq_len < 2:
    raise ValueError(f"{seq_len=} must be >= 2")
  return tuple(1 << e for e in range((seq_len - 1).bit_length()) if (1 << e) <= seq_len - 1)


def base_terms(base: str, seq_len: int, num_terms: int = FIB_TERMS) -> tuple[int, ...]:
  if base == "fib":
    return fibonacci_base(num_terms)
  if base == "pow2":
    return pow2_base(seq_len)
  raise ValueError(f"unknown {base=}; expected one of {BASES}")


def coprime_stride(num_layers: int) -> int:
  """The largest s <= L/2 with gcd(s, L) = 1 (the paper; S = 7 for L = 16)."""
  if num_layers < 2:
    raise ValueError(f"{num_layers=} must be >= 2 for the coprime schedule")
  return max(s for s in range(1, num_layers // 2 + 1) if math.gcd(s, num_layers) == 1)


def layer_slots(schedule: str, num_layers: int) -> tuple[int, ...]:
  """Slot s_l of each layer: l for stagger, (l * S) mod L for coprime."""
  if schedule == "stagger":
    return tuple(range(num_layers))
  if schedule == "coprime":
    stride = coprime_stride(num_layers)
    return tuple((layer * stride) % num_layers for layer in range(num_layers))
  raise ValueError(f"{schedule=} has no slots; only stagger and coprime do")


def layer_alphas(schedule: str, num_layers: int) -> tuple[float, ...] | None:
  """Per-layer alpha (the paper); for `learned` the initial value; None for dense."""
  if num_layers < 1:
    raise ValueError(f"{num_layers=} must be >= 1")
  if schedule in ("fixed", "learned"):
    return (1.0,) * num_layers
  if schedule in ("stagger", "coprime"):
    if num_layers < 2:
      raise ValueError(f"{num_layers=} must be >= 2 for the {schedule} schedule")
    return tuple(0.5 + s / (num_layers - 1) for s in layer_slots(schedule, num_layers))
  if schedule == "dense":
    return None
  raise ValueError(f"unknown {schedule=}; expected one of {SCHEDULES}")


def _check_geometry(window: int, seq_len: int) -> None:
  if seq_len < 1:
    raise ValueError(f"{seq_len=} must be >= 1")
  if window < 0:
    raise ValueError(f"{window=} must be >= 0")
  if window >= seq_len:
    raise ValueError(f"{window=} must be < {seq_len=}")


def far_distances(alpha: float, terms: tuple[int, ...], window: int, cap: int) -> tuple[int, ...]:
  """Sorted {round(alpha * b) : W < round(alpha * b) <= cap}, Python's round (half to even)."""
  if not (alpha >= 0 and math.isfinite(alpha)):
    raise ValueError(f"{alpha=} must be a finite number >= 0")
  return tuple(sorted({d for d in (round(alpha * b) for b in terms) if window < d <= cap}))


@dataclasses.dataclass(frozen=True)
class Pattern:
  """The integer-offset pattern of one layer: query i attends key i - d for d in `distances`.

  Attributes:
    window: W; distances 0..W are always attended (W + 1 keys including the query).
    far: the sorted distances beyond the window (the "rungs").
  """

  window: int
  far: tuple[int, ...] = ()

  def __post_init__(self):
    if self.window < 0:
      raise ValueError(f"window={self.window} must be >= 0")
    far = tuple(int(d) for d in self.far)
    if list(far) != sorted(set(far)) or (far and far[0] <= self.window):
      raise ValueError(f"far={far} must be strictly increasing and > window={self.window}")
    object.__setattr__(self, "far", far)

  @classmethod
  def build(
    cls,
    *,
    base: str,
    alpha: float,
    window: int,
    seq_len: int,
    train_len: int | None = None,
    cap_mode: str = "run",
    num_terms: int = FIB_TERMS,
  ) -> Pattern:
    """the paper: D = {0..W} U {round(alpha*b) : W < round(alpha*b) <= T-1}.

    `seq_len` is the length the model is run at; with cap_mode="train" the pattern is
    built at `train_len` instead (both the cap and the pow2 base).
    """
    if cap_mode not in CAP_MODES:
      raise ValueError(f"unknown {cap_mode=}; expected one of {CAP_MODES}")
    built_len = seq_len if cap_mode == "run" or train_len is None else train_len
    _check_geometry(window, built_len)
    _check_geometry(window, seq_len)
    terms = base_terms(base, built_len, num_terms)
    return cls(window, far_distances(alpha, terms, window, built_len - 1))

  @classmethod
  def dense(cls, seq_len: int) -> Pattern:
    """Plain causal attention: the window covers every earlier position."""
    _check_geometry(seq_len - 1, seq_len)
    return cls(seq_len - 1)

  @property
  def distances(self) -> tuple[int, ...]:
    return tuple(range(self.window + 1)) + self.far

  @property
  def max_distance(self) -> int:
    return self.far[-1] if self.far else self.window

  def keys_per_query(self, seq_len: int) -> float:
    """Mean number of attended keys per query over positions 0..T-1."""
    d = np.asarray(self.distances)
    return float(np.clip(seq_len - d, 0, None).sum() / seq_len)

  def mask(self, seq_len: int) -> np.ndarray:
    """Boolean [T, T] mask, True where query i attends key j (j = i - d, d in D)."""
    rel = np.arange(seq_len)[:, None] - np.arange(seq_len)[None, :]
    allowed = np.zeros(seq_len, dtype=bool)
    d = np.asarray(self.distances)
    allowed[d[d < seq_len]] = True
    return np.where(rel >= 0, allowed[np.clip(rel, 0, None)], False)

  def far_table(self) -> np.ndarray:
    """int32 table of the rungs the kernels iterate (forward: rows i - d; backward: j + d)."""
    return np.asarray(self.far, dtype=np.int32)


@dataclasses.dataclass(frozen=True)
class LearnedPattern:
  """What the learned-alpha path (the paper) needs besides alpha itself.

  The rung set depends on alpha, so no table can be fixed at trace time; `freeze`
  rounds a trained alpha into an integer `Pattern`.
  """

  window: int
  terms: tuple[int, ...]
  cap: int

  @classmethod
  def build(
    cls,
    *,
    base: str,
    window: int,
    seq_len: int,
    train_len: int | None = None,
    cap_mode: str = "run",
    num_terms: int = FIB_TERMS,
  ) -> LearnedPattern:
    if cap_mode not in CAP_MODES:
      raise ValueError(f"unknown {cap_mode=}; expected one of {CAP_MODES}")
    built_len = seq_len if cap_mode == "run" or train_len is None else train_len
    _check_geometry(window, built_len)
    _check_geometry(window, seq_len)
    return cls(window, base_terms(base, built_len, num_terms), built_len - 1)

  def freeze(self, alpha: float) -> Pattern:
    return Pattern(self.window, far_distances(float(alpha), self.terms, self.window, self.cap))


def model_patterns(
  *,
  base: str,
  schedule: str,
  window: int,
  num_layers: int,
  seq_len: int,
  train_len: int | None = None,
  cap_mode: str = "run",
  num_terms: int = FIB_TERMS,
) -> tuple[Pattern | LearnedPattern, ...]:
  """One pattern per layer for a schedule, at run length `seq_len`."""
  if base not in BASES:
    raise ValueError(f"unknown {base=}; expected one of {BASES}")
  alphas = layer_alphas(schedule, num_layers)
  if alphas is None:
    return (Pattern.dense(seq_len),) * num_layers
  if schedule == "learned":
    lp = LearnedPattern.build(
      base=base,
      window=window,
      seq_len=seq_len,
      train_len=train_len,
      cap_mode=cap_mode,
      num_terms=num_terms,
    )
    return (lp,) * num_layers
  return tuple(
    Pattern.build(
      base=base,
      alpha=a,
      window=window,
      seq_len=seq_len,
      train_len=train_len,
      cap_mode=cap_mode,
      num_terms=num_terms,
    )
    for a in alphas
  )
