"""experiments/results_md.py: RESULTS.md and its plots, rebuilt from the committed reports."""

import importlib.util
import json
import math
import pathlib
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]
PATH = REPO / "experiments" / "results_md.py"
spec = importlib.util.spec_from_file_location("results_md", PATH)
results_md = importlib.util.module_from_spec(spec)
spec.loader.exec_module(results_md)


def _write_run(root, name, ppl_by_mult, bins=None, seed_tokens=100, alphas=None, frozen=None):
  folder = root / name
  folder.mkdir(parents=True)
  results = [
    {
      "dataset": "validation",
      "variant": "trained",
      "length_mult": m,
      "status": "ok",
      "ppl": p,
      "nll": math.log(p),
      "tokens": 1 << 20,
      "bins": list(bins or [math.log(p)] * 8),
    }
    for m, p in ppl_by_mult.items()
  ]
  if frozen is not None:
    results.append({**results[0], "variant": "frozen", "ppl": frozen})
  report = {"label": name, "device": "Test GPU", "jax_version": "0", "results": results}
  (folder / "results-cap_run.json").write_text(json.dumps(report))
  run = {"name": name, "tokens": seed_tokens, "steps": 1, "wall_s": 1.0, "gpu": 0}
  (folder / "run.json").write_text(json.dumps(run))
  if alphas is not None:
    (folder / "metrics.jsonl").write_text(json.dumps({"kind": "train", "alphas": alphas}) + "\n")


def test_committed_results_md_is_what_the_committed_reports_give(tmp_path):
  """CI rebuilds RESULTS.md from the committed JSON: it must match, and the plots must draw."""
  proc = subprocess.run([sys.executable, str(PATH), "--check"], capture_output=True, text=True)
  assert proc.returncode == 0, proc.stderr
  out = tmp_path / "RESULTS.md"
  proc = subprocess.run(
    [sys.executable, str(PATH), "--out", str(out), "--plots", str(tmp_path / "plots")],
    capture_output=True,
    text=True,
  )
  assert proc.returncode == 0, proc.stderr
  assert (tmp_path / "plots" / "ppl_vs_length.png").stat().st_size > 10_000
  assert "## The paper's claims" in out.read_text()


def test_claims_follow_the_numbers(tmp_path):
  # Within Fibonacci at W = 8 the paper's order is broken (fixed beats stagger); dense is
  # worse than sparse at x1 and does not degrade; stagger has two seeds.
  _write_run(tmp_path, "dense", {1: 50.0, 4: 50.5})
  _write_run(tmp_path, "fib_fixed_w8", {1: 40.0, 4: 40.1}, bins=[4.0] * 8)
  _write_run(tmp_path, "fib_stagger_w8", {1: 41.0, 4: 41.0}, bins=[4.1] * 8)
  _write_run(tmp_path, "fib_stagger_w8_seed43", {1: 43.0, 4: 43.0})
  _write_run(
    tmp_path, "fib_learned_w8", {1: 42.0, 4: 42.0}, alphas=[0.9, 1.2], frozen=43.0
  )  # fmt: skip
  runs = results_md.load_runs(tmp_path)
  assert set(runs) == {"dense", "fib_fixed_w8", "fib_stagger_w8", "fib_learned_w8"}
  assert results_md.stat(runs, "fib_stagger_w8") == (42.0, math.sqrt(2.0), 2)
  verdicts = {c: v for c, v, _ in results_md.claims(runs)}
  assert verdicts["Within Fibonacci at W = 8: stagger ~ coprime < learned < fixed"] == (
    "does not hold"
  )
  assert verdicts["Dense is best at the training length"] == "does not hold"
  flat = [c for c in verdicts if c.startswith("Every sparse model")]
  assert verdicts[flat[0]] == "does not hold"  # dense did not degrade
  gap = [c for c in verdicts if c.startswith("The stagger gain")]
  assert verdicts[gap[0]] == "does not hold"  # fixed is better, not stagger
  assert verdicts["Learned alphas stay within about 0.05 of 1"] == "does not hold"
  evidence = {c: e for c, _, e in results_md.claims(runs)}
  assert "42.00 trained, 43.00 frozen (+2.4%)" in evidence["What freezing learned alphas costs"]
  order = evidence["Within Fibonacci at W = 8: stagger ~ coprime < learned < fixed"]
  # stagger (42 +- 1.41 over 2 seeds) ties learned (one seed) within its spread, not fixed (40)
  assert order.endswith("; within the seed spread: fib_stagger_w8 - fib_learned_w8 0.00 < sd 1.41")

  md = results_md.build(runs, tmp_path, tmp_path / "RESULTS.md", [])
  assert "| fib / stagger | - / 42.93 | 42.00 ± 1.41 (2) / 42.53 |" in md


