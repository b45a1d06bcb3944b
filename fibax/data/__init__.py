"""fibax.data: corpora -> sentencepiece tokenizer -> uint16 token shards -> grain batches.

    prepare(source, out_dir, vocab_size)        fibax.data.build     (also the CLI)
    train_iterator(data_dir, seq_len, batch_size, seed)   fibax.data.pipeline
    dataset_windows(data_dir, splits, seq_len, max_tokens)     fibax.data.evaluation

CLI: `python -m fibax.data prepare|info ...` (see `--help`).

Names are loaded lazily so that `prepare`'s worker processes do not import grain or JAX.
"""

import importlib

_EXPORTS = {
  "DataError": "fibax.data.files",
  "SPLITS": "fibax.data.splits",
  "make_source": "fibax.data.sources",
  "prepare": "fibax.data.build",
  "load_manifest": "fibax.data.shards",
  "SplitTokens": "fibax.data.shards",
  "load_tokenizer": "fibax.data.tokenizer",
  "train_iterator": "fibax.data.pipeline",
  "dataset_windows": "fibax.data.evaluation",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
  if name not in _EXPORTS:
    raise AttributeError(f"module 'fibax.data' has no attribute {name!r}")
  return getattr(importlib.import_module(_EXPORTS[name]), name)
