"""What the trainer's console shows.

By default: the trainer's own lines (config summary, mesh and batch, dataset, compilation,
progress with ETA, evaluation results, one line per checkpoint save) and every warning and
error. The libraries' INFO records (orbax logs each save in some 40 lines, tensorstore,
jax's backend probing, clu's metric echo and parameter table) and tfds' preparation banners
and progress bars appear only with `--verbose`, which also shows our own details (the full
config, the parameter table, the sharding of every parameter group).

`configure` is called once, by the command line (`main`); code that calls
`train.train_and_evaluate` itself keeps whatever logging it set up, and sees everything.
"""

import atexit
import contextlib
import io
import logging as std_logging
import os
import sys
import tempfile
import threading
import time

from absl import logging

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep
# `extra=` of our own INFO lines that only `--verbose` shows.
DETAIL = {'convnext_jax_detail': True}

# Warnings that libraries log in situations that are normal for this trainer: (where the
# record comes from, part of its message), each with why.
_EXPECTED_WARNINGS = (
    # tfds, about a dataset that is not prepared yet, which the trainer then prepares.
    (f'tensorflow_datasets{os.sep}', 'has no dataset_info.json'),
)

# What TensorFlow's C++ side prints to stderr while it is imported, before its log (and
# TF_CPP_MIN_LOG_LEVEL) is set up.
_NATIVE_NOTICES = (
    'oneDNN custom operations are on',
    'All log messages before absl::InitializeLog() is called are written to STDERR',
)

_quiet = False


class _ConsoleFilter(std_logging.Filter):
  """Passes warnings and errors (but the expected ones) and our own INFO lines (but details)."""

  def filter(self, record: std_logging.LogRecord) -> bool:
    if record.levelno >= std_logging.WARNING:
      return not any(
          source in record.pathname and text in record.getMessage()
          for source, text in _EXPECTED_WARNINGS
      )
    return record.pathname.startswith(_PACKAGE_DIR) and not getattr(
        record, 'convnext_jax_detail', False
    )


def configure(verbose: bool) -> None:
  """Shows only the trainer's own lines and every warning, unless `verbose`."""
  global _quiet
  _quiet = not verbose
  handler = logging.get_absl_handler()
  for existing in handler.filters:
    if isinstance(existing, _ConsoleFilter):
      handler.removeFilter(existing)
  if not verbose:
    handler.addFilter(_ConsoleFilter())


@contextlib.contextmanager
def library_output():
  """Around a library call that prints banners and progress bars to stdout and stderr
  (tfds' dataset preparation): they are dropped unless `--verbose`. Log records still
  appear (the absl handler keeps the real stderr); an exception still propagates."""
  if not _quiet:
    yield
    return
  sink = io.StringIO()
  with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
    yield


@contextlib.contextmanager
def native_notices_dropped():
  """Around the imports that load TensorFlow: its C++ start-up notices (`_NATIVE_NOTICES`,
  written to file descriptor 2 whatever TF_CPP_MIN_LOG_LEVEL says) are dropped; everything
  else written to stderr meanwhile is passed on afterwards, in order."""
  sys.stderr.flush()
  saved = os.dup(2)
  with tempfile.TemporaryFile() as captured:
    os.dup2(captured.fileno(), 2)
    try:
      yield
    finally:
      sys.stderr.flush()
      os.dup2(saved, 2)
      os.close(saved)
      captured.seek(0)
      for line in captured.read().decode(errors='replace').splitlines(keepends=True):
        if not any(notice in line for notice in _NATIVE_NOTICES):
          sys.stderr.write(line)
      sys.stderr.flush()


def duration(seconds: float) -> str:
  """'42 s', '7 min 05 s', '3 h 12 min'."""
  seconds = max(0, round(seconds))
  if seconds < 60:
    return f'{seconds} s'
  minutes, seconds = divmod(seconds, 60)
  if minutes < 60:
    return f'{minutes} min {seconds:02d} s'
  hours, minutes = divmod(minutes, 60)
  return f'{hours} h {minutes:02d} min'


# How long threads still running after a failed run get to end before the process exits
# without them.
_STUCK_THREADS_GRACE_S = 5.0


def exit_without_stuck_threads(status: int) -> int:
  """Ends a failed run's process with `status` even if threads it started would hold the exit;
  returns `status` when none would.

  When a checkpoint save fails before its directory exists (Cloud Storage refusing the write,
  say), orbax's save threads go on waiting for that directory's signal until their
  coordination timeout, many minutes; Python waits for such threads before it exits, so the
  run would print its error and hang instead of exiting for its launcher to act. After a short
  grace, the exit handlers run (jax's distributed shutdown among them) and the process exits
  without those threads.
  """

  def left():
    return [
        t
        for t in threading.enumerate()
        if t is not threading.current_thread() and not t.daemon and t.is_alive()
    ]

  # Polled, not joined: orbax's threads raise from a join that times out.
  deadline = time.monotonic() + _STUCK_THREADS_GRACE_S
  while left() and time.monotonic() < deadline:
    time.sleep(0.1)
  if left():
    logging.flush()
    atexit._run_exitfuncs()  # pylint: disable=protected-access (the handlers os._exit skips)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)  # pylint: disable=protected-access
  return status
