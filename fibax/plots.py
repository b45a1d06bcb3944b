"""PNG plots of evaluation reports (`fibax.eval_report.load_reports`) for a set of runs.

Figures are built with `matplotlib.figure.Figure` directly, not pyplot, so nothing depends on
(or changes) the backend: headless machines and notebooks alike get a PNG file.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from fibax.eval_report import series


def _name(report: dict, variant: str, caps: set[str]) -> str:
  name = report["label"] + ("" if variant == "trained" else f" ({variant})")
  return name + (f" [cap {report['cap_mode']}]" if len(caps) > 1 else "")


def plot_ppl_vs_length(
  reports: Sequence[dict], path: str | os.PathLike, datasets: Sequence[str] | None = None
) -> Path:
  """Perplexity against length multiple, one panel per dataset, one line per run/variant."""
  if not reports:
    raise ValueError("plot_ppl_vs_length needs at least one report")
  caps = {r["cap_mode"] for r in reports}
  if datasets is None:
    datasets = sorted({row["dataset"] for r in reports for row in r["results"]})
  fig = Figure(figsize=(5.5 * len(datasets), 4.2), layout="constrained")
  axes = fig.subplots(1, len(datasets), squeeze=False)[0]
  for ax, dataset in zip(axes, datasets, strict=True):
    for report in reports:
      for (ds, variant), by_mult in series(report).items():
        points = sorted((m, r["ppl"]) for m, r in by_mult.items() if ds == dataset and "ppl" in r)
        if points:
          m, ppl = zip(*points, strict=True)
          ax.plot(m, ppl, marker="o", label=_name(report, variant, caps))
    ax.set_xscale("log", base=2)
    ax.set_xlabel("evaluation length / training length")
    ax.set_ylabel("perplexity")
    ax.set_title(dataset)
    ax.grid(alpha=0.3)
    if ax.lines:
      ax.legend(fontsize="small")
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, dpi=120)
  return path


def smooth(curve_L: np.ndarray, points: int) -> tuple[np.ndarray, np.ndarray]:
  """(centre position, mean NLL) over `points` equal segments of a per-position curve."""
  pieces = np.array_split(np.arange(len(curve_L)), min(points, len(curve_L)))
  return (
    np.array([p.mean() for p in pieces]),
    np.array([curve_L[p].mean() for p in pieces]),
  )


def plot_position_curves(
  reports: Sequence[dict],
  path: str | os.PathLike,
  *,
  dataset: str = "validation",
  length_mult: int = 1,
  points: int = 64,
) -> Path:
  """Position-resolved NLL over the window (the paper) for each run/variant, averaged over
  `points` equal segments of the window."""
  caps = {r["cap_mode"] for r in reports}
  fig = Figure(figsize=(7, 4.2), layout="constrained")
  ax = fig.subplots()
  for report in reports:
    for key, curve_L in report.get("positions", {}).items():
      variant, ds, mult = key.split("/")
      if ds == dataset and mult == f"x{length_mult}":
        x, y = smooth(np.asarray(curve_L), points)
        ax.plot(x, y, label=_name(report, variant, caps))
  if not ax.lines:
    raise ValueError(
      f"no position curves for dataset={dataset!r} at length_mult={length_mult} in the reports"
    )
  ax.set_xlabel("position in the window")
  ax.set_ylabel("NLL (nats)")
  ax.set_title(f"{dataset}, windows of {length_mult}x the training length")
  ax.grid(alpha=0.3)
  ax.legend(fontsize="small")
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, dpi=120)
  return path


def plot_all(reports: Sequence[dict], out_dir: str | os.PathLike) -> list[Path]:
  """`ppl_vs_length.png` and one `positions_<dataset>_x<M>.png` per dataset and multiple."""
  out_dir = Path(out_dir)
  paths = [plot_ppl_vs_length(reports, out_dir / "ppl_vs_length.png")]
  keys = sorted(
    {tuple(k.split("/")[1:]) for r in reports for k in r.get("positions", {})},
    key=lambda k: (k[0], int(k[1][1:])),
  )
  for dataset, mult in keys:
    paths.append(
      plot_position_curves(
        reports,
        out_dir / f"positions_{dataset}_{mult}.png",
        dataset=dataset,
        length_mult=int(mult[1:]),
      )
    )
  return paths
