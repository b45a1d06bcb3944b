"""Model FLOPs and MFU, metric sinks (JSON Lines + TensorBoard) and the progress bar."""

from __future__ import annotations

import json
import math
import os
import sys
import time

from etils import epath

from fibax import model as model_lib
from fibax import patterns
from fibax.config import ModelConfig
from fibax.data.files import is_local, replace_text

# Dense bf16 matmul peaks in TFLOP/s per device (vendor figures, no sparsity), matched as
# substrings of `jax.Device.device_kind`, most specific first. Measured peaks run lower (about
# 780 on an H100 SXM); give yours with `train.peak_tflops`.
PEAK_TFLOPS: tuple[tuple[str, float], ...] = (
  ("H100 PCIe", 756.0),
  ("H100", 989.0),
  ("H200", 989.0),
  ("GH200", 989.0),
  ("B200", 2250.0),
  ("A100", 312.0),
  ("L4", 121.0),
  ("TPU v4", 275.0),
  ("TPU v5 lite", 197.0),
  ("TPU v5e", 197.0),
  ("TPU v5p", 459.0),
  ("TPU v5", 459.0),
  ("TPU v6 lite", 918.0),
  ("TPU v6e", 918.0),
)


# A metrics.jsonl that is not local (gs://) is rewritten whole when a record arrives this long
# after the last upload (and on every flush).
REWRITE_SECONDS = 30.0


def peak_tflops(device_kind: str) -> float | None:
  for name, tflops in PEAK_TFLOPS:
    if name.lower() in device_kind.lower():
      return tflops
  return None


def _keys_per_query(pattern, seq_len: int) -> float:
  if isinstance(pattern, patterns.LearnedPattern):
    # The learned path scores every candidate rung; count all of them.
    far = tuple(t for t in pattern.terms if pattern.window < t <= pattern.cap)
    pattern = patterns.Pattern(pattern.window, far)
  return pattern.keys_per_query(seq_len)


def flops_per_token(cfg: ModelConfig) -> float:
  """Training FLOPs per token (forward + backward = 3 x forward), counted from the config.

  Forward: 2 per multiply-add of every weight matrix (the tied unembedding included, the
  embedding lookup not), plus QK^T and PV over the keys each query attends, averaged over
  positions: for a sparse layer W + 1 + rungs keys, for a dense one (T + 1) / 2.
  """
  e, h, k, d, f = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.mlp_hidden
  per_layer = e * (h + 2 * k) * d + h * d * e + 3 * e * f
  matmul_params = cfg.num_layers * per_layer + cfg.vocab_size * e
  attn = sum(
    4 * h * d * _keys_per_query(p, cfg.seq_len) for p in model_lib.layer_patterns(cfg, cfg.seq_len)
  )
  return 3 * (2 * matmul_params + attn)


def _step_of(line: str) -> int | None:
  """The step of one metrics.jsonl line; None for a line cut short by a crash."""
  try:
    return int(json.loads(line)["step"])
  except (ValueError, KeyError, TypeError):
    return None


def read_losses(directory: str | os.PathLike, kind: str = "train") -> dict[int, float]:
  """step -> loss of the `kind` records in a run's metrics.jsonl (the last wins on repeats)."""
  out = {}
  for line in (epath.Path(directory) / "metrics.jsonl").read_text().splitlines():
    record = json.loads(line)
    if record["kind"] == kind:
      out[record["step"]] = record["loss"]
  return out


class _RewrittenFile:
  """A text file on an object store (gs://), which cannot append: the text so far, uploaded whole
  by a write REWRITE_SECONDS after the last upload, by `flush` and by `close` (each upload
  replaces the object at once; GCS takes about one write a second to an object)."""

  def __init__(self, path: epath.Path):
    self.path = path
    self.parts = [path.read_text()] if path.exists() else []
    self.uploaded, self.pending = time.monotonic(), False

  def write(self, text: str) -> None:
    self.parts.append(text)
    self.pending = True
    if time.monotonic() - self.uploaded >= REWRITE_SECONDS:
      self.flush()

  def flush(self) -> None:
    if self.pending:
      self.path.write_text("".join(self.parts))
      self.uploaded, self.pending = time.monotonic(), False

  def close(self) -> None:
    self.flush()


