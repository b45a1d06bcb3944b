"""Training: the optimizer recipe, a falling loss, metrics, the NaN stop, sharded == unsharded,
config files and overrides."""

import dataclasses
import importlib.util
import json
import math
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from jax.sharding import PartitionSpec
from train_helpers import losses, micro_config, reference_run

from fibax import sharding
from fibax.config import RunConfig, TrainConfig
from fibax.config_loader import apply_overrides, load_config
from fibax.data import train_iterator
from fibax.metrics import flops_per_token, peak_tflops
from fibax.model import Transformer
from fibax.optim import decay_mask, lr_schedule, make_optimizer
from fibax.steps import make_steps
from fibax.train import TrainingDiverged, train

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_lr_schedule_of_the_paper():
  lr = lr_schedule(TrainConfig())  # the paper: 300 warmup steps, cosine to 10% at 13,000
  assert float(lr(0)) == 0.0
  np.testing.assert_allclose(float(lr(150)), 1.5e-4, rtol=1e-6)
  np.testing.assert_allclose(float(lr(300)), 3e-4, rtol=1e-6)
  np.testing.assert_allclose(float(lr(6650)), 0.55 * 3e-4, rtol=1e-5)  # cosine midpoint
  np.testing.assert_allclose(float(lr(13_000)), 3e-5, rtol=1e-5)
  assert all(float(lr(s)) <= 3e-4 * (1 + 1e-6) for s in range(0, 13_000, 250))


def test_no_weight_decay_on_one_dimensional_params():
  cfg = dataclasses.replace(RunConfig().model, num_layers=2)
  cfg = dataclasses.replace(cfg, attention=dataclasses.replace(cfg.attention, schedule="learned"))
  tokens = jnp.zeros((1, 64), jnp.int32)
  params = jax.eval_shape(lambda: Transformer(cfg).init(jax.random.key(0), tokens)["params"])
  flat = jax.tree_util.tree_leaves_with_path(decay_mask(nn.meta.unbox(params)))
  by_name = {jax.tree_util.keystr(p): m for p, m in flat}
  assert not any(m for k, m in by_name.items() if "scale" in k or "theta" in k)
  assert all(m for k, m in by_name.items() if "kernel" in k or "embedding" in k)
  # One step on zero gradients: matrices shrink by lr * wd, vectors and scalars do not move.
  opt = make_optimizer(TrainConfig(warmup_steps=0, peak_lr=0.1, weight_decay=0.5))
  p = {"w": jnp.ones((2, 3)), "scale": jnp.ones(3), "theta": jnp.zeros(())}
  updates, _ = opt.update(jax.tree.map(jnp.zeros_like, p), opt.init(p), p)
  np.testing.assert_allclose(updates["w"], -0.05 * np.ones((2, 3)), rtol=1e-6)
  assert not np.any(updates["scale"]) and not np.any(updates["theta"])


def test_loss_falls_and_metrics_are_written(tmp_path_factory):
  cfg, workdir, summary = reference_run(tmp_path_factory)
  loss = losses(workdir)
  assert sorted(loss) == list(range(1, cfg.train.total_steps + 1))
  first, last = np.mean([loss[s] for s in (1, 2, 3)]), np.mean([loss[s] for s in (22, 23, 24)])
  assert last < first - 0.4, (first, last)
  records = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
  train_records = [r for r in records if r["kind"] == "train"]
  for r in train_records:
    assert math.isclose(r["ppl"], math.exp(r["loss"]), rel_tol=1e-9)
    assert r["lr"] >= 0 and r["grad_norm"] > 0
  assert all(r["tokens_per_s"] > 0 for r in train_records[1:])
  assert [r["kind"] for r in records].count("eval") == 1 and summary["val_loss"] < first
  if importlib.util.find_spec("tensorboardX"):  # optional: without it, JSON Lines only
    assert list(workdir.glob("events.out.tfevents.*")), "no TensorBoard event file"
  assert summary == {**summary, "step": 24, "preempted": False}
  assert json.loads((workdir / "config.json").read_text())["train"]["total_steps"] == 24


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path_factory, tmp_path):
  # lr(1) = 1e30 / 4: step 2's update blows the weights up; step 3's gradient is not finite.
  cfg = micro_config(tmp_path_factory, peak_lr=1e30, checkpoint_every=2, eval_tokens=0)
  with pytest.raises(
    TrainingDiverged, match=r"gradient norm (nan|inf) at step 3 is not finite.*step 2 in"
  ):
    train(cfg, tmp_path, log=lambda _: None)
  ckpt_dir = tmp_path / "checkpoints"
  assert sorted(p.name for p in ckpt_dir.iterdir() if p.name.isdigit()) == ["2"]
  state = ocp.StandardCheckpointer().restore(ckpt_dir / "2" / "state")
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(state["params"]))


