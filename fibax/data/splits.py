"""Deterministic document-level split by a hash of the document id.

u = first 8 bytes of sha256(id) / 2**64 in [0, 1): u < validation -> "validation",
u >= 1 - test -> "test", else "train". The same documents are held out on every machine and
every run, held-out documents stay whole, and changing one fraction never moves a document
between the other two held-out sets.
"""

from __future__ import annotations

import dataclasses
import hashlib

SPLITS = ("train", "validation", "test")


@dataclasses.dataclass(frozen=True)
class SplitFractions:
  validation: float = 0.03
  test: float = 0.03

  def __post_init__(self):
    for name in ("validation", "test"):
      value = getattr(self, name)
      if not 0.0 <= value < 1.0:
        raise ValueError(f"{name}={value} must be in [0, 1)")
    if self.validation + self.test >= 1.0:
      raise ValueError(f"validation={self.validation} + test={self.test} leaves no training data")


def unit_interval(doc_id: str) -> float:
  return int.from_bytes(hashlib.sha256(doc_id.encode()).digest()[:8], "big") / 2.0**64


def split_of(doc_id: str, fractions: SplitFractions) -> str:
  u = unit_interval(doc_id)
  if u < fractions.validation:
    return "validation"
  if u >= 1.0 - fractions.test:
    return "test"
  return "train"
