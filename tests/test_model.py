"""The Flax model of the paper."""

import dataclasses

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn

from fibax import attention
from fibax import model as M
from fibax.config import AttentionConfig, ModelConfig, RunConfig
from fibax.config_loader import apply_overrides
from kernels_pallas.gpu import GpuBlocks


def _small(schedule="stagger", impl="xla", **kw):
  return ModelConfig(
    vocab_size=97,
    d_model=32,
    num_layers=3,
    num_heads=4,
    num_kv_heads=2,
    head_dim=8,
    mlp_hidden=M_hidden(32),
    seq_len=48,
    compute_dtype="float32",
    attention=AttentionConfig(schedule=schedule, window=4, impl=impl, dense_impl="xla_dense"),
    **kw,
  )


def M_hidden(d):
  from fibax.config import mlp_hidden_for

  return mlp_hidden_for(d)


def test_paper_parameter_count():
  cfg = ModelConfig()
  assert cfg.mlp_hidden == 1366
  shapes = jax.eval_shape(
    lambda: M.Transformer(cfg).init(jax.random.key(0), jnp.zeros((1, 1024), jnp.int32))
  )
  total, non_embed = M.count_params(shapes["params"])
  assert total == 60_850_688 and round(total / 1e6, 1) == 60.9
  assert non_embed == 44_073_472 and round(non_embed / 1e6, 1) == 44.1


def test_init_statistics_and_no_biases():
  cfg = dataclasses.replace(
    _small(), d_model=256, mlp_hidden=M_hidden(256), num_heads=8, head_dim=32
  )
  params = nn.meta.unbox(
    M.Transformer(cfg).init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]
  )
  flat = {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_leaves_with_path(params)}
  assert not any("bias" in k for k in flat)
  std = 256**-0.5
  assert np.std(flat["['layer_0']['mlp']['up']['kernel']"]) == pytest.approx(std, rel=0.05)
  assert np.std(flat["['embed']['embedding']"]) == pytest.approx(std, rel=0.05)
  resid = std / np.sqrt(2 * cfg.num_layers)
  assert np.std(flat["['layer_0']['mlp']['down']['kernel']"]) == pytest.approx(resid, rel=0.05)
  assert np.std(flat["['layer_0']['attn']['out']['kernel']"]) == pytest.approx(resid, rel=0.05)
  assert np.all(flat["['layer_0']['attn_norm']['scale']"] == 1.0)


def test_layers_get_their_schedule_patterns():
  cfg = ModelConfig(attention=AttentionConfig(schedule="coprime", window=12))
  pats = M.layer_patterns(cfg, 1024)
  assert pats[1].far[-1] == round((0.5 + 7 / 15) * 987)
  longer = M.layer_patterns(cfg, 2048)
  frozen = M.layer_patterns(
    dataclasses.replace(cfg, attention=dataclasses.replace(cfg.attention, cap_mode="train")), 2048
  )
  assert frozen == pats and longer != pats


@pytest.mark.parametrize("schedule", ["stagger", "learned", "dense"])
def test_forward_at_training_and_longer_length(schedule):
  cfg = _small(schedule)
  m = M.Transformer(cfg)
  tokens = jax.random.randint(jax.random.key(1), (2, 48), 0, 97)
  params = m.init(jax.random.key(0), tokens)["params"]
  logits = m.apply({"params": params}, tokens)
  assert logits.shape == (2, 48, 97) and logits.dtype == jnp.float32
  assert np.all(np.isfinite(logits))
  long = jax.random.randint(jax.random.key(2), (1, 4 * 48), 0, 97)
  assert m.apply({"params": params}, long).shape == (1, 192, 97)


