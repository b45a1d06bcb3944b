"""Evaluation CLI; the logic lives in fibax.evaluate, fibax.eval_report, fibax.plots and
fibax.latency (all callable from a notebook).

    python -m fibax.eval --checkpoint runs/fib --length-mult 1 2 4 16 [--cap-mode run|train]
        [--datasets validation sotu] [--max-tokens N] [--variants trained frozen] [--out DIR]
    python -m fibax.eval plot runs/fib/eval runs/dense/eval --out plots/
    python -m fibax.eval latency --checkpoint runs/fib_learned [--impl pallas] [--out lat.json]
    python -m fibax.eval latency --config configs/paper.py:fib_learned_w8

Bad input (a missing or damaged checkpoint, a multiple below 1, an unknown dataset) ends with
one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from fibax.checkpoint import CheckpointError
from fibax.evaluate import (
  DATASETS,
  DEFAULT_BATCH_TOKENS,
  DEFAULT_MAX_TOKENS,
  VARIANTS,
  InsufficientMemory,
  evaluate_checkpoint,
  load_run,
)

ERRORS = (CheckpointError, ValueError, FileNotFoundError, InsufficientMemory, NotImplementedError)
SUBCOMMANDS = ("plot", "latency")


class _Parser(argparse.ArgumentParser):
  """Usage errors in one line too."""

  def error(self, message: str):
    self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _eval_parser() -> argparse.ArgumentParser:
  p = _Parser(
    prog="python -m fibax.eval",
    description="Held-out perplexity at multiples of the training length "
    f"(subcommands: {', '.join(SUBCOMMANDS)}; see python -m fibax.eval plot --help).",
  )
  p.add_argument("--checkpoint", required=True, help="a run's workdir or checkpoints/ or a step")
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
  return p


def _plot_parser() -> argparse.ArgumentParser:
  p = _Parser(
    prog="python -m fibax.eval plot",
    description="Perplexity against length multiple and position-resolved NLL curves (PNG) "
    "for a set of runs.",
  )
  p.add_argument("results", nargs="+", help="results-*.json files or eval directories")
  p.add_argument("--out", required=True, help="directory for the PNG files")
  return p


def _latency_parser() -> argparse.ArgumentParser:
  p = _Parser(
    prog="python -m fibax.eval latency",
    description="ms per forward and tokens/s: static vs learned (dynamic) vs learned frozen.",
  )
  src = p.add_mutually_exclusive_group(required=True)
  src.add_argument("--checkpoint", help="a run (its learned alphas are used if it has them)")
  src.add_argument("--config", help="configs/<file>.py[:<run>] (random init)")
  p.add_argument("--impl", default=None, help="integer-offset attention impl (e.g. pallas)")
  p.add_argument("--static-schedule", default="fixed")
  p.add_argument("--seq-len", type=int, default=1024)
  p.add_argument("--batch", type=int, nargs="+", default=[1, 32])
  p.add_argument("--reps", type=int, default=10)
  p.add_argument("--rounds", type=int, default=5)
  p.add_argument("--out", default=None, help="JSON file for the table")
  return p


def _run_eval(argv: list[str]) -> int:
  args = _eval_parser().parse_args(argv)
  from fibax.eval_report import format_table, write_report

  free = None if args.free_memory_gb is None else int(args.free_memory_gb * 2**30)
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
  )
  ckpt_dir = Path(report["checkpoint"])
  workdir = ckpt_dir.parent if ckpt_dir.name == "checkpoints" else ckpt_dir
  out = Path(args.out) if args.out else workdir / "eval"
  report["command"] = " ".join(["python -m fibax.eval", *argv])
  paths = write_report(report, out)
  print(format_table(report))
  if not args.no_plots and report["positions"]:
    from fibax.plots import plot_all

    paths["plots"] = plot_all([report], out)
  print(
    "wrote "
    + ", ".join(str(p) for v in paths.values() for p in (v if isinstance(v, list) else [v]))
  )
  return 0


def _run_plot(argv: list[str]) -> int:
  args = _plot_parser().parse_args(argv)
  from fibax.eval_report import load_reports
  from fibax.plots import plot_all

  for path in plot_all(load_reports(args.results), args.out):
    print(f"wrote {path}")
  return 0


def _run_latency(argv: list[str]) -> int:
  args = _latency_parser().parse_args(argv)
  import dataclasses

  from fibax.latency import format_latency, latency_table

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
  if args.out:
    table["command"] = " ".join(["python -m fibax.eval latency", *argv])
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(table, indent=1) + "\n")
    print(f"wrote {args.out}")
  return 0


def main(argv: list[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  command = {"plot": _run_plot, "latency": _run_latency}.get(argv[0] if argv else "", _run_eval)
  if command is not _run_eval:
    argv = argv[1:]
  try:
    return command(argv)
  except SystemExit as e:  # argparse: --help, or a usage error already printed in one line
    return e.code if isinstance(e.code, int) else 2
  except ERRORS as e:
    message = " ".join(str(e).split())  # one line, whatever the library wrote
    print(f"fibax.eval: error: {message}", file=sys.stderr)
    return 2


if __name__ == "__main__":
  sys.exit(main())
