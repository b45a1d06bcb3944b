"""fibax.evaluate on a micro checkpoint: perplexity against an independent computation, the
windows, length multiples, freezing, and the memory check."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from etils import epath
from eval_helpers import SEQ_LEN, STEP, corpus_dir, micro_model, saved_run

from fibax import patterns, sharding
from fibax.data.evaluation import dataset_windows
from fibax.data.shards import SplitTokens
from fibax.evaluate import (
  InsufficientMemory,
  compile_forward,
  evaluate_run,
  freeze,
  load_run,
  resolve_dataset,
  run_data_dir,
)
from fibax.model import Transformer, layer_patterns
from fibax.steps import make_steps


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """A static (stagger) micro model: the mechanics, with cheap compiles."""
  return load_run(saved_run(tmp_path_factory, "stagger")[1])


@pytest.fixture(scope="module")
def learned_run(tmp_path_factory):
  return load_run(saved_run(tmp_path_factory, "learned")[1])


def _independent_windows(data_dir, seq_len: int, count: int) -> np.ndarray:
  """The first `count` windows of the validation split, listed document by document:
  window k of a document is its tokens [k L, k L + L + 1)."""
  tokens = SplitTokens(data_dir, "validation")
  out = []
  for begin, end in zip(tokens.doc_bounds[:-1], tokens.doc_bounds[1:], strict=True):
    out += [tokens.read(int(s), seq_len + 1) for s in range(begin, end - seq_len, seq_len)]
  return np.stack(out[:count]).astype(np.int32)


def _nll_numpy(cfg, params, windows_NxL1) -> np.ndarray:
  """Per-token NLL [N, L] in float64 from the model's logits."""
  logits = np.asarray(
    Transformer(cfg).apply({"params": params}, jnp.asarray(windows_NxL1[:, :-1])), np.float64
  )
  top = logits.max(-1, keepdims=True)
  lse = (top + np.log(np.exp(logits - top).sum(-1, keepdims=True)))[..., 0]
  target = np.take_along_axis(logits, windows_NxL1[:, 1:, None].astype(np.int64), -1)[..., 0]
  return lse - target


def test_load_run_restores_the_saved_parameters(tmp_path_factory, learned_run):
  run = learned_run
  cfg, workdir = saved_run(tmp_path_factory, "learned")
  assert run.step == STEP and run.cfg == cfg and run.label == workdir.name
  assert run.cfg.model.attention.schedule == "learned"
  saved = make_steps(cfg, sharding.make_mesh(1, 1)).init(cfg.train.seed).params
  jax.tree.map(np.testing.assert_array_equal, saved, run.params)