def test_xla_and_reference_models_agree_and_are_causal():
  cfg = _small("stagger", impl="xla")
  tokens = jax.random.randint(jax.random.key(1), (2, 48), 0, 97)
  params = M.Transformer(cfg).init(jax.random.key(0), tokens)["params"]
  ref_cfg = dataclasses.replace(cfg, attention=dataclasses.replace(cfg.attention, impl="reference"))
  a = M.Transformer(cfg).apply({"params": params}, tokens)
  b = M.Transformer(ref_cfg).apply({"params": params}, tokens)
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-4, rtol=1e-4)
  changed = tokens.at[:, 30:].set((tokens[:, 30:] + 1) % 97)
  c = M.Transformer(cfg).apply({"params": params}, changed)
  np.testing.assert_array_equal(np.asarray(a[:, :30]), np.asarray(c[:, :30]))
  assert not np.allclose(np.asarray(a[:, 30:]), np.asarray(c[:, 30:]))


def test_learned_alphas_start_at_one_and_bf16_compute():
  cfg = dataclasses.replace(_small("learned"), compute_dtype="bfloat16")
  tokens = jnp.zeros((1, 16), jnp.int32)
  params = M.Transformer(cfg).init(jax.random.key(0), tokens)["params"]
  assert M.learned_alphas(params, cfg) == (1.0, 1.0, 1.0)
  leaves = jax.tree_util.tree_leaves(nn.meta.unbox(params))
  assert all(x.dtype == jnp.float32 for x in leaves)
  assert M.Transformer(cfg).apply({"params": params}, tokens).dtype == jnp.float32


@pytest.mark.parametrize("schedule", ["stagger", "learned"])
@pytest.mark.parametrize(
  "impl",
  [
    pytest.param("pallas", marks=pytest.mark.gpu),
    pytest.param("pallas_packed", marks=pytest.mark.gpu),
    "pallas_interpret",
    "pallas_packed_interpret",
  ],
)
def test_pallas_model_step_matches_xla(impl, schedule):
  """Loss and every parameter gradient of a training step (the learned alphas too): pallas ==
  xla. A learned layer runs its window through the kernel under a Pallas impl."""
  on_gpu = impl in ("pallas", "pallas_packed")
  # The GPU kernels' dots take head_dim >= 16 (the small model's is 8; the interpreters take it).
  head_dim = 16 if on_gpu else 8
  cfg = dataclasses.replace(
    _small(schedule, impl="xla"), num_layers=2, seq_len=40, head_dim=head_dim
  )
  tokens = jax.random.randint(jax.random.key(1), (2, 41), 0, 97)
  params = M.Transformer(cfg).init(jax.random.key(0), tokens[:, :-1])["params"]

  def loss(params, cfg):
    logits = M.Transformer(cfg).apply({"params": params}, tokens[:, :-1])
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[:, 1:, None], -1))

  pallas_cfg = dataclasses.replace(cfg, attention=dataclasses.replace(cfg.attention, impl=impl))
  l_x, g_x = jax.jit(jax.value_and_grad(loss), static_argnums=1)(params, cfg)
  l_p, g_p = jax.jit(jax.value_and_grad(loss), static_argnums=1)(params, pallas_cfg)
  assert float(l_p) == pytest.approx(float(l_x), rel=1e-4)
  # On a GPU both paths run float32 matmuls as TF32 (in different places): ~1e-3 relative.
  tol = dict(atol=1e-3, rtol=1e-2) if on_gpu else dict(atol=2e-4, rtol=2e-3)
  for a, b in zip(jax.tree_util.tree_leaves(g_p), jax.tree_util.tree_leaves(g_x), strict=True):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), **tol)


