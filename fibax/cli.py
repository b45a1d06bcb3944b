"""What every `python -m fibax.*` command shares: an error is one line on stderr,
`<prog>: error: <message>`, with exit status 2 for bad input (arguments, a config, a missing or
damaged corpus, checkpoint or workdir) and 1 for a run that failed (a training that diverged
or could not save, an output that could not be written, a non-finite result)."""

from __future__ import annotations

import argparse
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
