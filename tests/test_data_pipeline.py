"""prepare -> shards -> training iterator / eval reader / staging, on the sotu corpus."""

import os
import re
import shutil

import grain
import numpy as np
import pytest
from etils import epath

from experiments.stage import stage, unstage
from fibax.data import evaluation, pipeline, shards
from fibax.data.build import prepare
from fibax.data.files import DataError, read_json, sha256_file
from fibax.data.shards import SplitTokens, load_manifest
from fibax.data.sources import SotuSource
from fibax.data.tokenizer import EOS_ID, load_tokenizer

VOCAB = 512
quiet = lambda _: None


@pytest.fixture(scope="module")
def sotu_dir(tmp_path_factory):
  out = tmp_path_factory.mktemp("data") / "sotu"
  prepare("sotu", out, VOCAB, sample_chars=2_000_000, workers=2, log=quiet)
  return out


def _files(directory):
  return {p.relative_to(directory).as_posix(): sha256_file(p) for p in directory.rglob("*.*")}


def test_manifest_counts_and_whole_held_out_documents(sotu_dir):
  manifest = load_manifest(sotu_dir)
  splits = manifest["splits"]
  assert sum(s["docs"] for s in splits.values()) == 249
  assert splits["validation"]["docs"] > 0 and splits["train"]["tokens"] > 3_000_000
  assert manifest["tokenizer"]["vocab_size"] == VOCAB
  sp = load_tokenizer(sotu_dir, manifest["tokenizer"]["sha256"])
  speeches = SotuSource().directory
  for split in ("validation", "test"):
    tokens = SplitTokens(sotu_dir, split)
    assert tokens.num_tokens == splits[split]["tokens"]
    assert len(tokens.doc_bounds) == splits[split]["docs"] + 1
    # Every held-out speech is stored whole, ends with EOS and decodes to its exact text.
    for i, doc_id in enumerate(splits[split]["doc_ids"]):
      begin, end = tokens.doc_bounds[i], tokens.doc_bounds[i + 1]
      ids = tokens.read(int(begin), int(end - begin))
      assert ids[-1] == EOS_ID and EOS_ID not in ids[:-1]
      assert sp.decode(ids[:-1].tolist()) == (speeches / f"{doc_id}.txt").read_text()


def test_rerun_skips_and_interrupted_item_is_redone(sotu_dir, tmp_path):
  data = tmp_path / "copy"
  shutil.copytree(sotu_dir, data)
  before = _files(data)
  logs = []
  prepare("sotu", data, VOCAB, sample_chars=2_000_000, workers=1, log=logs.append)
  assert any("4 of 4 items already done" in line for line in logs)
  assert _files(data) == before
  # An interrupted run: a shard cut short, its marker never written, a temporary left over.
  (data / "shards/item-00002.json").unlink()
  with open(data / "shards/train-00002.bin", "r+b") as f:
    f.truncate(1000)
  (data / "shards/.train-00002.bin.abc.tmp").write_bytes(b"partial")
  logs.clear()
  prepare("sotu", data, VOCAB, sample_chars=2_000_000, workers=1, log=logs.append)
  assert any("3 of 4 items already done" in line for line in logs)
  assert _files(data) == before


def test_prepare_writes_local_directories_only(tmp_path):
  with pytest.raises(DataError, match=r"^cannot prepare data into 'gs://bucket/sotu': not a local"):
    prepare("sotu", "gs://bucket/sotu", VOCAB, workers=1, log=quiet)
  with pytest.raises(DataError, match=r"into 'gs://bucket/sotu'"):
    prepare("sotu", epath.Path("gs://bucket/sotu"), VOCAB, workers=1, log=quiet)


def test_changed_request_is_refused(sotu_dir):
  with pytest.raises(DataError, match=r"tokenizer\.json was made with vocab_size=512"):
    prepare("sotu", sotu_dir, 1024, sample_chars=2_000_000, workers=1, log=quiet)