def test_the_configs_gpu_blocks_reach_the_kernels_and_a_bad_spec_is_named():
  """AttentionConfig.gpu_blocks: the three Mosaic GPU kernels (q_tma=3, dkv_tma=1) run a bf16
  model's static layers (G = 4, D = 64; traced for the GPU interpreters here), the default
  config none of them, a run's own `gpu_blocks` context over the config's; `--set` takes the
  spec; a bad spec is a one-line error at config time."""
  from conftest import counted_calls

  from kernels_pallas import mosaic

  with pytest.raises(ValueError, match="bad block config '16,4,16'"):
    AttentionConfig(gpu_blocks="16,4,16")
  with pytest.raises(ValueError, match="q_tma=4 must be a bitmask"):
    AttentionConfig(gpu_blocks="16,4,16,4,2,2,2,1,0,1,2,1,1,1,0,1,4")
  spec = "16,4,16,4,2,2,2,1,0,1,2,1,1,1,0,1,3"
  # --set takes the spec as written (not as a tuple of integers).
  run = apply_overrides(RunConfig(), [f"model.attention.gpu_blocks={spec}"])
  assert run.model.attention.gpu_blocks == spec
  cfg = dataclasses.replace(
    _small("stagger", impl="pallas_packed_interpret"), num_layers=2, num_heads=8, head_dim=64,
    seq_len=32, compute_dtype="bfloat16",
  )  # fmt: skip
  tma = dataclasses.replace(
    cfg,
    attention=dataclasses.replace(cfg.attention, gpu_blocks="16,4,16,4,2,2,2,1,0,1,2,1,1,1,0,1,3"),
  )
  tokens = jax.random.randint(jax.random.key(1), (1, 33), 0, 97)
  params = M.Transformer(cfg).init(jax.random.key(0), tokens[:, :-1])["params"]

  def loss(params, cfg):
    logits = M.Transformer(cfg).apply({"params": params}, tokens[:, :-1]).astype(jnp.float32)
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[:, 1:, None], -1))

  step = jax.jit(jax.value_and_grad(loss), static_argnums=1)
  # Traced only: the kernels' values against the Triton ones are tests/test_mosaic_query.py's
  # and TestGpuPackedQTmaInterpret's.
  with counted_calls(mosaic, ["forward", "dq", "dkv"]) as calls:
    step.trace(params, tma)
  assert all(calls.values()), calls
  with counted_calls(mosaic, ["forward", "dq", "dkv"]) as calls:
    step.trace(params, cfg)  # the default: the Triton kernels
  assert not any(calls.values()), calls
  # A run's own `gpu_blocks` context wins over the config's: the Triton kernels here.
  with counted_calls(mosaic, ["forward", "dq", "dkv"]) as calls:
    with attention.gpu_blocks(GpuBlocks(kernel="packed")):
      step.trace(params, tma)
  assert not any(calls.values()), calls


