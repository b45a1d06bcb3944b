"""the paper pinned: distances, schedules, cap modes, rounding."""

import itertools
import math

import numpy as np
import pytest

from fibax import patterns as P


def test_fibonacci_and_pow2_bases():
  assert P.fibonacci_base() == (1, 2, 3, 5, 8, 13, 21, 34, 55, 89, 144, 233, 377, 610, 987)
  assert P.pow2_base(1024) == tuple(2**e for e in range(10))  # 1 .. 512 <= 1023
  assert P.pow2_base(4096)[-2:] == (1024, 2048)
  assert P.pow2_base(1025)[-1] == 1024


def test_paper_example_23_distances():
  p = P.Pattern.build(base="fib", alpha=1.0, window=12, seq_len=1024)
  assert p.distances == tuple(range(13)) + (13, 21, 34, 55, 89, 144, 233, 377, 610, 987)
  assert len(p.distances) == 23
  # Against 512 keys per query on average for dense causal (the paper).
  assert P.Pattern.dense(1024).keys_per_query(1024) == pytest.approx(512.5)


def test_coprime_stride_and_order():
  assert P.coprime_stride(16) == 7
  assert P.coprime_stride(12) == 5 and P.coprime_stride(2) == 1
  slots = P.layer_slots("coprime", 16)
  assert slots[:5] == (0, 7, 14, 5, 12)
  alphas = P.layer_alphas("coprime", 16)
  assert alphas[1] == pytest.approx(0.5 + 7 / 15)
  # Same multiset of alphas as the linear stagger, only the order over depth differs.
  stagger = P.layer_alphas("stagger", 16)
  assert sorted(alphas) == sorted(stagger)
  assert stagger[0] == 0.5 and stagger[-1] == 1.5
  assert alphas != stagger


def test_fixed_learned_dense_alphas():
  assert P.layer_alphas("fixed", 16) == (1.0,) * 16
  assert P.layer_alphas("learned", 4) == (1.0,) * 4
  assert P.layer_alphas("dense", 16) is None


def test_pow2_rungs_depend_on_run_length():
  p1 = P.Pattern.build(base="pow2", alpha=1.0, window=8, seq_len=1024)
  p4 = P.Pattern.build(base="pow2", alpha=1.0, window=8, seq_len=4096)
  assert p1.far == (16, 32, 64, 128, 256, 512)
  assert p4.far == (16, 32, 64, 128, 256, 512, 1024, 2048)
  frozen = P.Pattern.build(
    base="pow2", alpha=1.0, window=8, seq_len=4096, train_len=1024, cap_mode="train"
  )
  assert frozen == p1


def test_stagger_rung_gained_at_2048_only_in_run_mode():
  alphas = P.layer_alphas("stagger", 16)
  threshold = 1023.5 / 987  # round(alpha * 987) > 1023  <=>  alpha > ~1.037
  gained = []
  for a in alphas:
    train = P.Pattern.build(base="fib", alpha=a, window=12, seq_len=1024)
    run = P.Pattern.build(base="fib", alpha=a, window=12, seq_len=2048)
    frozen = P.Pattern.build(
      base="fib", alpha=a, window=12, seq_len=2048, train_len=1024, cap_mode="train"
    )
    assert frozen == train
    extra = set(run.far) - set(train.far)
    if a > threshold:
      assert extra == {round(a * 987)} and 1023 < round(a * 987) <= 1481
    else:
      assert not extra
    gained.append(bool(extra))
  assert sum(gained) == 7  # alphas 1.0667 .. 1.5


def test_rounding_half_to_even():
  # alpha * b lands on exact halves: 0.5 * 13 = 6.5 -> 6, 0.5 * 21 = 10.5 -> 10, 1.5 * 5 = 7.5 -> 8
  p = P.Pattern.build(base="fib", alpha=0.5, window=2, seq_len=1024)
  assert 6 in p.far and 7 not in p.far and 10 in p.far and 11 not in p.far
  assert 8 in P.Pattern.build(base="fib", alpha=1.5, window=2, seq_len=1024).far
  assert P.far_distances(0.5, (5,), 0, 100) == (2,)  # 2.5 -> 2
  assert P.far_distances(0.5, (7,), 0, 100) == (4,)  # 3.5 -> 4


def test_duplicate_rungs_collapse_and_cap():
  p = P.Pattern.build(base="fib", alpha=0.5, window=0, seq_len=64)
  assert len(p.far) == len(set(p.far))
  assert p.far[-1] <= 63
  assert P.Pattern.build(base="fib", alpha=1.0, window=12, seq_len=100).far == (13, 21, 34, 55, 89)


def test_mask_matches_distances():
  rng = np.random.default_rng(0)
  for _ in range(20):
    t = int(rng.integers(2, 80))
    w = int(rng.integers(0, t))
    p = P.Pattern.build(
      base=str(rng.choice(["fib", "pow2"])), alpha=float(rng.uniform(0.3, 2)), window=w, seq_len=t
    )
    m = p.mask(t)
    for i, j in itertools.product(range(t), range(t)):
      assert m[i, j] == (j <= i and (i - j) in p.distances)


def test_pattern_is_hashable_and_table():
  p = P.Pattern.build(base="fib", alpha=1.0, window=12, seq_len=1024)
  assert hash(p) == hash(P.Pattern(12, p.far))
  np.testing.assert_array_equal(p.far_table(), np.asarray(p.far, np.int32))


def test_model_patterns_per_schedule():
  pats = P.model_patterns(base="fib", schedule="stagger", window=12, num_layers=16, seq_len=1024)
  assert len(pats) == 16 and pats[0].far[-1] == round(0.5 * 987)
  assert all(p.window == 12 for p in pats)
  learned = P.model_patterns(base="fib", schedule="learned", window=8, num_layers=3, seq_len=128)
  assert all(isinstance(p, P.LearnedPattern) for p in learned)
  assert learned[0].freeze(1.0) == P.Pattern.build(base="fib", alpha=1.0, window=8, seq_len=128)
  dense = P.model_patterns(base="fib", schedule="dense", window=12, num_layers=2, seq_len=64)
  assert dense[0].window == 63 and dense[0].mask(64).sum() == 64 * 65 // 2


@pytest.mark.parametrize(
  "kwargs, match",
  [
    (dict(base="fib", alpha=1.0, window=16, seq_len=16), "window=16"),
    (dict(base="fib", alpha=1.0, window=20, seq_len=16), "window=20"),
    (dict(base="fibo", alpha=1.0, window=2, seq_len=16), "fibo"),
    (dict(base="fib", alpha=-0.5, window=2, seq_len=16), "-0.5"),
    (dict(base="fib", alpha=math.nan, window=2, seq_len=16), "nan"),
    (dict(base="fib", alpha=1.0, window=2, seq_len=16, cap_mode="frozen"), "frozen"),
  ],
)
def test_bad_arguments(kwargs, match):
  with pytest.raises(ValueError, match=match):
    P.Pattern.build(**kwargs)


def test_bad_schedule():
  with pytest.raises(ValueError, match="zigzag"):
    P.layer_alphas("zigzag", 16)
  with pytest.raises(ValueError, match="zigzag"):
    P.model_patterns(base="fib", schedule="zigzag", window=2, num_layers=2, seq_len=16)
