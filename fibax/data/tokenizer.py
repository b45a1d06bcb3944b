"""The sentencepiece tokenizer: trained on a bounded sample of the training split, stored as
`tokenizer.model` beside the token shards with `tokenizer.json` (training parameters, sample
statistics and the model's sha256, which the shard manifest repeats).

Choices (the paper only fixes "sentencepiece, 32,768 pieces"):
  * BPE with byte fallback, so any text round-trips exactly and nothing maps to <unk>.
  * Identity normalisation, whitespace kept as is, no dummy prefix, "\\n" its own piece:
    `decode(encode(text)) == text` for every document (tests check it).
  * Digits split (as in LLaMA), so numbers do not eat the vocabulary.
  * The sample is a deterministic Bernoulli draw of lines (seeded by the document id) at the
    rate that gives about `sample_chars` characters, so it spans the whole training split.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import sentencepiece as spm
from etils import epath

from fibax.data.files import (
  DataError,
  atomic_write_bytes,
  atomic_write_json,
  read_json,
  sha256_bytes,
)
from fibax.data.sources import Document
from fibax.data.splits import unit_interval

MODEL_FILE = "tokenizer.model"
INFO_FILE = "tokenizer.json"
UNK_ID, BOS_ID, EOS_ID = 0, 1, 2
NEWLINE = "\n"
MAX_VOCAB = 1 << 16  # token shards are uint16
# Longer lines are cut for the sample only (sentencepiece skips sentences past its limit).
MAX_SAMPLE_LINE_CHARS = 4096

TRAINER_ARGS = dict(
  model_type="bpe",
  byte_fallback=True,
  character_coverage=0.9995,
  normalization_rule_name="identity",
  remove_extra_whitespaces=False,
  add_dummy_prefix=False,
  split_digits=True,
  allow_whitespace_only_pieces=True,
  user_defined_symbols=[NEWLINE],
  unk_id=UNK_ID,
  bos_id=BOS_ID,
  eos_id=EOS_ID,
  pad_id=-1,
  max_sentence_length=4 * MAX_SAMPLE_LINE_CHARS,
  input_sentence_size=0,  # the sample is already bounded (and deterministic)
  shuffle_input_sentence=False,
)


def sample_lines(doc: Document, rate: float) -> list[str]:
  """The lines of `doc` kept for the tokenizer sample: each with probability `rate`, decided
  by an RNG seeded from the document id (so workers agree without coordination)."""
  lines = [line for line in doc.text.split(NEWLINE) if line.strip()]
  if rate >= 1.0:
    keep = np.ones(len(lines), bool)
  else:
    rng = np.random.default_rng(int(unit_interval(doc.id) * 2**63))
    keep = rng.random(len(lines)) < rate
  return [lines[i][:MAX_SAMPLE_LINE_CHARS] for i in np.flatnonzero(keep)]


def train_tokenizer(
  lines: Iterable[str], out_dir: str | os.PathLike, vocab_size: int, info: dict, num_threads: int
) -> dict:
  """Trains on `lines`, writes tokenizer.model and tokenizer.json; returns the json dict."""
  if not 2 * 256 <= vocab_size <= MAX_VOCAB:
    raise ValueError(
      f"vocab_size={vocab_size} must be in [512, {MAX_VOCAB}] (byte fallback, uint16)"
    )
  lines = list(lines)
  if not lines:
    raise DataError("the tokenizer sample is empty: no training documents")
  writer = io.BytesIO()
  try:
    spm.SentencePieceTrainer.train(
      sentence_iterator=iter(lines),
      model_writer=writer,
      vocab_size=vocab_size,
      num_threads=max(num_threads, 1),
      minloglevel=2,
      **TRAINER_ARGS,
    )
  except RuntimeError as e:
    chars = sum(map(len, lines))
    msg = str(e).strip().splitlines()[-1]
    raise DataError(f"tokenizer training failed on a sample of {chars} chars: {msg}") from None
  model = writer.getvalue()
  out_dir = Path(out_dir)
  info = dict(info)
  info.update(
    vocab_size=vocab_size,
    trainer_args={k: v for k, v in TRAINER_ARGS.items()},
    sample={"lines": len(lines), "chars": sum(map(len, lines)), **info.get("sample", {})},
    sentencepiece_version=spm.__version__,
    sha256=sha256_bytes(model),
  )
  atomic_write_bytes(out_dir / MODEL_FILE, model)
  atomic_write_json(out_dir / INFO_FILE, info)
  return info


def load_tokenizer(data_dir: str | os.PathLike, expected_sha256: str | None = None):
  """Loads `data_dir/tokenizer.model`, checking its sha256 against tokenizer.json and, when
  given, `expected_sha256` (the shard manifest's). `data_dir` may be local or gs://."""
  data_dir = epath.Path(data_dir)
  path = data_dir / MODEL_FILE
  if not path.is_file():
    raise DataError(f"missing file {path}")
  model = path.read_bytes()
  actual = sha256_bytes(model)
  recorded = read_json(data_dir / INFO_FILE)["sha256"]
  for what, expected in (("tokenizer.json", recorded), ("the shard manifest", expected_sha256)):
    if expected is not None and actual != expected:
      raise DataError(f"{path} (sha256 {actual[:12]}) does not match {what} ({expected[:12]})")
  return spm.SentencePieceProcessor(model_proto=model)