@pytest.mark.parametrize("other", ["onehot", "scatter_f32", "sorted"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_embedding_backward_variants_are_the_same_function(dtype, other):
  """embed_backward='onehot' (a matmul), 'scatter_f32' and 'sorted' give the scatter-add's
  gradient, repeated tokens too, and the same forward."""
  scatter = dataclasses.replace(_small("stagger"), compute_dtype=dtype, embed_backward="scatter")
  onehot = dataclasses.replace(scatter, embed_backward=other)
  tokens = jax.random.randint(jax.random.key(3), (2, 48), 0, 7)  # 7 ids: many repeats
  params = M.Transformer(scatter).init(jax.random.key(0), tokens)

  def loss(p, cfg):
    logits = M.Transformer(cfg).apply(p, tokens)
    return jnp.mean(jax.nn.logsumexp(logits, -1) - logits[..., 0])

  np.testing.assert_array_equal(loss(params, onehot), loss(params, scatter))
  g_scatter = jax.grad(loss)(params, scatter)
  g_onehot = jax.grad(loss)(params, onehot)
  if dtype == "float32":
    for a, b in zip(jax.tree.leaves(g_scatter), jax.tree.leaves(g_onehot), strict=True):
      np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-7)
  else:  # bf16 rounds differently: onehot accumulates in float32, so it is no further off
    truth = jax.grad(loss)(params, dataclasses.replace(scatter, compute_dtype="float32"))

    def embedding(g):
      return np.asarray(nn.unbox(g)["params"]["embed"]["embedding"], np.float64)

    err = {
      name: float(np.linalg.norm(embedding(g) - embedding(truth)))
      for name, g in (("scatter", g_scatter), ("other", g_onehot))
    }
    assert 0 < err["other"] <= err["scatter"] * 1.05, err  # bf16 is not exact
  with pytest.raises(ValueError, match="embed_backward='sparse'"):
    dataclasses.replace(scatter, embed_backward="sparse")


@pytest.mark.parametrize(
  "n, vocab, block",
  [(300, 7, 4), (300, 7, 128), (1000, 50, 16), (5, 3, 4), (64, 1, 8), (129, 1000, 128), (1, 5, 4),
   (5, 1, 4), (9, 3, 4)],
)  # fmt: skip
@pytest.mark.parametrize("ids", ["uniform", "zipf", "runs", "last"])
def test_embedding_grad_sorted_sums_rows_by_id(n, vocab, block, ids):
  """The per-id row sums, against float64 np.add.at: ids that repeat across many blocks (one
  id only, a Zipf law like text, long runs that start and end mid-block, every id the last
  one), a ragged last block, a single row, uint16 ids (as the data shards store them); and
  the slots' table indices distinct, as the store's `unique_indices` promises."""
  rng = np.random.default_rng(n + vocab + block)
  ids_N = {
    "uniform": rng.integers(0, vocab, n),
    "zipf": np.minimum(rng.zipf(1.3, n) - 1, vocab - 1),
    "runs": np.repeat(rng.integers(0, vocab, n), rng.integers(1, 3 * block, n))[:n],
    "last": np.full(n, vocab - 1),
  }[ids]
  g_NxE = rng.standard_normal((n, 6)).astype(np.float32)
  want = np.zeros((vocab, 6))
  np.add.at(want, ids_N, g_NxE.astype(np.float64))
  fn = jax.jit(M.embedding_grad_sorted, static_argnums=(2, 3))
  for dtype in (jnp.int32, jnp.uint16):
    got = fn(jnp.asarray(ids_N, dtype), jnp.asarray(g_NxE), vocab, block)
    assert got.shape == (vocab, 6) and got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=2e-5)
  index_S, _ = M._sorted_slots(jnp.asarray(ids_N, jnp.int32), jnp.asarray(g_NxE), vocab, block)
  index_S = np.asarray(index_S)
  assert len(set(index_S.tolist())) == index_S.size
  assert set(index_S[index_S < vocab].tolist()) == set(ids_N.tolist())  # each id stored once


def test_embedding_grad_sorted_per_batch_shard_under_a_mesh():
  """Inside `attention.kernel_mesh` (as a train step runs), each device sorts its own batch
  rows and the tables are summed over `data`: the same gradient as on one device, with no
  all-gather of the batch in the compiled step."""
  from fibax import attention
  from fibax.sharding import make_mesh

  cfg = _small("stagger")  # embed_backward="sorted", the default
  tokens = jax.random.randint(jax.random.key(3), (8, 48), 0, 7)
  params = M.Transformer(cfg).init(jax.random.key(0), tokens)

  def loss(p, t):
    logits = M.Transformer(cfg).apply(p, t)
    return jnp.mean(jax.nn.logsumexp(logits, -1) - logits[..., 0])

  def embed_grad(p, t):
    return nn.unbox(jax.grad(loss)(p, t))["params"]["embed"]["embedding"]

  want = jax.jit(embed_grad)(params, tokens)
  mesh = make_mesh(data=8, model=1)
  spec = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data", None))
  with attention.kernel_mesh(mesh):
    fn = jax.jit(embed_grad)
    hlo = fn.lower(params, jax.device_put(tokens, spec)).compile().as_text()
    got = fn(params, jax.device_put(tokens, spec))
  # float32 sums in another order: ~1e-7 on entries of ~0.1 (a row of ~1e-3 cancels)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)
  assert " all-gather(" not in hlo and "all-gather-start" not in hlo


