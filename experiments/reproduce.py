"""Trains and evaluates a set of the paper's runs, then writes the paper's tables with our
numbers beside theirs.

    python experiments/reproduce.py --config configs/tiny_paper.py \\
        --runs dense fib_fixed_w8 fib_learned_w8 fib_stagger_w8 fib_coprime_w8 \\
               pow2_stagger_w8 pow2_fixed_w8 \\
        --root runs/tiny_paper --length-mult 1 2 4 --out experiments/results/tiny_paper

Each run trains in <root>/<name> (resuming, or skipped when already trained) and is
evaluated into <root>/<name>/eval (skipped when that report exists with the same length
multiples); `--tables-only` rebuilds the tables from existing reports. The tables
(`tables.md`, `tables.json` in --out) follow the paper: perplexity by schedule and window,
the dense baseline, length extrapolation with the change at the largest multiple, the
8-bin position-resolved NLL of fixed against stagger, and the orderings the paper claims.
The paper's figures are FineWeb-Edu at 60.9M parameters; ours are whatever the config
trains, and the tables say so in their heading.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from fibax import cli, eval_report
from fibax.config_loader import add_overrides_argument, apply_overrides, load_config

# the paper (FineWeb-Edu, trained at T = 1024): held-out perplexity.
PAPER_PPL = {
  "fib_fixed": {6: 44.35, 8: 44.08, 10: 43.48, 12: 43.12},
  "fib_learned": {6: 43.86, 8: 43.70, 10: 42.99, 12: 42.85},
  "fib_stagger": {6: 42.93, 8: 42.53, 10: 42.21, 12: 42.02},
  "fib_coprime": {6: 43.10, 8: 42.58, 10: 42.28, 12: 42.09},
  "pow2_stagger": {6: 44.11, 8: 43.60, 10: 43.17, 12: 42.69},
  "pow2_fixed": {8: 44.78},
}
PAPER_DENSE_PPL = 33.37
# Length extrapolation: perplexity at 1x, 2x, 4x the training length.
PAPER_EXTRAPOLATION = {
  "dense": (33.37, 49.15, 100.36),
  "fib_stagger_w12": (42.02, 41.65, 41.45),
  "fib_stagger_w8": (42.53, 42.17, 41.98),
  "fib_coprime_w12": (42.09, 42.53, 43.25),
  "fib_fixed_w8": (44.08, 43.74, 43.56),
  "fib_learned_w8": (43.70, 43.34, 43.15),
  "pow2_fixed_w8": (44.78, 44.98, 49.86),
}
# Position-resolved NLL (nats, 8 equal bins over the window), W = 8.
PAPER_BINS = {
  "fib_fixed_w8": (3.883, 3.808, 3.767, 3.770, 3.742, 3.780, 3.776, 3.763),
  "fib_stagger_w8": (3.861, 3.769, 3.733, 3.731, 3.709, 3.737, 3.739, 3.726),
}
SCHEDULE_ROWS = tuple(PAPER_PPL)


def split_name(name: str) -> tuple[str, int | None]:
  """'fib_stagger_w8' -> ('fib_stagger', 8); 'dense' -> ('dense', None); seeds are kept."""
  head, _, tail = name.rpartition("_w")
  if head and tail.isdigit():
    return head, int(tail)
  return name, None


def run_config(args, name: str):
  """The run's config: `--config` file with the run name (and `--config-args`), then `--set`."""
  extra = f",{args.config_args}" if args.config_args else ""
  return apply_overrides(load_config(f"{args.config}:{name}{extra}"), args.overrides)


def train_and_eval(args, name: str) -> Path:
  from fibax.evaluate import evaluate_checkpoint
  from fibax.train import train

  cfg = run_config(args, name)
  workdir = Path(args.root) / name
  train(cfg, workdir)
  eval_dir = workdir / "eval"
  report_path = eval_dir / "results-cap_run.json"
  variants = ("trained", "frozen") if cfg.model.attention.schedule == "learned" else ("trained",)
  wanted = {(d, v, m) for d in args.datasets for v in variants for m in args.length_mult}
  if report_path.exists():
    results = eval_report.load_report(report_path)["results"]
    if wanted <= {(r["dataset"], r["variant"], r["length_mult"]) for r in results}:
      print(f"{name}: evaluation already in {report_path}")
      return report_path
  report = evaluate_checkpoint(
    workdir,
    label=name,
    length_mults=args.length_mult,
    datasets=args.datasets,
    variants=variants,
    max_tokens=args.max_tokens,
  )
  eval_report.write_report(report, eval_dir)
  return report_path


