"""Evaluation CLI; the logic lives in fibax.evaluate, fibax.eval_report, fibax.plots and
fibax.latency (all callable from a notebook).

    python -m fibax.eval --checkpoint runs/fib --length-mult 1 2 4 16 [--cap-mode run|train]
        [--datasets validation sotu] [--max-tokens N] [--variants trained frozen] [--out DIR]
    python -m fibax.eval plot runs/fib/eval runs/dense/eval --out plots/
    python -m fibax.eval latency --checkpoint runs/fib_learned [--impl pallas] [--out lat.json]
    python -m fibax.eval latency --config configs/paper.py:fib_learned_w8

Without a subcommand it evaluates a checkpoint; `plot` and `latency` are argparse subcommands
and come first. Every error ends with one line on stderr:

  exit status 2: bad input (an unknown option, a missing or damaged checkpoint or one that does
    not match its config, a multiple below 1, an unknown dataset);
  exit status 1: nothing to show for it: an output that cannot be written (checked before
    anything is loaded or computed), or a non-finite NLL (no report is written).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from fibax import cli
from fibax.checkpoint import CheckpointError
from fibax.eval_report import OutputError, check_writable, format_table, load_reports, write_report
from fibax.evaluate import (
  DATASETS,
  DEFAULT_BATCH_TOKENS,
  DEFAULT_MAX_TOKENS,
  VARIANTS,
  InsufficientMemory,
  NonFiniteResult,
  check_eval_args,
  evaluate_checkpoint,
  load_run,
)
from fibax.restore import checkpoint_dir

BAD_INPUT_ERRORS = (
  CheckpointError,
  ValueError,
  FileNotFoundError,
  InsufficientMemory,
  NotImplementedError,
)
FAILED_ERRORS = (OutputError, NonFiniteResult)
SUBCOMMANDS = ("plot", "latency")
PROG = "python -m fibax.eval"


def _parser() -> argparse.ArgumentParser:
  """The evaluation's options at the top level, `plot` and `latency` as subcommands."""
  p = cli.Parser(
    prog=PROG,
    description="Held-out perplexity at multiples of the training length, or a subcommand "
    "(python -m fibax.eval plot --help).",
  )
  commands = p.add_subparsers(
    dest="command", title="subcommands", metavar="{" + ",".join(SUBCOMMANDS) + "}"
  )
  p.add_argument("--checkpoint", help="a run's workdir or checkpoints/ or a step (required)")
  p.add_argument("--step", type=int, default=None, help="checkpoint step (default: newest)")
  p.add_argument("--length-mult", type=int, nargs="+", default=[1], metavar="M")
  p.add_argument("--cap-mode", choices=("run", "train"), default=None, help="default: the run's")
  p.add_argument("--datasets", nargs="+", default=["validation"], help=f"of {DATASETS}")
  p.add_argument("--variants", nargs="+", default=["trained"], help=f"of {VARIANTS}")
  p.add_argument("--max-tokens", type=int, default=DEFAULT_MAX_TOKENS)
  p.add_argument("--batch-tokens", type=int, default=DEFAULT_BATCH_TOKENS)
  p.add_argument("--data-dir", default=None, help="the run's prepared data (default: its config's)")
  p.add_argument("--impl", default=None, help="attention impl to evaluate with (default: run's)")
  p.add_argument("--dense-impl", default=None)
  p.add_argument("--free-memory-gb", type=float, default=None, help="plan with this much memory")
  p.add_argument("--label", default=None, help="name of the run in tables and plots")
  p.add_argument("--out", default=None, help="default: <workdir>/eval")
  p.add_argument("--no-plots", action="store_true")

  s = commands.add_parser(
    "plot",
    help="plot the reports of a set of runs",
    description="Perplexity against length multiple and position-resolved NLL curves (PNG) "
    "for a set of runs.",
  )
  s.add_argument("results", nargs="+", help="results-*.json files or eval directories")
  s.add_argument("--out", required=True, help="directory for the PNG files")

  s = commands.add_parser(
    "latency",
    help="time static vs learned vs frozen attention",
    description="ms per forward and tokens/s: static vs learned (dynamic) vs learned frozen.",
  )
  src = s.add_mutually_exclusive_group(required=True)
  src.add_argument("--checkpoint", help="a run (its learned alphas are used if it has them)")
  src.add_argument("--config", help="configs/<file>.py[:<run>] (random init)")
  s.add_argument("--impl", default=None, help="integer-offset attention impl (e.g. pallas)")
  s.add_argument("--static-schedule", default="fixed")
  s.add_argument("--seq-len", type=int, default=1024)
  s.add_argument("--batch", type=int, nargs="+", default=[1, 32])
  s.add_argument("--reps", type=int, default=10)
  s.add_argument("--rounds", type=int, default=5)
  s.add_argument("--out", default=None, help="JSON file for the table")
  return p


