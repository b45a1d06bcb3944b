"""Plain-JAX attention paths against the float32 reference (the paper)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fibax import attention
from fibax.patterns import LearnedPattern, Pattern

TOL = {jnp.float32: dict(atol=2e-5, rtol=2e-5), jnp.bfloat16: dict(atol=3e-2, rtol=3e-2)}


def _qkv(key, b, t, h, kv, d, dtype):
  kq, kk, kv_ = jax.random.split(key, 3)
  return (
    jax.random.normal(kq, (b, t, h, d), dtype),
    jax.random.normal(kk, (b, t, kv, d), dtype),
    jax.random.normal(kv_, (b, t, kv, d), dtype),
  )


def _random_case(seed):
  rng = np.random.default_rng(seed)
  t = int(rng.integers(3, 90))
  w = int(rng.integers(0, min(t, 16)))
  pattern = Pattern.build(
    base=str(rng.choice(["fib", "pow2"])), alpha=float(rng.uniform(0.4, 1.6)), window=w, seq_len=t
  )
  kv = int(rng.choice([1, 2]))
  h = kv * int(rng.choice([1, 2, 4]))
  return t, h, kv, int(rng.choice([8, 16])), pattern


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_xla_matches_reference(seed, dtype):
  t, h, kv, d, pattern = _random_case(seed)
  q, k, v = _qkv(jax.random.key(seed), 2, t, h, kv, d, dtype)
  tol = TOL[dtype]
  ref = attention.IMPLEMENTATIONS["reference"](q, k, v, pattern)
  out = attention.xla(q, k, v, pattern)
  np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref, np.float32), **tol)

  def loss(fn, q, k, v):
    return (
      fn(q, k, v, pattern).astype(jnp.float32) * jnp.cos(jnp.arange(d))[None, None, None, :]
    ).sum()

  g_ref = jax.grad(lambda *a: loss(attention.IMPLEMENTATIONS["reference"], *a), argnums=(0, 1, 2))(
    q, k, v
  )
  g_out = jax.grad(lambda *a: loss(attention.xla, *a), argnums=(0, 1, 2))(q, k, v)
  for a, b in zip(g_out, g_ref, strict=True):
    scale = float(jnp.abs(b.astype(jnp.float32)).max()) + 1
    np.testing.assert_allclose(
      np.asarray(a, np.float32) / scale, np.asarray(b, np.float32) / scale, **tol
    )


@pytest.mark.parametrize("alpha", [1.0, 2.0, 3.0])
def test_learned_at_integer_alpha_equals_integer_path(alpha):
  t, w = 80, 4
  lp = LearnedPattern.build(base="fib", window=w, seq_len=t)
  q, k, v = _qkv(jax.random.key(1), 2, t, 4, 2, 16, jnp.float32)
  ref = attention.IMPLEMENTATIONS["reference"](q, k, v, lp.freeze(alpha))
  out = attention.learned(q, k, v, lp, jnp.float32(alpha))
  np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=2e-5, rtol=2e-5)


def test_learned_gradient_matches_finite_difference():
  t, w = 64, 3
  lp = LearnedPattern.build(base="fib", window=w, seq_len=t)
  with jax.enable_x64(True):
    q, k, v = (x.astype(jnp.float64) for x in _qkv(jax.random.key(2), 1, t, 2, 1, 8, jnp.float32))
    weights = jax.random.normal(jax.random.key(3), (1, t, 2, 8), jnp.float64)

    def loss(theta):
      return (attention.learned(q, k, v, lp, 0.5 + jax.nn.sigmoid(theta)) * weights).sum()

    # alpha ~ 1.09: fractional rungs; eps small enough that no lo = floor(alpha * b) moves.
    theta = jnp.float64(0.37)
    grad = float(jax.grad(loss)(theta))
    eps = 1e-5
    fd = (float(loss(theta + eps)) - float(loss(theta - eps))) / (2 * eps)
  assert abs(grad) > 1e-3  # the gradient does reach theta
  assert grad == pytest.approx(fd, rel=1e-4)


def _table_rung_by_rung(pattern, alpha):
  """The skip rules of `attention.learned_table` as the paper's code applies them, one rung
  after another (float32 products, half-to-even rounding); also how many rungs only the
  taken-floor rule skipped."""
  los, fracs, keeps, taken_only = [], [], [], 0
  for b in pattern.terms:
    t = np.float32(alpha) * np.float32(b)
    lo = int(np.floor(t))
    taken = any(k and prev == lo for prev, k in zip(los, keeps, strict=True))
    skip = round(float(t)) <= pattern.window or lo > pattern.cap or lo <= pattern.window
    taken_only += taken and not skip
    los.append(lo)
    fracs.append(t - np.float32(lo))
    keeps.append(not (skip or taken))
  return (np.array(los), np.array(fracs, np.float32), np.array(keeps)), taken_only


def test_learned_table_matches_the_rung_by_rung_rules():
  """Random terms (unsorted, repeated, close enough that two rungs share a floor), windows,
  caps and alphas: the whole-array table equals the rules applied rung by rung, including
  which of two rungs with one floor is kept (the first open one)."""
  rng = np.random.default_rng(0)
  taken_only = 0
  for _ in range(300):
    terms = tuple(int(x) for x in rng.integers(1, 40, size=int(rng.integers(1, 12))))
    lp = LearnedPattern(int(rng.integers(0, 6)), terms, int(rng.integers(4, 60)))
    alpha = float(rng.uniform(0.05, 3.0))
    want, n = _table_rung_by_rung(lp, alpha)
    taken_only += n
    got = attention.learned_table(lp, jnp.float32(alpha))
    for g, w in zip(got, want, strict=True):
      np.testing.assert_array_equal(np.asarray(g), w, err_msg=f"{lp} alpha={alpha}")
  assert taken_only > 50  # the rule for a floor already taken was exercised


def test_learned_table_is_the_same_operations_at_any_rung_count():
  """A fixed number of whole-array operations, not a chain a rung (which compiled in seconds
  a layer on a GPU): the traced table of 15 rungs has as many equations as that of 3."""

  def eqns(num_terms):
    lp = LearnedPattern(4, tuple(range(5, 5 + 3 * num_terms, 3)), 100)
    return len(jax.make_jaxpr(lambda a: attention.learned_table(lp, a))(1.0).eqns)

  assert eqns(15) == eqns(3) < 30


def test_learned_skip_rules():
  """The learned path against a hand-built softmax over the slots the paper keeps.

  At alpha = 0.5 and W = 4 (T = 64), t = 0.5 b: rungs 1, 2, 3, 5, 8 have round(t) <= 4 and are
  skipped; 13, 21, 34, 55, 89 stay as (lo, frac) = (6, .5), (10, .5), (17, 0), (27, .5),
  (44, .5); 144 has lo = 72 > T - 1 and is skipped. With V = one-hot rows the output is each
  key position's attention weight, so a wrong skip, offset, fraction or mask changes it.
  """
  t_len, w, d = 64, 4, 64
  lp = LearnedPattern.build(base="fib", window=w, seq_len=t_len)
  q, k, _ = _qkv(jax.random.key(4), 1, t_len, 1, 1, d, jnp.float32)
  v = jnp.eye(t_len, dtype=jnp.float32)[None, :, None, :]  # v[j] = e_j
  out = np.asarray(attention.learned(q, k, v, lp, jnp.float32(0.5)))[0, :, 0]
  kept = [(6, 0.5), (10, 0.5), (17, 0.0), (27, 0.5), (44, 0.5)]
  q_np, k_np = np.asarray(q, np.float64)[0, :, 0], np.asarray(k, np.float64)[0, :, 0]
  # All rungs valid; those past 30 masked; only the window and lo = 6; lo = 6 and lo = 10 at
  # their first position, where row i - lo - 1 = -1 is clamped to row 0.
  for i in (63, 30, 8, 6, 10):
    slots = [[(i - dd, 1.0)] for dd in range(w + 1) if i - dd >= 0]
    slots += [[(i - lo, 1.0 - f), (max(i - lo - 1, 0), f)] for lo, f in kept if i - lo >= 0]
    keys = [sum(wt * k_np[j] for j, wt in slot) for slot in slots]
    logits = np.array([q_np[i] @ key for key in keys]) / np.sqrt(d)
    p = np.exp(logits - logits.max())
    p /= p.sum()
    expected = np.zeros(t_len)
    for p_slot, slot in zip(p, slots, strict=True):
      for j, wt in slot:
        expected[j] += p_slot * wt
    np.testing.assert_allclose(out[i], expected, atol=2e-6)


def _learned_by_gather(q, k, v, lp, alpha):
  """The learned path written plainly: every slot's rows gathered with clamped indices."""
  t_len, d = q.shape[1], q.shape[3]
  groups = q.shape[2] // k.shape[2]
  k, v = (jnp.repeat(x, groups, axis=2) for x in (k, v))
  pos = jnp.arange(t_len)
  slots = [(pos - dd, jnp.zeros(()), pos >= dd) for dd in range(min(lp.window, t_len - 1) + 1)]
  used = []
  for b in lp.terms:
    t = alpha * b
    lo = jnp.floor(t).astype(jnp.int32)
    skip = (jnp.round(t) <= lp.window) | (lo > lp.cap) | (lo <= lp.window)
    for prev, prev_skip in used:
      skip = skip | (~prev_skip & (prev == lo))
    used.append((lo, skip))
    slots.append((pos - lo, t - jnp.floor(t), ~skip & (pos >= lo)))
  keys, vals, valid = [], [], []
  for idx, frac, ok in slots:
    lo_rows, hi_rows = jnp.clip(idx, 0, t_len - 1), jnp.clip(idx - 1, 0, t_len - 1)
    keys.append((1 - frac) * k[:, lo_rows] + frac * k[:, hi_rows])
    vals.append((1 - frac) * v[:, lo_rows] + frac * v[:, hi_rows])
    valid.append(ok)
  s = jnp.einsum("bthd,nbthd->bthn", q, jnp.stack(keys)) / np.sqrt(d)
  s = jnp.where(jnp.stack(valid, axis=1)[None, :, None, :], s, -1e30)
  return jnp.einsum("bthn,nbthd->bthd", jax.nn.softmax(s, axis=-1), jnp.stack(vals))


