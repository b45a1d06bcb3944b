"""fibax.generate: ring-buffer decoding equals the full-sequence forward, step by step."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fibax import generate as G
from fibax import model as M
from fibax.config import AttentionConfig, ModelConfig


def _cfg(schedule="stagger", base="fib", num_terms=6, **att):
  # 6 Fibonacci terms (1 .. 13): rings of at most round(1.5 * 13) + 1 = 21 rows, so a
  # 300-token generation wraps every ring many times.
  return ModelConfig(
    vocab_size=61, d_model=32, num_layers=3, num_heads=4, num_kv_heads=2, head_dim=8,
    mlp_hidden=86, seq_len=32, compute_dtype="float32",
    attention=AttentionConfig(schedule=schedule, base=base, window=3, num_terms=num_terms, **att),
  )  # fmt: skip


def _params(cfg, seed=0):
  return M.Transformer(cfg).init(jax.random.key(seed), np.zeros((1, 8), np.int32))["params"]


def _full_logits(params, cfg, tokens):
  tokens_1xT = np.asarray([tokens], np.int32)
  return np.asarray(M.Transformer(cfg).apply({"params": params}, tokens_1xT))[0]


@pytest.mark.parametrize(
  ("schedule", "base", "cap_mode"),
  [("stagger", "fib", "run"), ("dense", "fib", "run"), ("stagger", "pow2", "train")],
)
def test_each_decoded_step_equals_the_full_forward(schedule, base, cap_mode):
  cfg = _cfg(schedule, base, cap_mode=cap_mode)
  params = _params(cfg)
  prompt = [5, 9, 1, 33, 7, 12, 40]
  out = G.generate(params, cfg, [prompt], 300, eos_id=-1, return_logits=True)
  new = out.tokens[0]
  assert len(new) == 300
  full = _full_logits(params, cfg, prompt + new)
  np.testing.assert_allclose(out.logits[0], full[len(prompt) - 1 : -1], atol=2e-4, rtol=2e-4)
  assert new == np.argmax(full[len(prompt) - 1 : -1], -1).tolist()  # greedy
  if schedule != "dense":  # rings of at most 25 rows (pow2 16 * 1.5 + 1) wrapped many times
    gen_cfg = G.generation_config(params, cfg)
    assert max(rows for rows, _ in G.cache_layout(gen_cfg, len(prompt) + 300)) <= 25


def test_every_decoded_step_writes_its_logits_in_the_models_logits_dtype():
  """model.logits_dtype='compute' under bf16: the prompt's last logits (the full forward) and
  every decoded step's are bf16 values read as float32, as the train step's loss sees them."""
  cfg = dataclasses.replace(_cfg(), compute_dtype="bfloat16", logits_dtype="compute")
  out = G.generate(_params(cfg), cfg, [[5, 9, 1, 33]], 12, eos_id=-1, return_logits=True)
  logits = np.asarray(out.logits[0])
  assert logits.shape == (12, cfg.vocab_size) and logits.dtype == np.float32
  np.testing.assert_array_equal(
    logits, np.asarray(jnp.asarray(logits).astype(jnp.bfloat16), np.float32)
  )
  f32 = dataclasses.replace(cfg, logits_dtype="float32")
  out32 = G.generate(_params(f32), f32, [[5, 9, 1, 33]], 12, eos_id=-1, return_logits=True)
  rounded = np.asarray(jnp.asarray(out32.logits[0]).astype(jnp.bfloat16), np.float32)
  assert not np.array_equal(np.asarray(out32.logits[0]), rounded)  # float32 logits: not rounded


def test_learned_runs_decode_frozen():
  cfg = _cfg("learned")
  thetas = iter([-1.5, 0.4, 2.0])  # alphas 0.68, 1.10, 1.38: a pattern other than fixed's
  params = jax.tree_util.tree_map_with_path(
    lambda path, x: x + next(thetas) if "theta" in jax.tree_util.keystr(path) else x,
    _params(cfg),
  )
  prompt = [3, 4, 5, 6]
  out = G.generate(params, cfg, [prompt], 40, eos_id=-1, return_logits=True)
  frozen = G.generation_config(params, cfg)
  assert [round(a, 2) for a in frozen.attention.frozen_alphas] == [0.68, 1.1, 1.38]
  full = _full_logits(params, frozen, prompt + out.tokens[0])
  np.testing.assert_allclose(out.logits[0], full[len(prompt) - 1 : -1], atol=2e-4, rtol=2e-4)


def test_batched_prompts_of_different_lengths_match_one_at_a_time():
  cfg = _cfg()
  params = _params(cfg, seed=1)
  prompts = [[7], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11], [30, 31, 32, 33, 34]]
  batched = G.generate(params, cfg, prompts, 50, eos_id=-1).tokens
  alone = [G.generate(params, cfg, [p], 50, eos_id=-1).tokens[0] for p in prompts]
  assert batched == alone


def test_rows_stop_at_eos_and_sampling_is_seeded():
  cfg = _cfg()
  params = _params(cfg, seed=2)
  greedy = G.generate(params, cfg, [[1, 2, 3]], 30, eos_id=-1).tokens[0]
  eos = greedy[4]  # the fifth greedy token, used as the end of sequence
  stopped = G.generate(params, cfg, [[1, 2, 3]], 30, eos_id=eos).tokens[0]
  assert stopped == greedy[: greedy.index(eos) + 1]
  a = G.generate(params, cfg, [[1, 2, 3]] * 2, 30, temperature=1.0, top_p=0.9, seed=7).tokens
  b = G.generate(params, cfg, [[1, 2, 3]] * 2, 30, temperature=1.0, top_p=0.9, seed=7).tokens
  assert a == b and a[0] != a[1]  # the same seed repeats; the rows draw independently
  top1 = G.generate(params, cfg, [[1, 2, 3]], 30, temperature=1.0, top_k=1, eos_id=-1).tokens
  assert top1[0] == greedy  # top-k = 1 is greedy


@pytest.mark.parametrize(
  ("prompts", "kwargs", "message"),
  [
    ([[]], {}, "at least one token"),
    ([[1]], {"max_new_tokens": 0}, "max_new_tokens=0"),
    ([[1]], {"top_p": 0.0}, "top_p=0.0"),
    ([[1, 99]], {}, r"prompt token ids must be in \[0, 61\)"),
  ],
)
def test_bad_input_is_a_clear_error(prompts, kwargs, message):
  cfg = _cfg()
  kwargs = {"max_new_tokens": 5, **kwargs}
  with pytest.raises(ValueError, match=message):
    G.generate(_params(cfg), cfg, prompts, **kwargs)


def test_pow2_patterns_are_built_at_the_training_length():
  cfg = _cfg("stagger", "pow2", num_terms=15)
  gen = G.generation_config(None, cfg)
  assert gen.attention.cap_mode == "train"
  layout = G.cache_layout(gen, 4096)
  assert max(rows for rows, _ in layout) <= round(1.5 * 16) + 1  # pow2 up to 31 at T = 32
  assert dataclasses.replace(gen, attention=cfg.attention) == cfg


def test_cli_streams_the_greedy_text_and_refuses_bad_input(tmp_path_factory, capsys):
  from train_helpers import reference_run

  from fibax.data.tokenizer import load_tokenizer
  from fibax.restore import load_run

  cfg, workdir, _ = reference_run(tmp_path_factory)
  args = ["--checkpoint", str(workdir), "--prompt", "Fellow citizens", "--max-new-tokens", "40"]
  assert G.main([*args, "--temperature", "0"]) == 0
  captured = capsys.readouterr()
  run = load_run(workdir)
  sp = load_tokenizer(cfg.data_dir)
  want = G.generate(run.params, run.cfg.model, [sp.encode("Fellow citizens")], 40).tokens[0]
  assert captured.out.rstrip("\n") == sp.decode(want)
  assert "tokens/s" in captured.err

  for bad, message in (
    (["--checkpoint", str(workdir / "nowhere"), "--prompt", "x"], "does not exist"),
    ([*args[:2], "--prompt", "  "], "--prompt is empty"),
    ([*args, "--max-new-tokens", "-3"], "--max-new-tokens=-3 must be >= 1"),
  ):
    assert G.main(bad) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err
