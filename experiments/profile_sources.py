"""Names the ops of a `bench_train.py` profile from the compiled programs' HLO.

A profile traced as timed (`--profile-as-timed`, inside XLA's command buffers) records each
kernel with the buffer as its `hlo_op`, so a result written before `bench_train.py` found
sources by kernel name has none. Given the train steps' optimized HLO as XLA dumps it
(`--xla_dump_to`; `speed_suite.sh`'s TRAIN_DUMP=1 keeps `*after_optimizations.txt.gz`), this
adds each `profile_top` row's source (the JAX op and the model's line it came from) and
`profile_kinds_top`: the kinds (`bench_train.OP_KINDS`) of those rows, which cover the top
`bench_train.PROFILE_TOP` ops only (the run's own `profile_kinds` cover every op).

  python experiments/profile_sources.py RESULT.json --hlo dense@1024=A.txt.gz \\
    fib_stagger_w12@1024=B.txt.gz --out NAMED.json
"""

from __future__ import annotations

import argparse
import gzip
import json
from pathlib import Path

from experiments import bench_train
from fibax.data.files import atomic_write_json


def _read(path: str) -> str:
  opener = gzip.open if path.endswith(".gz") else open
  with opener(path, "rt") as f:
    return f.read()


def name_ops(result: dict, hlo: dict[tuple[str, int], str]) -> dict:
  """`result` (a bench_train JSON) with the rows of each run that `hlo` {(run, seq_len): HLO
  text} names given their sources and `profile_kinds_top`."""
  out = dict(result, results=[])
  for r in result["results"]:
    text = hlo.get((r["run"], r["seq_len"]))
    if text is None or "profile_top" not in r:
      out["results"].append(r)
      continue
    sources = bench_train.hlo_sources(text)
    rows = []
    for row in r["profile_top"]:
      source = row.get("source") or sources.get(bench_train.kernel_instruction(row["op"]))
      rows.append({**row, "source": source} if source else row)
    out["results"].append(
      {**r, "profile_top": rows, "profile_kinds_top": bench_train.op_kinds(rows)}
    )
  return out


def _pair(text: str) -> tuple[tuple[str, int], str]:
  try:
    key, path = text.split("=", 1)
    run, seq_len = key.rsplit("@", 1)
    return (run, int(seq_len)), path
  except ValueError:
    raise argparse.ArgumentTypeError(f"bad --hlo {text!r}: expected RUN@SEQ_LEN=FILE") from None


def main(argv=None):
  ap = argparse.ArgumentParser(prog="profile_sources.py", description=__doc__.splitlines()[0])
  ap.add_argument("result", help="a bench_train.py JSON with a profile")
  ap.add_argument("--hlo", nargs="+", type=_pair, required=True, help="RUN@SEQ_LEN=FILE ...")
  ap.add_argument("--out", required=True)
  args = ap.parse_args(argv)
  result = json.loads(Path(args.result).read_text())
  runs = {(r["run"], r["seq_len"]) for r in result["results"]}
  for key, path in args.hlo:
    if key not in runs:
      ap.error(f"--hlo {key[0]}@{key[1]}: no such run in {args.result} ({sorted(runs)})")
    if not Path(path).is_file():
      ap.error(f"--hlo {key[0]}@{key[1]}: no file {path}")
  named = name_ops(result, {key: _read(path) for key, path in args.hlo})
  atomic_write_json(args.out, named)


if __name__ == "__main__":
  main()
