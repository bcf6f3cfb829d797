"""Tests of the workdir lock: a real second trainer process, races, stale locks, GCS specs."""

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading

import pytest

from convnext_jax import workdir_lock
from convnext_jax.workdir_lock import WorkdirLock
from convnext_jax.workdir_lock import WorkdirLocked

HOST = socket.gethostname()
# The lock holder in a second process: takes the lock, says so, and sleeps until killed.
_HOLDER = textwrap.dedent("""
    import sys, time
    from convnext_jax.workdir_lock import WorkdirLock
    WorkdirLock(sys.argv[1]).acquire()
    print('locked', flush=True)
    time.sleep(120)
""")


class FakeClock:
  """A settable unix time."""

  def __init__(self, now=1_796_277_600.0):  # 2026-12-03 06:00:00 UTC
    self.now = now

  def __call__(self):
    return self.now


def _read_lock(workdir):
  with open(os.path.join(workdir, workdir_lock.LOCK_NAME)) as f:
    return json.load(f)


def _dead_pid():
  """The pid of a process that has exited and been reaped."""
  child = subprocess.Popen([sys.executable, '-c', 'pass'])
  child.wait(timeout=30)
  return child.pid


def test_second_process_refused_until_killed_then_taken_over(tmp_path, caplog):
  workdir = str(tmp_path / 'run')
  holder = subprocess.Popen(
      [sys.executable, '-c', _HOLDER, workdir], stdout=subprocess.PIPE, text=True
  )
  try:
    assert holder.stdout.readline() == 'locked\n'
    with pytest.raises(WorkdirLocked) as refused:
      WorkdirLock(workdir).acquire()
    message = str(refused.value)
    assert '\n' not in message
    assert (
        f'workdir {workdir} is in use by another trainer: host {HOST}, pid {holder.pid}, '
        in message
    )
    assert f'(lock {workdir}/LOCK)' in message
    assert message.endswith(f'if no trainer uses it, delete {workdir}/LOCK')
    assert _read_lock(workdir)['pid'] == holder.pid
  finally:
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=30)
  # SIGKILL releases nothing: the lock file is still the dead holder's.
  assert _read_lock(workdir)['pid'] == holder.pid

  lock = WorkdirLock(workdir, heartbeat_s=None)
  with caplog.at_level('WARNING'):
    lock.acquire()
  assert f'host {HOST}, pid {holder.pid}' in caplog.text
  assert f'pid {holder.pid} is no longer running on this host' in caplog.text
  record = _read_lock(workdir)
  assert (record['host'], record['pid']) == (HOST, os.getpid())
  assert record['command'] == ' '.join(sys.argv)
  lock.release()
  assert not os.path.exists(os.path.join(workdir, 'LOCK'))


def test_context_manager_writes_record_and_releases(tmp_path):
  clock = FakeClock()
  with WorkdirLock(tmp_path, clock=clock, host='h1', pid=os.getpid()) as lock:
    record = _read_lock(tmp_path)
    assert lock.held and not lock.lost
    assert record['started'] == '2026-12-03T06:00:00Z'
    assert record['started_unix'] == record['heartbeat'] == 1_796_277_600.0
    assert (record['host'], record['pid']) == ('h1', os.getpid())
    assert len(record['token']) == 32
    # The same process, a second lock object: refused, and told why.
    with pytest.raises(WorkdirLocked, match='this very process'):
      WorkdirLock(tmp_path, clock=clock, host='h1').acquire()
  assert os.listdir(tmp_path) == []


def test_deterministic_race_on_stale_lock_one_takeover_fails(tmp_path):
  clock = FakeClock()
  dead = WorkdirLock(tmp_path, heartbeat_s=None, clock=clock, pid=_dead_pid()).acquire()
  del dead  # dies without releasing
  rival = WorkdirLock(tmp_path, heartbeat_s=None, clock=clock, pid=os.getppid())

  class RacedLock(WorkdirLock):
    """Lets the rival take over between our read of the stale lock and our write."""

    def _stale_reason(self, holder):
      if not rival.held and holder['pid'] != os.getppid():
        rival.acquire()
      return super()._stale_reason(holder)

  with pytest.raises(WorkdirLocked, match=rf'host {HOST}, pid {os.getppid()},'):
    RacedLock(tmp_path, heartbeat_s=None, clock=clock).acquire()
  assert rival.held
  assert _read_lock(tmp_path)['pid'] == os.getppid()


