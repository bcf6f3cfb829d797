"""File helpers: writing outputs so that a failure never leaves a half-written file behind.

A full disk is reported the same way whichever library was writing: `atomic_output` turns the
writers' own errors (OSError ENOSPC/EDQUOT, safetensors' SafetensorError, tensorstore's
`RESOURCE_EXHAUSTED ... No space left on device` ValueError, torch's RuntimeError raised
while handling the OSError of a Python file) into one `DiskFullError` with a one-line message.
"""

import contextlib
import errno
import logging as std_logging
import os
import shutil
import sys
import tempfile
import time
import warnings

from absl import logging

# What each disk-full errno is called in messages, and the strerror text that libraries
# (safetensors, tensorstore) embed in their own exceptions instead of an errno.
_DISK_FULL = {
    errno.ENOSPC: ('no space left on device', 'ENOSPC', 'No space left on device'),
    errno.EDQUOT: ('disk quota exceeded', 'EDQUOT', 'Disk quota exceeded'),
}


def describe_disk_full(code: int) -> str:
  """'no space left on device (ENOSPC)' or 'disk quota exceeded (EDQUOT)'."""
  what, name, _ = _DISK_FULL[code]
  return f'{what} ({name})'


class DiskFullError(OSError):
  """Writing failed because the filesystem is full or over quota; str() is one line."""

  def __init__(self, code: int, path: str):
    what, name, _ = _DISK_FULL[code]
    super().__init__(
        code, f'{what} writing {path} ({name}); free space or choose another destination'
    )

  def __str__(self):
    return self.strerror


def disk_full_errno(exc: BaseException | None) -> int | None:
  """ENOSPC or EDQUOT if `exc`, or an exception it was raised from or while handling, says
  the disk is full or over quota; None for any other error.

  Follows `__cause__`/`__context__` because writers wrap the OSError: torch's zip writer
  raises `RuntimeError('... unexpected pos ...')` while handling it.
  """
  seen = set()
  while exc is not None and id(exc) not in seen:
    seen.add(id(exc))
    if isinstance(exc, OSError) and exc.errno in _DISK_FULL:
      return exc.errno
    text = str(exc)
    for code, (_, _, strerror) in _DISK_FULL.items():
      if strerror in text:
        return code
    exc = exc.__cause__ or exc.__context__
  return None


# After a failed orbax write, the tensorstore writes orbax left in flight go on for a moment
# and recreate their directories (tensorstore makes parents as needed) inside a staging
# directory already removed: it is removed again until it stays gone this long.
_SETTLE_S = 0.5
_SETTLE_LIMIT_S = 10.0


def _remove_until_gone(directory: str):
  deadline = time.monotonic() + _SETTLE_LIMIT_S
  gone_since = None
  while time.monotonic() < deadline:
    shutil.rmtree(directory, ignore_errors=True)
    if os.path.lexists(directory):
      gone_since = None
    elif gone_since is None:
      gone_since = time.monotonic()
    elif time.monotonic() - gone_since >= _SETTLE_S:
      return
    time.sleep(0.02)
  if os.path.lexists(directory):
    logging.warning(
        '%s is still being written %.0f s after the write failed; remove it '
        'once the process has exited',
        directory,
        _SETTLE_LIMIT_S,
    )


