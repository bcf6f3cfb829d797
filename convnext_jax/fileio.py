"""File helpers: writing outputs so that a failure never leaves a half-written file behind,
locally or on Cloud Storage, and the one-line reports of what writes fail with.

A full disk is reported the same way whichever library was writing: `atomic_output` turns the
writers' own errors (OSError ENOSPC/EDQUOT, safetensors' SafetensorError, tensorstore's
`RESOURCE_EXHAUSTED ... No space left on device` ValueError, torch's RuntimeError raised
while handling the OSError of a Python file) into one `DiskFullError` with a one-line message.
A bucket's refusal is described by `describe_storage_error`, whichever client made the request.
"""

import contextlib
import errno
import logging as std_logging
import os
import re
import shutil
import sys
import tempfile
import time
import warnings

from absl import logging
from etils import epath

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


# Cloud Storage's refusals, as the clients report them once their own retries are spent
# (TensorFlow's file system: 'HTTP response code 403 ... when uploading gs://...'; tensorstore:
# 'PERMISSION_DENIED: ... HTTP response code: 403 ... gs://...'): what it means, what to do.
_STORAGE_STATUS = {
    401: (
        'Cloud Storage did not accept the credentials (HTTP 401)',
        'check the credentials the VM (or GOOGLE_APPLICATION_CREDENTIALS) provides',
    ),
    403: (
        'permission denied by Cloud Storage (HTTP 403)',
        "give the VM's service account roles/storage.objectUser (or objectAdmin) on the bucket",
    ),
    429: (
        "Cloud Storage's rate limit (HTTP 429) outlasted the client's retries",
        'write less often (config.checkpoint_every_steps) or from fewer hosts, then run again',
    ),
}
_STORAGE_CODE = re.compile(r"HTTP response code:? (\d{3})|http_response_code='(\d{3})'")
_STORAGE_UNREACHABLE = (
    "Couldn't connect to server",
    'Could not connect to server',
    'Connection refused',
    'Failed to connect',
)
_GCS_PATH = re.compile(r"gs://[^\s'\",;]+")


def describe_storage_error(exc: BaseException | None) -> str | None:
  """One line for a Cloud Storage request that failed for good (`exc`, or an exception it was
  raised from or while handling): what the bucket answered, the gs:// path when the error
  names it, what to do; None for any other error.

  Transient answers (429, 5xx, a dropped connection) are retried by the clients themselves
  (TensorFlow's file system and tensorstore, with backoff for about a minute and more); this
  describes what is left once they give up. The HTTP status is read from the clients' own
  messages: TensorFlow's 'HTTP response code 403 ... when uploading gs://...', tensorstore's
  "PERMISSION_DENIED: ... [http_response_code='403']".
  """
  seen = set()
  while exc is not None and id(exc) not in seen:
    seen.add(id(exc))
    text = str(exc)
    path = _GCS_PATH.search(text)
    where = f' on {path.group(0)}' if path else ''
    match = _STORAGE_CODE.search(text)
    code = int(next(g for g in match.groups() if g)) if match else None
    if code in _STORAGE_STATUS:
      what, todo = _STORAGE_STATUS[code]
      return f'{what}{where}: {todo}'
    if code is not None and code >= 500:
      return (
          f"Cloud Storage kept failing (HTTP {code}){where} through the client's retries: "
          'check https://status.cloud.google.com and the network, then run again'
      )
    if path and any(marker in text for marker in _STORAGE_UNREACHABLE):
      return (
          f"Cloud Storage could not be reached{where} through the client's retries: check "
          "the VM's network (and any proxy settings), then run again"
      )
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

  A remote `path` (`gs://...`) is written locally first and then uploaded (see
  `_uploaded_output`).

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
  if is_remote(path):
    with _uploaded_output(path, overwrite) as tmp:
      yield tmp
    return
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


def reported_in_one_line(exc: BaseException | None) -> bool:
  """Whether a write error is one the entry points report in one line: a full disk, or a
  Cloud Storage refusal (`describe_storage_error`)."""
  return disk_full_errno(exc) is not None or describe_storage_error(exc) is not None


def is_remote(path) -> bool:
  """Whether `path` is a URL such as `gs://bucket/name` rather than a local path."""
  return '://' in str(path)


