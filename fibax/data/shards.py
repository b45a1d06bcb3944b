"""The on-disk token format: per work item and split, `shards/{split}-{item:05d}.bin` (raw
uint16 tokens, every document followed by EOS) and `.docs.npy` (int64 document offsets,
[D+1]); `shards/item-{item:05d}.json` marks the item complete; `manifest.json` lists every
shard with its token count and sha256, the token counts per split and the tokenizer's sha256.

Writing: `write_item` is run by worker processes. Files are written under temporary names and
renamed; the item's marker is written last, so an item without a marker is redone and a
re-run skips items whose marker matches. Reading: `SplitTokens` presents one split as a single
stream of tokens through memory maps (or, for a directory that is not local such as gs://, each
shard's bytes read whole through `etils.epath`), after checking the tokenizer and every shard.
"""

from __future__ import annotations

import dataclasses
import io
import os
from pathlib import Path

import numpy as np
from etils import epath

from fibax.data.files import (
  DataError,
  atomic_path,
  atomic_write_json,
  is_local,
  read_json,
  sha256_file,
  verify_sha256,
)
from fibax.data.sources import Source, Unit
from fibax.data.splits import SPLITS, SplitFractions, split_of
from fibax.data.tokenizer import EOS_ID, MODEL_FILE, load_tokenizer

SHARD_DIR = "shards"
MANIFEST = "manifest.json"
FORMAT = "fibax-tokens-v1"
TOKEN_DTYPE = np.uint16


@dataclasses.dataclass(frozen=True)
class WorkItem:
  index: int
  units: tuple[str, ...]

  @property
  def marker(self) -> str:
    return f"{SHARD_DIR}/item-{self.index:05d}.json"

  def files(self, split: str) -> tuple[str, str]:
    stem = f"{SHARD_DIR}/{split}-{self.index:05d}"
    return f"{stem}.bin", f"{stem}.docs.npy"


def group_units(units: list[Unit], chars_per_item: int) -> list[WorkItem]:
  """Consecutive units grouped into items of about `chars_per_item` characters (a unit is
  never split), so that the layout depends on the corpus only, not on the worker count."""
  groups: list[list[str]] = [[]]
  size = 0
  for unit in units:
    if groups[-1] and size + unit.approx_chars > chars_per_item:
      groups.append([])
      size = 0
    groups[-1].append(unit.name)
    size += unit.approx_chars
  return [WorkItem(i, tuple(g)) for i, g in enumerate(groups)]


def _marker_matches(out_dir: Path, item: WorkItem, marker: dict, expected: dict) -> bool:
  for key, value in expected.items():
    if marker.get(key) != value:
      raise DataError(
        f"{out_dir / item.marker} was written with another {key} ({marker.get(key)!r} != "
        f"{value!r}); use a fresh output directory"
      )
  for entry in marker["outputs"].values():
    path = out_dir / entry["file"]
    if not path.is_file() or path.stat().st_size != entry["tokens"] * TOKEN_DTYPE().itemsize:
      return False
    if not (out_dir / entry["docs_file"]).is_file():
      return False
  return True


def item_is_done(out_dir: Path, item: WorkItem, expected: dict) -> bool:
  path = out_dir / item.marker
  return path.is_file() and _marker_matches(out_dir, item, read_json(path), expected)


def marker_fields(item: WorkItem, fractions: SplitFractions, tokenizer_sha256: str) -> dict:
  return {
    "units": list(item.units),
    "fractions": dataclasses.asdict(fractions),
    "tokenizer_sha256": tokenizer_sha256,
  }


def write_item(
  source: Source, item: WorkItem, fractions: SplitFractions, out_dir: str, tokenizer_sha256: str
) -> dict:
  """Tokenizes the documents of `item` into one shard per split; returns the item's marker."""
  out_dir = Path(out_dir)
  sp = load_tokenizer(out_dir, tokenizer_sha256)
  tokens: dict[str, list[np.ndarray]] = {s: [] for s in SPLITS}
  chars = dict.fromkeys(SPLITS, 0)
  held_out_ids: dict[str, list[str]] = {s: [] for s in SPLITS if s != "train"}
  eos = np.array([EOS_ID], TOKEN_DTYPE)
  for unit in item.units:
    for doc in source.read(unit):
      split = split_of(doc.id, fractions)
      tokens[split] += [np.asarray(sp.encode(doc.text), TOKEN_DTYPE), eos]
      chars[split] += len(doc.text)
      if split in held_out_ids:
        held_out_ids[split].append(doc.id)
  outputs = {}
  for split in SPLITS:
    pieces = tokens[split]
    lengths = np.array([len(p) for p in pieces[0::2]], np.int64) + 1
    docs_N1 = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    bin_file, docs_file = item.files(split)
    with atomic_path(out_dir / bin_file) as tmp:
      np.concatenate(pieces or [np.zeros(0, TOKEN_DTYPE)]).tofile(tmp)
      sha = sha256_file(tmp)
    with atomic_path(out_dir / docs_file) as tmp, open(tmp, "wb") as f:
      np.save(f, docs_N1)
    outputs[split] = {
      "file": bin_file,
      "docs_file": docs_file,
      "tokens": int(docs_N1[-1]),
      "docs": len(lengths),
      "chars": chars[split],
      "sha256": sha,
    }
    if split in held_out_ids:
      outputs[split]["doc_ids"] = held_out_ids[split]
  marker = {**marker_fields(item, fractions, tokenizer_sha256), "outputs": outputs}
  atomic_write_json(out_dir / item.marker, marker)
  return marker


