"""The evaluation reader: non-overlapping windows of any length over one split, in order.

Window k of a document spans its tokens [k*L, k*L + L + 1) (inputs and targets shifted by
one), so the targets of consecutive windows never overlap. With `within_docs` (the default)
windows never cross a document boundary and a document's tail shorter than a window is left
out; this is what the length-extrapolation evaluation needs (a 16K window is 16K tokens of one
book). Without it, windows tile the split's whole stream (documents joined by EOS).
`max_tokens` keeps the first windows in document order up to that many targets, so the same
tokens are evaluated on every call: deterministic first-N-tokens.

    for batch in eval_batches(data_dir, "validation", seq_len=4096, batch_size=8,
                              max_tokens=2**21):
      batch["inputs"], batch["targets"]  # int32[8, 4096]
      batch["weights"]                   # float32[8, 4096]; 0 on the padding rows of the
                                         # last batch, so shapes stay fixed under jit
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import numpy as np

from fibax.data.files import DataError
from fibax.data.shards import SplitTokens


def window_starts(
  tokens: SplitTokens, seq_len: int, max_tokens: int | None = None, within_docs: bool = True
) -> np.ndarray:
  """The first token of every evaluation window, int64[N], in document order."""
  if seq_len < 1:
    raise ValueError(f"seq_len={seq_len} must be >= 1")
  if max_tokens is not None and max_tokens < seq_len:
    raise ValueError(f"max_tokens={max_tokens} is less than one window of {seq_len=}")
  bounds = tokens.doc_bounds if within_docs else np.array([0, tokens.num_tokens], np.int64)
  begins_D, ends_D = bounds[:-1], bounds[1:]
  counts_D = np.maximum(ends_D - begins_D - 1, 0) // seq_len
  doc_D = np.repeat(np.arange(len(counts_D)), counts_D)
  first_window_D = np.cumsum(counts_D) - counts_D
  starts_N = begins_D[doc_D] + (np.arange(len(doc_D)) - first_window_D[doc_D]) * seq_len
  if len(starts_N) == 0:
    where = "one document" if within_docs else "the split"
    raise DataError(
      f"{tokens.manifest_path}: no window of seq_len + 1 = {seq_len + 1} tokens fits in {where} "
      f"of split {tokens.split!r} ({tokens.num_tokens} tokens)"
    )
  if max_tokens is not None:
    starts_N = starts_N[: max_tokens // seq_len]
  return starts_N


def eval_batches(
  data_dir: str | os.PathLike,
  split: str,
  seq_len: int,
  batch_size: int,
  max_tokens: int | None = None,
  within_docs: bool = True,
  verify: bool = True,
) -> Iterator[dict[str, np.ndarray]]:
  """Batches of evaluation windows: {"inputs", "targets": int32[B, L], "weights": float32[B, L]}.

  The last batch is padded to `batch_size` with rows of weight 0. Raises `DataError` (naming
  the manifest) when no window fits.
  """
  if batch_size < 1:
    raise ValueError(f"batch_size={batch_size} must be >= 1")
  tokens = SplitTokens(data_dir, split, verify=verify)
  starts_N = window_starts(tokens, seq_len, max_tokens, within_docs)
  for first in range(0, len(starts_N), batch_size):
    starts_B = starts_N[first : first + batch_size]
    windows_BxL1 = np.zeros((batch_size, seq_len + 1), np.int32)
    weights_BxL = np.zeros((batch_size, seq_len), np.float32)
    for i, start in enumerate(starts_B):
      windows_BxL1[i] = tokens.read(int(start), seq_len + 1)
    weights_BxL[: len(starts_B)] = 1.0
    yield {
      "inputs": windows_BxL1[:, :-1],
      "targets": windows_BxL1[:, 1:],
      "weights": weights_BxL,
    }