@pytest.mark.parametrize("alpha", [0.5, 0.93, 1.37, 2.6])
def test_learned_matches_clamped_gathers_with_gradients(alpha):
  """Shifted slices of the edge-padded keys are the clamped gathers the paper indexes with:
  outputs and gradients (q, k, v, alpha), rungs past T and at their first position too."""
  t_len, w = 70, 3
  lp = LearnedPattern.build(base="fib", window=w, seq_len=t_len)
  q, k, v = _qkv(jax.random.key(9), 2, t_len, 4, 2, 8, jnp.float32)
  weights = jax.random.normal(jax.random.key(10), q.shape)

  def loss(fn, q, k, v, a):
    return (fn(q, k, v, lp, a) * weights).sum()

  a = jnp.float32(alpha)
  np.testing.assert_allclose(
    attention.learned(q, k, v, lp, a), _learned_by_gather(q, k, v, lp, a), atol=2e-5, rtol=2e-5
  )
  g_new = jax.grad(lambda *x: loss(attention.learned, *x), argnums=(0, 1, 2, 3))(q, k, v, a)
  g_old = jax.grad(lambda *x: loss(_learned_by_gather, *x), argnums=(0, 1, 2, 3))(q, k, v, a)
  for new, old in zip(g_new, g_old, strict=True):
    np.testing.assert_allclose(np.asarray(new), np.asarray(old), atol=1e-4, rtol=1e-4)
  assert np.abs(np.asarray(g_new[1])[:, 0]).max() > 0  # row 0 collects the clamped slots


