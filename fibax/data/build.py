"""`prepare`: a corpus -> a data directory (tokenizer + uint16 token shards + manifest).

    out_dir/
      tokenizer.model, tokenizer.json   sentencepiece model; its parameters, sample and sha256
      shards/{split}-{item:05d}.bin     uint16 tokens, EOS after every document
      shards/{split}-{item:05d}.docs.npy  int64 document offsets
      shards/item-{item:05d}.json       the work item's completion marker
      manifest.json                     token counts per split, shard sha256s, tokenizer sha256

Two parallel passes over work items (groups of source units): a scan that reads every document
(so undecodable or empty input fails before anything is written) and draws the tokenizer
sample from the training split, then tokenization. Re-running skips finished items; a failed
run into a new directory removes it, and a failed resume keeps only complete items.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import multiprocessing
import os
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from fibax.data import shards as shards_lib
from fibax.data import tokenizer as tok
from fibax.data.files import (
  DataError,
  atomic_write_json,
  exit_with_parent,
  is_local,
  read_json,
  remove_stale_temporaries,
  remove_tree,
)
from fibax.data.sources import Source, make_source
from fibax.data.splits import SPLITS, SplitFractions, split_of

DEFAULT_SAMPLE_CHARS = 40_000_000
DEFAULT_CHARS_PER_ITEM = 4_000_000
SPLIT_RULE = "u = sha256(id)[:8] / 2**64; u < validation: validation; u >= 1 - test: test"


def _scan_item(
  source: Source, item: shards_lib.WorkItem, fractions: SplitFractions, rate: float
) -> tuple[list[str], dict[str, int]]:
  """Reads every document of `item`; returns its tokenizer-sample lines and docs per split."""
  lines: list[str] = []
  docs = dict.fromkeys(SPLITS, 0)
  for unit in item.units:
    for doc in source.read(unit):
      split = split_of(doc.id, fractions)
      docs[split] += 1
      if split == "train":
        lines += tok.sample_lines(doc, rate)
  return lines, docs


def _parallel_map(fn: Callable, calls: Sequence[tuple], workers: int, log, what: str) -> list:
  """fn(*call) for every call, in worker processes (spawned: the parent may hold JAX)."""
  start = time.perf_counter()
  results: list = [None] * len(calls)
  if workers <= 1 or len(calls) <= 1:
    for i, call in enumerate(calls):
      results[i] = fn(*call)
  else:
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(
      workers, mp_context=context, initializer=exit_with_parent
    ) as pool:
      futures = {pool.submit(fn, *call): i for i, call in enumerate(calls)}
      try:
        for done, future in enumerate(concurrent.futures.as_completed(futures), start=1):
          results[futures[future]] = future.result()
          if len(calls) >= 10 and done % (len(calls) // 10) == 0:
            log(f"  {what}: {done}/{len(calls)} items, {time.perf_counter() - start:.1f} s")
      except BaseException:
        pool.shutdown(wait=True, cancel_futures=True)
        raise
  log(f"{what}: {len(calls)} items in {time.perf_counter() - start:.1f} s on {workers} workers")
  return results


def _tokenizer_request(source: Source, fractions: SplitFractions, vocab_size, sample_chars):
  return {
    "source": source.describe(),
    "fractions": dataclasses.asdict(fractions),
    "vocab_size": vocab_size,
    "sample_chars": sample_chars,
  }


def _existing_tokenizer(out_dir: Path, request: dict | None, tokenizer_from: Path | None):
  """The sha256 of a usable tokenizer already in `out_dir`, or None if there is none."""
  info_path = out_dir / tok.INFO_FILE
  if not info_path.is_file():
    return None
  info = read_json(info_path)
  tok.load_tokenizer(out_dir)  # checks the model against tokenizer.json
  if tokenizer_from is not None:
    wanted = read_json(tokenizer_from / tok.INFO_FILE)["sha256"]
    if info["sha256"] != wanted:
      raise DataError(f"{info_path} differs from the tokenizer in {tokenizer_from}")
  elif (recorded := info.get("request") or {}) != request:
    diff = ", ".join(f"{k}={recorded.get(k)!r}" for k in request if recorded.get(k) != request[k])
    raise DataError(f"{info_path} was made with {diff}; use a fresh output directory")
  return info["sha256"]


def _build_manifest(out_dir, source, fractions, items, tokenizer_sha, vocab_size) -> dict:
  markers = [read_json(out_dir / item.marker) for item in items]
  splits = {}
  for split in SPLITS:
    outputs = [m["outputs"][split] for m in markers]
    entry = {
      "docs": sum(o["docs"] for o in outputs),
      "chars": sum(o["chars"] for o in outputs),
      "tokens": sum(o["tokens"] for o in outputs),
    }
    entry["chars_per_token"] = round(entry["chars"] / max(entry["tokens"], 1), 4)
    if split != "train":
      entry["doc_ids"] = [i for o in outputs for i in o["doc_ids"]]
    keys = ("file", "docs_file", "tokens", "docs", "sha256")
    entry["shards"] = [{k: o[k] for k in keys} for o in outputs]
    splits[split] = entry
  if splits["train"]["tokens"] == 0:
    raise DataError(f"no training documents in {source.describe()}")
  return {
    "format": shards_lib.FORMAT,
    "source": source.describe(),
    "fractions": dataclasses.asdict(fractions),
    "split_rule": SPLIT_RULE,
    "tokenizer": {
      "file": tok.MODEL_FILE,
      "sha256": tokenizer_sha,
      "vocab_size": vocab_size,
      "eos_id": tok.EOS_ID,
    },
    "dtype": "uint16",
    "layout": "each document's tokens followed by EOS, documents in source order",
    "splits": splits,
  }


def _copy_tokenizer(tokenizer_from: Path, out_dir: Path) -> str:
  tok.load_tokenizer(tokenizer_from)  # verifies it before copying
  for name in (tok.MODEL_FILE, tok.INFO_FILE):
    shutil.copyfile(tokenizer_from / name, out_dir / f".{name}.tmp")
  for name in (tok.MODEL_FILE, tok.INFO_FILE):
    os.replace(out_dir / f".{name}.tmp", out_dir / name)
  return read_json(out_dir / tok.INFO_FILE)["sha256"]


def _tokenizer_sample(source, units, items, fractions, sample_chars, workers, log) -> list[str]:
  """Scans every document (bad input fails here, before anything is written) and returns
  about `sample_chars` characters of training-split lines, spread over the whole split."""
  train_chars = sum(u.approx_chars for u in units) * (1 - fractions.validation - fractions.test)
  rate = min(1.0, sample_chars / max(train_chars, 1))
  calls = [(source, item, fractions, rate) for item in items]
  scans = _parallel_map(_scan_item, calls, workers, log, "scan")
  docs = {s: sum(d[s] for _, d in scans) for s in SPLITS}
  lines, chars = [], 0
  for item_lines, _ in scans:
    for line in item_lines:
      if chars >= sample_chars:
        break
      lines.append(line)
      chars += len(line)
  log(f"scan: documents {docs}; tokenizer sample {chars:,} chars ({len(lines):,} lines)")
  return lines


def prepare(
  source: str | Source,
  out_dir: str | os.PathLike,
  vocab_size: int | None = None,
  *,
  validation: float = 0.03,
  test: float = 0.03,
  tokenizer_from: str | os.PathLike | None = None,
  sample_chars: int = DEFAULT_SAMPLE_CHARS,
  chars_per_item: int = DEFAULT_CHARS_PER_ITEM,
  workers: int | None = None,
  shards: int | None = None,
  max_docs_per_shard: int | None = None,
  log: Callable[[str], None] = print,
) -> dict:
  """Prepares `source` ("sotu", "gutenberg", "fineweb-edu", a directory or a `Source`) into
  `out_dir`.

  Args:
    vocab_size: pieces of the sentencepiece model to train (32_768 in the paper; e.g. 2048 for
      the tiny config). Not needed with `tokenizer_from`.
    validation, test: fractions of documents held out (by a hash of the document id).
    tokenizer_from: a prepared data directory whose tokenizer to reuse (e.g. to tokenize sotu
      as an out-of-domain set for a model trained on Gutenberg).
    sample_chars: size of the tokenizer's training sample, in characters.
    workers: processes for both passes (default: all cores).
    shards, max_docs_per_shard: slice a Gutenberg, parquet or hub source (first shards or
      files / first documents of each).

  Returns:
    The manifest (also written to out_dir/manifest.json).

  Raises:
    DataError: `out_dir` is not a local path (gs://): prepare locally, then copy the directory.
  """
  if not is_local(out_dir):
    raise DataError(
      f"cannot prepare data into {os.fspath(out_dir)!r}: not a local path (prepare it into a "
      "local directory, then copy that there)"
    )
  if isinstance(source, str):
    source = make_source(source, shards=shards, max_docs_per_shard=max_docs_per_shard)
  if (vocab_size is None) == (tokenizer_from is None):
    raise ValueError(f"give exactly one of vocab_size={vocab_size} and {tokenizer_from=}")
  tokenizer_from = None if tokenizer_from is None else Path(tokenizer_from)
  fractions = SplitFractions(validation, test)
  workers = workers or os.cpu_count() or 1
  out_dir = Path(out_dir)
  units = source.units()
  items = shards_lib.group_units(units, chars_per_item)
  created = not out_dir.exists()
  out_dir.mkdir(parents=True, exist_ok=True)
  request = (
    None if tokenizer_from else _tokenizer_request(source, fractions, vocab_size, sample_chars)
  )
  start = time.perf_counter()
  try:
    remove_stale_temporaries(out_dir)
    tokenizer_sha = _existing_tokenizer(out_dir, request, tokenizer_from)
    if tokenizer_sha is None and tokenizer_from is not None:
      tokenizer_sha = _copy_tokenizer(tokenizer_from, out_dir)
    if tokenizer_sha is None:
      lines = _tokenizer_sample(source, units, items, fractions, sample_chars, workers, log)
      t0 = time.perf_counter()
      sample = {"limit_chars": sample_chars}
      info = tok.train_tokenizer(
        lines, out_dir, vocab_size, {"request": request, "sample": sample}, workers
      )
      tokenizer_sha = info["sha256"]
      log(f"tokenizer: {vocab_size} pieces in {time.perf_counter() - t0:.1f} s")
    pending = []
    for item in items:
      fields = shards_lib.marker_fields(item, fractions, tokenizer_sha)
      if not shards_lib.item_is_done(out_dir, item, fields):
        pending.append(item)
    log(f"tokenize: {len(items) - len(pending)} of {len(items)} items already done")
    calls = [(source, item, fractions, str(out_dir), tokenizer_sha) for item in pending]
    _parallel_map(shards_lib.write_item, calls, workers, log, "tokenize")
    actual_vocab = int(read_json(out_dir / tok.INFO_FILE)["vocab_size"])
    manifest = _build_manifest(out_dir, source, fractions, items, tokenizer_sha, actual_vocab)
    atomic_write_json(out_dir / shards_lib.MANIFEST, manifest)
  except BaseException:
    if created:
      remove_tree(out_dir)
    else:
      remove_stale_temporaries(out_dir)
    raise
  counts = ", ".join(f"{s} {manifest['splits'][s]['tokens']:,}" for s in SPLITS)
  log(f"prepared {out_dir}: tokens {counts} in {time.perf_counter() - start:.1f} s")
  return manifest