@contextlib.contextmanager
def atomic_output(path: str, overwrite: bool = False):
  """Yields a temporary path for a file or directory; renames it to `path` on success.

  The temporary path lives in a hidden staging directory beside `path` (same filesystem, so
  the rename is atomic for files). On any error the staging directory is removed (again
  until it stays gone for 0.5 s, as writes a failed orbax save left in flight may recreate
  it) and `path`, if it existed, is left as it was.

  Raises:
    FileExistsError: `path` exists and not `overwrite`.
    FileNotFoundError: the directory of `path` does not exist.
    DiskFullError: the filesystem of `path` filled up (or hit its quota) while writing,
      whatever the writer raised for it; other errors of the writer propagate unchanged.
  """
  path = os.path.abspath(path)
  if os.path.lexists(path) and not overwrite:
    raise FileExistsError(f'{path} already exists; pass --overwrite to replace it')
  parent, base = os.path.split(path)
  if not os.path.isdir(parent):
    raise FileNotFoundError(f'output directory {parent} does not exist; create it first')
  staging = None
  try:
    staging = tempfile.mkdtemp(prefix=f'.{base}.tmp-', dir=parent)
    tmp = os.path.join(staging, base)
    yield tmp
    if not os.path.lexists(tmp):
      raise RuntimeError(f'nothing was written to {tmp}')
    if os.path.lexists(path) and (os.path.isdir(path) or os.path.isdir(tmp)):
      # A directory cannot be swapped in atomically: move the old one aside first.
      os.rename(path, os.path.join(staging, base + '.old'))
    os.replace(tmp, path)
  except Exception as e:
    if staging is not None:
      _remove_until_gone(staging)
    code = disk_full_errno(e)
    if code is None:
      raise
    raise DiskFullError(code, path) from e
  finally:
    if staging is not None:
      shutil.rmtree(staging, ignore_errors=True)


def _not_disk_full_record(record) -> bool:
  return not (record.exc_info and disk_full_errno(record.exc_info[1]))


def _is_closed_loop_echo(unraisable) -> bool:
  return (
      unraisable.object is None
      and isinstance(unraisable.exc_value, RuntimeError)
      and str(unraisable.exc_value) == 'Event loop is closed'
  )


@contextlib.contextmanager
def quiet_disk_full_echoes():
  """Keeps a disk-full write failure, reported by the caller as one line, to that line.

  When an orbax write fails, orbax logs the exception with its traceback from each of its
  background threads (absl ERROR), and tensorstore writes still in flight complete, up to
  milliseconds after the error reached the caller, into the event loop orbax has closed:
  each prints an unraisable `RuntimeError: Event loop is closed` traceback (dozens for one
  checkpoint); asyncio logs 'Task exception was never retrieved' for the write tasks it
  collects later; Python warns of the write coroutines never awaited as the process exits.
  Inside this context the absl and asyncio records of a disk-full exception are dropped, and
  the 'Event loop is closed' tracebacks are held back. If a disk-full error leaves the
  context, the held ones are dropped and so are later echoes, records and those warnings, for
  the rest of the process (meant for entry points, which report the error and exit); otherwise
  the held ones are printed as usual and the filters and hook removed. Other unraisable
  exceptions and log records pass.
  """
  held = []
  previous_hook = sys.unraisablehook

  def hold_closed_loop_echoes(unraisable):
    if _is_closed_loop_echo(unraisable):
      held.append(unraisable)
    else:
      previous_hook(unraisable)

  def drop_closed_loop_echoes(unraisable):
    if not _is_closed_loop_echo(unraisable):
      previous_hook(unraisable)

  # Orbax's records come through absl; asyncio's "Task exception was never retrieved" ones,
  # for the writes whose tasks are collected later, through its own logger.
  loggers = (logging.get_absl_logger(), std_logging.getLogger('asyncio'))
  for logger in loggers:
    logger.addFilter(_not_disk_full_record)
  sys.unraisablehook = hold_closed_loop_echoes
  disk_full = False
  try:
    yield
  except Exception as e:
    disk_full = disk_full_errno(e) is not None
    raise
  finally:
    if disk_full:  # The echoes go on after the error: keep them out for good.
      sys.unraisablehook = drop_closed_loop_echoes
      # Write coroutines orbax created and abandoned when the write failed: collected, and
      # warned about, as the process exits, after the error's one line.
      warnings.filterwarnings(
          'ignore', message=r"coroutine '.*' was never awaited", category=RuntimeWarning
      )
    else:
      for logger in loggers:
        logger.removeFilter(_not_disk_full_record)
      sys.unraisablehook = previous_hook
      for unraisable in held:
        previous_hook(unraisable)