def test_no_reports_is_a_one_line_error(tmp_path):
  proc = subprocess.run(
    [sys.executable, str(PATH), "--results", str(tmp_path), "--out", str(tmp_path / "R.md")],
    capture_output=True,
    text=True,
  )
  assert proc.returncode == 1 and "no results-cap_run.json" in proc.stderr
  assert len(proc.stderr.strip().splitlines()) == 1 and not (tmp_path / "R.md").exists()


def test_full_recipe_runs_get_their_own_section(tmp_path):
  """Reports under --full come out as their own tables with every evaluated length (64x
  too), beside the matrix, and the dense gap there is computed from them."""
  matrix, full = tmp_path / "matrix", tmp_path / "full"
  _write_run(matrix, "fib_stagger_w12", {1: 49.0, 4: 48.5})
  _write_run(full, "dense", {1: 40.0, 4: 60.0})
  _write_run(full, "fib_stagger_w12", {1: 44.0, 4: 43.0, 64: 42.0})
  out = tmp_path / "RESULTS.md"
  args = ["--results", matrix, "--full", full, "--out", out, "--plots", tmp_path / "plots"]
  args += ["--latency", tmp_path / "none"]  # not the committed tables
  proc = subprocess.run(
    [sys.executable, str(PATH), *map(str, args)], capture_output=True, text=True
  )
  assert proc.returncode == 0, proc.stderr
  text = out.read_text()
  section = text[text.index("## Full recipe") : text.index("## Runs of the 100M-token matrix")]
  assert (
    "| fib_stagger_w12 | 44.00 / 42.02 | 43.00 / 41.45 | 42.00 | -2.3% / -1.4% | -4.5% |" in section
  )
  assert "| dense | 40.00 / 33.37 | 60.00 / 100.36 | - | +50.0% / +200.7% | - |" in section
  assert "dense 40.00, fib_stagger_w12 44.00 (+10.0%" in section
  assert "x64" not in text[: text.index("## Full recipe")]  # the matrix tables keep their lengths