class MetricWriter:
  """Appends one JSON object per record to `metrics.jsonl` and scalars to TensorBoard event
  files in the same directory (an `etils.epath` path: local, or gs:// where metrics.jsonl is
  rewritten whole every REWRITE_SECONDS as records arrive and on `flush`). Only the writing
  process (process 0) should make one with `enabled=True`; the others get a writer that drops
  everything."""

  def __init__(
    self, directory: str | os.PathLike, enabled: bool = True, resume_step: int | None = None
  ):
    """`resume_step`: the step training resumes from; records of later steps (written
    before a crash, and about to be written again) are dropped from both outputs."""
    self.enabled, self._tb = enabled, None
    if not enabled:
      return
    self.directory = epath.Path(directory)
    self.directory.mkdir(parents=True, exist_ok=True)
    path = self.directory / "metrics.jsonl"
    if resume_step is not None and path.exists():
      kept = [
        line
        for line in path.read_text().splitlines(keepends=True)
        if (step := _step_of(line)) is not None and step <= resume_step
      ]
      replace_text(path, "".join(kept))
    if is_local(path):
      self._jsonl = open(path, "a", buffering=1)  # noqa: SIM115 (line buffered: each record)
    else:
      self._jsonl = _RewrittenFile(path)
    try:
      from tensorboardX import SummaryWriter
    except ImportError:
      print("fibax: tensorboardX is not installed; writing metrics.jsonl only", file=sys.stderr)
    else:
      purge = None if resume_step is None else resume_step + 1  # hides events from here on
      try:
        self._tb = SummaryWriter(str(self.directory), flush_secs=30, purge_step=purge)
      except ImportError as e:  # gs:// needs google-cloud-storage, s3:// boto3
        print(f"fibax: no TensorBoard events in {self.directory} ({e})", file=sys.stderr)

  def write(self, step: int, metrics: dict, prefix: str = "train") -> None:
    if not self.enabled:
      return
    record = {"step": step, "time": time.time(), "kind": prefix, **metrics}
    self._jsonl.write(json.dumps(record) + "\n")
    if self._tb is not None:
      for name, value in metrics.items():
        if isinstance(value, int | float) and math.isfinite(value):
          self._tb.add_scalar(f"{prefix}/{name}", value, step)
        elif isinstance(value, list | tuple):  # per-layer values, e.g. the learned alphas
          for i, v in enumerate(value):
            self._tb.add_scalar(f"{prefix}/{name}/layer_{i}", v, step)

  def flush(self) -> None:
    """Writes out every record so far (on gs://, records wait up to 30 s otherwise)."""
    if self.enabled:
      self._jsonl.flush()
      if self._tb is not None:
        self._tb.flush()

  def close(self) -> None:
    if self.enabled:
      self._jsonl.close()
      if self._tb is not None:
        self._tb.close()


class Progress:
  """A progress bar (rich, a Flax dependency) above which log lines scroll; without the bar,
  lines go to `log`."""

  def __init__(self, total: int, initial: int, bar: bool = True, log=print):
    self._bar, self._log = None, log
    if bar:
      from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
      )
      from rich.progress import (
        Progress as RichProgress,
      )

      self._bar = RichProgress(
        TextColumn("train"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[status]}"),
      )
      self._task = self._bar.add_task("train", total=total, completed=initial, status="")
      self._bar.start()

  def update(self, step: int, status: str | None = None) -> None:
    if self._bar is not None:
      fields = {} if status is None else {"status": status}
      self._bar.update(self._task, completed=step, **fields)

  def print(self, line: str) -> None:
    if self._bar is not None:
      self._bar.console.print(line, highlight=False, markup=False)
    else:
      self._log(line)

  def close(self) -> None:
    if self._bar is not None:
      self._bar.stop()
