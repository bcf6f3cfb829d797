"""A full disk: one error line, exit status 1, nothing left behind.

The end-to-end tests run `python -m convnext_jax.convert_cli` with its destination on a tmpfs too
small for the output (convnext_atto weights are 14 MB in float32), mounted in a private mount
namespace by `helpers.run_on_small_disk`.
"""

import errno
import logging
import os
import sys

import helpers
import pytest
import torch

from convnext_jax import checkpoints
from convnext_jax import convert
from convnext_jax import fileio
from convnext_jax import models

MODEL = 'convnext_atto'
CLI = [sys.executable, '-m', 'convnext_jax.convert_cli']


def _no_space(path):
  return (
      f'convnext-convert: error: no space left on device writing {path} (ENOSPC); '
      'free space or choose another destination'
  )


@pytest.fixture(scope='module')
def sources(tmp_path_factory):
  """A 14 MB official .pth and the params checkpoint imported from it."""
  root = tmp_path_factory.mktemp('sources')
  params = helpers.random_params(models.create_model(MODEL, num_classes=10))
  state_dict = convert.flax_to_torch(params, MODEL, 'official')
  pth = str(root / 'atto.pth')
  torch.save({'model': {k: torch.from_numpy(v) for k, v in state_dict.items()}}, pth)
  ckpt = str(root / 'ckpt')
  checkpoints.save_params(ckpt, params, {'model_name': MODEL, 'num_classes': 10})
  return {'pth': pth, 'ckpt': ckpt}


@pytest.fixture
def disk(tmp_path):
  mount_dir = tmp_path / 'disk'
  mount_dir.mkdir()
  yield str(mount_dir)
  assert not os.listdir(mount_dir)  # The tmpfs was private to the command's namespace.


def _assert_one_error_line(stderr, dest):
  assert 'Traceback' not in stderr and 'Event loop is closed' not in stderr, stderr
  assert stderr.splitlines()[-1] == _no_space(dest), stderr


def test_import_to_full_disk(sources, disk):
  dest = f'{disk}/out'
  code, out, err, listing = helpers.run_on_small_disk(
      CLI + ['import', sources['pth'], dest], disk, '4m'
  )
  assert code == 1 and out == ''
  assert err.splitlines() == [_no_space(dest)], err
  assert listing == ''  # No staging directory, no partial checkpoint.


@pytest.mark.parametrize('name', ['out.pth', 'out.safetensors', 'hf'])
def test_export_to_full_disk(sources, disk, name):
  dest = f'{disk}/{name}'
  code, out, err, listing = helpers.run_on_small_disk(
      CLI + ['export', sources['ckpt'], dest], disk, '4m'
  )
  assert code == 1 and out == ''
  _assert_one_error_line(err, dest)
  assert listing == ''


def _files_and_sizes(root):
  return sorted(
      f'{os.path.relpath(os.path.join(d, f), root)} {os.path.getsize(os.path.join(d, f))}'
      for d, _, names in os.walk(root)
      for f in names
  )


def test_overwrite_on_full_disk_keeps_the_old_output(sources, disk):
  dest = f'{disk}/out.pth'
  code, _, err, listing = helpers.run_on_small_disk(
      CLI + ['export', sources['ckpt'], dest, '--overwrite'],
      disk,
      '4m',
      before='printf precious > "$DISK/out.pth"',
      after='find "$DISK" -mindepth 1 -printf "%P %s\\n"; cat "$DISK/out.pth"',
  )
  assert code == 1
  _assert_one_error_line(err, dest)
  assert listing == 'out.pth 8\nprecious'

  # An existing checkpoint (14 MB) fits on the 20 MB disk; a second copy beside it does not.
  dest = f'{disk}/ckpt'
  code, _, err, listing = helpers.run_on_small_disk(
      CLI + ['import', sources['pth'], dest, '--overwrite'],
      disk,
      '20m',
      before=f'cp -r {sources["ckpt"]} "$DISK/ckpt"',
      after='ls -A "$DISK"; cd "$DISK/ckpt" && find . -type f -printf "%P %s\\n"',
  )
  assert code == 1
  assert err.splitlines() == [_no_space(dest)], err
  top, *files = listing.splitlines()
  assert top == 'ckpt'  # No staging directory beside it.
  assert sorted(files) == _files_and_sizes(sources['ckpt'])


# ---------------------------------------------------------------------------------------
# The translation is honest: only errors that say the disk is full become DiskFullError.
# ---------------------------------------------------------------------------------------

_TENSORSTORE_ENOSPC = (
    'RESOURCE_EXHAUSTED: Error writing "w/0" in OCDBT database at local file "/d/": Failed '
    "to write 20668 bytes to file 14: No space left on device [os_error_code='28']"
)


@pytest.mark.parametrize(
    'exc,expected',
    [
        (OSError(errno.ENOSPC, 'No space left on device'), errno.ENOSPC),
        (OSError(errno.EDQUOT, 'Disk quota exceeded'), errno.EDQUOT),
        (ValueError(_TENSORSTORE_ENOSPC), errno.ENOSPC),
        (
            RuntimeError(
                'Error while serializing: I/O error: No space left on device (os error 28)'
            ),
            errno.ENOSPC,
        ),
        (OSError(errno.EACCES, 'Permission denied'), None),
        (ValueError('RESOURCE_EXHAUSTED: Out of memory allocating 4 GB'), None),
        (RuntimeError('[enforce fail at inline_container.cc:672] . unexpected pos 3 vs 2'), None),
    ],
)
def test_disk_full_errno(exc, expected):
  assert fileio.disk_full_errno(exc) == expected


