"""Checkpoints: an orbax `CheckpointManager` holding the train state, the grain iterator's
position and a JSON record with a checksum of every state leaf.

Saves are asynchronous (orbax copies the arrays to host memory, then writes in a background
thread) and atomic (a step directory appears only once complete). On restore the newest step
is tried first; one that fails to load or whose checksums disagree is reported, moved into
`<dir>_corrupt/`, and the next older step is tried. The directory is an `etils.epath` path: local
or gs:// (orbax writes both).
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grain
import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

from fibax.data.files import is_local

STATE, DATA, META = "state", "data", "meta"


def error_line(e: BaseException) -> str:
  """`Type: first line` of an exception, without TensorStore's pointer to its full message."""
  first = (str(e).strip().splitlines() or [""])[0].split(" See full TensorStore")[0]
  return f"{type(e).__name__}: {first}"[:300]


@contextlib.contextmanager
def quiet_orbax():
  """Orbax warns through absl on every read-only open ("Given directory is read only"), and a
  damaged array leaves asyncio logging pages of tracebacks; our CheckpointError says it all."""
  loggers = [logging.getLogger(name) for name in ("absl", "asyncio")]
  levels = [logger.level for logger in loggers]
  for logger in loggers:
    logger.setLevel(logging.CRITICAL)
  try:
    yield
  finally:
    for logger, level in zip(loggers, levels, strict=True):
      logger.setLevel(level)


def absolute(path: str | os.PathLike) -> epath.Path:
  """`path` as an absolute epath.Path (a URI such as gs://bucket/run is left as it is)."""
  return epath.Path(Path(path).absolute() if is_local(path) else path)


class CheckpointError(RuntimeError):
  """No readable checkpoint where one was expected."""


@jax.jit
def _checksums(tree) -> list[jax.Array]:
  """Per leaf, the sum of its bits as uint32 words, modulo 2^32 (order-independent, exact)."""

  def one(x):
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
      x = jax.random.key_data(x)
    bits = jnp.dtype(x.dtype).itemsize * 8
    if bits not in (8, 16, 32):
      raise NotImplementedError(f"checksum of dtype={x.dtype} is not supported")
    word = jax.lax.bitcast_convert_type(x, jnp.dtype(f"uint{bits}")).astype(jnp.uint32)
    return jnp.sum(word, dtype=jnp.uint32)

  return [one(x) for x in jax.tree.leaves(tree)]


def checksums(tree) -> list[int]:
  return [int(c) for c in jax.device_get(_checksums(tree))]


def restore_step(
  mngr: ocp.CheckpointManager, step: int, abstract: Callable[[dict], Any], data_iter=None
) -> tuple[Any, dict]:
  """One step's (state, record): the record, then the state that `abstract(record)` describes
  (a TrainState of ShapeDtypeStructs with their shardings; with opt_state None, only the step and
  the parameters) and, given `data_iter`, the iterator's position. Training resumes with it
  (`Checkpointer.restore`), evaluation and generation load with it (`fibax.restore.load_run`).

  The arrays must match the record's checksums: all of them, or without opt_state the leading
  ones (a TrainState's leaves are the step, the parameters, then the optimizer state).

  Raises:
    CheckpointError: the record names another step, or the checksums differ; and whatever
      orbax raises for a step that fails to load.
  """
  record = mngr.restore(step, args=ocp.args.Composite(**{META: ocp.args.JsonRestore()}))[META]
  if record.get("step") != step:
    raise CheckpointError(f"its record says step={record.get('step')}")
  target = abstract(record)
  if target.opt_state is None:
    fields = {"step": target.step, "params": target.params}
    restore_args = ocp.checkpoint_utils.construct_restore_args(fields)
    args = {STATE: ocp.args.PyTreeRestore(fields, restore_args, partial_restore=True)}
  else:
    args = {STATE: ocp.args.StandardRestore(target)}
  if data_iter is not None:
    args[DATA] = grain.checkpoint.CheckpointRestore(data_iter)
  state = mngr.restore(step, args=ocp.args.Composite(**args))[STATE]
  if target.opt_state is None:
    state = target.replace(**state)
  got, want = checksums(state), record["checksums"]
  bad = [i for i, (a, b) in enumerate(zip(got, want[: len(got)], strict=True)) if a != b]
  if bad:
    raise CheckpointError(f"checksums differ in {len(bad)} of {len(got)} state leaves")
  return state, record