def _results(report: dict, dataset: str, variant: str = "trained") -> dict[int, dict]:
  return {
    r["length_mult"]: r
    for r in report["results"]
    if r["dataset"] == dataset and r["variant"] == variant and r.get("status") == "ok"
  }


def _fmt(x: float | None, digits: int = 2) -> str:
  return "" if x is None else f"{x:.{digits}f}"


def build_tables(reports: dict[str, dict], dataset: str, scale: str) -> tuple[str, dict]:
  """Markdown and JSON of the paper's tables with ours beside the paper's."""
  rows = {name: _results(rep, dataset) for name, rep in reports.items()}
  ppl1 = {name: r[1]["ppl"] for name, r in rows.items() if 1 in r}
  mults = sorted({m for r in rows.values() for m in r})
  data: dict = {"dataset": dataset, "scale": scale, "ppl_x1": ppl1}
  md = [
    f"Ours: {scale}; held-out set `{dataset}`. Paper: FineWeb-Edu, 60.9M parameters, "
    "426M tokens. Cells are ours / paper.",
    "",
  ]

  windows = sorted({w for n in ppl1 for b, w in [split_name(n)] if w is not None})
  md += ["### Perplexity at the training length", ""]
  md += ["| schedule | " + " | ".join(f"W={w}" for w in windows) + " |"]
  md += ["|---|" + "---|" * len(windows)]
  for sched in SCHEDULE_ROWS:
    cells = []
    for w in windows:
      ours = ppl1.get(f"{sched}_w{w}")
      paper = PAPER_PPL[sched].get(w)
      cells.append("" if ours is None else f"{ours:.2f} / {_fmt(paper) or '-'}")
    if any(cells):
      md.append(f"| {sched.replace('_', ' / ')} | " + " | ".join(cells) + " |")
  if "dense" in ppl1:
    md += ["", f"Dense: {ppl1['dense']:.2f} / {PAPER_DENSE_PPL:.2f}."]
    best = min((p for n, p in ppl1.items() if n != "dense"), default=None)
    if best is not None:
      data["best_sparse_vs_dense"] = best / ppl1["dense"] - 1
      md[-1] += (
        f" Best sparse is {best / ppl1['dense'] - 1:+.1%} against dense "
        f"(paper {min(min(v.values()) for v in PAPER_PPL.values()) / PAPER_DENSE_PPL - 1:+.1%})."
      )

  orderings = {}
  for w in windows:
    ranked = sorted((ppl1[f"{s}_w{w}"], s) for s in SCHEDULE_ROWS if f"{s}_w{w}" in ppl1)
    paper_ranked = sorted((PAPER_PPL[s][w], s) for _, s in ranked if w in PAPER_PPL[s])
    orderings[w] = {"ours": [s for _, s in ranked], "paper": [s for _, s in paper_ranked]}
  data["orderings"] = orderings
  if orderings:
    md += ["", "### Ordering, best first", ""]
    for w, o in orderings.items():
      md.append(f"- W={w}: ours {' < '.join(o['ours'])}; paper {' < '.join(o['paper'])}")

  if len(mults) > 1:
    top = mults[-1]
    md += ["", "### Length extrapolation", ""]
    md += ["| model | " + " | ".join(f"x{m}" for m in mults) + f" | change at x{top} |"]
    md += ["|---|" + "---|" * (len(mults) + 1)]
    data["extrapolation"] = {}
    for name, r in rows.items():
      if 1 not in r:
        continue
      paper = PAPER_EXTRAPOLATION.get(name)
      cells = []
      for m in mults:
        ours = r.get(m, {}).get("ppl")
        p = paper[{1: 0, 2: 1, 4: 2}[m]] if paper and m in (1, 2, 4) else None
        cells.append(_fmt(ours) + (f" / {p:.2f}" if p is not None and ours is not None else ""))
      change = r[top]["ppl"] / r[1]["ppl"] - 1 if top in r else None
      paper_change = paper[2] / paper[0] - 1 if paper and top == 4 else None
      data["extrapolation"][name] = {"ppl": {m: r[m]["ppl"] for m in r}, "change": change}
      cell = "" if change is None else f"{change:+.1%}"
      if paper_change is not None and change is not None:
        cell += f" / {paper_change:+.1%}"
      md.append(f"| {name} | " + " | ".join(cells) + f" | {cell} |")

  frozen = {n: _results(rep, dataset, "frozen") for n, rep in reports.items()}
  frozen = {n: r for n, r in frozen.items() if r and 1 in rows.get(n, {})}
  if frozen:
    data["frozen"] = {n: {m: r[m]["ppl"] for m in r} for n, r in frozen.items()}
    md += ["", "### Learned alpha, trained (dynamic path) and frozen into static tables", ""]
    md += ["| model | " + " | ".join(f"x{m} trained | x{m} frozen" for m in mults) + " |"]
    md += ["|---|" + "---|---|" * len(mults)]
    for name, r in frozen.items():
      cells = [
        f"{_fmt(rows[name].get(m, {}).get('ppl'))} | {_fmt(r.get(m, {}).get('ppl'))}" for m in mults
      ]
      md.append(f"| {name} | " + " | ".join(cells) + " |")

  pair = [n for n in ("fib_fixed_w8", "fib_stagger_w8") if n in rows and 1 in rows[n]]
  if len(pair) == 2:
    fixed, stagger = (rows[n][1]["bins"] for n in pair)
    gap = [f - s for f, s in zip(fixed, stagger, strict=True)]
    paper_gap = [f - s for f, s in zip(*PAPER_BINS.values(), strict=True)]
    data["position_bins"] = {"fixed": fixed, "stagger": stagger, "gap": gap}
    md += ["", "### Position-resolved NLL, W = 8 (nats, 8 bins over the window)", ""]
    md += ["| | " + " | ".join(str(i + 1) for i in range(len(gap))) + " |"]
    md += ["|---|" + "---|" * len(gap)]
    md.append("| fixed | " + " | ".join(f"{x:.3f}" for x in fixed) + " |")
    md.append("| stagger | " + " | ".join(f"{x:.3f}" for x in stagger) + " |")
    md.append("| gap, ours | " + " | ".join(f"{x:+.3f}" for x in gap) + " |")
    md.append("| gap, paper | " + " | ".join(f"{x:+.3f}" for x in paper_gap) + " |")
  return "\n".join(md) + "\n", data