def _losses_on_mesh(cfg, data: int, model: int, num_steps: int = 4):
  mesh = sharding.make_mesh(data, model)
  steps = make_steps(cfg, mesh)
  state = steps.init(cfg.train.seed)
  it = train_iterator(cfg.data_dir, cfg.model.seq_len, cfg.train.batch_size, 0, worker_count=0)
  out = []
  for _ in range(num_steps):
    state, m = steps.train(state, sharding.global_batch(next(it), mesh))
    out.append((float(m["loss"]), float(m["grad_norm"])))
  return np.array(out), state


def test_sharded_with_accumulation_equals_unsharded(tmp_path_factory):
  # data = 4, model = 2 on the 8 fake devices, with 2 accumulated microbatches, against one
  # device taking the whole batch at once.
  cfg = micro_config(tmp_path_factory)
  accum = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, grad_accum=2))
  sharded, state = _losses_on_mesh(accum, 4, 2)
  unsharded, _ = _losses_on_mesh(cfg, 1, 1)
  np.testing.assert_allclose(sharded, unsharded, rtol=2e-5)
  gate = state.params["layer_0"]["mlp"]["gate"]["kernel"]
  assert gate.sharding.spec == PartitionSpec(None, "model")
  assert len(gate.sharding.device_set) == 8


def test_config_files_and_overrides():
  cfg = load_config(f"{CONFIGS}/paper.py:pow2_stagger_w8")
  assert cfg.model.attention.base == "pow2" and cfg.model.attention.window == 8
  scaled = load_config(f"{CONFIGS}/paper.py:dense,steps=3052").train
  assert (scaled.total_steps, scaled.warmup_steps) == (3052, 70)  # warmup 300 * 3052 / 13000
  cfg = apply_overrides(
    load_config(f"{CONFIGS}/tiny.py"),
    ["train.total_steps=7", "train.peak_lr=1", "model.attention.impl=reference", "data_dir=x"],
  )
  assert (cfg.train.total_steps, cfg.train.peak_lr, cfg.data_dir) == (7, 1.0, "x")
  assert cfg.model.attention.impl == "reference"
  with pytest.raises(ValueError, match="no field 'total_step'"):
    apply_overrides(cfg, ["train.total_step=7"])
  with pytest.raises(ValueError, match="expected int"):
    apply_overrides(cfg, ["train.total_steps=many"])


def test_model_flops_and_peaks():
  cfg = RunConfig().model
  dense = dataclasses.replace(cfg, attention=dataclasses.replace(cfg.attention, schedule="dense"))
  # 6 x (44.1M non-embedding + 16.8M tied unembedding) matmul weights, plus attention.
  assert 6 * 60.8e6 < flops_per_token(cfg) < flops_per_token(dense) < 6 * 60.8e6 * 1.3
  assert peak_tflops("NVIDIA H100 80GB HBM3") == 989.0 and peak_tflops("cpu") is None