@pytest.mark.parametrize(
  "impl",
  [
    "reference", "xla", "learned", "xla_dense", "pallas_interpret", "pallas_packed_interpret",
    "pallas_tpu_interpret",
  ],
)  # fmt: skip
def test_causality(impl):
  """d out[t] / d inputs[s] is exactly zero for every s > t."""
  t, t0 = 48, 20
  if impl == "xla_dense":
    pattern = Pattern.dense(t)
  else:
    pattern = Pattern.build(base="fib", alpha=1.3, window=5, seq_len=t)
  q, k, v = _qkv(jax.random.key(5), 1, t, 4, 2, 8, jnp.float32)

  def out_t(q, k, v):
    if impl == "learned":
      lp = LearnedPattern.build(base="fib", window=5, seq_len=t)
      return attention.learned(q, k, v, lp, jnp.float32(1.3))[:, t0].sum()
    return attention.get(impl)(q, k, v, pattern)[:, t0].sum()

  grads = jax.grad(out_t, argnums=(0, 1, 2))(q, k, v)
  for g in grads:
    assert np.all(np.asarray(g)[:, t0 + 1 :] == 0.0)
    assert np.any(np.asarray(g)[:, : t0 + 1] != 0.0)


def test_dense_path_needs_dense_pattern_and_matches_reference():
  q, k, v = _qkv(jax.random.key(6), 2, 33, 8, 2, 16, jnp.float32)
  ref = attention.IMPLEMENTATIONS["reference"](q, k, v, Pattern.dense(33))
  np.testing.assert_allclose(
    np.asarray(attention.get("xla_dense")(q, k, v, Pattern.dense(33))), np.asarray(ref), atol=2e-5
  )
  with pytest.raises(NotImplementedError, match="dense pattern"):
    attention.get("xla_dense")(q, k, v, Pattern(4))


