"""File helpers: writing outputs so that a failure never leaves a half-written file behind."""

import contextlib
import os
import shutil
import tempfile


@contextlib.contextmanager
def atomic_output(path: str, overwrite: bool = False):
  """Yields a temporary path for a file or directory; renames it to `path` on success.

  The temporary path lives in a hidden staging directory beside `path` (same filesystem, so
  the rename is atomic for files). On any error the staging directory is removed and `path`,
  if it existed, is left as it was.

  Raises:
    FileExistsError: `path` exists and not `overwrite`.
    FileNotFoundError: the directory of `path` does not exist.
  """
  path = os.path.abspath(path)
  if os.path.lexists(path) and not overwrite:
    raise FileExistsError(f'{path} already exists; pass --overwrite to replace it')
  parent, base = os.path.split(path)
  if not os.path.isdir(parent):
    raise FileNotFoundError(f'output directory {parent} does not exist; create it first')
  staging = tempfile.mkdtemp(prefix=f'.{base}.tmp-', dir=parent)
  try:
    tmp = os.path.join(staging, base)
    yield tmp
    if not os.path.lexists(tmp):
      raise RuntimeError(f'nothing was written to {tmp}')
    if os.path.lexists(path) and (os.path.isdir(path) or os.path.isdir(tmp)):
      # A directory cannot be swapped in atomically: move the old one aside first.
      os.rename(path, os.path.join(staging, base + '.old'))
    os.replace(tmp, path)
  finally:
    shutil.rmtree(staging, ignore_errors=True)