def _parse(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
  """(arguments, the subcommand's argv): the subcommand must come first, and without one
  --checkpoint is required."""
  parser = _parser()
  args = parser.parse_args(argv)
  if args.command is not None and argv[0] != args.command:
    parser.error(f"the subcommand comes first: python -m fibax.eval {args.command} ...")
  if args.command is None and args.checkpoint is None:
    parser.error("the following arguments are required: --checkpoint")
  return args, argv[1:] if args.command else argv


def _write(what: str, path: Path, write):
  """`write()`, an OSError reported as an OutputError naming `what` and `path`."""
  try:
    return write()
  except OSError as e:
    raise OutputError(f"cannot write {what} to {path} ({type(e).__name__}: {e})") from None


def _run_eval(args: argparse.Namespace, argv: list[str]) -> int:
  # Everything that can be checked before the checkpoint is loaded: the arguments, that the
  # checkpoint exists, and that the report can be written.
  check_eval_args(
    args.length_mult, args.datasets, args.variants, args.max_tokens, args.batch_tokens
  )
  ckpt_dir = checkpoint_dir(args.checkpoint)
  workdir = ckpt_dir.parent if ckpt_dir.name == "checkpoints" else ckpt_dir
  try:
    out = check_writable(args.out or workdir / "eval")
  except OutputError as e:
    if args.out:
      raise
    raise OutputError(f"{e}; pass --out DIR to write the report elsewhere") from None

  free = None if args.free_memory_gb is None else int(args.free_memory_gb * 2**30)
  try:
    report = evaluate_checkpoint(
      args.checkpoint,
      step=args.step,
      label=args.label,
      impl=args.impl,
      dense_impl=args.dense_impl,
      length_mults=args.length_mult,
      datasets=args.datasets,
      cap_mode=args.cap_mode,
      variants=args.variants,
      max_tokens=args.max_tokens,
      batch_tokens=args.batch_tokens,
      data_dir=args.data_dir,
      free_bytes=free,
      require_finite=True,
    )
  except NonFiniteResult as e:
    raise NonFiniteResult(f"{e}; no report written") from None
  report["command"] = " ".join(["python -m fibax.eval", *argv])
  paths = _write("the report", out, lambda: write_report(report, out))
  print(format_table(report))
  if not args.no_plots and report["positions"]:
    from fibax.plots import plot_all

    paths["plots"] = _write("the plots", out, lambda: plot_all([report], out))
  print(
    "wrote "
    + ", ".join(str(p) for v in paths.values() for p in (v if isinstance(v, list) else [v]))
  )
  return 0


def _run_plot(args: argparse.Namespace, argv: list[str]) -> int:
  from fibax.plots import plot_all

  out = check_writable(args.out)
  reports = load_reports(args.results)
  for path in _write("the plots", out, lambda: plot_all(reports, out)):
    print(f"wrote {path}")
  return 0


def _run_latency(args: argparse.Namespace, argv: list[str]) -> int:
  import dataclasses

  from fibax.latency import format_latency, latency_table

  out = None if args.out is None else check_writable(args.out, is_file=True)
  overrides = {} if args.impl is None else {"impl": args.impl}
  learned_params = None
  if args.checkpoint:
    run = load_run(args.checkpoint, overrides=overrides)
    cfg = run.cfg.model
    if cfg.attention.schedule == "learned" and cfg.attention.frozen_alphas is None:
      learned_params = run.params
  else:
    from fibax.config_loader import load_config

    cfg = load_config(args.config).model
    if overrides:
      cfg = dataclasses.replace(cfg, attention=dataclasses.replace(cfg.attention, **overrides))
  table = latency_table(
    cfg,
    learned_params=learned_params,
    static_schedule=args.static_schedule,
    seq_len=args.seq_len,
    batch_sizes=args.batch,
    reps=args.reps,
    rounds=args.rounds,
  )
  print(format_latency(table))
  if out is not None:
    table["command"] = " ".join(["python -m fibax.eval latency", *argv])

    def write():
      out.parent.mkdir(parents=True, exist_ok=True)
      out.write_text(json.dumps(table, indent=1) + "\n")

    _write("the latency table", out, write)
    print(f"wrote {args.out}")
  return 0


COMMANDS = {None: _run_eval, "plot": _run_plot, "latency": _run_latency}


def main(argv: list[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  cli.set_xla_defaults()
  try:
    args, command_argv = _parse(argv)
    return COMMANDS[args.command](args, command_argv)
  except SystemExit as e:  # argparse: --help, or a usage error already printed in one line
    return e.code if isinstance(e.code, int) else cli.BAD_INPUT
  except FAILED_ERRORS as e:
    return cli.fail(PROG, e, cli.FAILED)
  except BAD_INPUT_ERRORS as e:
    return cli.fail(PROG, e, cli.BAD_INPUT)


if __name__ == "__main__":
  sys.exit(main())
