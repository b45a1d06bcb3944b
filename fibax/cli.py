"""What every `python -m fibax.*` command shares: an error is one line on stderr,
`<prog>: error: <message>`, with exit status 2 for bad input (arguments, a config, a missing or
damaged corpus, checkpoint or workdir) and 1 for a run that failed (a training that diverged
or could not save, an output that could not be written, a non-finite result)."""

from __future__ import annotations

import argparse
import os
import sys

BAD_INPUT = 2
FAILED = 1


class Parser(argparse.ArgumentParser):
  """argparse with its usage errors in one line too."""

  def error(self, message: str):
    self.exit(BAD_INPUT, f"{self.prog}: error: {message} (see --help)\n")


def fail(prog: str, error: BaseException | str, code: int) -> int:
  """Prints `error` as the one line and returns `code` (for `return fail(...)` in a main)."""
  print(f"{prog}: error: {' '.join(str(error).split())}", file=sys.stderr)
  return code


# XLA flags every command sets unless XLA_FLAGS already names them. Triton GEMM fusions off:
# XLA then sends the matmuls to cuBLAS, which ran the paper model's train step on an H200 in
# 45.0 ms instead of 57.7 ms (experiments/results/bench_train_h200_options/). CUB's radix sort
# off: the sorted input-embedding gradient's argsort is then XLA's own sort kernel, where
# CUB's, a thunk of its own, left the GPU idle 0.47-0.62 ms a step before the step's command
# buffer started; with it the sparse train step was 0.15-1.11 ms faster in 6 of 6 runs, the
# dense one -0.75..+0.56 ms (XLA's sort minus CUB's; experiments/results/speed_h200x2_4aef62b/).
# It applies to every sort of a command (e.g. top-p sampling's in generation), timed only in
# the train step. GPU flags only:
# other backends read and ignore them (every jaxlib build knows XLA's GPU flags).
XLA_DEFAULTS = {
  "--xla_gpu_enable_triton_gemm": "false",
  "--xla_gpu_enable_cub_radix_sort": "false",
}


def set_xla_defaults() -> str:
  """Adds `XLA_DEFAULTS` to XLA_FLAGS (those it does not set already) and returns XLA_FLAGS.
  XLA reads them when the backend starts: call this before anything runs on a device."""
  flags = os.environ.get("XLA_FLAGS", "")
  named = {f.split("=")[0].lstrip("-") for f in flags.split()}
  extra = [f"{k}={v}" for k, v in XLA_DEFAULTS.items() if k.lstrip("-") not in named]
  os.environ["XLA_FLAGS"] = " ".join([flags, *extra]).strip()
  return os.environ["XLA_FLAGS"]