def test_disk_full_errno_follows_the_chain():
  # What torch.save into a Python file raises on a full disk.
  try:
    try:
      raise OSError(errno.ENOSPC, 'No space left on device')
    except OSError:
      raise RuntimeError(  # noqa: B904 (torch raises it so: the ENOSPC is only the context)
          '[enforce fail at inline_container.cc:672] . unexpected pos 3 vs 2'
      )
  except RuntimeError as e:
    assert fileio.disk_full_errno(e) == errno.ENOSPC


def test_atomic_output_translates_only_disk_full(tmp_path):
  dest = str(tmp_path / 'out')
  with pytest.raises(fileio.DiskFullError) as info, fileio.atomic_output(dest) as tmp:
    open(tmp, 'w').close()
    raise ValueError(_TENSORSTORE_ENOSPC)
  assert info.value.errno == errno.ENOSPC and isinstance(info.value, OSError)
  assert str(info.value) == (
      f'no space left on device writing {dest} (ENOSPC); free space '
      'or choose another destination'
  )
  with (
      pytest.raises(ValueError, match='^RESOURCE_EXHAUSTED: Out of memory$'),
      fileio.atomic_output(dest),
  ):
    raise ValueError('RESOURCE_EXHAUSTED: Out of memory')
  assert not os.listdir(tmp_path)


class _Unraisable:
  """What sys.unraisablehook receives (its type is not constructible from Python)."""

  def __init__(self, message):
    self.exc_type = RuntimeError
    self.exc_value = RuntimeError(message)
    self.exc_traceback = self.err_msg = self.object = None


def _closed_loop_echo():
  return _Unraisable('Event loop is closed')


def test_quiet_write_error_echoes_drops_only_the_echoes_of_a_full_disk(monkeypatch):
  printed = []
  monkeypatch.setattr(sys, 'unraisablehook', printed.append)
  records = []

  class Collect(logging.Handler):

    def emit(self, record):
      records.append(record)

  absl_logger = logging.getLogger('absl')
  handler = Collect()
  absl_logger.addHandler(handler)
  try:
    with pytest.raises(fileio.DiskFullError), fileio.quiet_write_error_echoes():
      sys.unraisablehook(_closed_loop_echo())
      try:
        raise ValueError(_TENSORSTORE_ENOSPC)
      except ValueError:
        absl_logger.error('thread raised', exc_info=True)
      absl_logger.error('unrelated')
      raise fileio.DiskFullError(errno.ENOSPC, '/d/out')
    assert not printed and [r.getMessage() for r in records] == ['unrelated']
    # Echoes that come after the error left are dropped too; anything else is printed.
    sys.unraisablehook(_closed_loop_echo())
    sys.unraisablehook(_Unraisable('something else'))
    assert [str(u.exc_value) for u in printed] == ['something else']
    printed.clear()
    monkeypatch.setattr(sys, 'unraisablehook', printed.append)

    # Any other failure: the held echoes are printed after all.
    with pytest.raises(ValueError), fileio.quiet_write_error_echoes():
      sys.unraisablehook(_closed_loop_echo())
      raise ValueError('RESOURCE_EXHAUSTED: Out of memory')
    assert [str(u.exc_value) for u in printed] == ['Event loop is closed']
    assert sys.unraisablehook == printed.append  # pylint: disable=comparison-with-callable
  finally:
    absl_logger.removeHandler(handler)
    for logger in (logging.getLogger('asyncio'), absl_logger):  # Left by the disk-full exit.
      logger.removeFilter(fileio._not_a_reported_write_error)  # pylint: disable=protected-access


def test_asyncio_records_of_a_disk_full_error_are_dropped_during_and_after(monkeypatch):
  """asyncio logs 'Task exception was never retrieved' for orbax's failed write tasks when it
  collects them, which may be after the one line was printed."""
  monkeypatch.setattr(sys, 'unraisablehook', sys.unraisablehook)  # Restored afterwards.
  records = []

  class Collect(logging.Handler):

    def emit(self, record):
      records.append(record.getMessage())

  asyncio_logger = logging.getLogger('asyncio')
  handler = Collect()
  asyncio_logger.addHandler(handler)
  error = ValueError(_TENSORSTORE_ENOSPC)
  try:
    with pytest.raises(ValueError), fileio.quiet_write_error_echoes():
      asyncio_logger.error('Task exception was never retrieved', exc_info=(ValueError, error, None))
      raise error
    asyncio_logger.error('Future exception was never retrieved', exc_info=(ValueError, error, None))
    asyncio_logger.error('unrelated')
  finally:
    asyncio_logger.removeHandler(handler)
    for logger in (asyncio_logger, logging.getLogger('absl')):  # Left by the disk-full exit.
      logger.removeFilter(fileio._not_a_reported_write_error)  # pylint: disable=protected-access
  assert records == ['unrelated']