def load_manifest(data_dir: str | os.PathLike) -> dict:
  path = epath.Path(data_dir) / MANIFEST
  manifest = read_json(path)
  if manifest.get("format") != FORMAT:
    raise DataError(f"{path} is not a {FORMAT} manifest (format={manifest.get('format')!r})")
  return manifest


class SplitTokens:
  """One split of a prepared data directory as a single token stream.

  Opening checks that tokenizer.model matches the manifest, that every shard exists with the
  recorded size and (with `verify`) its sha256. `read` works across shard boundaries. The
  object pickles without its shards' tokens, so grain worker processes reopen them: memory maps
  of a local directory; for one that is not local (gs://), every shard read whole into memory.
  """

  def __init__(self, data_dir: str | os.PathLike, split: str, verify: bool = True):
    if split not in SPLITS:
      raise ValueError(f"unknown split={split!r}; expected one of {SPLITS}")
    self.data_dir = epath.Path(data_dir)
    self.split = split
    manifest = load_manifest(self.data_dir)
    self.manifest_path = self.data_dir / MANIFEST
    self.tokenizer_sha256 = manifest["tokenizer"]["sha256"]
    tokenizer_path = self.data_dir / MODEL_FILE
    if not tokenizer_path.is_file():
      raise DataError(f"missing file {tokenizer_path}")
    if (actual := sha256_file(tokenizer_path)) != self.tokenizer_sha256:
      raise DataError(
        f"{tokenizer_path} (sha256 {actual[:12]}) does not match the tokenizer of the shards "
        f"in {self.manifest_path} ({self.tokenizer_sha256[:12]})"
      )
    self.vocab_size = int(manifest["tokenizer"]["vocab_size"])
    self.shards = [s for s in manifest["splits"][split]["shards"] if s["tokens"] > 0]
    doc_bounds = [np.zeros(1, np.int64)]
    offset = 0
    for shard in self.shards:
      path = self.data_dir / shard["file"]
      if not path.is_file():
        raise DataError(f"missing shard {path} (listed in {self.manifest_path})")
      if (size := path.stat().length) != shard["tokens"] * TOKEN_DTYPE().itemsize:
        raise DataError(f"{path} has {size} bytes, expected {shard['tokens']} tokens")
      if verify:
        verify_sha256(path, shard["sha256"])
      docs_path = self.data_dir / shard["docs_file"]
      if not docs_path.is_file():
        raise DataError(f"missing file {docs_path} (listed in {self.manifest_path})")
      docs_N1 = np.load(io.BytesIO(docs_path.read_bytes()))
      if docs_N1[0] != 0 or docs_N1[-1] != shard["tokens"]:
        raise DataError(f"{docs_path} does not match {path}")
      doc_bounds.append(docs_N1[1:] + offset)
      offset += shard["tokens"]
    self.starts = np.array([0] + [s["tokens"] for s in self.shards], np.int64).cumsum()
    self.num_tokens = int(self.starts[-1])
    self.doc_bounds = np.concatenate(doc_bounds)
    self.fingerprint = f"{split}:{self.num_tokens}:{self.tokenizer_sha256[:16]}"
    self._tokens: list[np.ndarray] | None = None

  def __getstate__(self):
    return {**self.__dict__, "_tokens": None}

  def _shard_tokens(self) -> list[np.ndarray]:
    if self._tokens is None:
      paths = [self.data_dir / s["file"] for s in self.shards]
      if is_local(self.data_dir):
        self._tokens = [np.memmap(p, TOKEN_DTYPE, mode="r") for p in paths]
      else:  # no memory maps of an object store: the bytes, read once
        self._tokens = [np.frombuffer(p.read_bytes(), TOKEN_DTYPE) for p in paths]
    return self._tokens

  def read(self, start: int, length: int) -> np.ndarray:
    """Tokens [start, start + length) of the split as uint16[length]."""
    if start < 0 or start + length > self.num_tokens:
      raise IndexError(f"tokens [{start}, {start + length}) outside [0, {self.num_tokens})")
    arrays = self._shard_tokens()
    i = int(np.searchsorted(self.starts, start, side="right")) - 1
    local = start - int(self.starts[i])
    if local + length <= len(arrays[i]):
      return np.array(arrays[i][local : local + length])
    pieces = []
    while length > 0:
      piece = arrays[i][local : local + length]
      pieces.append(piece)
      length -= len(piece)
      i, local = i + 1, 0
    return np.concatenate(pieces)
