"""The training loop, callable from a notebook, and its CLI.

    python -m fibax.train --config configs/tiny.py --workdir runs/tiny
    python -m fibax.train --config configs/paper.py:fib_stagger_w12 --workdir runs/fib \\
        --set train.total_steps=100 train.mesh_model=2

    from fibax.train import train
    summary = train(run_config, "runs/tiny")

The workdir holds `checkpoints/`, `metrics.jsonl`, TensorBoard event files and
`config.json` (written when the run starts afresh). The workdir and the data directory are
`etils.epath` paths: local, or gs:// (read and written through epath and orbax). Running again
on the same workdir resumes exactly where the last checkpoint left off (parameters, optimizer
state, step and data position); a config that contradicts the checkpoints' (other than in how
things run: logging, evaluation, checkpoint cadence, mesh, kernels) is refused. SIGTERM or SIGINT
(Ctrl-C) saves a checkpoint after the current step and returns (the CLI then exits with 128 +
the signal: 143 or 130). One training at a time holds a local workdir (a lock file; gs:// has no
locks, so nothing stops a second training there); a failed background checkpoint write stops
training at once, and a state with non-finite parameters is never saved.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from jax.experimental import multihost_utils

from fibax import attention, cli, sharding
from fibax import metrics as metrics_lib
from fibax.checkpoint import Checkpointer, CheckpointError, quiet_orbax
from fibax.config import RunConfig
from fibax.config_loader import add_overrides_argument, apply_overrides, load_config
from fibax.data.evaluation import dataset_windows
from fibax.data.files import DataError, is_local, replace_text
from fibax.evaluate import window_nll
from fibax.model import learned_alphas
from fibax.steps import make_steps, nll_sum_fn

PREEMPTED_EXIT_CODE = 128 + signal.SIGTERM
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
LOCK_FILE = ".lock"
# Fields that say how a run runs, not what it computes: they may change between a run's
# starts. Any other difference from the checkpoints' config is refused on resume.
OPERATIONAL_FIELDS = frozenset(
  {
    "data_dir",
    "model.attention.impl",
    "model.attention.dense_impl",
    "model.attention.gpu_blocks",
    "model.embed_backward",
    "model.mlp_pad",
    "model.loss_chunk",
    "model.norm_impl",
    "model.loss_lse",
    "model.remat",
    *(
      f"train.{name}"
      for name in (
        "eval_every", "checkpoint_every", "keep_checkpoints", "eval_tokens", "log_every",
        "async_checkpoint", "mesh_data", "mesh_model", "distributed", "peak_tflops",
        "data_workers", "progress_bar",
      )
    ),
  }
)  # fmt: skip


class TrainingDiverged(FloatingPointError):
  """The loss or the parameters became NaN or inf; nothing after the last good checkpoint
  was saved."""


class WorkdirError(RuntimeError):
  """The workdir cannot be used: not a directory, not writable, in use by another training,
  or holding checkpoints of a different run."""


class _StopFlag:
  """Set by SIGTERM or SIGINT (while the loop runs, in the main thread)."""

  def __init__(self):
    self.event = threading.Event()
    self.signum = signal.SIGTERM

  def _set(self, signum, _frame):
    self.signum = signal.Signals(signum)
    self.event.set()

  @contextlib.contextmanager
  def installed(self):
    if threading.current_thread() is not threading.main_thread():
      yield self
      return
    previous = {sig: signal.signal(sig, self._set) for sig in STOP_SIGNALS}
    try:
      yield self
    finally:
      for sig, handler in previous.items():
        signal.signal(sig, handler)

  def agreed(self) -> bool:
    """Whether any process was signalled (a collective: call it at the same step everywhere)."""
    flag = np.int32(self.event.is_set())
    if jax.process_count() > 1:
      flag = multihost_utils.process_allgather(flag).max()
    return bool(flag)


def kernel_blocks_note(att) -> str:
  """The start line's ", Pallas GPU blocks SPEC" for a packed Pallas GPU impl
  (`attention.resolved_gpu_blocks`); "" for any other impl."""
  spec = attention.resolved_gpu_blocks(att)
  return f", Pallas GPU blocks {spec}" if spec else ""


@contextlib.contextmanager
def _workdir_lock(workdir: epath.Path, enabled: bool):
  """Holds an exclusive lock on `workdir` (made if missing) while the block runs; one that is
  not local (gs://) is not locked: an object store has no file locks."""
  if not enabled:  # processes other than 0 share process 0's workdir
    yield
    return
  if workdir.exists() and not workdir.is_dir():
    raise WorkdirError(f"workdir {workdir} exists and is not a directory")
  try:
    workdir.mkdir(parents=True, exist_ok=True)
    fd = None
    if is_local(workdir):
      fd = os.open(workdir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
  except OSError as e:
    raise WorkdirError(f"workdir {workdir} is not writable ({e.strerror})") from None
  if fd is None:
    yield
    return
  try:
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      owner = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
      raise WorkdirError(
        f"workdir {workdir} is in use by another training (pid {owner}); not started"
      ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    yield
  finally:
    os.close(fd)  # releases the lock


@jax.jit
def _all_finite(tree) -> jax.Array:
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def _flat(tree, prefix: str = "") -> dict:
  if isinstance(tree, dict):
    return {k: v for key, sub in tree.items() for k, v in _flat(sub, f"{prefix}{key}.").items()}
  return {prefix[:-1]: tree}


def contradictions(cfg: RunConfig, saved: dict) -> list[str]:
  """`field: now != saved` for every field of `cfg` that differs from the config the
  checkpoints were written with, apart from OPERATIONAL_FIELDS."""
  now = _flat(json.loads(json.dumps(dataclasses.asdict(cfg))))
  then = _flat(saved)
  return [
    f"{k}={now.get(k)!r} (checkpoints: {then.get(k)!r})"
    for k in sorted(now.keys() | then.keys())
    if k not in OPERATIONAL_FIELDS and now.get(k) != then.get(k)
  ]


def prepare_data(cfg: RunConfig, log: Callable[[str], None] = print) -> epath.Path:
  """The run's data directory, prepared (tokenizer with the model's vocabulary) if missing
  (into a local directory only: one on gs:// must be prepared already)."""
  from fibax.data.build import prepare

  data_dir = epath.Path(cfg.data_dir or f"data/{cfg.data_source}")
  if jax.process_index() == 0 and not (data_dir / "manifest.json").exists():
    log(f"preparing {cfg.data_source!r} into {data_dir} (vocab {cfg.model.vocab_size})")
    prepare(cfg.data_source, data_dir, vocab_size=cfg.model.vocab_size, log=log)
  if jax.process_count() > 1:  # every process, whatever it sees on its own disk
    multihost_utils.sync_global_devices("fibax_prepare_data")
  return data_dir


def validation_windows(data_dir: epath.Path, cfg: RunConfig) -> np.ndarray:
  """The first `train.eval_tokens` tokens of the validation split in evaluation windows
  (`fibax.data.evaluation.dataset_windows`), int32[N, seq_len + 1]."""
  seq_len, max_tokens = cfg.model.seq_len, cfg.train.eval_tokens
  windows_NxL1 = dataset_windows(data_dir, ("validation",), seq_len, max_tokens)
  if not len(windows_NxL1):
    raise DataError(
      f"{data_dir}: no validation window of seq_len + 1 = {seq_len + 1} tokens fits in one "
      f"document and in train.eval_tokens={max_tokens}; train.eval_tokens=0 trains without "
      "validation"
    )
  return windows_NxL1


class _Logger:
  """Collects per-step device metrics and fetches them only when asked (no per-step sync)."""

  def __init__(self, cfg: RunConfig, writer, progress, num_devices: int):
    self.cfg, self.writer, self.progress = cfg, writer, progress
    self.pending: list[tuple[int, dict]] = []
    self.tokens_per_step = cfg.train.batch_size * cfg.model.seq_len
    self.flops_per_token = metrics_lib.flops_per_token(cfg.model)
    kind = jax.devices()[0].device_kind
    peak = cfg.train.peak_tflops or metrics_lib.peak_tflops(kind)
    self.peak_flops = None if peak is None else peak * 1e12 * num_devices
    self.clock, self.clock_step, self.last_loss = None, None, None

  def start_clock(self, step: int) -> None:
    self.clock, self.clock_step = time.perf_counter(), step

  def flush(self, step: int, state) -> None:
    """Writes one record for the pending steps; raises TrainingDiverged on a non-finite loss."""
    if not self.pending:
      return
    fetched = jax.device_get([m for _, m in self.pending])
    steps_done = [s for s, _ in self.pending]
    self.pending = []
    for s, m in zip(steps_done, fetched, strict=True):
      loss, grad_norm = float(m["loss"]), float(m["grad_norm"])
      if not (math.isfinite(loss) and math.isfinite(grad_norm)):
        raise TrainingDiverged(f"loss {loss} / gradient norm {grad_norm} at step {s} is not finite")
    loss = float(np.mean([np.float64(m["loss"]) for m in fetched]))
    record = {
      "loss": loss,
      "ppl": math.exp(min(loss, 700.0)),
      "lr": float(fetched[-1]["lr"]),
      "grad_norm": float(fetched[-1]["grad_norm"]),
      "tokens_per_s": None,
      "mfu": None,
    }
    now = time.perf_counter()
    if self.clock is not None and step > self.clock_step:
      record["tokens_per_s"] = (step - self.clock_step) * self.tokens_per_step / (now - self.clock)
      if self.peak_flops:
        record["mfu"] = record["tokens_per_s"] * self.flops_per_token / self.peak_flops
      self.clock, self.clock_step = now, step
    att = self.cfg.model.attention
    if att.schedule == "learned" and att.frozen_alphas is None:
      record["alphas"] = list(learned_alphas(state.params, self.cfg.model))
    self.writer.write(step, record)
    self.last_loss = loss
    tps = record["tokens_per_s"]
    line = (
      f"step {step}/{self.cfg.train.total_steps}  loss {loss:.4f}  ppl {record['ppl']:.1f}  "
      f"lr {record['lr']:.2e}  |g| {record['grad_norm']:.3f}"
      + ("" if tps is None else f"  {tps:,.0f} tok/s")
      + ("" if record["mfu"] is None else f"  mfu {record['mfu']:.1%}")
    )
    self.progress.print(line)
    self.progress.update(step, f"loss {loss:.3f}")


def train(
  cfg: RunConfig, workdir: str | os.PathLike, *, log: Callable[[str], None] = print
) -> dict:
  """Trains `cfg` in `workdir`, resuming from its newest readable checkpoint.

  Returns:
    {"step", "loss" (mean of the last logged steps), "val_loss", "preempted", "signal" (the
    stopping signal's number, or None), "seconds"}.

  Raises:
    TrainingDiverged: the loss or the parameters became NaN or inf (checkpoints up to then
      stay intact).
    fibax.checkpoint.CheckpointError: checkpoints exist but none can be read, or a
      checkpoint write failed (the newer complete ones stay).
    WorkdirError: the workdir is not a writable directory, another training holds it, or its
      checkpoints were written with a contradicting config.
  """
  sharding.maybe_initialize_distributed(cfg.train.distributed)
  workdir = epath.Path(workdir)
  main = jax.process_index() == 0
  # Orbax logs a failed background save's traceback from its own thread; the CheckpointError
  # raised here says it in one line.
  with _workdir_lock(workdir, main), quiet_orbax():
    return _train(cfg, workdir, main, log if main else (lambda _: None))


def _train(cfg: RunConfig, workdir: epath.Path, main: bool, log: Callable[[str], None]) -> dict:
  from fibax.data import train_iterator

  start_time = time.perf_counter()
  tc = cfg.train
  data_dir = prepare_data(cfg, log)
  windows_NxL1 = validation_windows(data_dir, cfg) if tc.eval_tokens > 0 else None
  mesh = sharding.make_mesh(tc.mesh_data, tc.mesh_model)
  steps = make_steps(cfg, mesh)
  data_iter = train_iterator(
    data_dir,
    cfg.model.seq_len,
    tc.batch_size,
    tc.seed,
    worker_count=tc.data_workers,
    vocab_size=cfg.model.vocab_size,
  )
  ckpt = Checkpointer(
    workdir / "checkpoints", keep=tc.keep_checkpoints, async_save=tc.async_checkpoint, log=log
  )
  try:
    restored = ckpt.restore(steps.abstract_state, data_iter)
  except BaseException:
    ckpt.close()
    raise
  if restored is not None and "config" in restored[1]:
    if differ := contradictions(cfg, restored[1]["config"]):
      ckpt.close()
      raise WorkdirError(
        f"{workdir} holds checkpoints of another config: {'; '.join(differ)}; use another "
        "workdir, or the checkpoints' config"
      )
  state = steps.init(tc.seed) if restored is None else restored[0]
  step = int(state.step)
  if main and (restored is None or not (workdir / "config.json").exists()):
    replace_text(workdir / "config.json", json.dumps(dataclasses.asdict(cfg), indent=2) + "\n")
  if step >= tc.total_steps:
    log(f"{workdir} is already trained to step {step} of {tc.total_steps}; nothing to do")
  log(
    f"{'resuming at' if restored else 'starting'} step {step} of {tc.total_steps} on "
    f"{mesh.devices.size} {jax.devices()[0].platform} device(s), mesh {dict(mesh.shape)}"
    f"{kernel_blocks_note(cfg.model.attention)}"
  )
  writer = metrics_lib.MetricWriter(workdir, enabled=main, resume_step=step)
  progress = metrics_lib.Progress(tc.total_steps, step, bar=main and tc.progress_bar, log=log)
  logger = _Logger(cfg, writer, progress, mesh.devices.size)
  stop, preempted, val_loss = _StopFlag(), False, None
  try:
    with stop.installed():
      while step < tc.total_steps and not preempted:
        batch = sharding.global_batch(next(data_iter), mesh)
        state, step_metrics = steps.train(state, batch)
        step += 1
        ckpt.check()  # a background save that failed stops the run here
        logger.pending.append((step, step_metrics))
        if logger.clock is None:
          jax.block_until_ready(state)  # the first step compiles: time from its end
          logger.start_clock(step)
        last = step == tc.total_steps
        # Single process: check the signal every step; several: at log steps (a collective).
        check = jax.process_count() == 1 or step % tc.log_every == 0 or last
        preempted = check and stop.agreed()
        save = step % tc.checkpoint_every == 0 or last or preempted
        run_eval = tc.eval_tokens > 0 and (step % tc.eval_every == 0 or last)
        if step % tc.log_every == 0 or save or run_eval:
          logger.flush(step, state)  # before any save: a NaN state is never checkpointed
        if run_eval:
          # Mean token NLL, by the loop that `python -m fibax.eval` runs.
          nll_L = window_nll(nll_sum_fn(cfg.model), state.params, windows_NxL1, tc.batch_size, mesh)
          val_loss = float(nll_L.mean())
          writer.write(step, {"loss": val_loss, "ppl": math.exp(min(val_loss, 700.0))}, "eval")
          progress.print(f"step {step}  validation loss {val_loss:.4f}")
          logger.start_clock(step)  # tokens/s counts training only
        if save:
          if not bool(_all_finite(state.params)):  # an update that diverged at a save step
            raise TrainingDiverged(f"the parameters after step {step} are not finite")
          writer.flush()  # records up to a checkpoint outlive a crash (gs:// holds them back)
          ckpt.save(step, state, data_iter, {"config": dataclasses.asdict(cfg)})
    if preempted:
      ckpt.wait()
      log(f"{stop.signum.name}: saved a checkpoint at step {step} in {ckpt.directory}; stopping")
  except TrainingDiverged as e:
    ckpt.wait()
    saved = ckpt.steps()
    raise TrainingDiverged(
      f"{e}; stopping. Nothing after the last checkpoint was saved: "
      + (f"step {max(saved)} in {ckpt.directory}" if saved else "no checkpoint yet")
    ) from None
  finally:
    progress.close()
    ckpt.close()
    writer.close()
  seconds = time.perf_counter() - start_time
  log(f"done: step {step}, loss {logger.last_loss}, validation loss {val_loss} in {seconds:.1f} s")
  return {
    "step": step,
    "loss": logger.last_loss,
    "val_loss": val_loss,
    "preempted": preempted,
    "signal": int(stop.signum) if preempted else None,
    "seconds": seconds,
  }


def main(argv: list[str] | None = None) -> int:
  parser = cli.Parser(prog="python -m fibax.train", description=__doc__.split("\n")[0])
  parser.add_argument("--config", required=True, help="configs/<file>.py[:<run>[,key=value]]")
  parser.add_argument("--workdir", required=True, help="checkpoints, metrics and event files")
  add_overrides_argument(parser)
  args = parser.parse_args(argv)
  cli.set_xla_defaults()
  try:
    cfg = apply_overrides(load_config(args.config), args.overrides)
  except (OSError, ValueError, TypeError, AttributeError) as e:
    parser.error(str(e))
  try:
    summary = train(cfg, args.workdir)
  except (DataError, WorkdirError) as e:
    return cli.fail(parser.prog, e, cli.BAD_INPUT)
  except (TrainingDiverged, CheckpointError) as e:
    return cli.fail(parser.prog, e, cli.FAILED)
  return 128 + summary["signal"] if summary["preempted"] else 0


if __name__ == "__main__":
  sys.exit(main())
