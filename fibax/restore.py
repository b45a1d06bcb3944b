"""Read-only restore of a run that `fibax.train` checkpointed: its config and parameters.

Reads the trainer's format (`fibax.checkpoint`: an orbax `CheckpointManager` with the state, the
data iterator's position and a JSON record holding the run config and a checksum per state
leaf) with `fibax.checkpoint.restore_step`, the reader that training resumes with. Only the
record, the step and the parameters are read (no optimizer state: no optimizer is built), their
checksums are checked, and nothing is moved or written: a damaged checkpoint is an error naming
it, not a fallback to an older step.

    run = load_run("runs/fib_stagger_w12")      # newest step; or step=..., or a step's dir
    run.cfg, run.params, run.step

The path is an `etils.epath` path: local or gs://.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import orbax.checkpoint as ocp
from etils import epath

from fibax import sharding
from fibax.checkpoint import (
  DATA,
  META,
  STATE,
  CheckpointError,
  absolute,
  error_line,
  quiet_orbax,
  restore_step,
)
from fibax.config import RunConfig
from fibax.steps import params_state


@dataclasses.dataclass(frozen=True)
class Run:
  """A checkpointed run: its config, its parameters at `step`, and a label for reports."""

  cfg: RunConfig
  params: Any
  step: int
  checkpoint_dir: epath.Path
  label: str


def run_config_from_dict(record: dict) -> RunConfig:
  """The inverse of `dataclasses.asdict(RunConfig)` (as stored in a checkpoint's record)."""

  def build(cls, values: dict):
    kwargs = {}
    for field in dataclasses.fields(cls):
      if field.name not in values:
        continue
      value = values[field.name]
      if dataclasses.is_dataclass(field.default):
        value = build(type(field.default), value)
      elif isinstance(value, list):
        value = tuple(value)
      kwargs[field.name] = value
    return cls(**kwargs)

  return build(RunConfig, record)


def _resolve_checkpoint(path: epath.Path, step: int | None) -> tuple[epath.Path, int | None]:
  """(directory of step directories, step): a workdir, its checkpoints/ or one step's dir."""
  if not path.exists():
    raise CheckpointError(f"checkpoint={str(path)!r} does not exist")
  if (path / "checkpoints").is_dir():
    return path / "checkpoints", step
  if path.name.isdigit() and (path / STATE).is_dir():
    return path.parent, int(path.name) if step is None else step
  return path, step


def checkpoint_dir(path: str | os.PathLike) -> epath.Path:
  """The directory of step directories that `load_run(path)` reads (absolute), without opening
  it. Raises CheckpointError if `path` does not exist."""
  return _resolve_checkpoint(absolute(path), None)[0]


def _run_config(record: dict, overrides: dict | None) -> RunConfig:
  """The record's run config, `overrides` replacing fields of its attention config."""
  cfg = run_config_from_dict(record["config"])
  if overrides:
    attention = dataclasses.replace(cfg.model.attention, **overrides)
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, attention=attention))
  return cfg


def load_run(
  path: str | os.PathLike,
  *,
  step: int | None = None,
  label: str | None = None,
  overrides: dict[str, Any] | None = None,
) -> Run:
  """The run config and parameters of a checkpoint written by `fibax.train`.

  Args:
    path: the run's workdir, its `checkpoints/` directory, or one step's directory.
    step: which step (default: the newest).
    overrides: `AttentionConfig` fields to replace before anything is traced (e.g.
      {"impl": "xla"} to read a checkpoint trained with the GPU kernel on a CPU).

  Raises:
    CheckpointError: no such directory, no checkpoint in it, or one that fails to load or
      whose checksums disagree with its record.
  """
  ckpt_dir, step = _resolve_checkpoint(absolute(path), step)
  options = ocp.CheckpointManagerOptions(read_only=True, create=False, save_interval_steps=0)
  try:
    with quiet_orbax():
      mngr = ocp.CheckpointManager(ckpt_dir, options=options, item_names=(STATE, DATA, META))
    steps = sorted(mngr.all_steps())
  except Exception as e:  # noqa: BLE001 (any failure to open is reported the same way)
    raise CheckpointError(f"cannot open checkpoints in {ckpt_dir} ({error_line(e)})") from None
  if not steps:
    raise CheckpointError(f"no checkpoint in {ckpt_dir} (expected step directories of fibax.train)")
  if step is None:
    step = steps[-1]
  if step not in steps:
    raise CheckpointError(f"step={step} is not in {ckpt_dir} (steps there: {steps})")
  mesh = sharding.make_mesh(1, 1)
  try:
    with quiet_orbax():
      state, record = restore_step(
        mngr, step, lambda record: params_state(_run_config(record, overrides).model, mesh)
      )
  except Exception as e:  # noqa: BLE001 (any failure to load is reported the same way)
    raise CheckpointError(
      f"checkpoint step {step} in {ckpt_dir} is unreadable ({error_line(e)})"
    ) from None
  finally:
    mngr.close()
  if label is None:
    label = ckpt_dir.parent.name if ckpt_dir.name == "checkpoints" else ckpt_dir.name
  return Run(_run_config(record, overrides), state.params, step, ckpt_dir, label)