@pytest.mark.parametrize("chunk", [16, 20, 48, 64])
def test_chunked_loss_is_the_same_function_and_keeps_less(chunk):
  """model.loss_chunk: the same per-position losses and gradients as the whole [B, T, V]
  logits, for chunks that divide T, do not (a padded last chunk) or exceed it; the compiled
  gradient keeps less memory when chunks are small."""
  from fibax.steps import token_losses

  whole = _small("stagger")
  chunked = dataclasses.replace(whole, loss_chunk=chunk)
  tokens = jax.random.randint(jax.random.key(5), (3, 49), 0, whole.vocab_size)
  inputs, targets = tokens[:, :-1], tokens[:, 1:]
  params = M.init_params(whole, 0)

  def loss(p, cfg):
    return token_losses(p, M.Transformer(cfg), inputs, targets)

  np.testing.assert_allclose(loss(params, chunked), loss(params, whole), rtol=1e-6, atol=1e-6)
  assert loss(params, chunked).shape == (3, 48)

  def mean_loss(p, cfg):
    return loss(p, cfg).mean()

  g_whole = jax.grad(mean_loss)(params, whole)
  g_chunk = jax.grad(mean_loss)(params, chunked)
  for a, b in zip(jax.tree.leaves(g_whole), jax.tree.leaves(g_chunk), strict=True):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-6)
  if chunk == 16:  # [B, T, V] float32 logits are not all kept at once

    def temp_bytes(cfg, vocab=4096):
      big = dataclasses.replace(cfg, vocab_size=vocab)
      p = jax.eval_shape(lambda: M.init_params(big, 0))
      toks = jax.ShapeDtypeStruct((8, 48), jnp.int32)
      fn = jax.jit(jax.grad(lambda p, t: token_losses(p, M.Transformer(big), t, t).mean()))
      return fn.lower(p, toks).compile().memory_analysis().temp_size_in_bytes

    logits_bytes = 8 * 48 * 4096 * 4
    assert temp_bytes(chunked) + logits_bytes < temp_bytes(whole)
  with pytest.raises(ValueError, match="loss_chunk=-1"):
    dataclasses.replace(whole, loss_chunk=-1)


def _vocab_dots(jaxpr, vocab):
  """The dtypes of the operands of every dot_general in a jaxpr (nested ones too) that
  contracts or produces a dimension of size `vocab`."""
  found = []
  for eqn in jaxpr.eqns:
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      found += _vocab_dots(sub, vocab)
    if eqn.primitive.name == "dot_general":
      shapes = [v.aval.shape for v in (*eqn.invars, *eqn.outvars)]
      if any(vocab in shape for shape in shapes):
        found.append(tuple(str(v.aval.dtype) for v in eqn.invars))
  return found


@pytest.mark.parametrize("chunk", [0, 16])
def test_logits_grad_compute_rounds_only_the_output_layers_backward(chunk):
  """model.logits_grad='compute': the same forward and loss; the output layer's backward
  matmuls take bf16 operands (float32 ones under 'float32': TF32 on a GPU), and the gradients
  stay within bf16 rounding of the float32-cotangent ones. In float32 compute they are the
  same up to float32 rounding (its backward forms softmax - one-hot itself, in one pass)."""
  from fibax.steps import token_losses

  vocab = 96  # a size no other dimension of _small has
  f32_grad = dataclasses.replace(
    _small("stagger"), compute_dtype="bfloat16", vocab_size=vocab, loss_chunk=chunk
  )
  bf16_grad = dataclasses.replace(f32_grad, logits_grad="compute")
  tokens = jax.random.randint(jax.random.key(5), (2, 33), 0, vocab)
  params = M.init_params(f32_grad, 0)

  def loss(p, cfg):
    return token_losses(p, M.Transformer(cfg), tokens[:, :-1], tokens[:, 1:]).mean()

  np.testing.assert_array_equal(loss(params, bf16_grad), loss(params, f32_grad))
  dots = {
    name: _vocab_dots(jax.make_jaxpr(jax.grad(loss), static_argnums=1)(params, cfg).jaxpr, vocab)
    for name, cfg in (("float32", f32_grad), ("compute", bf16_grad))
  }
  # A float32 operand in a dot: XLA converts the other one too (TF32 or float32 on a GPU).
  assert any("float32" in pair for pair in dots["float32"]), dots
  assert all(pair == ("bfloat16", "bfloat16") for pair in dots["compute"]), dots
  assert len(dots["compute"]) == len(dots["float32"]), dots
  g_f32 = [np.asarray(g, np.float32) for g in jax.tree.leaves(jax.grad(loss)(params, f32_grad))]
  g_bf16 = [np.asarray(g, np.float32) for g in jax.tree.leaves(jax.grad(loss)(params, bf16_grad))]
  for a, b in zip(g_f32, g_bf16, strict=True):
    assert np.abs(a - b).max() <= 2e-2 * np.abs(a).max() + 1e-6
  assert any(not np.array_equal(a, b) for a, b in zip(g_f32, g_bf16, strict=True))
  exact = [dataclasses.replace(c, compute_dtype="float32") for c in (f32_grad, bf16_grad)]
  for a, b in zip(*(jax.tree.leaves(jax.grad(loss)(params, c)) for c in exact), strict=True):
    assert np.abs(np.asarray(a) - np.asarray(b)).max() <= 1e-5 * np.abs(np.asarray(a)).max()
  with pytest.raises(ValueError, match="logits_grad='bf16'"):
    dataclasses.replace(f32_grad, logits_grad="bf16")