def test_bad_heads_and_impl():
  q, k, v = _qkv(jax.random.key(7), 1, 8, 6, 4, 8, jnp.float32)
  with pytest.raises(ValueError, match="num_heads=6"):
    attention.xla(q, k, v, Pattern(2))
  with pytest.raises(ValueError, match="flash9"):
    attention.get("flash9")


def test_gpu_blocks_reach_every_pallas_gpu_call_inside_their_context(monkeypatch):
  """`attention.gpu_blocks`: the packed impls get the blocks (rung groups included), the
  row-wise ones the same blocks without rung groups, TPU backends nothing; outside the context
  the kernels' defaults. The grouped packed kernel still matches the reference there."""
  import kernels_pallas
  from kernels_pallas.gpu import GpuBlocks, default_blocks

  tuned = GpuBlocks(kernel="packed", num_warps=8, rung_group=2, rung_group_bwd=4)
  with attention.gpu_blocks(tuned):
    assert attention.gpu_blocks_for("gpu", "packed") == tuned
    rowwise = attention.gpu_blocks_for("gpu_interpret", None)
    assert (rowwise.kernel, rowwise.num_warps, rowwise.group, rowwise.group_bwd) == (
      "rowwise", 8, 1, 1
    )  # fmt: skip
    assert attention.gpu_blocks_for("tpu", "packed") is None
    assert attention.gpu_blocks_for(None, "packed") is None
  # Outside the context: the machine's default (on a Hopper GPU the Mosaic kernels).
  assert attention.gpu_blocks_for("gpu", "packed") == default_blocks("packed")
  assert attention.gpu_blocks_for("gpu", None) is None  # the op's defaults

  pattern = Pattern.build(base="fib", alpha=0.7, window=3, seq_len=70)
  q, k, v = _qkv(jax.random.key(9), 1, 70, 4, 1, 16, jnp.float32)
  ref = attention.get("reference")(q, k, v, pattern)
  seen = []
  real = kernels_pallas.fib_attention
  monkeypatch.setattr(
    kernels_pallas,
    "fib_attention",
    lambda *a, blocks, **kw: seen.append(blocks) or real(*a, blocks=blocks, **kw),
  )
  with attention.gpu_blocks(tuned):
    got = attention.get("pallas_packed_interpret")(q, k, v, pattern)
  assert seen == [dataclasses.replace(tuned, kernel="packed")]
  np.testing.assert_allclose(got, ref, **TOL[jnp.float32])

  # A learned layer: its rungs in the packed kernels, or its window alone in the row-wise one.
  calls = []
  for name in ("fib_attention_learned", "fib_attention_lse"):
    real_fn = getattr(kernels_pallas, name)
    spy = lambda *a, blocks, _f=real_fn, _n=name, **kw: (
      calls.append((_n, blocks)) or _f(*a, blocks=blocks, **kw)
    )
    monkeypatch.setattr(kernels_pallas, name, spy)
  learned = LearnedPattern.build(base="fib", window=3, seq_len=70)
  with attention.gpu_blocks(tuned):
    for backend, in_kernel in (("gpu_interpret", True), ("gpu_interpret", False)):
      attention.learned(
        q, k, v, learned, jnp.float32(1.2), window_backend=backend, rungs_in_kernel=in_kernel
      )
  assert [(n, b.kernel, b.num_warps, b.group) for n, b in calls] == [
    ("fib_attention_learned", "packed", 8, 2),
    ("fib_attention_lse", "rowwise", 8, 1),
  ]
