"""Every file in configs/ loads and gives a valid config."""

import dataclasses
import importlib.util
import pathlib

import pytest

from fibax.config import AttentionConfig, ModelConfig, RunConfig

CONFIGS = sorted(
  (pathlib.Path(__file__).parent.parent / "configs").glob("[!_]*.py")
)  # not __init__


def _load(path):
  spec = importlib.util.spec_from_file_location(path.stem, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_file_loads(path):
  assert isinstance(_load(path).get_config(), RunConfig)


def test_paper_matrix_is_complete():
  paper = _load(pathlib.Path(__file__).parent.parent / "configs" / "paper.py")
  names = set(paper.RUNS)
  main = {n for n in names if "seed" not in n and n != "dense"}
  assert len(main) == 21
  assert "dense" in names
  seeds = {n for n in names if "seed" in n}
  assert len(seeds) == 12  # the paper's nine, and dense at 43 and 44 and learned at 44
  assert {"dense_seed43", "dense_seed44", "fib_learned_w12_seed44"} <= seeds
  for name in names:
    cfg = paper.get_config(name)
    assert cfg.model.seq_len == 1024 and cfg.train.total_steps == 13_000
    scaled = paper.get_config(name, steps=paper.STEPS_100M)
    assert scaled.model == cfg.model and scaled.train.seed == cfg.train.seed
    assert scaled.train.total_steps * 32 * 1024 >= 100_000_000
    assert dataclasses.replace(scaled.train, total_steps=13_000, warmup_steps=300) == cfg.train
  assert paper.get_config("fib_coprime_w10").model.attention.window == 10
  assert paper.get_config("pow2_fixed_w8").model.attention.base == "pow2"
  assert paper.get_config("fib_stagger_w12_seed44").train.seed == 44
  with pytest.raises(ValueError, match="fib_zigzag"):
    paper.get_config("fib_zigzag")
  with pytest.raises(ValueError, match="steps=0"):
    paper.get_config("dense", steps=0)


def test_bad_model_config():
  with pytest.raises(ValueError, match="num_heads=6"):
    ModelConfig(num_heads=6, num_kv_heads=4)
  with pytest.raises(ValueError, match="window=1024"):
    ModelConfig(attention=AttentionConfig(window=1024))
  with pytest.raises(ValueError, match="zigzag"):
    AttentionConfig(schedule="zigzag")
  with pytest.raises(ValueError, match="fibo"):
    AttentionConfig(base="fibo")


def test_tiny_paper_keeps_each_runs_attention_at_a_small_scale():
  root = pathlib.Path(__file__).parent.parent / "configs"
  paper, tiny = _load(root / "paper.py"), _load(root / "tiny_paper.py")
  for name in ("dense", "fib_coprime_w8", "pow2_fixed_w8", "fib_stagger_w12_seed44"):
    small, full = tiny.get_config(name), paper.get_config(name)
    assert small.model.attention == full.model.attention and small.train.seed == full.train.seed
    assert small.model.num_layers == 8 and small.data_source == "sotu"
  # At 8 layers coprime reassignment (S = 3) is a different order from stagger, unlike 4 or 6.
  from fibax import patterns

  assert patterns.coprime_stride(8) == 3
  assert patterns.coprime_stride(4) == patterns.coprime_stride(6) == 1
  with pytest.raises(ValueError, match="fib_zigzag_w8"):
    tiny.get_config("fib_zigzag_w8")


def test_attention_impl_names_are_checked_when_the_config_is_built():
  from fibax import attention
  from fibax.config import DENSE_IMPLS, IMPLS

  assert set(IMPLS) | set(DENSE_IMPLS) <= set(attention.IMPLEMENTATIONS)
  with pytest.raises(ValueError, match="unknown impl='palas'"):
    AttentionConfig(impl="palas")
  with pytest.raises(ValueError, match="unknown dense_impl='pallas'"):
    AttentionConfig(dense_impl="pallas")