@pytest.mark.parametrize("grad, chunk", [("float32", 0), ("compute", 0), ("compute", 16)])
def test_logits_dtype_compute_rounds_the_logits_as_a_bf16_autocast_does(grad, chunk):
  """model.logits_dtype='compute': the output layer writes bf16 logits (what the paper's bf16
  autocast gives: the logits matmul's output), the loss reads them as float32: the loss of
  the logits rounded to bf16 and nothing else, within float32 rounding, and gradients within
  that rounding of the float32 logits' ones."""
  from fibax.steps import token_losses

  vocab = 96
  f32 = dataclasses.replace(
    _small("stagger"), compute_dtype="bfloat16", vocab_size=vocab, loss_chunk=chunk,
    logits_grad=grad,
  )  # fmt: skip
  bf16 = dataclasses.replace(f32, logits_dtype="compute")
  tokens = jax.random.randint(jax.random.key(6), (4, 65), 0, vocab)
  inputs, targets = tokens[:, :-1], tokens[:, 1:]
  params = M.init_params(f32, 0)

  def loss(p, cfg):
    return token_losses(p, M.Transformer(cfg), inputs, targets).mean()

  def rounded(p):  # by hand: the float32 logits' states, the logits rounded, then the loss
    x, e = M.Transformer(f32).apply({"params": p}, inputs, output_layer=False)
    logits = jnp.einsum("bte,ve->btv", x, e, preferred_element_type=jnp.float32)
    logits = logits.astype(jnp.bfloat16).astype(jnp.float32)
    return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()

  got, want, f32_loss = loss(params, bf16), rounded(params), loss(params, f32)
  assert abs(float(got) - float(want)) <= 1e-6 * abs(float(want))
  assert got != f32_loss  # the rounding is there
  logits = M.Transformer(bf16).apply({"params": params}, inputs)
  assert logits.dtype == jnp.float32  # callers get float32 of the bf16 values
  np.testing.assert_array_equal(logits, logits.astype(jnp.bfloat16).astype(jnp.float32))
  g_got = jax.tree.leaves(jax.grad(loss)(params, bf16))
  g_f32 = jax.tree.leaves(jax.grad(loss)(params, f32))
  for a, b in zip(g_got, g_f32, strict=True):  # the rounding moves them only a little
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    assert np.abs(a - b).max() <= 3e-2 * np.abs(b).max() + 1e-6

  def logits_out(cfg):  # the dtypes of every [., V] matmul output of the gradient's program
    def walk(jaxpr):
      for eqn in jaxpr.eqns:
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
          yield from walk(sub)
        if eqn.primitive.name == "dot_general" and eqn.outvars[0].aval.shape[-1] == vocab:
          yield str(eqn.outvars[0].aval.dtype)

    return set(walk(jax.make_jaxpr(jax.grad(loss), static_argnums=1)(params, cfg).jaxpr))

  assert logits_out(f32) == {"float32"} and logits_out(bf16) == {"bfloat16"}
  with pytest.raises(ValueError, match="logits_dtype='bf16'"):
    dataclasses.replace(f32, logits_dtype="bf16")