class Checkpointer:
  """Saves and restores (state, data iterator) under `directory`, keeping the newest `keep`."""

  def __init__(
    self,
    directory: str | os.PathLike,
    *,
    keep: int,
    async_save: bool = True,
    log: Callable[[str], None] = print,
  ):
    self.directory = absolute(directory)
    self.log = log
    self._unchecked = False  # a save whose outcome check() has not yet seen
    options = ocp.CheckpointManagerOptions(
      max_to_keep=keep, create=True, enable_async_checkpointing=async_save
    )
    self._mngr = ocp.CheckpointManager(
      self.directory, options=options, item_names=(STATE, DATA, META)
    )

  def steps(self) -> list[int]:
    return list(self._mngr.all_steps())

  def save(self, step: int, state, data_iter, meta: dict | None = None) -> None:
    """Starts saving `state` and the iterator's position at `step`; returns once the arrays are
    copied off the device (so the caller may donate them) and the write runs in background."""
    record = {"step": step, "checksums": checksums(state), **(meta or {})}
    self._unchecked = True
    try:
      self._save(step, state, data_iter, record)
    except Exception as e:  # noqa: BLE001 (e.g. the disk is full)
      raise self._save_failed(e) from None

  def _save(self, step: int, state, data_iter, record: dict) -> None:
    self._mngr.save(
      step,
      args=ocp.args.Composite(
        **{
          STATE: ocp.args.StandardSave(state),
          DATA: grain.checkpoint.CheckpointSave(data_iter),
          META: ocp.args.JsonSave(record),
        }
      ),
      force=True,
    )

  def restore(self, abstract_state, data_iter) -> tuple[object, dict] | None:
    """The newest readable checkpoint as (state, meta), the iterator set to its position;
    None if there is no checkpoint. Unreadable newer steps are reported and moved aside.

    Raises:
      CheckpointError: checkpoints exist but none of them can be read, or unreadable ones
        cannot be moved aside.
    """
    failures = []
    for step in sorted(self.steps(), reverse=True):
      try:
        state, meta = restore_step(self._mngr, step, lambda _: abstract_state, data_iter)
      except Exception as e:  # noqa: BLE001 (any failure to load is reported the same way)
        reason = error_line(e)
        self.log(f"checkpoint step {step} in {self.directory} is unreadable ({reason})")
        failures.append((step, reason))
        continue
      if failures:
        try:
          moved = [self._move_aside(s) for s, _ in failures]
        except OSError as e:  # e.g. gs:// through gcsfs: epath renames into existing folders only
          raise CheckpointError(
            f"could not move unreadable step(s) {[s for s, _ in failures]} out of "
            f"{self.directory} ({error_line(e)}); move them away, then resume"
          ) from None
        self.log(
          f"resuming from step {step} instead; moved unreadable step(s) "
          f"{[s for s, _ in failures]} to {moved[0].parent}"
        )
      return state, meta
    if failures:
      raise CheckpointError(
        f"no readable checkpoint in {self.directory}: steps {[s for s, _ in failures]} all "
        "failed to load (see above; a config other than the one that wrote them fails the "
        "same way); move the directory away to start afresh"
      )
    return None

  def _move_aside(self, step: int) -> epath.Path:
    aside = self.directory.parent / f"{self.directory.name}_corrupt" / f"{step}-{int(time.time())}"
    if jax.process_index() == 0:
      aside.parent.mkdir(parents=True, exist_ok=True)
      (self.directory / str(step)).rename(aside)
    multihost_utils.sync_global_devices(f"fibax_move_aside_{step}")
    self._mngr.reload()
    return aside

  def _save_failed(self, e: BaseException) -> CheckpointError:
    good = self.steps()
    return CheckpointError(
      f"saving a checkpoint in {self.directory} failed ({error_line(e)}); the newest complete "
      + (f"one is step {max(good)}" if good else "one: none")
    )

  def check(self) -> None:
    """Raises CheckpointError if a background save has failed (call it every step: it does
    nothing once the last save is known to have finished)."""
    if not self._unchecked:
      return
    try:
      self._mngr.check_for_errors()
      if not self._mngr.is_saving_in_progress():
        self._mngr.wait_until_finished()  # returns at once; raises if the finished save failed
        self._unchecked = False
    except Exception as e:  # noqa: BLE001 (whatever the writer raised, e.g. a full disk)
      self._unchecked = False
      raise self._save_failed(e) from None

  def wait(self) -> None:
    """Waits for the background save; raises CheckpointError if it failed."""
    try:
      self._mngr.wait_until_finished()
    except Exception as e:  # noqa: BLE001
      raise self._save_failed(e) from None

  def close(self) -> None:
    try:
      self.wait()
    finally:
      self._mngr.close()
