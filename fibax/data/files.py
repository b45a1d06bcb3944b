"""File integrity for the data pipeline: one error type, atomic writes, checksums.

Every file the pipeline writes goes through `atomic_write_*` (a temporary name in the same
directory, then `os.replace`), so an interrupted run never leaves a file that looks complete.
Reading takes `etils.epath` paths: a prepared directory may be local or a URI such as gs://
(`is_local`); preparing one writes local directories only.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import multiprocessing
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from etils import epath

_CHUNK = 1 << 22
_UMASK = os.umask(0)
os.umask(_UMASK)


class DataError(ValueError):
  """Bad input or a damaged data directory; the message names the offending file."""


_WATCHED_PID = None


def exit_with_parent() -> None:
  """In a worker process, exit as soon as the process that started it is gone: a parent
  killed with SIGKILL cannot stop its workers, which would otherwise live on holding memory
  and semaphores. Idempotent (one watcher thread a process); a no-op in a main process."""
  global _WATCHED_PID
  if _WATCHED_PID == os.getpid() or multiprocessing.parent_process() is None:
    return
  _WATCHED_PID = os.getpid()
  parent = os.getppid()

  def watch():
    while os.getppid() == parent:
      time.sleep(0.5)
    os._exit(1)

  threading.Thread(target=watch, daemon=True, name="fibax-exit-with-parent").start()


def is_local(path: str | os.PathLike) -> bool:
  """Whether `path` is on this machine's file system: it has no URI scheme (gs://, s3://)."""
  return "://" not in os.fspath(path)


def replace_text(path: epath.Path, text: str) -> None:
  """Replaces the file at `path` with `text` at once. Locally through `<name>.tmp` and a rename;
  elsewhere in one write: an object store (gs://) shows an object only once its upload is
  complete (readers see the old text or the new, never a part), and its rename is a copy then a
  delete, not atomic."""
  if is_local(path):
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
  else:
    path.write_text(text)


def sha256_file(path: str | os.PathLike) -> str:
  digest = hashlib.sha256()
  with epath.Path(path).open("rb") as f:
    while chunk := f.read(_CHUNK):
      digest.update(chunk)
  return digest.hexdigest()


def sha256_bytes(data: bytes) -> str:
  return hashlib.sha256(data).hexdigest()


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
  """Yields a temporary path beside `path`; renames it onto `path` only if the block succeeds."""
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
  os.close(fd)
  try:
    yield Path(tmp)
    os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp creates 0600; finished files get the usual mode
    os.replace(tmp, path)
  finally:
    with contextlib.suppress(FileNotFoundError):
      os.remove(tmp)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
  with atomic_path(path) as tmp:
    tmp.write_bytes(data)


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
  atomic_write_bytes(path, (json.dumps(obj, indent=1, sort_keys=False) + "\n").encode())


def read_json(path: str | os.PathLike) -> Any:
  path = epath.Path(path)
  if not path.is_file():
    raise DataError(f"missing file {path}")
  try:
    return json.loads(path.read_text())
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise DataError(f"{path} is not valid JSON: {e}") from None


def verify_sha256(path: str | os.PathLike, expected: str) -> None:
  path = epath.Path(path)
  if not path.is_file():
    raise DataError(f"missing file {path}")
  actual = sha256_file(path)
  if actual != expected:
    raise DataError(
      f"bad checksum for {path}: sha256 {actual[:16]}... != expected {expected[:16]}..."
    )


def make_temp_dir(beside: Path) -> Path:
  """A temporary directory next to `beside`, to be renamed onto it when complete."""
  beside.parent.mkdir(parents=True, exist_ok=True)
  tmp = Path(tempfile.mkdtemp(dir=beside.parent, prefix=f".{beside.name}.", suffix=".tmp"))
  os.chmod(tmp, 0o777 & ~_UMASK)
  return tmp


def remove_tree(path: str | os.PathLike) -> None:
  shutil.rmtree(path, ignore_errors=True)


def remove_stale_temporaries(directory: str | os.PathLike) -> None:
  """Removes `.*.tmp` files that a killed run left behind (they never look complete)."""
  directory = Path(directory)
  if directory.is_dir():
    for tmp in directory.rglob(".*.tmp"):
      with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