def test_sharding_check_and_samples_are_linked_when_present(tmp_path):
  """A sharding report gets its own table (the largest differences from the first layout),
  and the full recipe's samples are linked; neither appears without its files."""
  matrix, full, shard = tmp_path / "matrix", tmp_path / "full", tmp_path / "shard"
  _write_run(matrix, "fib_stagger_w12", {1: 49.0})
  _write_run(full, "fib_stagger_w12", {1: 44.0})
  out = tmp_path / "RESULTS.md"
  args = ["--results", matrix, "--full", full, "--sharding", shard, "--out", out]
  args += ["--latency", tmp_path / "none"]
  args += ["--plots", tmp_path / "plots"]

  def build():
    proc = subprocess.run(
      [sys.executable, str(PATH), *map(str, args)], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    return out.read_text()

  text = build()
  assert "## Sharding" not in text and "samples.md" not in text
  shard.mkdir()
  report = {
    "command": "python experiments/sharding_check.py --devices 4",
    "versions": {"device": "Test GPU"},
    "config": "configs/paper.py:fib_stagger_w12,steps=300",
    "overrides": ["model.attention.impl=pallas"],
    "layouts": [
      {"name": "data4", "mesh_data": 4, "mesh_model": 1},
      {"name": "data2_model2", "mesh_data": 2, "mesh_model": 2},
    ],
    "losses": {"data4": {"10": 9.0, "20": 8.0}, "data2_model2": {"10": 9.001, "20": 7.99}},
    "summary": {"max_abs_loss_diff_data2_model2_vs_data4": 0.01},
  }
  (shard / "sharding.json").write_text(json.dumps(report))
  (full / "samples").mkdir()
  (full / "samples" / "samples.md").write_text("# Samples\n")
  text = build()
  assert "| data4 | 4 x 1 | 2 | 8.0000 | - |" in text
  assert "| data2_model2 | 2 x 2 | 2 | 7.9900 | 1.00e-02 |" in text
  assert "[samples.md](full/samples/samples.md)" in text


def test_the_token_count_difference_is_read_from_the_full_recipe_runs():
  """The 'tokens per run' caveat states what the full recipe measured, not a fixed sentence."""

  def runs(dense, stagger):
    entry = lambda p: {"report": {"results": [  # noqa: E731
      {"dataset": "validation", "length_mult": 1, "variant": "trained", "status": "ok", "ppl": p}
    ]}}  # fmt: skip
    return {"dense": [entry(dense)], "fib_stagger_w12": [entry(stagger)]}

  text = "\n".join(results_md.differences_md(runs(40.0, 42.0), runs(30.0, 36.0)))
  assert "It does: fib / stagger W = 12 trails dense by +5.0% at 100M tokens and by +20.0%" in text
  text = "\n".join(results_md.differences_md(runs(40.0, 42.0), runs(30.0, 30.3)))
  assert (
    "It does not: fib / stagger W = 12 trails dense by +5.0% at 100M tokens and by +1.0%" in text
  )
  assert "the full-recipe runs will say" in "\n".join(results_md.differences_md(runs(40, 42), None))


def test_runs_that_computed_differently_say_so_in_the_runs_table():
  """Replicates trained with another embedding gradient (the same function, other rounding)
  than the seed they repeat show it beside their numbers; uniform settings add no column."""

  def entry(name, embed):
    config = {"model": {"embed_backward": embed, "attention": {"impl": "pallas"}}}
    run = {"tokens": 100, "steps": 1, "wall_s": 1.0}
    return {"name": name, "run": run, "report": {"config": config, "device": "Test GPU"}}

  mixed = {"a": [entry("a", "scatter"), entry("a_seed43", "onehot")]}
  table = results_md.runs_table_md(mixed)
  assert table[0].endswith("| embedding gradient | card |")
  assert "| scatter | Test GPU |" in table[2] and "| onehot | Test GPU |" in table[3]
  same = results_md.runs_table_md({"a": [entry("a", "onehot"), entry("a_seed43", "onehot")]})
  assert "embedding gradient" not in same[0] and "onehot" not in "\n".join(same)


def test_learned_runs_show_which_window_path_they_took():
  def entry(name, schedule, **attention):
    config = {"model": {"attention": {"schedule": schedule, "impl": "pallas", **attention}}}
    run = {"tokens": 100, "steps": 1, "wall_s": 1.0}
    return {"name": name, "run": run, "report": {"config": config, "device": "GPU"}}

  runs = {
    "fib_learned_w12": [
      entry("fib_learned_w12", "learned"),  # before the knob: the plain-JAX window
      entry("fib_learned_w12_seed43", "learned", learned_window="kernel"),
    ],
    "fib_fixed_w12": [entry("fib_fixed_w12", "fixed", learned_window="kernel")],
  }
  table = results_md.runs_table_md(runs)
  assert "| learned window | card |" in table[0]
  rows = {line.split(" | ")[0][2:]: line for line in table[2:]}
  assert "| jax | GPU |" in rows["fib_learned_w12"]
  assert "| kernel | GPU |" in rows["fib_learned_w12_seed43"]
  assert "| - | GPU |" in rows["fib_fixed_w12"]


def test_the_seed_difference_reads_the_replicates(tmp_path):
  """With replicates, 'what differs' gives their spread and names the runs with one seed."""
  _write_run(tmp_path, "fib_stagger_w12", {1: 41.0})
  _write_run(tmp_path, "fib_stagger_w12_seed43", {1: 43.0})
  _write_run(tmp_path, "fib_fixed_w12", {1: 44.0})
  runs = results_md.load_runs(tmp_path)
  text = results_md.seeds_md(runs)
  assert text.startswith("- **Seed replicates** of fib_stagger_w12 (2 seeds)")
  assert "standard deviation at x1 1.41 perplexity" in text
  assert "One seed (42) only: fib_fixed_w12" in text
  assert "One seed so far" in results_md.seeds_md(
    {"fib_fixed_w12": runs["fib_fixed_w12"]}
  )  # fmt: skip


def test_latency_tables_give_the_latency_claim_and_their_own_section(tmp_path):
  """`fibax.eval latency` tables, when present, decide the paper's 5x claim from their GPU
  learned / static ratios (2.5x and up: holds) and are listed row by row; without them, or
  with no GPU table that timed learned against static, the claim is named as not measured."""
  lat = tmp_path / "latency"

  def table(impl, seq_len, learned_ratios, device="Test GPU (gpu)", frozen=True):
    rows = []
    for batch, ratio in zip((1, 32), learned_ratios, strict=True):
      rows += [
        {"variant": "static", "batch_size": batch, "ms": 2.0, "vs_static": 1.0},
        {"variant": "learned", "batch_size": batch, "ms": 2.0 * ratio, "vs_static": ratio},
      ]
      if frozen:
        rows.append({"variant": "frozen", "batch_size": batch, "ms": 2.1, "vs_static": 1.05})
    command = f"python -m fibax.eval latency --config c.py --impl {impl}"
    return dict(
      device=device, seq_len=seq_len, impl=impl, rows=rows, static_schedule="fixed",
      frozen_alphas=[1.0, 1.0], command=command,
    )  # fmt: skip

  def write(name, t):
    (lat / f"latency_{name}.json").write_text(json.dumps(t))

  def verdict():
    claim = results_md.latency_claim(results_md.load_latency(lat))
    return claim and claim[1:]

  assert results_md.load_latency(lat) == [] and verdict() is None  # no folder
  lat.mkdir()
  write("a", table("pallas_packed", 1024, (1.4, 1.1)))
  write("b", table("xla", 4096, (0.9, 1.2)))
  assert verdict() == (
    "does not hold",
    "forward latency, learned / static: `pallas_packed` 1.10x-1.40x; `xla` 0.90x-1.20x (T = "
    "1,024, 4,096, batch 1, 32, Test GPU (gpu)); frozen learned / static 1.05x (see 'Inference "
    "latency')",
  )
  section = "\n".join(results_md.latency_md(results_md.load_latency(lat)))
  assert (
    "| `pallas_packed` | 1,024 | 32 | fixed | 2.00 | 2.20 (1.100x) | 2.10 (1.050x) | "
    "fresh (every alpha 1) | Test GPU (gpu) |" in section
  )
  assert "| `xla` | 4,096 | 1 | fixed | 2.00 | 1.80 (0.900x) | 2.10 (1.050x) |" in section
  write("b", table("xla", 4096, (5.0, 6.0)))
  assert verdict()[0] == "unresolved"  # 1.1x-1.4x with one impl, 5x-6x with the other
  write("a", table("pallas_packed", 1024, (2.5, 3.0), frozen=False))  # 2.5x: holds
  assert verdict()[0] == "holds" and "frozen learned / static 1.05x" in verdict()[1]
  write("a", table("pallas_packed", 1024, (2.49, 3.0)))
  assert verdict()[0] == "unresolved"

  # The command line: the claim and the section in RESULTS.md, the "not measured" sentence
  # gone. A CPU table does not decide a GPU speed claim (listed all the same); rows without a
  # ratio (static not timed first) are left out, and a table without its static row.
  matrix, out = tmp_path / "matrix", tmp_path / "RESULTS.md"
  _write_run(matrix, "fib_stagger_w12", {1: 49.0})
  args = ["--results", matrix, "--latency", lat, "--out", out, "--plots", tmp_path / "plots"]
  proc = subprocess.run([sys.executable, str(PATH), *map(str, args)], capture_output=True)
  assert proc.returncode == 0, proc.stderr
  text = out.read_text()
  assert "| Learned alpha costs about 5x the inference latency of an integer-offset " in text
  assert "| **unresolved** |" in text and "## Inference latency" in text
  assert "Not measured in this file" not in text
  for name in ("a", "b"):
    (lat / f"latency_{name}.json").unlink()
  write("cpu", table("xla", 1024, (5.0, 5.0), device="cpu (cpu)"))
  no_static = table("pallas_packed", 1024, (1.2, 1.2))
  no_static["rows"] = [{**r, "vs_static": None} for r in no_static["rows"]]
  write("gpu", no_static)
  # A table timed learned before static: its learned rows have no ratio and are left out,
  # its static and frozen rows stay; a trained model's alphas are named with their range.
  late = table("pallas_packed", 4096, (1.3, 1.3))
  late["rows"] = [
    {**r, "vs_static": None} if r["variant"] == "learned" else r for r in late["rows"]
  ]
  late.update(learned_alphas="given", frozen_alphas=[0.98, 1.02])
  write("late", late)
  tables = results_md.load_latency(lat)
  assert [t["impl"] for t in tables] == ["xla", "pallas_packed"]  # latency_cpu, latency_late
  assert {r["variant"] for r in tables[1]["rows"]} == {"static", "frozen"}
  assert results_md.latency_claim(tables) is None  # no GPU learned ratio left
  section = "\n".join(results_md.latency_md(tables))
  assert "| `xla` | 1,024 | 1 | fixed | 2.00 | 10.00 (5.000x) |" in section
  assert (
    "| `pallas_packed` | 4,096 | 1 | fixed | 2.00 | - | 2.10 (1.050x) | trained (0.980-1.020) |"
    in section
  )
  proc = subprocess.run([sys.executable, str(PATH), *map(str, args)], capture_output=True)
  assert proc.returncode == 0, proc.stderr
  text = out.read_text()
  assert "Learned alpha costs about 5x" not in text and "Not measured in this file" in text
  assert "## Inference latency" in text  # listed all the same


def test_a_broken_latency_table_is_a_one_line_error_and_writes_nothing(tmp_path):
  matrix, lat, out = tmp_path / "matrix", tmp_path / "latency", tmp_path / "RESULTS.md"
  _write_run(matrix, "fib_stagger_w12", {1: 49.0})
  lat.mkdir()
  for text, why in (("{not json", "JSONDecodeError"), ('{"rows": []}', "device, impl, seq_len")):
    (lat / "latency_x.json").write_text(text)
    args = ["--results", matrix, "--latency", lat, "--out", out, "--plots", tmp_path / "plots"]
    proc = subprocess.run(
      [sys.executable, str(PATH), *map(str, args)], capture_output=True, text=True
    )
    assert proc.returncode == 1 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert (
      "latency_x.json is not a `fibax.eval latency` table" in proc.stderr and why in proc.stderr
    )
    assert not out.exists() and not (tmp_path / "plots").exists()