def test_learned_window_jax_is_the_plain_jax_computation_under_a_pallas_impl():
  """`learned_window="jax"` keeps a learned run's window out of the kernel, so a Pallas-impl
  learned run computes exactly what the runs made before the kernel window computed (the xla
  impl's learned path); "kernel" differs from it by rounding only."""
  cfg = dataclasses.replace(_small("learned", impl="xla"), num_layers=2, seq_len=40)
  tokens = jax.random.randint(jax.random.key(1), (2, 41), 0, 97)
  params = M.Transformer(cfg).init(jax.random.key(0), tokens[:, :-1])["params"]

  def loss(params, cfg):
    logits = M.Transformer(cfg).apply({"params": params}, tokens[:, :-1])
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[:, 1:, None], -1))

  def with_window(learned_window):
    att = dataclasses.replace(cfg.attention, impl="pallas_interpret", learned_window=learned_window)
    return dataclasses.replace(cfg, attention=att)

  step = jax.jit(jax.value_and_grad(loss), static_argnums=1)
  l_x, g_x = step(params, cfg)
  l_j, g_j = step(params, with_window("jax"))
  l_k, g_k = step(params, with_window("kernel"))
  assert float(l_j) == float(l_x)
  for a, b in zip(jax.tree_util.tree_leaves(g_j), jax.tree_util.tree_leaves(g_x), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert any(
    not np.array_equal(np.asarray(a), np.asarray(b))
    for a, b in zip(jax.tree_util.tree_leaves(g_k), jax.tree_util.tree_leaves(g_x), strict=True)
  )
  with pytest.raises(ValueError, match="learned_window='pallas'"):
    dataclasses.replace(cfg.attention, learned_window="pallas")


@pytest.mark.parametrize(
  ("schedule", "remat"),
  [
    ("stagger", "block"),
    ("stagger", "dots"),
    ("learned", "block"),
    pytest.param("learned", "dots", marks=pytest.mark.slow),  # each policy and schedule in CI
  ],
)
def test_remat_is_the_same_function_with_the_same_parameters_and_keeps_less(remat, schedule):
  """model.remat: the same parameter tree, loss and gradients (alpha's too) as keeping every
  activation; the compiled gradient of a deeper, wider model keeps less memory (checked with
  the static schedule: what a policy keeps does not depend on how the offsets are set, and
  the learned model's compile of it was half of its 38-44 s)."""
  from fibax.steps import token_losses

  keep = _small(schedule)
  recompute = dataclasses.replace(keep, remat=remat)
  tokens = jax.random.randint(jax.random.key(6), (2, 49), 0, keep.vocab_size)
  params = M.init_params(keep, 0)
  assert jax.tree.structure(M.init_params(recompute, 0)) == jax.tree.structure(params)

  def loss(p, cfg):
    return token_losses(p, M.Transformer(cfg), tokens[:, :-1], tokens[:, 1:]).mean()

  np.testing.assert_allclose(loss(params, recompute), loss(params, keep), rtol=1e-6)
  g_keep = jax.grad(loss)(params, keep)
  g_re = jax.grad(loss)(params, recompute)
  for a, b in zip(jax.tree.leaves(g_keep), jax.tree.leaves(g_re), strict=True):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-7)

  def temp_bytes(cfg):
    big = dataclasses.replace(cfg, num_layers=6, d_model=128, mlp_hidden=M_hidden(128))
    p = jax.eval_shape(lambda: M.init_params(big, 0))
    toks = jax.ShapeDtypeStruct((8, 48), jnp.int32)
    fn = jax.jit(jax.grad(lambda p, t: token_losses(p, M.Transformer(big), t, t).mean()))
    return fn.lower(p, toks).compile().memory_analysis().temp_size_in_bytes

  if schedule != "learned":
    assert temp_bytes(recompute) < temp_bytes(keep)
  with pytest.raises(ValueError, match="remat='all'"):
    dataclasses.replace(keep, remat="all")


