"""The training input pipeline: a grain 0.2.x `DataLoader` over a prepared data directory.

    it = train_iterator(data_dir, seq_len=T, batch_size=B, seed=0)
    batch = next(it)   # {"inputs": int32[B/P, T], "targets": int32[B/P, T]}, P = processes
    state = it.get_state()        # bytes (JSON, ~400 B); save it with the checkpoint
    it.set_state(state)           # on a fresh iterator: continues with the next unseen batch

A state restores only into an iterator with the same data, seq_len, batch_size, seed,
process count and worker_count (grain compares them and raises otherwise).

`batch_size` is the global batch; each of the P JAX processes gets its own B/P rows (make
the global array with `jax.make_array_from_process_local_data`). `targets` are `inputs`
shifted by one token. For orbax, the iterator is a checkpointable item as is:
    mngr.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=grain.checkpoint.CheckpointSave(it)))
    mngr.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract), data=grain.checkpoint.CheckpointRestore(it)))
(`tests/test_data_pipeline.py` does this round trip.)

Examples: documents packed with EOS, not random windows. The split is one token stream (each
document followed by EOS); window w is tokens [w*T, w*T + T + 1), so neighbouring windows
share one token and every token is a target once per epoch (bar the < B windows an epoch
drops to keep batches full). Random windows would
draw some tokens several times and others never within the same token budget, and a
permutation makes the state a single counter. Documents longer than T are cut (Gutenberg
books run 10^4-10^6 tokens); shorter ones share a window, separated by EOS, and attention is
not masked at EOS (as in GPT-2 / nanoGPT).

Order: epoch e is a permutation of all windows drawn from (seed, e); global batch g of the
epoch is windows perm[g*B : (g+1)*B] (the last partial batch of an epoch is dropped), and
process p takes rows [p*B/P, (p+1)*B/P). So the data seen is the same for any process count.
One grain record is one process's slice of one batch: grain's IndexSampler spends ~100 us per
record (it builds a Philox generator per record), which at one record per window would cap
the loader near 1M tokens/s at T = 128 on 2 cores. Read-ahead: `worker_count` processes,
`worker_buffer_size` batches ahead each.
"""

from __future__ import annotations

import os

import grain
import numpy as np
from absl import flags

from fibax.data.files import DataError, exit_with_parent
from fibax.data.shards import SplitTokens

# Records of an endless run (num_epochs=None): far more batches than any run takes.
_ENDLESS_BATCHES = 1 << 40


class BatchSource(grain.sources.RandomAccessDataSource):
  """Record k: process (k % P)'s rows of global batch k // P, as uint16[B/P, T+1]."""

  def __init__(
    self,
    tokens: SplitTokens,
    seq_len: int,
    batch_size: int,
    seed: int,
    procs: int,
    num_epochs: int | None,
  ):
    self.tokens, self.seq_len, self.batch_size, self.seed = tokens, seq_len, batch_size, seed
    self.procs, self.local_batch = procs, batch_size // procs
    self.num_windows = (tokens.num_tokens - 1) // seq_len
    self.batches_per_epoch = self.num_windows // batch_size
    if self.batches_per_epoch < 1:
      raise DataError(
        f"{tokens.manifest_path}: split {tokens.split!r} has {tokens.num_tokens} tokens, "
        f"{self.num_windows} windows of seq_len + 1 = {seq_len + 1}, fewer than {batch_size=}"
      )
    batches = _ENDLESS_BATCHES if num_epochs is None else num_epochs * self.batches_per_epoch
    self.num_records = batches * procs
    self._cached, self._cached_epoch = None, None

  def __len__(self) -> int:
    return self.num_records

  def _permutation(self, epoch: int) -> np.ndarray:
    if self._cached_epoch != epoch:  # one epoch at a time: a permutation is 8 B per window
      self._cached = np.random.default_rng([self.seed, epoch]).permutation(self.num_windows)
      self._cached_epoch = epoch
    return self._cached

  def __getitem__(self, record: int) -> np.ndarray:
    batch, proc = divmod(int(record), self.procs)
    epoch, batch_in_epoch = divmod(batch, self.batches_per_epoch)
    first = batch_in_epoch * self.batch_size + proc * self.local_batch
    windows_b = self._permutation(epoch)[first : first + self.local_batch]
    length = self.seq_len + 1
    return np.stack([self.tokens.read(int(w) * self.seq_len, length) for w in windows_b])

  def __getstate__(self):
    return {**self.__dict__, "_cached": None, "_cached_epoch": None}

  def __repr__(self) -> str:
    # grain checks a restored state against repr(data_source): name the data, not its path.
    return (
      f"BatchSource({self.tokens.fingerprint}, seq_len={self.seq_len}, "
      f"batch_size={self.batch_size}, seed={self.seed}, procs={self.procs})"
    )