def test_threads_racing_on_stale_lock_exactly_one_wins(tmp_path):
  clock = FakeClock()
  WorkdirLock(tmp_path, heartbeat_s=None, clock=clock, host='gone').acquire()
  clock.now += 601
  locks = [
      WorkdirLock(tmp_path, heartbeat_s=None, clock=clock, host=f'h{i}', pid=100 + i)
      for i in range(8)
  ]
  barrier = threading.Barrier(len(locks))
  errors = {}

  def take(lock):
    barrier.wait()
    try:
      lock.acquire()
    except WorkdirLocked as e:
      errors[lock] = str(e)

  threads = [threading.Thread(target=take, args=(lock,)) for lock in locks]
  for thread in threads:
    thread.start()
  for thread in threads:
    thread.join(timeout=30)
  winners = [lock for lock in locks if lock.held]
  assert len(winners) == 1 and len(errors) == 7
  winner_host = f'h{locks.index(winners[0])}'
  assert _read_lock(tmp_path)['host'] == winner_host
  for message in errors.values():
    assert f'host {winner_host}, pid {winners[0]._pid},' in message


def test_other_host_fresh_refuses_stale_taken_over_and_old_holder_lost(tmp_path, monkeypatch):
  monkeypatch.setattr(sys, 'argv', ['convnext-train', '--workdir', str(tmp_path)])
  clock = FakeClock()
  old = WorkdirLock(
      tmp_path, heartbeat_s=None, stale_after_s=600, clock=clock, host='other', pid=4242
  ).acquire()
  new = WorkdirLock(tmp_path, heartbeat_s=None, stale_after_s=600, clock=clock, host='mine', pid=7)

  clock.now += 590
  with pytest.raises(WorkdirLocked) as refused:
    new.acquire()
  assert str(refused.value) == (
      f'workdir {tmp_path} is in use by another trainer: host other, pid 4242, started '
      f'2026-12-03 06:00:00 UTC, command "{" ".join(sys.argv)}", last heartbeat 590 s ago '
      f'(it is taken over after 600 s without one) (lock {tmp_path}/LOCK); stop that run or '
      f'choose another --workdir; if no trainer uses it, delete {tmp_path}/LOCK'
  )

  assert old.heartbeat()  # refreshed at +590: stale only at +1190
  clock.now += 600
  with pytest.raises(WorkdirLocked, match='last heartbeat 600 s ago'):
    new.acquire()
  clock.now += 1
  new.acquire()
  assert (_read_lock(tmp_path)['host'], _read_lock(tmp_path)['pid']) == ('mine', 7)

  assert not old.lost
  assert not old.heartbeat()
  assert old.lost and not old.held
  assert _read_lock(tmp_path)['heartbeat'] == clock.now  # the new holder's, untouched
  # The old holder's release leaves the new holder's lock alone.
  old.release()
  assert _read_lock(tmp_path)['pid'] == 7
  new.release()
  assert not os.path.exists(tmp_path / 'LOCK')


def _wait_for(condition, timeout_s=10.0):
  event = threading.Event()
  for _ in range(int(timeout_s / 0.01)):
    if condition():
      return True
    event.wait(0.01)
  return condition()


def test_heartbeat_thread_refreshes_then_detects_takeover(tmp_path):
  clock = FakeClock()
  lock = WorkdirLock(
      tmp_path, heartbeat_s=0.01, stale_after_s=600, clock=clock, host='a', pid=1
  ).acquire()
  clock.now += 5
  assert _wait_for(lambda: _read_lock(tmp_path)['heartbeat'] == clock.now)
  assert not lock.lost

  # Another host whose clock runs 601 s ahead sees the heartbeat as stale (as it would
  # after host 'a' lost its network for 10 minutes) and takes the lock over, although the
  # holder's thread is still beating.
  later = FakeClock(clock.now + 601)
  WorkdirLock(tmp_path, heartbeat_s=None, clock=later, host='b', pid=2).acquire()
  assert _wait_for(lambda: lock.lost)
  assert not lock.held
  lock.release()
  assert (_read_lock(tmp_path)['host'], _read_lock(tmp_path)['heartbeat']) == ('b', later.now)