def test_ppl_is_exp_of_mean_nll_computed_independently(tmp_path_factory, run):
  data_dir = corpus_dir(tmp_path_factory)
  # 18 windows at batch 5: three full batches and one padded with weight-0 rows.
  kwargs = dict(length_mults=(1,), max_tokens=18 * SEQ_LEN + 7, batch_tokens=5 * SEQ_LEN)
  report = evaluate_run(run, **kwargs, log=print)
  again = evaluate_run(run, **kwargs, log=print)  # deterministic: the same windows, bit for bit
  assert again["results"][0]["nll"] == report["results"][0]["nll"]
  (row,) = report["results"]
  assert row["status"] == "ok" and row["batch_size"] == 5
  assert row["windows"] == 18 and row["tokens"] == 18 * SEQ_LEN

  windows = _independent_windows(data_dir, SEQ_LEN, 18)
  nll_NxL = _nll_numpy(run.cfg.model, run.params, windows)
  assert row["nll"] == pytest.approx(nll_NxL.mean(), rel=1e-5)
  assert row["ppl"] == pytest.approx(math.exp(nll_NxL.mean()), rel=1e-5)
  curve = report["positions"]["trained/validation/x1"]
  np.testing.assert_allclose(curve, nll_NxL.mean(0), rtol=1e-5)
  bins = nll_NxL.mean(0).reshape(8, SEQ_LEN // 8).mean(1)
  np.testing.assert_allclose(row["bins"], bins, rtol=1e-5)


def test_windows_are_non_overlapping_in_order_and_deterministic(tmp_path_factory, run):
  data_dir = corpus_dir(tmp_path_factory)
  seq_len = 4 * SEQ_LEN
  first = dataset_windows(data_dir, ("validation",), seq_len, max_tokens=40 * seq_len)
  again = dataset_windows(data_dir, ("validation",), seq_len, max_tokens=40 * seq_len)
  np.testing.assert_array_equal(first, again)
  np.testing.assert_array_equal(first, _independent_windows(data_dir, seq_len, 40))
  # Within a document each window starts on the last token of the previous one, so every
  # target is scored once.
  tokens = SplitTokens(data_dir, "validation")
  doc_len = int(tokens.doc_bounds[1] - tokens.doc_bounds[0])
  per_doc = min((doc_len - 1) // seq_len, len(first))
  np.testing.assert_array_equal(first[1:per_doc, 0], first[: per_doc - 1, -1])


@pytest.mark.parametrize("as_path", [str, epath.Path])
def test_checkpoint_and_data_paths_as_strings_or_epath_paths(tmp_path_factory, run, as_path):
  cfg, workdir = saved_run(tmp_path_factory, "stagger")
  again = load_run(as_path(str(workdir)))
  assert (again.step, again.label, again.checkpoint_dir) == (STEP, run.label, run.checkpoint_dir)
  jax.tree.map(np.testing.assert_array_equal, again.params, run.params)
  data_dir = run_data_dir(cfg, as_path(str(corpus_dir(tmp_path_factory))))
  assert isinstance(data_dir, epath.Path)
  windows = dataset_windows(data_dir, ("validation",), SEQ_LEN, max_tokens=5 * SEQ_LEN)
  np.testing.assert_array_equal(windows, _independent_windows(data_dir, SEQ_LEN, 5))


def test_length_mult_sets_the_window_length(run):
  report = evaluate_run(run, length_mults=(1, 4), max_tokens=512, batch_tokens=256, log=print)
  by_mult = {r["length_mult"]: r for r in report["results"]}
  assert by_mult[1]["seq_len"] == SEQ_LEN and by_mult[4]["seq_len"] == 4 * SEQ_LEN
  assert by_mult[1]["windows"] == 512 // SEQ_LEN and by_mult[4]["windows"] == 512 // (4 * SEQ_LEN)
  assert len(report["positions"]["trained/validation/x4"]) == 4 * SEQ_LEN
  assert all(len(r["bins"]) == 8 for r in report["results"])


@pytest.mark.parametrize("cap_mode", ["run", "train"])
def test_frozen_learned_at_alpha_one_equals_the_fixed_model(learned_run, cap_mode):
  run = learned_run
  att = dataclasses.replace(run.cfg.model.attention, cap_mode=cap_mode)
  learned = dataclasses.replace(run.cfg.model, attention=att)
  frozen = freeze(run.params, learned)
  assert frozen.attention.frozen_alphas == (1.0, 1.0)  # theta = 0 at initialisation
  fixed = dataclasses.replace(learned, attention=dataclasses.replace(att, schedule="fixed"))
  tokens = jax.random.randint(jax.random.key(0), (2, 4 * SEQ_LEN), 0, 512)
  models = [("frozen", frozen), ("fixed", fixed)] + [("learned", learned)] * (cap_mode == "run")
  out = {
    name: np.asarray(jax.jit(Transformer(cfg).apply)({"params": run.params}, tokens))
    for name, cfg in models
  }
  np.testing.assert_array_equal(out["frozen"], out["fixed"])
  if cap_mode == "run":
    # At alpha = 1 every rung is integral, so the dynamic path agrees up to float rounding.
    np.testing.assert_allclose(out["learned"], out["fixed"], atol=2e-5)


def test_freeze_rounds_each_layers_alpha_into_its_pattern(learned_run):
  run = learned_run
  params = jax.tree.map(lambda x: x, run.params)
  params["layer_0"]["attn"]["theta"] = jnp.asarray(np.log(0.3 / 0.7), jnp.float32)  # alpha 0.8
  frozen = freeze(params, run.cfg)  # a RunConfig in, a RunConfig out
  alphas = frozen.model.attention.frozen_alphas
  assert alphas[0] == pytest.approx(0.8, abs=1e-6) and alphas[1] == 1.0
  seq_len = 4 * SEQ_LEN
  built = layer_patterns(frozen.model, seq_len)
  learned = patterns.LearnedPattern.build(
    base="fib", window=4, seq_len=seq_len, train_len=SEQ_LEN, cap_mode="run"
  )
  assert built == tuple(learned.freeze(a) for a in alphas)
  assert built[0].far != built[1].far
  with pytest.raises(ValueError, match="freeze needs a learned schedule"):
    freeze(params, frozen)
  with pytest.raises(ValueError, match="schedule='stagger'"):
    freeze(params, micro_model("stagger"))


def test_memory_refusal_before_running(run):
  report = evaluate_run(
    run, length_mults=(2,), max_tokens=256, batch_tokens=64, free_bytes=64 << 10, log=print
  )
  for row in report["results"]:
    assert row["status"].startswith("refused: stagger sparse model at seq_len=64 needs ~")
    assert "free" in row["status"] and "ppl" not in row
  assert report["positions"] == {}


def test_dense_model_refused_where_sparse_fits(run):
  dense, sparse = micro_model("dense"), micro_model("stagger")  # the same parameters
  seq_len, free = 64 * SEQ_LEN, 64 << 20  # 2048 tokens; 64 MiB
  with pytest.raises(InsufficientMemory, match=r"dense model at seq_len=2048 needs > 0\.06 GiB"):
    compile_forward(dense, run.params, seq_len, 1, free)
  _, batch, need = compile_forward(sparse, run.params, seq_len, 1, free)
  assert batch == 1 and need < free


def test_batch_is_lowered_until_it_fits(run):
  cfg, params = run.cfg.model, run.params
  _, _, need_1 = compile_forward(cfg, params, 4 * SEQ_LEN, 1, 1 << 40)
  _, batch, need = compile_forward(cfg, params, 4 * SEQ_LEN, 16, int(3.5 * need_1 / 0.9))
  assert 1 < batch < 16 and need <= 3.5 * need_1


def test_datasets_resolve_to_directories_and_splits(tmp_path_factory, tmp_path, monkeypatch):
  data_dir = corpus_dir(tmp_path_factory)
  assert resolve_dataset("validation", data_dir) == (data_dir, ("validation",))
  calls = []

  def fake_prepare(source, out_dir, **kwargs):
    calls.append((source, kwargs["tokenizer_from"]))
    out_dir.mkdir(parents=True)
    (out_dir / "manifest.json").write_text("{}")

  monkeypatch.setattr("fibax.data.build.prepare", fake_prepare)
  local = tmp_path / "data"
  local.mkdir()
  manifest = (data_dir / "manifest.json").read_text()
  (local / "manifest.json").write_text(manifest)
  sotu_dir, splits = resolve_dataset("sotu", local, log=print)
  assert calls == [("sotu", local)] and sotu_dir.parent == local.parent
  assert splits == ("validation", "test", "train")
  (local / "manifest.json").write_text(manifest.replace('"kind": "directory"', '"kind": "sotu"'))
  assert resolve_dataset("sotu", local) == (local, ("validation", "test"))
  with pytest.raises(ValueError, match="unknown dataset='wiki'"):
    resolve_dataset("wiki", local)
