"""Staging a prepared data directory for a machine reached through small transfers.

    python experiments/stage.py stage --data data/gutenberg --out staged/ --splits train,validation
    python experiments/stage.py unstage --parts staged/ --out data/gutenberg

`stage` packs the manifest, the tokenizer and the token shards of the chosen splits into
parts of at most `part_bytes` (default 56 MiB, under the 60 MiB a part may have) plus
`stage.json` (every file's size and sha256, every part's sha256). `unstage` checks each part,
rebuilds the files into a temporary directory, checks each file, and only then renames the
directory into place. The parts are plain byte ranges of the files concatenated in the order
stage.json lists them (no archive format to trust).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from fibax.data.files import (
  DataError,
  atomic_write_json,
  make_temp_dir,
  read_json,
  remove_tree,
  sha256_file,
)
from fibax.data.shards import MANIFEST, SplitTokens, load_manifest
from fibax.data.splits import SPLITS
from fibax.data.tokenizer import INFO_FILE, MODEL_FILE

STAGE_FILE = "stage.json"
DEFAULT_PART_BYTES = 56 << 20
MAX_PART_BYTES = (60 << 20) - 1
_CHUNK = 1 << 22


def _staged_files(data_dir: Path, splits) -> list[str]:
  manifest = load_manifest(data_dir)
  names = [MANIFEST, MODEL_FILE, INFO_FILE]
  for split in splits:
    SplitTokens(data_dir, split, verify=True)  # ship nothing damaged
    for shard in manifest["splits"][split]["shards"]:
      names += [shard["file"], shard["docs_file"]]
  return names


def stage(
  data_dir: str | os.PathLike,
  out_dir: str | os.PathLike,
  splits=SPLITS,
  part_bytes: int = DEFAULT_PART_BYTES,
) -> Path:
  """Packs `data_dir` (the given splits) into `out_dir/part-NNNNN.bin` + `stage.json`."""
  if not 0 < part_bytes <= MAX_PART_BYTES:
    raise ValueError(f"part_bytes={part_bytes} must be in (0, {MAX_PART_BYTES}]")
  for split in splits:
    if split not in SPLITS:
      raise ValueError(f"unknown split={split!r}; expected one of {SPLITS}")
  data_dir, out_dir = Path(data_dir), Path(out_dir)
  if out_dir.exists():
    raise DataError(f"staging directory {out_dir} already exists")
  names = _staged_files(data_dir, splits)
  tmp_dir = make_temp_dir(out_dir)
  try:
    files, parts = [], []
    part, part_hash, part_size = None, None, 0

    def close_part():
      part.close()
      parts.append(
        {"file": Path(part.name).name, "bytes": part_size, "sha256": part_hash.hexdigest()}
      )

    for name in names:
      path = data_dir / name
      files.append({"file": name, "bytes": path.stat().st_size, "sha256": sha256_file(path)})
      with open(path, "rb") as f:
        while chunk := f.read(min(_CHUNK, part_bytes)):
          while chunk:
            if part is None or part_size == part_bytes:
              if part is not None:
                close_part()
              part = open(tmp_dir / f"part-{len(parts):05d}.bin", "wb")
              part_hash, part_size = hashlib.sha256(), 0
            piece, chunk = chunk[: part_bytes - part_size], chunk[part_bytes - part_size :]
            part.write(piece)
            part_hash.update(piece)
            part_size += len(piece)
    close_part()
    atomic_write_json(
      tmp_dir / STAGE_FILE, {"source": str(data_dir), "files": files, "parts": parts}
    )
    os.replace(tmp_dir, out_dir)
  except BaseException:
    remove_tree(tmp_dir)
    raise
  return out_dir / STAGE_FILE


def unstage(stage_dir: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
  """Verifies the parts in `stage_dir` and rebuilds the data directory at `out_dir`."""
  stage_dir, out_dir = Path(stage_dir), Path(out_dir)
  if out_dir.exists():
    raise DataError(f"output directory {out_dir} already exists")
  index = read_json(stage_dir / STAGE_FILE)
  for part in index["parts"]:
    path = stage_dir / part["file"]
    if not path.is_file():
      raise DataError(f"missing part {path}")
    if path.stat().st_size != part["bytes"] or sha256_file(path) != part["sha256"]:
      raise DataError(f"bad checksum for {path} (listed in {stage_dir / STAGE_FILE})")
  for entry in index["files"]:
    name = Path(entry["file"])
    if name.is_absolute() or ".." in name.parts:
      raise DataError(f"{stage_dir / STAGE_FILE} lists an unsafe path {entry['file']!r}")
  tmp_dir = make_temp_dir(out_dir)
  try:
    parts = iter(index["parts"])
    current, buffered = None, b""

    def read(n: int) -> bytes:
      nonlocal current, buffered
      out = []
      while n > 0:
        if not buffered:
          if current is not None:
            current.close()
          current = open(stage_dir / next(parts)["file"], "rb")
          buffered = current.read()
        out.append(buffered[:n])
        n -= len(out[-1])
        buffered = buffered[len(out[-1]) :]
      return b"".join(out)

    for entry in index["files"]:
      path = tmp_dir / entry["file"]
      path.parent.mkdir(parents=True, exist_ok=True)
      with open(path, "wb") as f:
        remaining = entry["bytes"]
        while remaining:
          piece = read(min(remaining, _CHUNK))
          f.write(piece)
          remaining -= len(piece)
      if sha256_file(path) != entry["sha256"]:
        raise DataError(f"bad checksum for {entry['file']} rebuilt from {stage_dir}")
    if current is not None:
      current.close()
    os.replace(tmp_dir, out_dir)
  except BaseException:
    remove_tree(tmp_dir)
    raise
  return out_dir


def main(argv: list[str] | None = None) -> int:
  import argparse
  import json
  import sys

  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  commands = parser.add_subparsers(dest="command", required=True)
  p = commands.add_parser("stage", help="pack a data directory into parts under 60 MiB")
  p.add_argument("--data", required=True)
  p.add_argument("--out", required=True)
  p.add_argument("--splits", default=",".join(SPLITS), help="comma-separated")
  p.add_argument("--part-mib", type=float, default=56.0)
  p = commands.add_parser("unstage", help="verify staged parts and rebuild the directory")
  p.add_argument("--parts", required=True)
  p.add_argument("--out", required=True)
  args = parser.parse_args(argv)
  try:
    if args.command == "stage":
      splits = tuple(s for s in args.splits.split(",") if s)
      if unknown := [s for s in splits if s not in SPLITS]:
        raise ValueError(f"--splits: unknown split(s) {unknown}; expected some of {SPLITS}")
      index = stage(args.data, args.out, splits, int(args.part_mib * 2**20))
      parts = json.loads(index.read_text())["parts"]
      print(f"staged {len(parts)} parts, {sum(p['bytes'] for p in parts):,} bytes, in {args.out}")
    else:
      print(f"rebuilt and verified {unstage(args.parts, args.out)}")
  except (DataError, ValueError) as e:
    print(f"stage.py: error: {e}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