def write_atomic(path: Path, text: str) -> None:
  tmp = path.with_name(path.name + ".tmp")
  tmp.write_text(text)
  os.replace(tmp, path)


def main(argv=None):
  cli.set_xla_defaults()  # as `python -m fibax.train` runs: cuBLAS matmuls, XLA's sort (GPU)
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--config", required=True, help="a config file whose get_config takes a run name")
  p.add_argument("--runs", nargs="+", required=True)
  p.add_argument("--config-args", default="", help="more get_config arguments, e.g. steps=3052")
  add_overrides_argument(p, "config overrides for every run")
  p.add_argument("--root", required=True, help="parent of the run workdirs")
  p.add_argument("--length-mult", nargs="+", type=int, default=[1, 2, 4])
  p.add_argument("--datasets", nargs="+", default=["validation"])
  p.add_argument("--max-tokens", type=int, default=1 << 20)
  p.add_argument("--scale", default="", help="what the config trains, for the tables' heading")
  p.add_argument("--tables-only", action="store_true")
  p.add_argument("--out", required=True, help="directory for tables.md and tables.json")
  args = p.parse_args(argv)

  if not args.tables_only:  # bad names and arguments fail before any run trains
    from fibax.evaluate import check_eval_args

    for name in args.runs:
      run_config(args, name)
    check_eval_args(args.length_mult, args.datasets, max_tokens=args.max_tokens)
  reports = {}
  for name in args.runs:
    if args.tables_only:
      path = Path(args.root) / name / "eval" / "results-cap_run.json"
    else:
      path = train_and_eval(args, name)
    reports[name] = eval_report.load_report(path)
  out = Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  scale = args.scale or f"runs of {args.config}"
  md, data = build_tables(reports, args.datasets[0], scale)
  data["command"] = " ".join(["python", *sys.argv])
  data["runs"] = list(reports)
  write_atomic(out / "tables.md", md)
  write_atomic(out / "tables.json", json.dumps(data, indent=1) + "\n")
  print(md)


if __name__ == "__main__":
  try:
    main()
  except (ValueError, TypeError, FileNotFoundError) as e:  # a bad name, argument or path
    sys.exit(f"reproduce.py: error: {' '.join(str(e).split())}")
