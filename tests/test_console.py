"""What the trainer's console lets through (`console.configure`), and TensorFlow's start-up
notices dropped at the file-descriptor level (`console.native_notices_dropped`)."""

import logging
import os
import subprocess
import sys

from absl import logging as absl_logging
import pytest

import convnext_jax
from convnext_jax import console

PACKAGE = os.path.dirname(convnext_jax.__file__)
SITE = os.path.dirname(os.path.dirname(absl_logging.__file__))


def _record(path, level=logging.INFO, message='m', **extra):
  record = logging.LogRecord('absl', level, path, 1, message, (), None)
  record.__dict__.update(extra)
  return record


@pytest.fixture
def handler_filter():
  """The filter `configure` puts on absl's handler, as a predicate; restores the handler."""
  handler = absl_logging.get_absl_handler()
  saved = list(handler.filters)
  yield handler.filter
  handler.filters[:] = saved
  console.configure(verbose=True)  # Back to showing everything, as for library users.


@pytest.mark.parametrize('verbose', [False, True])
def test_filter(handler_filter, verbose):
  console.configure(verbose)
  orbax = os.path.join(SITE, 'orbax', 'checkpoint', '_src', 'checkpoint_manager.py')
  tfds_utils = os.path.join(SITE, 'tensorflow_datasets', 'core', 'utils', 'file_utils.py')
  train = os.path.join(PACKAGE, 'train.py')
  # Our own INFO lines always; the libraries' only with --verbose; warnings always.
  assert handler_filter(_record(train))
  assert handler_filter(_record(orbax)) == verbose
  assert handler_filter(_record(os.path.join(SITE, 'jax', '_src', 'xla_bridge.py'))) == verbose
  assert handler_filter(_record(orbax, logging.WARNING))
  assert handler_filter(_record(orbax, logging.ERROR))
  # Our details only with --verbose.
  assert handler_filter(_record(train, **console.DETAIL)) == verbose
  # tfds' warning about a dataset it has not prepared yet (the trainer prepares it next).
  assert (
      handler_filter(
          _record(
              tfds_utils,
              logging.WARNING,
              'Variant folder /d/convnext_shapes/2.0.0 has no dataset_info.json',
          )
      )
      == verbose
  )
  assert handler_filter(_record(tfds_utils, logging.WARNING, 'something else'))
  # A file of another package whose name begins like ours is not ours.
  assert handler_filter(_record(PACKAGE + '_extra' + os.sep + 'x.py')) == verbose


def test_library_output_is_dropped_unless_verbose(capfd, handler_filter):
  del handler_filter
  for verbose in (False, True):
    console.configure(verbose)
    with console.library_output():
      print('banner')
      print('bar', file=sys.stderr)
    out, err = capfd.readouterr()
    assert (out, err) == (('banner\n', 'bar\n') if verbose else ('', ''))


def test_native_notices_dropped():
  """What a C library writes to fd 2 inside the block: the known notices go, the rest stays,
  in order, and stderr works again afterwards."""
  code = """if True:
    import os, sys
    from convnext_jax import console
    with console.native_notices_dropped():
      os.write(2, b"WARNING: All log messages before absl::InitializeLog() is called are "
                  b"written to STDERR\\n")
      os.write(2, b"I0000 port.cc:153] oneDNN custom operations are on. You may see...\\n")
      os.write(2, b"a real problem\\n")
      print("python line", file=sys.stderr)
    os.write(2, b"after\\n")
  """
  proc = subprocess.run(
      [sys.executable, '-c', code], capture_output=True, text=True, timeout=120, check=True
  )
  assert proc.stderr == 'a real problem\npython line\nafter\n'


@pytest.mark.parametrize(
    'seconds, text',
    [(0.4, '0 s'), (42, '42 s'), (59.6, '1 min 00 s'), (425, '7 min 05 s'), (11520, '3 h 12 min')],
)
def test_duration(seconds, text):
  assert console.duration(seconds) == text
