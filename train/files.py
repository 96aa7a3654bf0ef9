"""The one atomic file write of train/: readers see the old file or the new one, never half."""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Callable
from pathlib import Path


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> None:
  """Calls ``write(tmp)`` on a fresh temporary file beside ``path``, syncs it, renames it.

  The temporary name is unique to this process and call, so concurrent writers (processes
  sharing a cache) never write into one file; a failed write leaves no temporary behind.

  Args:
    path: The file to create or replace.
    write: Writes the whole content to the path it is given (``Path.write_text``,
      ``Figure.savefig``, ...).
  """
  path = Path(path)
  tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
  try:
    write(tmp)
    fd = os.open(tmp, os.O_RDONLY)
    try:
      os.fsync(fd)  # The data is on disk before the rename makes it visible.
    finally:
      os.close(fd)
    os.replace(tmp, path)
  finally:
    with contextlib.suppress(FileNotFoundError):
      tmp.unlink()  # Only left if something failed.