def test_vocab_larger_than_the_corpus_allows_leaves_nothing(tmp_path):
  corpus = tmp_path / "tiny"
  corpus.mkdir()
  (corpus / "one.txt").write_text("Only a few words here.")
  with pytest.raises(DataError, match="tokenizer training failed"):
    prepare(str(corpus), tmp_path / "out", 4096, validation=0, test=0, workers=1, log=quiet)
  assert not (tmp_path / "out").exists()


def _train(data_dir, seq_len, batch_size, seed, **kwargs):
  """A single-process iterator read in this process, unless kwargs say otherwise."""
  kwargs = {"worker_count": 0, "shard_index": 0, "shard_count": 1, **kwargs}
  return pipeline.train_iterator(data_dir, seq_len, batch_size, seed, **kwargs)


def _take(it, n):
  return [next(it) for _ in range(n)]


def _same(batches_a, batches_b):
  return all(
    (a["inputs"] == b["inputs"]).all() and (a["targets"] == b["targets"]).all()
    for a, b in zip(batches_a, batches_b, strict=True)
  )


def test_train_batches(sotu_dir):
  it = _train(sotu_dir, 64, 8, seed=1)
  batches = _take(it, 3)
  for batch in batches:
    assert batch["inputs"].shape == batch["targets"].shape == (8, 64)
    assert batch["inputs"].dtype == np.int32
    assert (batch["inputs"][:, 1:] == batch["targets"][:, :-1]).all()
    assert batch["inputs"].max() < VOCAB
  again = _train(sotu_dir, 64, 8, seed=1)
  other = _train(sotu_dir, 64, 8, seed=2)
  assert _same(batches, _take(again, 3))
  assert not _same(batches, _take(other, 3))


@pytest.mark.parametrize("worker_count", [0, 1])
def test_resume_continues_with_the_next_unseen_batch(sotu_dir, worker_count):
  it = _train(sotu_dir, 32, 4, seed=3, worker_count=worker_count)
  _take(it, 5)
  state = it.get_state()
  assert isinstance(state, bytes)
  expected = _take(it, 4)
  resumed = _train(sotu_dir, 32, 4, seed=3, worker_count=worker_count)
  resumed.set_state(state)
  assert _same(_take(resumed, 4), expected)


def test_orbax_checkpoint_round_trip(sotu_dir, tmp_path):
  ocp = pytest.importorskip("orbax.checkpoint")
  it = _train(sotu_dir, 32, 4, seed=4)
  _take(it, 2)
  manager = ocp.CheckpointManager(tmp_path / "ckpt")
  params = {"w": np.arange(3.0)}
  save = ocp.args.Composite(
    params=ocp.args.StandardSave(params), data=grain.checkpoint.CheckpointSave(it)
  )
  manager.save(2, args=save)
  manager.wait_until_finished()
  expected = _take(it, 3)
  resumed = _train(sotu_dir, 32, 4, seed=4)
  restore = ocp.args.Composite(
    params=ocp.args.StandardRestore(params), data=grain.checkpoint.CheckpointRestore(resumed)
  )
  manager.restore(2, args=restore)
  assert _same(_take(resumed, 3), expected)


def test_processes_split_each_global_batch(sotu_dir):
  single = _train(sotu_dir, 32, 8, seed=5)
  parts = [_train(sotu_dir, 32, 8, seed=5, shard_index=p, shard_count=2) for p in range(2)]
  for _ in range(3):
    whole = next(single)["inputs"]
    halves = [next(part)["inputs"] for part in parts]
    assert halves[0].shape == (4, 32)
    assert (np.concatenate(halves) == whole).all()
  with pytest.raises(ValueError, match="not divisible by 3"):
    _train(sotu_dir, 32, 8, seed=5, shard_count=3)