@pytest.mark.parametrize(
  "impl, schedule",
  [
    ("pallas_interpret", "stagger"),
    ("pallas_interpret", "learned"),
    pytest.param("pallas_packed", "learned", marks=pytest.mark.gpu),
    pytest.param("pallas", "learned", marks=pytest.mark.gpu),
  ],
)
def test_pallas_kernels_run_per_device_on_a_mesh(tmp_path_factory, impl, schedule):
  """On a data x model mesh the Pallas kernels (custom calls XLA cannot split) run under
  shard_map, each device on its own batch rows and heads, a learned layer's alpha whole on
  each and its gradient summed: the same losses as one device. On CPU (8 host devices) the
  mesh is 2 x 2; a machine of 2 or 3 GPUs takes 2 x 1 and 1 x 2."""
  cfg = micro_config(tmp_path_factory)
  attn = dataclasses.replace(cfg.model.attention, impl=impl, schedule=schedule)
  model = dataclasses.replace(cfg.model, attention=attn)
  on_gpu = not impl.endswith("_interpret")
  if on_gpu:  # the GPU kernels' dots take head_dim >= 16 (the micro model's is 8)
    model = dataclasses.replace(model, head_dim=16)
  cfg = dataclasses.replace(cfg, model=model)
  if jax.device_count() < 2:
    pytest.skip(f"needs 2 devices for a mesh; this machine has {jax.device_count()}")
  meshes = [(2, 2)] if jax.device_count() >= 4 else [(2, 1), (1, 2)]
  unsharded, _ = _losses_on_mesh(cfg, 1, 1, num_steps=3)
  # On a GPU float32 matmuls run as TF32, and a mesh's smaller matmuls may take other cuBLAS
  # algorithms: the tolerance of test_model's GPU step test, against float32 rounding on CPU.
  rtol = 1e-3 if on_gpu else 2e-5
  for data, model_axis in meshes:
    sharded, state = _losses_on_mesh(cfg, data, model_axis, num_steps=3)
    np.testing.assert_allclose(sharded, unsharded, rtol=rtol, err_msg=f"{data} x {model_axis}")

  def kernels_per_device(data, model):
    mesh = sharding.make_mesh(data, model)
    steps = make_steps(cfg, mesh)
    batch = {k: jnp.zeros((8, 32), jnp.int32) for k in ("inputs", "targets")}
    jaxpr = str(jax.make_jaxpr(steps.train)(steps.abstract_state, batch))
    return jaxpr.count("shard_map"), "pallas_call" in jaxpr

  shard_maps, has_kernel = kernels_per_device(*meshes[0])
  assert shard_maps >= cfg.model.num_layers and has_kernel
  assert kernels_per_device(1, 1)[0] == 0  # one device: no shard_map
  if schedule == "learned":
    theta = state.params["layer_0"]["attn"]["theta"]
    assert theta.sharding.is_fully_replicated


def test_resume_allows_the_operational_fields_and_a_checkpoint_written_before_them():
  """How the norms, the loss's log-sum-exp and the attention kernels run (`model.norm_impl`,
  `model.loss_lse`, `model.attention.gpu_blocks`) may change between a run's starts, and a
  checkpoint's config that predates them (no such keys) does not contradict them; a field of
  what the model computes still does."""
  from configs.tiny import get_config
  from fibax.train import contradictions

  cfg = get_config()
  saved = json.loads(json.dumps(dataclasses.asdict(cfg)))
  del saved["model"]["norm_impl"], saved["model"]["loss_lse"]
  del saved["model"]["attention"]["gpu_blocks"]
  tma = dataclasses.replace(cfg.model.attention, gpu_blocks="16,4,16,4,2,2,2,1,0,1,2,1,1,1,0,1,3")
  fast = dataclasses.replace(
    cfg,
    model=dataclasses.replace(
      cfg.model, norm_impl="pallas_interpret", logits_grad="compute", attention=tma
    ),
  )
  fast = dataclasses.replace(fast, model=dataclasses.replace(fast.model, loss_lse="online"))
  assert contradictions(fast, saved) == ["model.logits_grad='compute' (checkpoints: 'float32')"]
  assert contradictions(cfg, saved) == []