@contextlib.contextmanager
def _uploaded_output(path: str, overwrite: bool):
  """`atomic_output` for a remote `path`: a local temporary path, uploaded on success.

  On Cloud Storage an object appears only once its upload is complete, so a file is never
  seen half-written. A directory's files appear one by one, so its readers' own file (a
  Hugging Face directory's config.json) is uploaded last; an existing directory replaced by
  `overwrite` is removed first.
  """
  dest = epath.Path(path)
  if dest.exists() and not overwrite:
    raise FileExistsError(f'{path} already exists; pass --overwrite to replace it')
  staging = tempfile.mkdtemp(prefix='convnext-upload-')
  try:
    tmp = os.path.join(staging, dest.name)
    try:
      yield tmp
    except Exception as e:
      code = disk_full_errno(e)
      if code is None:
        raise
      raise DiskFullError(code, tmp) from e
    if not os.path.lexists(tmp):
      raise RuntimeError(f'nothing was written to {tmp}')
    if not os.path.isdir(tmp):
      epath.Path(tmp).copy(dest, overwrite=True)
      return
    if dest.exists():
      dest.rmtree()
    names = sorted(
        (os.path.relpath(os.path.join(root, f), tmp) for root, _, fs in os.walk(tmp) for f in fs),
        key=lambda name: (name == 'config.json', name),
    )
    for name in names:
      (dest / name).parent.mkdir(parents=True, exist_ok=True)
      epath.Path(tmp, name).copy(dest / name, overwrite=True)
  finally:
    shutil.rmtree(staging, ignore_errors=True)


@contextlib.contextmanager
def local_copy(path: str):
  """Yields a local path holding `path`'s file or directory: `path` itself if it is local, else
  a temporary download of it (removed afterwards), for readers that take only local files
  (torch, safetensors). A remote path that does not exist is yielded as it is."""
  if not is_remote(path) or not epath.Path(path).exists():
    yield path
    return
  source = epath.Path(path)
  staging = tempfile.mkdtemp(prefix='convnext-download-')
  try:
    local = os.path.join(staging, source.name)
    if source.is_dir():
      for root, _, files in source.walk():
        for name in files:
          target = os.path.join(local, os.path.relpath(str(root / name), str(source)))
          os.makedirs(os.path.dirname(target), exist_ok=True)
          (root / name).copy(target)
    else:
      source.copy(local)
    yield local
  finally:
    shutil.rmtree(staging, ignore_errors=True)


def _not_a_reported_write_error(record) -> bool:
  return not (record.exc_info and reported_in_one_line(record.exc_info[1]))


def _is_closed_loop_echo(unraisable) -> bool:
  return (
      unraisable.object is None
      and isinstance(unraisable.exc_value, RuntimeError)
      and str(unraisable.exc_value) == 'Event loop is closed'
  )


@contextlib.contextmanager
def quiet_write_error_echoes():
  """Keeps a write failure that the caller reports in one line (`reported_in_one_line`: a full
  disk, a Cloud Storage refusal) to that line.

  When an orbax write fails, orbax logs the exception with its traceback from each of its
  background threads (absl ERROR), and tensorstore writes still in flight complete, up to
  milliseconds after the error reached the caller, into the event loop orbax has closed:
  each prints an unraisable `RuntimeError: Event loop is closed` traceback (dozens for one
  checkpoint); asyncio logs 'Task exception was never retrieved' for the write tasks it
  collects later; Python warns of the write coroutines never awaited as the process exits.
  Inside this context the absl and asyncio records of such an exception are dropped, and
  the 'Event loop is closed' tracebacks are held back. If such an error leaves the context,
  the held ones are dropped and so are later echoes, records and those warnings, for the rest
  of the process (meant for entry points, which report the error and exit); otherwise the
  held ones are printed as usual and the filters and hook removed. Other unraisable
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
    logger.addFilter(_not_a_reported_write_error)
  sys.unraisablehook = hold_closed_loop_echoes
  disk_full = False
  try:
    yield
  except Exception as e:
    disk_full = reported_in_one_line(e)
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
        logger.removeFilter(_not_a_reported_write_error)
      sys.unraisablehook = previous_hook
      for unraisable in held:
        previous_hook(unraisable)