def test_one_epoch_is_every_window_once(sotu_dir):
  seq_len, batch = 256, 16
  it = _train(sotu_dir, seq_len, batch, seed=6, num_epochs=1)
  rows = np.concatenate([b["inputs"] for b in it])
  tokens = SplitTokens(sotu_dir, "train")
  num_windows = (tokens.num_tokens - 1) // seq_len
  assert len(rows) == num_windows // batch * batch
  every = {tokens.read(w * seq_len, seq_len).tobytes() for w in range(num_windows)}
  seen = [row.astype(np.uint16).tobytes() for row in rows]
  assert len(set(seen)) == len(seen) and set(seen) <= every


@pytest.mark.parametrize("as_path", [str, epath.Path])
def test_a_data_dir_that_is_not_local_is_read_whole_with_the_same_tokens(
  sotu_dir, tmp_path, monkeypatch, as_path
):
  """The reader of a gs:// directory (each shard's bytes read through epath, not memory-mapped),
  forced on the local directory given as a string or an epath.Path: the same tokens, the same
  batches and the same checksum check."""
  mapped = SplitTokens(sotu_dir, "train")
  assert all(isinstance(a, np.memmap) for a in mapped._shard_tokens())
  expected = _take(_train(sotu_dir, 64, 8, seed=1), 3)
  monkeypatch.setattr(shards, "is_local", lambda _: False)
  tokens = SplitTokens(as_path(str(sotu_dir)), "train")
  assert isinstance(tokens.data_dir, epath.Path) and len(tokens.shards) > 1
  assert not any(isinstance(a, np.memmap) for a in tokens._shard_tokens())
  boundary = int(tokens.starts[1])
  for start, length in [(0, 100), (boundary - 5, 10), (tokens.num_tokens - 7, 7)]:
    assert (tokens.read(start, length) == mapped.read(start, length)).all()
  assert (tokens.read(0, tokens.num_tokens) == mapped.read(0, mapped.num_tokens)).all()
  assert _same(_take(_train(as_path(str(sotu_dir)), 64, 8, seed=1), 3), expected)
  data = tmp_path / "copy"
  shutil.copytree(sotu_dir, data)
  shard = data / tokens.shards[1]["file"]
  raw = bytearray(shard.read_bytes())
  raw[10] ^= 1
  shard.write_bytes(bytes(raw))
  with pytest.raises(DataError, match=f"bad checksum for .*{re.escape(shard.name)}"):
    SplitTokens(as_path(str(data)), "train")


def test_corpus_smaller_than_a_window(sotu_dir):
  with pytest.raises(DataError, match=r"manifest\.json: split 'test' has \d+ tokens"):
    _train(sotu_dir, 1 << 20, 1, seed=0, split="test")
  with pytest.raises(DataError, match=r"manifest\.json: no window of seq_len \+ 1"):
    evaluation.window_starts(SplitTokens(sotu_dir, "test"), 1 << 20)
  assert evaluation.dataset_windows(sotu_dir, ("test",), 1 << 20, 1 << 21).shape == (0, 2**20 + 1)


def test_eval_windows_are_disjoint_in_documents_and_a_prefix(sotu_dir):
  tokens = SplitTokens(sotu_dir, "validation")
  seq_len = 1000
  windows = evaluation.dataset_windows(sotu_dir, ("validation",), seq_len, 1 << 30)
  starts = evaluation.window_starts(tokens, seq_len)
  assert windows.shape == (len(starts), seq_len + 1) and windows.dtype == np.int32
  ends = tokens.doc_bounds[np.searchsorted(tokens.doc_bounds, starts, side="right")]
  assert (starts + seq_len + 1 <= ends).all()  # never crosses into the next document
  assert (np.diff(starts) >= seq_len).all()  # targets never overlap
  for window, start in zip(windows, starts, strict=True):
    assert (window == tokens.read(int(start), seq_len + 1)).all()
  first = evaluation.dataset_windows(sotu_dir, ("validation",), seq_len, 5 * seq_len + 7)
  assert (first == windows[:5]).all()
  # Over two splits: the first split's windows, then the next split's, up to max_tokens.
  both = evaluation.dataset_windows(sotu_dir, ("validation", "test"), 100, 1 << 30)
  alone = evaluation.dataset_windows(sotu_dir, ("validation",), 100, 1 << 30)
  assert len(both) > len(alone) and (both[: len(alone)] == alone).all()


