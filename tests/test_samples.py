"""experiments/samples.py: continuations of held-out books from saved runs, and a sparse run's
continuation of a long prompt, written as JSON and markdown."""

import json

from eval_helpers import saved_run

from experiments import samples
from fibax.data.shards import SplitTokens
from fibax.data.tokenizer import load_tokenizer
from fibax.generate import generate
from fibax.restore import load_run


def test_samples_match_generate_and_the_book(tmp_path_factory, tmp_path):
  cfg, sparse = saved_run(tmp_path_factory, "stagger")
  _, dense = saved_run(tmp_path_factory, "dense")
  out = tmp_path / "out"
  args = ["--num-samples", "3", "--prompt-tokens", "20", "--new-tokens", "12"]
  args += ["--long-context", "3000", "--temperature", "0", "--seed", "3"]
  assert samples.main(["--runs", str(sparse), str(dense), "--out", str(out), *args]) == 0

  report = json.loads((out / "samples.json").read_text())
  assert [r["schedule"] for r in report["runs"]] == ["stagger", "dense"]
  tokens = SplitTokens(cfg.data_dir, "validation")
  pairs = samples.book_prompts(tokens, 3, 20, 12)
  sp = load_tokenizer(cfg.data_dir)
  run = load_run(sparse)
  want = generate(run.params, run.cfg.model, [p for p, _ in pairs], 12).tokens  # greedy
  got = report["runs"][0]["books"]["samples"]
  assert [s["model"] for s in got] == [sp.decode(t) for t in want]
  assert [s["book"] for s in got] == [sp.decode(ref) for _, ref in pairs]
  # Prompts come from the middle of three different books, the same for both runs.
  assert len({s["prompt"] for s in got}) == 3
  assert [s["prompt"] for s in report["runs"][1]["books"]["samples"]] == [s["prompt"] for s in got]

  long = report["runs"][0]["long"]
  assert long["status"] == "ok" and long["prompt_tokens"] == 3000
  # The sparse cache holds each layer's reach + 1 rows (Fibonacci: at most round(1.5 * 987) + 1),
  # not the 3,012 positions.
  assert max(long["cache_rows_per_layer"]) <= round(1.5 * 987) + 1 < 3000
  assert "long" not in report["runs"][1]  # dense: book samples only
  dense_rows = report["runs"][1]["books"]["cache_rows_per_layer"]
  assert min(dense_rows) >= 20 + 12
  md = (out / "samples.md").read_text()
  assert "After 3,000 tokens of one book" in md and md.count("### Sample") == 6


def test_bad_input_is_one_line(tmp_path_factory, tmp_path, capsys):
  _, sparse = saved_run(tmp_path_factory, "stagger")
  for args, message in (
    (["--prompt-tokens", "100000", "--new-tokens", "12"], "holds 2 x (100000 + 12) tokens"),
    (["--new-tokens", "0"], "--new-tokens=0 must be >= 1"),
    (["--runs", str(tmp_path / "nowhere")], "does not exist"),
  ):
    runs = [] if "--runs" in args else ["--runs", str(sparse)]
    code = _main([*runs, "--out", str(tmp_path), *args])
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and len(err.splitlines()) == 1, err
  assert not (tmp_path / "samples.json").exists()


def _main(argv):
  try:
    return samples.main(argv)
  except SystemExit as e:
    return e.code
