"""A lock on a training workdir, so that two trainers never write the same checkpoints.

The lock is one small JSON object, `WORKDIR/LOCK`, next to `WORKDIR/checkpoints/`:

  {"format": "convnext_jax.workdir_lock/1", "host": "vm-3", "pid": 4242,
   "started": "2026-12-03T06:00:00Z", "started_unix": 1796277600.0,
   "heartbeat": 1796277660.0, "command": "python -m convnext_jax.main ...",
   "token": "9f2c...", "boot_id": "...", "process_start": 123456}

It is taken, refreshed and released with tensorstore's conditional writes, one mechanism
for local disks (the 'file' kvstore driver) and GCS (the 'gcs' driver): creating the key
only if it is absent, and replacing or deleting it only if its storage generation is still
the one we last saw. Of several processes that race for a free or stale lock exactly one
wins; the others see the winner and refuse.

A lock left behind by a trainer that died without releasing it (SIGKILL, OOM, a lost VM)
is stale and is taken over, with a warning naming the old holder:
  * on the same machine (same host name and boot id), as soon as its pid is gone, is a
    zombie, or belongs to a newer process (pid reuse: its start time in /proc differs);
  * from another machine (a GCS workdir, shared NFS), when its heartbeat is older than
    `stale_after_s`. A live holder rewrites its heartbeat every `heartbeat_s` from a daemon
    thread. Hosts' clocks are compared, so they should agree to well within
    `stale_after_s`.
A lock that is not valid JSON is never taken over: nothing says whether its writer lives.

If a heartbeat finds the lock no longer ours (another trainer judged it stale and took it
over, e.g. after this host lost its network for longer than `stale_after_s`), `lost` turns
True and the heartbeat stops; the trainer checks `lost` before each save and stops instead
of overwriting the new holder's checkpoints.

Multi-process training: only process 0 takes the lock, for the whole job, before any
process writes to the workdir, and broadcasts whether it succeeded so that every process
stops together; every process checks the broadcast outcome of `lost` the same way:

  lock = workdir_lock.WorkdirLock(workdir)
  if jax.process_index() == 0:
    lock.acquire()  # raises WorkdirLocked: one line naming the holder
  try:
    train(...)
  finally:
    lock.release()  # a no-op where not acquired

Nothing here imports TensorFlow or JAX.
"""

from collections.abc import Callable
import datetime
import json
import os
import socket
import sys
import threading
import time
from typing import Any
import uuid

from absl import logging
from etils import epath
import tensorstore as ts

from convnext_jax import fileio

LOCK_NAME = 'LOCK'
LOCK_FORMAT = 'convnext_jax.workdir_lock/1'
# Storage generation of an absent key: a write conditional on it creates the key only if
# nobody else has.
_NO_VALUE = b'\x02'
# Attempts of read-then-conditional-write before giving up; each failed attempt means
# another process changed the lock between our read and our write.
_MAX_ATTEMPTS = 5
_COMMAND_CHARS = 160  # of the holder's command line, in messages


class WorkdirLocked(RuntimeError):
  """The workdir is in use by another trainer; the message is one line naming it."""


def kvstore_spec(workdir: epath.PathLike) -> dict[str, str]:
  """The tensorstore kvstore spec of a workdir: 'gcs' for gs://bucket/path, else 'file'.

  Args:
    workdir: a local path or `gs://bucket/path`.

  Returns:
    A kvstore spec whose 'path' ends in '/', so that keys are file names in the workdir.

  Raises:
    ValueError: another URL scheme, or a gs:// path without a bucket.
  """
  text = os.fspath(workdir)
  if text.startswith('gs://'):
    # epath normalises repeated and trailing slashes: gs://b/a//b/ is gs://b/a/b.
    bucket, _, prefix = str(epath.Path(text))[len('gs://') :].partition('/')
    if not bucket:
      raise ValueError(f'workdir {text} names no bucket; expected gs://BUCKET/PATH')
    return {'driver': 'gcs', 'bucket': bucket, 'path': prefix + '/' if prefix else ''}
  if fileio.is_remote(text):
    raise ValueError(f'workdir {text}: only local paths and gs:// are supported for the lock')
  return {'driver': 'file', 'path': os.path.abspath(text) + '/'}