class _ToExample(grain.transforms.Map):
  def map(self, windows_BxT1: np.ndarray) -> dict[str, np.ndarray]:
    exit_with_parent()  # runs in grain's worker processes
    windows_BxT1 = windows_BxT1.astype(np.int32)
    return {"inputs": windows_BxT1[:, :-1], "targets": windows_BxT1[:, 1:]}


def _process_index_and_count(shard_index: int | None, shard_count: int | None) -> tuple[int, int]:
  if shard_index is None and shard_count is None:
    import jax

    return jax.process_index(), jax.process_count()
  if shard_index is None or shard_count is None or not 0 <= shard_index < shard_count:
    raise ValueError(f"need 0 <= {shard_index=} < {shard_count=}, both or neither given")
  return shard_index, shard_count


def train_iterator(
  data_dir: str | os.PathLike,
  seq_len: int,
  batch_size: int,
  seed: int,
  *,
  split: str = "train",
  num_epochs: int | None = None,
  worker_count: int = 1,
  worker_buffer_size: int = 2,
  shard_index: int | None = None,
  shard_count: int | None = None,
  vocab_size: int | None = None,
  verify: bool = True,
) -> grain.DataLoaderIterator:
  """A resumable iterator over shuffled training batches of a prepared data directory.

  Args:
    data_dir: a directory written by `fibax.data.prepare` (or restored by `unstage`).
    seq_len: T; each example holds T + 1 tokens (inputs and targets shifted by one).
    batch_size: the global batch size B, divisible by the process count P.
    seed: the shuffle seed; epoch e is a permutation drawn from (seed, e).
    num_epochs: None repeats forever; otherwise the iterator ends after that many epochs.
    worker_count: grain worker processes reading ahead (0: read in this process).
    worker_buffer_size: batches each worker prepares ahead.
    shard_index, shard_count: override jax.process_index() / jax.process_count().
    vocab_size: the model's vocabulary, if given checked to cover the tokenizer's.
    verify: check every shard's sha256 when opening (about 1 s per GB).

  Returns:
    A `grain.DataLoaderIterator` of {"inputs": int32[B/P, T], "targets": int32[B/P, T]};
    `get_state()` -> bytes and `set_state(bytes)` resume at the next unseen batch.
  """
  if seq_len < 1 or batch_size < 1:
    raise ValueError(f"{seq_len=} and {batch_size=} must be >= 1")
  if not 0 <= seed < 2**32:
    raise ValueError(f"{seed=} must be a non-negative 32-bit integer")
  proc, procs = _process_index_and_count(shard_index, shard_count)
  if batch_size % procs:
    raise ValueError(f"{batch_size=} is not divisible by {procs} processes")
  tokens = SplitTokens(data_dir, split, verify=verify)
  if vocab_size is not None and vocab_size < tokens.vocab_size:
    raise DataError(
      f"{tokens.manifest_path}: the tokenizer has {tokens.vocab_size} pieces > {vocab_size=}"
    )
  source = BatchSource(tokens, seq_len, batch_size, seed, procs, num_epochs)
  if worker_count > 0 and not flags.FLAGS.is_parsed():
    # grain 0.2.18 reads an absl flag in its workers (google/grain#1355, fixed in #1362).
    flags.FLAGS.mark_as_parsed()
  loader = grain.DataLoader(
    data_source=source,
    sampler=grain.samplers.SequentialSampler(len(source), grain.sharding.NoSharding()),
    operations=[_ToExample()],
    worker_count=worker_count,
    worker_buffer_size=worker_buffer_size,
    shard_options=grain.sharding.ShardOptions(proc, procs, drop_remainder=True),
    # Read-ahead comes from the worker processes; grain's reader threads only add overhead.
    read_options=grain.ReadOptions(num_threads=0, prefetch_buffer_size=0),
  )
  return iter(loader)