def test_mlp_pad_is_the_same_model_in_aligned_matmuls():
  """model.mlp_pad: the same parameters (names, shapes, initial values), the same loss and
  gradients, while the MLP's matmuls see the hidden width rounded up (86 -> 96 here)."""
  base = _small("stagger")
  padded = dataclasses.replace(base, mlp_pad=16)
  tokens = jax.random.randint(jax.random.key(3), (2, 48), 0, 97)
  p_base = M.Transformer(base).init(jax.random.key(0), tokens)
  p_pad = M.Transformer(padded).init(jax.random.key(0), tokens)
  assert jax.tree.structure(p_base) == jax.tree.structure(p_pad)
  for a, b in zip(jax.tree.leaves(p_base), jax.tree.leaves(p_pad), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

  def loss(p, cfg):
    logits = M.Transformer(cfg).apply(p, tokens)
    return jnp.mean(jax.nn.logsumexp(logits, -1) - logits[..., 0])

  np.testing.assert_allclose(loss(p_pad, padded), loss(p_base, base), rtol=1e-6)
  g_base, g_pad = jax.grad(loss)(p_base, base), jax.grad(loss)(p_base, padded)
  for a, b in zip(jax.tree.leaves(g_base), jax.tree.leaves(g_pad), strict=True):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-7)

  def widths(cfg):
    jaxpr = jax.make_jaxpr(lambda p: M.Transformer(cfg).apply(p, tokens))(p_base)
    dots = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "dot_general"]
    return {v.aval.shape[-1] for e in dots for v in e.invars}

  assert 96 in widths(padded) and 86 not in widths(padded) and 86 in widths(base)
  with pytest.raises(ValueError, match="mlp_pad=-1"):
    dataclasses.replace(base, mlp_pad=-1)


def test_qkv_projections_are_one_matmul_with_the_dense_generals_values():
  """The query, key and value projections run as one matmul against their kernels side by
  side (its backward forms x's gradient in one matmul too): DenseGeneral's values and
  gradients; on a mesh that splits heads over `model`, three matmuls (kernels stay put)."""
  from fibax import attention
  from fibax.sharding import make_mesh

  keys = jax.random.split(jax.random.key(7), 4)
  x = jax.random.normal(keys[0], (2, 8, 32))
  kernels = [jax.random.normal(k, (32, n, 8)) for k, n in zip(keys[1:], (4, 2, 2), strict=True)]

  def dense(x, w):
    return nn.DenseGeneral(w.shape[1:], use_bias=False).apply({"params": {"kernel": w}}, x)

  def loss(fn):
    return lambda x, ws: sum(jnp.sum(jnp.sin(o)) for o in fn(x, ws))

  def fused(x, ws):
    return M._project_qkv(x, ws, jnp.float32)

  def separate(x, ws):
    return [dense(x, w) for w in ws]

  for got, want in zip(fused(x, kernels), separate(x, kernels), strict=True):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
  g_fused = jax.grad(loss(fused), (0, 1))(x, kernels)
  g_separate = jax.grad(loss(separate), (0, 1))(x, kernels)
  for a, b in zip(jax.tree.leaves(g_fused), jax.tree.leaves(g_separate), strict=True):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)

  def dots(fn):
    jaxpr = jax.make_jaxpr(jax.grad(loss(fn), (0, 1)))(x, kernels)
    return str(jaxpr).count("dot_general[")

  assert dots(fused) == 3  # one forward, x's and the kernels' gradients
  assert dots(separate) == 9
  with attention.kernel_mesh(make_mesh(data=4, model=2)):
    assert dots(lambda x, ws: M._project_qkv(x, ws, jnp.float32)) == 9
    split = M._project_qkv(x, kernels, jnp.float32)
  for got, want in zip(split, separate(x, kernels), strict=True):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