def test_stage_round_trip_and_bad_part(sotu_dir, tmp_path):
  index = stage(sotu_dir, tmp_path / "staged", splits=("train", "validation"), part_bytes=1 << 20)
  parts = read_json(index)["parts"]
  assert len(parts) > 3 and all(p["bytes"] <= 1 << 20 for p in parts)
  restored = unstage(tmp_path / "staged", tmp_path / "restored")
  original = {k: v for k, v in _files(sotu_dir).items() if not k.startswith("shards/test-")}
  original = {k: v for k, v in original.items() if not k.startswith("shards/item-")}
  assert _files(restored) == original
  assert _same(_take(_train(sotu_dir, 64, 4, 7), 2), _take(_train(restored, 64, 4, 7), 2))
  # The test split was not staged: reading it names the missing shard.
  with pytest.raises(DataError, match=r"missing shard .*test-\d+\.bin"):
    SplitTokens(restored, "test")
  # One flipped byte in one part: refused, naming the part, and nothing is written.
  damaged = tmp_path / "staged" / parts[1]["file"]
  data = bytearray(damaged.read_bytes())
  data[100] ^= 1
  damaged.write_bytes(bytes(data))
  with pytest.raises(DataError, match=r"bad checksum for .*part-00001\.bin"):
    unstage(tmp_path / "staged", tmp_path / "again")
  assert not (tmp_path / "again").exists()
  assert not [p for p in tmp_path.iterdir() if p.name.startswith(".again")]


def test_damaged_data_directory_is_refused(sotu_dir, tmp_path):
  data = tmp_path / "copy"
  shutil.copytree(sotu_dir, data)
  shard = data / "shards/validation-00001.bin"
  raw = bytearray(shard.read_bytes())
  raw[10] ^= 1
  shard.write_bytes(bytes(raw))
  with pytest.raises(DataError, match=r"bad checksum for .*validation-00001\.bin"):
    SplitTokens(data, "validation")
  SplitTokens(data, "validation", verify=False)  # sizes still match: opens unverified
  os.remove(shard)
  with pytest.raises(DataError, match=r"missing shard .*validation-00001\.bin"):
    SplitTokens(data, "validation", verify=False)
  # A tokenizer that is not the one the shards were made with.
  other = tmp_path / "other"
  prepare(str(_tiny_corpus(tmp_path)), other, 512, validation=0, test=0, workers=1, log=quiet)
  shutil.copyfile(other / "tokenizer.model", data / "tokenizer.model")
  with pytest.raises(DataError, match=r"tokenizer\.model .* does not match the tokenizer of"):
    SplitTokens(data, "train")


def _tiny_corpus(tmp_path):
  corpus = tmp_path / "tiny"
  corpus.mkdir()
  text = (SotuSource().directory / "1790-Washington-1.txt").read_text()
  for i in range(4):
    (corpus / f"{i}.txt").write_text(text[i * 1000 :] * 3)
  return corpus


def test_gutenberg_slice_with_the_sotu_tokenizer(gutenberg_corpus, sotu_dir, tmp_path):
  manifest = prepare(
    "gutenberg",
    tmp_path / "gutenberg",
    tokenizer_from=sotu_dir,
    shards=1,
    max_docs_per_shard=3,
    validation=0.3,
    test=0.3,
    workers=1,
    log=quiet,
  )
  assert manifest["tokenizer"]["sha256"] == load_manifest(sotu_dir)["tokenizer"]["sha256"]
  assert sum(s["docs"] for s in manifest["splits"].values()) == 3
  for split, entry in manifest["splits"].items():
    if entry["docs"]:
      windows = evaluation.dataset_windows(tmp_path / "gutenberg", (split,), 2048, 8192)
      assert windows.shape == (4, 2049)
