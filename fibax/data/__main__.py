"""`python -m fibax.data prepare|info`: argument parsing only.

python -m fibax.data prepare --source sotu --out data/sotu --vocab-size 2048
python -m fibax.data prepare --source gutenberg --out data/gutenberg --vocab-size 32768
python -m fibax.data prepare --source sotu --out data/sotu-g32k --tokenizer-from data/gutenberg
FIBAX_FINEWEB_EDU=/data/fineweb-edu/sample/10BT python -m fibax.data prepare --source fineweb-edu \\
    --out data/fineweb-edu --vocab-size 32768 --max-docs-per-shard 20000
python -m fibax.data info data/gutenberg
"""

from __future__ import annotations

import sys

from fibax import cli
from fibax.data.files import DataError


def main(argv: list[str] | None = None) -> int:
  parser = cli.Parser(prog="python -m fibax.data", description=__doc__.split("\n")[0])
  commands = parser.add_subparsers(dest="command", required=True)

  p = commands.add_parser("prepare", help="corpus -> tokenizer + token shards + manifest")
  p.add_argument("--source", required=True, help="sotu | gutenberg | fineweb-edu | a directory")
  p.add_argument("--out", required=True)
  p.add_argument("--vocab-size", type=int, help="pieces to train (32768 in the paper)")
  p.add_argument("--tokenizer-from", help="a prepared directory whose tokenizer to reuse")
  p.add_argument("--validation", type=float, default=0.03, help="fraction of documents")
  p.add_argument("--test", type=float, default=0.03, help="fraction of documents")
  p.add_argument("--sample-chars", type=int, default=None, help="tokenizer sample size")
  p.add_argument("--workers", type=int, default=None, help="default: all cores")
  p.add_argument(
    "--shards", type=int, default=None, help="Gutenberg, parquet, hub: first N shards or files only"
  )
  p.add_argument(
    "--max-docs-per-shard",
    type=int,
    default=None,
    help="Gutenberg, parquet, hub: first N documents of each",
  )

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
    else:
      from fibax.data.shards import load_manifest

      manifest = load_manifest(args.data)
      for split, entry in manifest["splits"].items():
        print(f"{split:>10}: {entry['docs']:>6,} docs {entry['tokens']:>13,} tokens")
      print(f"tokenizer: {manifest['tokenizer']['vocab_size']} pieces")
  except (DataError, ValueError) as e:
    return cli.fail(parser.prog, e, cli.BAD_INPUT)
  return 0


if __name__ == "__main__":
  sys.exit(main())
