"""Test set-up: 8 fake CPU devices (before JAX starts), rank promotion raises."""

import os

# Cheaper XLA:CPU compiles: Pallas interpret mode compiles every kernel pattern, and
# compile time, not run time, dominates the CPU suite.
# FIBAX_GPU_TESTS=1 runs on the accelerator with XLA's defaults.
if os.environ.get("FIBAX_GPU_TESTS") != "1":
  os.environ.setdefault(
    "XLA_FLAGS",
    "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0"
    " --xla_llvm_disable_expensive_passes=true",
  )
  os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")


def pytest_collection_modifyitems(config, items):
  has_gpu = any(d.platform == "gpu" for d in jax.devices())
  skip = pytest.mark.skip(reason="needs a CUDA GPU")
  for item in items:
    if "gpu" in item.keywords and not has_gpu:
      item.add_marker(skip)