def test_release_without_acquire_and_twice_is_a_no_op(tmp_path):
  lock = WorkdirLock(tmp_path, heartbeat_s=None)
  lock.release()
  lock.acquire()
  lock.release()
  lock.release()
  assert not os.path.exists(tmp_path / 'LOCK')


def test_corrupt_lock_is_never_taken_over(tmp_path):
  (tmp_path / 'LOCK').write_text('not json')
  with pytest.raises(WorkdirLocked) as refused:
    WorkdirLock(tmp_path, heartbeat_s=None).acquire()
  assert str(refused.value) == (
      f"workdir {tmp_path} has a lock file that is not a convnext_jax lock (b'not json') at "
      f'{tmp_path}/LOCK, so it may be in use; if no trainer uses this workdir, delete '
      f'{tmp_path}/LOCK'
  )
  assert (tmp_path / 'LOCK').read_text() == 'not json'


def test_gcs_and_local_kvstore_specs():
  assert workdir_lock.kvstore_spec('gs://bucket/a/b') == {
      'driver': 'gcs',
      'bucket': 'bucket',
      'path': 'a/b/',
  }
  assert workdir_lock.kvstore_spec('gs://bucket/a/b/') == {
      'driver': 'gcs',
      'bucket': 'bucket',
      'path': 'a/b/',
  }
  assert workdir_lock.kvstore_spec('gs://bucket') == {
      'driver': 'gcs',
      'bucket': 'bucket',
      'path': '',
  }
  assert workdir_lock.kvstore_spec('/x/run') == {'driver': 'file', 'path': '/x/run/'}
  with pytest.raises(ValueError, match='only local paths and gs://'):
    workdir_lock.kvstore_spec('s3://bucket/a')
  lock = WorkdirLock('gs://bucket/a/b')  # no network until acquire()
  assert lock.path == 'gs://bucket/a/b/LOCK'


def test_heartbeat_must_be_shorter_than_staleness(tmp_path):
  with pytest.raises(ValueError, match='heartbeat_s=600 must be positive and below'):
    WorkdirLock(tmp_path, heartbeat_s=600, stale_after_s=600)


def test_pid_reused_by_a_newer_process_is_stale(tmp_path, caplog):
  clock = FakeClock()
  # A lock from this host whose pid is alive (our parent) but started at another time.
  WorkdirLock(tmp_path, heartbeat_s=None, clock=clock, pid=os.getppid()).acquire()
  record = _read_lock(tmp_path)
  if record['process_start'] is None:
    pytest.skip('no /proc/<pid>/stat here')
  record['process_start'] -= 1
  (tmp_path / 'LOCK').write_text(json.dumps(record))
  with caplog.at_level('WARNING'):
    WorkdirLock(tmp_path, heartbeat_s=None, clock=clock).acquire()
  assert f'pid {os.getppid()} now belongs to a newer process' in caplog.text
  assert _read_lock(tmp_path)['pid'] == os.getpid()


def test_release_after_unnoticed_takeover_leaves_the_new_lock(tmp_path, caplog):
  clock = FakeClock()
  old = WorkdirLock(tmp_path, heartbeat_s=None, clock=clock, host='other', pid=4242).acquire()
  clock.now += 601
  WorkdirLock(tmp_path, heartbeat_s=None, clock=clock, host='mine', pid=7).acquire()
  assert not old.lost  # no heartbeat since: only the conditional delete can tell
  with caplog.at_level('WARNING'):
    old.release()
  assert 'another trainer took it over' in caplog.text
  assert old.lost
  assert (_read_lock(tmp_path)['host'], _read_lock(tmp_path)['pid']) == ('mine', 7)