def _boot_id() -> str | None:
  # Same host name and same boot id means the same machine since its last boot: only then
  # do its pids mean anything to us (containers on different VMs may share a host name).
  try:
    with open('/proc/sys/kernel/random/boot_id') as f:
      return f.read().strip()
  except OSError:
    return None


def _proc_stat(pid: int) -> tuple[str, int] | None:
  """(state, start time in clock ticks since boot) of a process, or None where unknown."""
  try:
    with open(f'/proc/{pid}/stat') as f:
      stat = f.read()
  except OSError:
    return None
  # The command name (field 2) may hold spaces and parentheses: split after its last ')'.
  fields = stat[stat.rfind(')') + 2 :].split()
  try:
    return fields[0], int(fields[19])
  except (IndexError, ValueError):
    return None


def _pid_running(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True  # it exists, owned by another user
  except OSError:
    return True  # cannot tell: never take over a lock that may be live
  stat = _proc_stat(pid)
  return stat is None or stat[0] != 'Z'  # a zombie has exited, only its parent did not reap it


def _utc(unix_time: float) -> str:
  return datetime.datetime.fromtimestamp(unix_time, datetime.UTC).strftime('%Y-%m-%d %H:%M:%S UTC')


class WorkdirLock:
  """An exclusive lock on a training workdir, held by one trainer process.

  Use as a context manager, or `acquire()` and `release()` in a `finally`.
  """

  def __init__(
      self,
      workdir: epath.PathLike,
      *,
      heartbeat_s: float | None = 60.0,
      stale_after_s: float = 600.0,
      clock: Callable[[], float] = time.time,
      host: str | None = None,
      pid: int | None = None,
  ):
    """Describes the lock; nothing is read or written before `acquire()`.

    Args:
      workdir: the training workdir, local or gs://; it need not exist yet.
      heartbeat_s: seconds between heartbeats of the background thread; None runs no
        thread (the caller may call `heartbeat()` itself).
      stale_after_s: a lock from another machine whose heartbeat is older than this is
        taken over.
      clock: unix time now; injectable for tests.
      host: this host's name (default `socket.gethostname()`); injectable for tests.
      pid: this process's id (default `os.getpid()`); injectable for tests.

    Raises:
      ValueError: `stale_after_s` is not larger than `heartbeat_s`, or an unsupported
        workdir URL.
    """
    if heartbeat_s is not None and not 0 < heartbeat_s < stale_after_s:
      raise ValueError(
          f'heartbeat_s={heartbeat_s} must be positive and below stale_after_s='
          f'{stale_after_s}, or a live lock would look stale'
      )
    self.workdir = os.fspath(workdir)
    self.path = self.workdir.rstrip('/') + '/' + LOCK_NAME
    self._spec = kvstore_spec(workdir)
    self._heartbeat_s = heartbeat_s
    self._stale_after_s = stale_after_s
    self._clock = clock
    self._host = socket.gethostname() if host is None else host
    self._pid = os.getpid() if pid is None else pid
    self._kv: ts.KvStore | None = None
    self._record: dict[str, Any] | None = None
    self._generation: bytes | None = None  # storage generation of our write; None: not held
    self._lost = False
    self._mutex = threading.Lock()  # orders heartbeat writes against release
    self._stop = threading.Event()
    self._thread: threading.Thread | None = None

  @property
  def held(self) -> bool:
    """Whether this object holds the lock (acquired, not released, not lost)."""
    return self._generation is not None and not self._lost

  @property
  def lost(self) -> bool:
    """True once a heartbeat (or `release()`) found that another trainer took the lock over."""
    return self._lost

  def __enter__(self) -> 'WorkdirLock':
    return self.acquire()

  def __exit__(self, *exc_info) -> None:
    self.release()

  def _store(self) -> ts.KvStore:
    if self._kv is None:
      self._kv = ts.KvStore.open(self._spec).result()
    return self._kv

  def _new_record(self) -> dict[str, Any]:
    now = self._clock()
    stat = _proc_stat(self._pid)
    return {
        'format': LOCK_FORMAT,
        'host': self._host,
        'pid': self._pid,
        'started': datetime.datetime.fromtimestamp(now, datetime.UTC).strftime(
            '%Y-%m-%dT%H:%M:%SZ'
        ),
        'started_unix': now,
        'heartbeat': now,
        'command': ' '.join(sys.argv),
        'token': uuid.uuid4().hex,
        'boot_id': _boot_id(),
        'process_start': stat[1] if stat else None,
    }

  def acquire(self) -> 'WorkdirLock':
    """Takes the lock: creates it if absent, takes it over if stale, else refuses.

    Returns:
      self.

    Raises:
      WorkdirLocked: another live trainer holds the lock (or its lock cannot be read).
      RuntimeError: this object already holds the lock.
    """
    if self._generation is not None:
      raise RuntimeError(f'{self.path} is already held by this WorkdirLock; release() it first')
    kv = self._store()
    record = self._new_record()
    data = json.dumps(record, indent=1).encode()
    for _ in range(_MAX_ATTEMPTS):
      read = kv.read(LOCK_NAME).result()
      if read.state == 'missing':
        written = kv.write(LOCK_NAME, data, if_equal=_NO_VALUE).result()
        if written.generation:
          break
        continue  # another process created it after our read: look at theirs
      holder = _parse(read.value)
      if holder is None:
        raise WorkdirLocked(
            f'workdir {self.workdir} has a lock file that is not a convnext_jax lock '
            f'({read.value[:80]!r}) at {self.path}, so it may be in use; if no trainer uses '
            f'this workdir, delete {self.path}'
        )
      reason = self._stale_reason(holder)
      if reason is None:
        raise WorkdirLocked(self._held_message(holder))
      written = kv.write(LOCK_NAME, data, if_equal=read.stamp.generation).result()
      if written.generation:
        logging.warning(
            'Took over the stale lock %s of %s: %s.', self.path, _describe(holder), reason
        )
        break
      # Another process changed the lock after our read (took it over too, or heartbeat):
      # read again, and most likely refuse in its favour.
    else:
      raise WorkdirLocked(
          f'workdir {self.workdir}: the lock {self.path} kept changing under '
          f'{_MAX_ATTEMPTS} attempts to take it; another trainer is starting '
          'there; stop it or choose another --workdir'
      )
    self._record, self._generation, self._lost = record, written.generation, False
    logging.info('Holding the workdir lock %s (host %s, pid %d).', self.path, self._host, self._pid)
    if self._heartbeat_s is not None:
      self._stop.clear()
      self._thread = threading.Thread(
          target=self._heartbeat_loop, daemon=True, name='workdir-lock-heartbeat'
      )
      self._thread.start()
    return self

  def _same_machine(self, holder: dict[str, Any]) -> bool:
    if holder['host'] != self._host:
      return False
    boot_id = _boot_id()
    return holder.get('boot_id') is None or boot_id is None or holder['boot_id'] == boot_id

  def _stale_reason(self, holder: dict[str, Any]) -> str | None:
    """Why the holder's lock is stale, or None if the holder may be alive."""
    if self._same_machine(holder):
      pid = holder['pid']
      if not _pid_running(pid):
        return f'pid {pid} is no longer running on this host'
      stat = _proc_stat(pid)
      if holder.get('process_start') is not None and stat and stat[1] != holder['process_start']:
        return f'pid {pid} now belongs to a newer process'
      return None
    age = self._clock() - holder['heartbeat']
    if age > self._stale_after_s:
      return f'last heartbeat {age:.0f} s ago, more than stale_after_s={self._stale_after_s:.0f}'
    return None

  def _held_message(self, holder: dict[str, Any]) -> str:
    age = max(0.0, self._clock() - holder['heartbeat'])
    if self._same_machine(holder):
      where = (
          'this very process: an earlier WorkdirLock was not released'
          if holder['pid'] == self._pid
          else 'running on this host'
      )
    else:
      where = f'it is taken over after {self._stale_after_s:.0f} s without one'
    return (
        f'workdir {self.workdir} is in use by another trainer: {_describe(holder)}, '
        f'last heartbeat {age:.0f} s ago ({where}) (lock {self.path}); stop that run or '
        f'choose another --workdir; if no trainer uses it, delete {self.path}'
    )

  def heartbeat(self) -> bool:
    """Rewrites our heartbeat, if the lock is still ours.

    Returns:
      Whether the lock is still ours; False (and `lost` set) if another trainer took it
      over, or if it was never acquired or is released.
    """
    with self._mutex:
      if self._generation is None or self._lost:
        return False
      record = dict(self._record, heartbeat=self._clock())
      written = (
          self._store()
          .write(LOCK_NAME, json.dumps(record, indent=1).encode(), if_equal=self._generation)
          .result()
      )
      if written.generation:
        self._record, self._generation = record, written.generation
        return True
      self._lost = True
    current = _parse(self._store().read(LOCK_NAME).result().value)
    logging.error(
        'Lost the workdir lock %s: %s; this trainer must stop writing to %s.',
        self.path,
        f'{_describe(current)} took it over, judging this trainer dead'
        if current
        else 'it was deleted or replaced',
        self.workdir,
    )
    return False

  def _heartbeat_loop(self) -> None:
    while not self._stop.wait(self._heartbeat_s):
      try:
        if not self.heartbeat():
          return
      except Exception as e:  # pylint: disable=broad-except
        # A transient storage error (GCS hiccup) must not kill the thread: the lock only
        # goes stale if heartbeats fail for stale_after_s.
        logging.warning('Workdir lock heartbeat to %s failed, will retry: %s', self.path, e)

  def release(self) -> None:
    """Stops the heartbeat and deletes the lock if it is still ours; else leaves it.

    Safe to call more than once, and where `acquire()` was never called or failed.
    """
    self._stop.set()
    if self._thread is not None:
      self._thread.join(timeout=60)
      self._thread = None
    with self._mutex:
      if self._generation is None:
        return
      generation, self._generation = self._generation, None
      if self._lost:
        return  # the heartbeat already logged who holds it now
      deleted = self._store().write(LOCK_NAME, None, if_equal=generation).result()
    if deleted.generation:
      logging.info('Released the workdir lock %s.', self.path)
    else:
      self._lost = True
      logging.warning(
          'Did not delete the workdir lock %s: another trainer took it over.', self.path
      )


def _parse(value: bytes) -> dict[str, Any] | None:
  """The holder recorded in a lock file, or None if it is not one of our locks."""
  try:
    record = json.loads(value)
  except ValueError:
    return None
  if not (
      isinstance(record, dict)
      and isinstance(record.get('host'), str)
      and isinstance(record.get('pid'), int)
      and isinstance(record.get('heartbeat'), (int, float))
      and isinstance(record.get('started_unix'), (int, float))
  ):
    return None
  return record


def _describe(holder: dict[str, Any]) -> str:
  command = ' '.join(str(holder.get('command', '')).split())  # one line
  if len(command) > _COMMAND_CHARS:
    command = command[:_COMMAND_CHARS] + '...'
  return (
      f'host {holder["host"]}, pid {holder["pid"]}, started '
      f'{_utc(holder["started_unix"])}, command "{command}"'
  )
