"""Device mesh, logical-axis rules, and the multi-host set-up.

The model annotates every parameter with logical axes (fibax.model: "vocab", "embed",
"heads", "kv_heads", "kv", "mlp", "norm"); `RULES` maps them onto the mesh axes `DATA` and
`MODEL` (Megatron-style: heads and the MLP hidden split over `MODEL`, batches over `DATA`).
A dimension that the mesh axis does not divide stays replicated, so any model runs on any
mesh (e.g. the paper's MLP hidden 1366 on model = 4).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA, MODEL = "data", "model"
BATCH = "batch"  # the logical axis of batch rows

RULES: tuple[tuple[str, str | None], ...] = (
  (BATCH, DATA),
  ("vocab", MODEL),
  ("embed", None),
  ("heads", MODEL),
  ("kv_heads", MODEL),
  ("kv", None),
  ("mlp", MODEL),
  ("norm", None),
)


def maybe_initialize_distributed(mode: str = "auto") -> bool:
  """Calls `jax.distributed.initialize` when asked or when a multi-process launch is seen.

  "auto" initializes when JAX_COORDINATOR_ADDRESS is set (with JAX_NUM_PROCESSES and
  JAX_PROCESS_ID, e.g. several CPU processes on one host) or on a multi-host TPU slice
  (TPU_WORKER_HOSTNAMES lists several hosts); "on" always initializes and lets JAX detect
  the cluster (SLURM, Open MPI, Kubernetes, Cloud TPU); "off" never. Must run before
  anything else touches JAX devices. Returns whether JAX runs distributed.
  """
  if mode not in ("auto", "on", "off"):
    raise ValueError(f"distributed={mode!r} must be one of auto, on, off")
  if jax.distributed.is_initialized():
    return True
  env = os.environ
  pod = "," in env.get("TPU_WORKER_HOSTNAMES", "")
  if mode == "off" or (mode == "auto" and "JAX_COORDINATOR_ADDRESS" not in env and not pod):
    return False
  kwargs = {}
  if "JAX_NUM_PROCESSES" in env:
    kwargs["num_processes"] = int(env["JAX_NUM_PROCESSES"])
  if "JAX_PROCESS_ID" in env:
    kwargs["process_id"] = int(env["JAX_PROCESS_ID"])
  jax.distributed.initialize(**kwargs)
  return True


def make_mesh(data: int = -1, model: int = 1, devices: Sequence | None = None) -> Mesh:
  """A (data, model) mesh over `devices` (default: all); data = -1 takes what model leaves.

  A single process may ask for fewer devices than it has; it gets the first ones.
  """
  devices = list(jax.devices() if devices is None else devices)
  if model < 1 or len(devices) % model:
    raise ValueError(f"mesh model={model} does not divide {len(devices)} devices")
  if data == -1:
    data = len(devices) // model
  if data * model < len(devices) and jax.process_count() == 1:
    devices = devices[: data * model]  # e.g. one device of several, for a reference run
  if data * model != len(devices):
    raise ValueError(f"mesh data={data} x model={model} != {len(devices)} devices")
  if jax.process_count() > 1:
    # Keeps each process's devices together along `data`, so its batch rows stay local.
    grid = mesh_utils.create_device_mesh((data, model), devices)
  else:
    grid = np.asarray(devices).reshape(data, model)
  return Mesh(grid, (DATA, MODEL))


def _mesh_axes(names: tuple, shape: tuple[int, ...], mesh: Mesh, rules) -> PartitionSpec:
  table = dict(rules)
  axes = []
  for name, size in zip(names, shape, strict=True):
    axis = table.get(name) if name is not None else None
    if axis is not None and (size % mesh.shape[axis] or axis in axes):
      axis = None  # not divisible (or already used by another dimension): replicate
    axes.append(axis)
  return PartitionSpec(*axes)


def param_shardings(boxed_params, mesh: Mesh, rules=RULES):
  """NamedShardings for the *unboxed* parameter tree, from a (possibly abstract) tree of
  `nn.LogicallyPartitioned` leaves as `model.init` returns it."""

  def one(leaf):
    if isinstance(leaf, nn.LogicallyPartitioned):
      spec = _mesh_axes(tuple(leaf.names), leaf.value.shape, mesh, rules)
    else:
      spec = PartitionSpec()
    return NamedSharding(mesh, spec)

  return jax.tree.map(one, boxed_params, is_leaf=lambda x: isinstance(x, nn.Partitioned))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Rows over the data axis, the sequence unsplit."""
  return NamedSharding(mesh, PartitionSpec(DATA))


def global_batch(local_batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """This process's rows (fibax.data gives each process B/P rows) -> global arrays [B, ...]."""
  sharding = batch_sharding(mesh)
  return {
    k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
    for k, v in local_batch.items()
  }
