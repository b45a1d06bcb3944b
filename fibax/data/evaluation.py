"""The evaluation reader: non-overlapping windows of any length over held-out splits, in order.

Window k of a document spans its tokens [k*L, k*L + L + 1) (inputs and targets shifted by
one), so the targets of consecutive windows never overlap, and windows never cross a document
boundary (a document's tail shorter than a window is left out): a 16K window is 16K tokens of
one book, as the length-extrapolation evaluation needs. `max_tokens` keeps the first windows in
document order up to that many targets, so the same tokens are evaluated on every call.

    windows_NxL1 = dataset_windows(data_dir, ("validation",), seq_len=4096, max_tokens=2**20)
    windows_NxL1[:, :-1], windows_NxL1[:, 1:]  # inputs and targets, int32[N, 4096]
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from fibax.data.files import DataError
from fibax.data.shards import SplitTokens


def window_starts(tokens: SplitTokens, seq_len: int, max_tokens: int | None = None) -> np.ndarray:
  """The first token of every evaluation window, int64[N], in document order."""
  if seq_len < 1:
    raise ValueError(f"seq_len={seq_len} must be >= 1")
  if max_tokens is not None and max_tokens < seq_len:
    raise ValueError(f"max_tokens={max_tokens} is less than one window of {seq_len=}")
  begins_D, ends_D = tokens.doc_bounds[:-1], tokens.doc_bounds[1:]
  counts_D = np.maximum(ends_D - begins_D - 1, 0) // seq_len
  doc_D = np.repeat(np.arange(len(counts_D)), counts_D)
  first_window_D = np.cumsum(counts_D) - counts_D
  starts_N = begins_D[doc_D] + (np.arange(len(doc_D)) - first_window_D[doc_D]) * seq_len
  if len(starts_N) == 0:
    raise DataError(
      f"{tokens.manifest_path}: no window of seq_len + 1 = {seq_len + 1} tokens fits in one "
      f"document of split {tokens.split!r} ({tokens.num_tokens} tokens)"
    )
  if max_tokens is not None:
    starts_N = starts_N[: max_tokens // seq_len]
  return starts_N


def dataset_windows(
  data_dir: str | os.PathLike,
  splits: Sequence[str],
  seq_len: int,
  max_tokens: int,
  verify: bool = True,
) -> np.ndarray:
  """The first `max_tokens // seq_len` evaluation windows over `splits` in order, as
  int32[N, seq_len + 1] (N may be 0: no window fits in one document)."""
  windows, left = [], max_tokens
  for split in splits:
    if left < seq_len:
      break
    tokens = SplitTokens(data_dir, split, verify=verify)
    try:
      starts_N = window_starts(tokens, seq_len, left)
    except DataError:  # no window of this length fits in one document of this split
      continue
    windows += [tokens.read(int(s), seq_len + 1).astype(np.int32) for s in starts_N]
    left -= len(starts_N) * seq_len
  return np.stack(windows) if windows else np.zeros((0, seq_len + 1), np.int32)
