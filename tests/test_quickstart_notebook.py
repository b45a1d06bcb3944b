"""experiments/quickstart.ipynb runs top to bottom on CPU (a few minutes, with fewer steps).

nbformat / nbclient / ipykernel are not dependencies of the project, so the code cells are run
with exec() in one namespace, in order, as a kernel would; the cell tagged `parameters` is
followed by the test's overrides (papermill's convention).
"""

import json
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "experiments" / "quickstart.ipynb"


def _code_cells(path: Path) -> list[tuple[str, list[str]]]:
  nb = json.loads(path.read_text())
  assert nb["nbformat"] == 4
  return [
    ("".join(c["source"]), c.get("metadata", {}).get("tags", []))
    for c in nb["cells"]
    if c["cell_type"] == "code"
  ]


def test_quickstart_notebook_runs_on_cpu(tmp_path, monkeypatch):
  monkeypatch.chdir(REPO)  # the notebook runs from the repository root (configs/, data/)
  prepared = REPO / "data" / "sotu" / "manifest.json"
  overrides = {
    "WORKDIR": str(tmp_path / "quickstart"),
    # The repository's prepared sotu when there is one; otherwise the notebook prepares it.
    "DATA_DIR": str(prepared.parent) if prepared.is_file() else str(tmp_path / "sotu"),
    "TOTAL_STEPS": 4,
    "EVAL_TOKENS": 1 << 13,
  }
  namespace = {"__name__": "__quickstart__"}
  cells = _code_cells(NOTEBOOK)
  assert any("parameters" in tags for _, tags in cells)
  for source, tags in cells:
    assert not any(line.lstrip().startswith(("!", "%")) for line in source.splitlines()), (
      "shell/magic lines cannot run outside IPython"
    )
    exec(compile(source, f"{NOTEBOOK.name}", "exec"), namespace)
    if "parameters" in tags:
      namespace.update(overrides)

  assert namespace["summary"]["step"] == 4
  rows = {r["length_mult"]: r for r in namespace["report"]["results"]}
  assert set(rows) == {1, 4} and all(r["status"] == "ok" for r in rows.values())
  assert rows[4]["seq_len"] == 4 * 256
  # The trainer's validation loss covers the same first windows as the evaluation at 1x.
  assert rows[1]["nll"] == pytest.approx(namespace["summary"]["val_loss"], rel=1e-5)
  for png in (namespace["ppl_png"], namespace["positions_png"]):
    assert os.path.getsize(png) > 0
