"""A pod run's every `gs://` path against a Cloud Storage server on 127.0.0.1, faults included.

The server is fake-gcs-server behind the proxy of `tests/gcs_server.py` (which says how each
library reaches it: tensorstore and the Python clients by their emulator settings, TensorFlow's
file system, and with it etils epath, orbax's metadata, tfds and TensorBoard, by libcurl's
proxy and CA settings). Nothing below the network is patched; the commands are the real ones.

One module fixture runs the trainer (`python -m convnext_jax.main`, tests/mp_config.py's tiny
model, 12 steps, a checkpoint every 4) on a bucket:
  straight  the dataset prepared in the bucket on first use; the server answers 503 to the
            first writes of step 4's save and drops the connection of the next ones; it is
            gone (connections refused) for a minute while step 8 is being saved;
  stopped   the same run, a second trainer started on its workdir while it runs, then
            SIGTERM while step 4's save is under way (its writes slowed, and held by the
            server until the signal is sent, so that the run cannot end first);
  refused   `stopped` resumed while the bucket answers 403 to its next save's writes;
  resumed   `stopped` resumed again once the bucket accepts writes: it must end exactly
            as `straight`.
The server itself ends with the test run that started it, even one killed with SIGKILL.
"""

import io
import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import threading
import time

import gcs_server
import helpers
import multiprocess
import numpy as np
from PIL import Image
import pytest

from convnext_jax import checkpoints

REPO = pathlib.Path(__file__).resolve().parents[1]
BUCKET = 'convnext-test'
ROOT = f'gs://{BUCKET}'
DATA_DIR = f'{ROOT}/tensorflow_datasets'
STEPS = 12
OUTAGE_S = 60  # "The server gone for a minute mid-run."
TIMEOUT = 600
FLAGS = (
    '--config.checkpoint_every_steps=4',
    '--config.eval_every_steps=4',
    '--config.log_every_steps=2',
    '--config.keep_checkpoints=5',
    f'--config.num_steps={STEPS}',
)


@pytest.fixture(scope='module')
def gcs(tmp_path_factory):
  """The server, a bucket, and this process pointed at it (for reading what runs wrote)."""
  server = gcs_server.GcsServer(tmp_path_factory.mktemp('gcs'))
  server.create_bucket(BUCKET)
  saved = {name: os.environ.get(name) for name in server.env}
  os.environ.update(server.env)
  yield server
  for name, value in saved.items():
    if value is None:
      os.environ.pop(name, None)
    else:
      os.environ[name] = value
  server.stop()


class Trainer:
  """`python -m convnext_jax.main` on a workdir, its stderr collected line by line."""

  started = []  # Every trainer of the module, for the fixture's clean-up.

  def __init__(self, gcs, workdir, *flags):
    Trainer.started.append(self)
    self.workdir = workdir
    self.lines = []
    self.proc = subprocess.Popen(
        [
            sys.executable,
            *multiprocess.trainer_args(
                REPO / 'tests' / 'mp_config.py', workdir, DATA_DIR, *FLAGS, *flags
            ),
        ],
        env=multiprocess.cpu_env(**gcs.env),
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    self._reader = threading.Thread(target=self._read, daemon=True)
    self._reader.start()

  def _read(self):
    for line in self.proc.stderr:
      self.lines.append(line.rstrip('\n'))

  def wait_for(self, text, timeout=TIMEOUT):
    deadline = time.monotonic() + timeout
    while not any(text in line for line in self.lines):
      if self.proc.poll() is not None or time.monotonic() > deadline:
        raise AssertionError(f'{text!r} never logged:\n' + self.stderr[-3000:])
      time.sleep(0.05)

  def finish(self, timeout=TIMEOUT):
    try:
      self.proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
      self.proc.kill()
      self.proc.wait()
      raise AssertionError(f'{self.workdir}: still running after {timeout} s') from None
    self._reader.join(timeout=10)
    return self

  @property
  def stderr(self):
    return '\n'.join(self.lines)

  @property
  def last_line(self):
    return self.lines[-1] if self.lines else ''


def _writes_to(prefix):
  """A request predicate: writes (uploads, deletions) of objects under `prefix`."""
  return lambda request: request.writes and request.object_name.startswith(prefix)


class Faults:
  """What the proxy does to requests; a test sets rules (predicate -> action, for the first
  `count` matching requests) and reads back what was done."""

  def __init__(self, proxy):
    self._lock = threading.Lock()
    self._rules = []
    self.done = []  # (action, request)
    proxy.handle = self._handle

  def add(self, predicate, action, count=None, delay_s=0.0, hold=None):
    """`delay_s`: each matching request waits that long first; `hold`: a threading.Event
    each matching request waits for."""
    with self._lock:
      self._rules.append([predicate, action, count, delay_s, hold])

  def clear(self):
    with self._lock:
      self._rules = []

  def _handle(self, request):
    with self._lock:
      for rule in self._rules:
        predicate, action, count, delay_s, hold = rule
        if (count is None or count > 0) and predicate(request):
          if count is not None:
            rule[2] -= 1
          self.done.append((action, request))
          break
      else:
        return None
    if delay_s:
      time.sleep(delay_s)
    if hold is not None:
      hold.wait(TIMEOUT)
    return action


@pytest.fixture(scope='module')
def runs(gcs):
  faults = Faults(gcs.proxy)
  out = {}
  release = threading.Event()  # Lets the held writes of `stopped`'s step 4 through.
  try:
    # straight: 503s, then dropped connections, on step 4's first writes; a minute's outage
    # while step 8 is saved.
    step4 = _writes_to('straight/checkpoints/4/')
    faults.add(step4, ('status', 503), count=3)
    faults.add(step4, ('drop',), count=3)
    straight = Trainer(gcs, f'{ROOT}/straight')
    straight.wait_for('checkpoint step 8: writing in the background')
    with gcs.proxy.down():
      time.sleep(OUTAGE_S)
    out['straight'] = straight.finish()
    out['straight_faults'] = list(faults.done)
    faults.clear()

    # stopped: a second trainer on its workdir, then SIGTERM during step 4's (slowed) save.
    faults.add(_writes_to('stopped/checkpoints/4/'), None, delay_s=0.2, hold=release)
    stopped = Trainer(gcs, f'{ROOT}/stopped')
    stopped.wait_for('Holding the workdir lock')
    out['second'] = Trainer(gcs, f'{ROOT}/stopped').finish()
    stopped.wait_for('checkpoint step 4: writing in the background')
    stopped.proc.send_signal(signal.SIGTERM)
    release.set()
    out['stopped'] = stopped.finish()
    out['stopped_steps'] = checkpoints.workdir_steps(f'{ROOT}/stopped')
    out['slowed'] = sum(action is None for action, _ in faults.done)
    faults.clear()

    # refused: the bucket refuses the next save's writes (a service account without write
    # access). The run stopped at step k (5 to 11; 9 if it was waiting to save step 8).
    out['refused_step'] = (out['stopped_steps'][-1] // 4 + 1) * 4
    faults.add(_writes_to(f'stopped/checkpoints/{out["refused_step"]}/'), ('status', 403))
    # It ends at once (not held by orbax's threads waiting on the refused step's signals).
    out['refused'] = Trainer(gcs, f'{ROOT}/stopped').finish(timeout=120)
    out['refused_steps'] = checkpoints.workdir_steps(f'{ROOT}/stopped')
    faults.clear()

    out['resumed'] = Trainer(gcs, f'{ROOT}/stopped').finish()
  finally:  # A failed step leaves no trainer running and no request held.
    release.set()
    for trainer in Trainer.started:
      if trainer.proc.poll() is None:
        trainer.proc.kill()
        trainer.proc.wait()
  return out


def test_a_run_on_a_bucket_prepares_its_data_there_and_finishes(runs):
  run = runs['straight']
  assert run.proc.returncode == 0, run.stderr[-3000:]
  assert checkpoints.workdir_steps(f'{ROOT}/straight') == [4, 8, 12]
  from etils import epath  # pylint: disable=g-import-not-at-top

  assert (epath.Path(DATA_DIR) / 'convnext_shapes' / '2.0.0' / 'dataset_info.json').is_file()
  assert 'done: step 12' in run.stderr
  assert not epath.Path(f'{ROOT}/straight/LOCK').exists()  # Released at the end.


def test_a_burst_of_503s_and_dropped_connections_during_a_save_are_retried(runs, gcs):
  done = runs['straight_faults']
  assert [action for action, _ in done] == [('status', 503)] * 3 + [('drop',)] * 3, done
  # Each failed request was sent again and answered.
  log = [r for r in gcs.proxy.log if r.object_name.startswith('straight/checkpoints/4/')]
  for _, request in done:
    assert any(r.object_name == request.object_name and r.status == 200 for r in log), request
  assert runs['straight'].proc.returncode == 0
  assert checkpoints.verify_step(checkpoints.checkpoint_dir(f'{ROOT}/straight') / '4') is None


def test_the_server_gone_for_a_minute_mid_save_costs_nothing(runs):
  run = runs['straight']
  assert run.proc.returncode == 0, run.stderr[-3000:]
  directory = checkpoints.checkpoint_dir(f'{ROOT}/straight')
  for step in (4, 8, 12):  # Every step written in full, step 8 across the outage.
    assert checkpoints.verify_step(directory / str(step)) is None, step
  assert 'Traceback' not in run.stderr


def test_a_second_trainer_on_a_bucket_workdir_is_refused(runs):
  second = runs['second']
  assert second.proc.returncode == 1, second.stderr[-3000:]
  workdir = f'{ROOT}/stopped'
  assert second.last_line.startswith(
      f'convnext-train: error: workdir {workdir} is in use by another trainer: host '
  ), second.last_line
  assert f'pid {runs["stopped"].proc.pid},' in second.last_line
  assert f'(lock {workdir}/LOCK)' in second.last_line


def test_sigterm_saves_on_the_bucket_and_the_resume_is_bit_identical(runs):
  stopped = runs['stopped']
  assert stopped.proc.returncode == 0, stopped.stderr[-3000:]
  assert runs['slowed'] > 0  # Step 4's writes went slowly...
  at = runs['stopped_steps']  # [4, k], or [4, 8, 9] if it was waiting to save step 8.
  assert at[0] == 4 and 4 < at[-1] < STEPS and set(at[1:-1]) <= {8}, at  # ...and were kept.
  assert f'preempted at step {at[-1]}: checkpoint written, exiting' in stopped.stderr
  resumed = runs['resumed']
  assert resumed.proc.returncode == 0, resumed.stderr[-3000:]
  assert f'resumed from step {at[-1]}' in resumed.stderr
  mine = helpers.saved_state(f'{ROOT}/stopped', STEPS)
  reference = helpers.saved_state(f'{ROOT}/straight', STEPS)
  assert mine.keys() == reference.keys()
  for name in reference:  # Parameters, EMA, optimizer moments, step and rng.
    np.testing.assert_array_equal(mine[name], reference[name], name)


def test_a_bucket_refusing_writes_ends_the_run_in_one_line_and_loses_nothing(runs):
  refused, step = runs['refused'], runs['refused_step']
  at = runs['stopped_steps']
  assert refused.proc.returncode == 1, refused.stderr[-3000:]
  directory = f'{ROOT}/stopped/checkpoints'
  assert re.fullmatch(
      f'convnext-train: error: checkpoint step {step} could not be written to {directory}: '
      f'permission denied by Cloud Storage \\(HTTP 403\\) on {directory}/{step}/\\S*: give '
      "the VM's service account roles/storage.objectUser \\(or objectAdmin\\) on the bucket; "
      'the steps before it are intact and a new run resumes from the newest',
      refused.last_line,
  ), refused.last_line
  assert 'Traceback' not in refused.stderr
  # The refused step was never committed: it is not a step; those before it are intact.
  assert runs['refused_steps'] == at
  for step in at:
    step_dir = checkpoints.checkpoint_dir(f'{ROOT}/stopped') / str(step)
    assert checkpoints.verify_step(step_dir) is None, step


def test_checksums_on_the_bucket_are_sealed_and_checked(runs, gcs):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  step_dir = checkpoints.checkpoint_dir(f'{ROOT}/straight') / '12'
  sums = json.loads((step_dir / checkpoints.CHECKSUMS_FILE).read_text())['files']
  name = max(sums, key=lambda n: sums[n][0])  # The largest file: array data.
  assert name.startswith('state/')
  path = str(step_dir / name)
  data = bytearray(tf.io.gfile.GFile(path, 'rb').read())
  data[len(data) // 2] ^= 0xFF
  with tf.io.gfile.GFile(path, 'wb') as f:
    f.write(bytes(data))
  assert checkpoints.verify_step(step_dir) == (
      f'{name} does not match the checksum written with it'
  )
  data[len(data) // 2] ^= 0xFF
  with tf.io.gfile.GFile(path, 'wb') as f:
    f.write(bytes(data))
  assert checkpoints.verify_step(step_dir) is None


def test_tensorboard_reads_the_events_from_the_bucket(runs):
  from tensorboard.backend.event_processing import event_accumulator  # pylint: disable=g-import-not-at-top

  acc = event_accumulator.EventAccumulator(f'{ROOT}/straight', size_guidance={'tensors': 0})
  acc.Reload()
  steps = [e.step for e in acc.Tensors('train/loss')]
  assert steps == list(range(2, STEPS + 1, 2))
  assert [e.step for e in acc.Tensors('convnext_shapes/ema/top1')] == [4, 8, 12]


def _jpeg(seed):
  pixels = np.random.default_rng(seed).integers(0, 256, (48, 40, 3), dtype=np.uint8)
  out = io.BytesIO()
  Image.fromarray(pixels).save(out, format='JPEG', quality=90)
  return out.getvalue()


def test_convert_and_predict_read_and_write_the_bucket(gcs, tmp_path, capsys):
  """A timm file written to the bucket, imported from it into a params checkpoint there,
  exported back to it, and predicted with on images stored there: the same weights and the
  same predictions as from local copies."""
  import jax  # pylint: disable=g-import-not-at-top
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  from convnext_jax import convert_cli  # pylint: disable=g-import-not-at-top
  from convnext_jax import models  # pylint: disable=g-import-not-at-top
  from convnext_jax import predict  # pylint: disable=g-import-not-at-top
  from convnext_jax.convert import files  # pylint: disable=g-import-not-at-top
  from convnext_jax.convert import layouts  # pylint: disable=g-import-not-at-top

  params = helpers.random_params(models.create_model('convnext_atto', num_classes=10))
  original = layouts.flax_to_torch(params, 'convnext_atto', 'timm')
  timm_file = f'{ROOT}/weights/atto.safetensors'
  files.save_safetensors(original, timm_file)
  imported, exported = f'{ROOT}/weights/atto_params', f'{ROOT}/weights/back.safetensors'
  assert convert_cli.main(['import', timm_file, imported]) == 0
  assert convert_cli.main(['export', imported, exported]) == 0
  back = tmp_path / 'back.safetensors'
  tf.io.gfile.copy(exported, str(back))
  assert sorted(load_file(back)) == sorted(original)
  for name, value in load_file(back).items():
    np.testing.assert_array_equal(value, original[name], name)
  loaded, metadata = checkpoints.load_params(imported)
  jax.tree.map(np.testing.assert_array_equal, loaded, params)
  assert metadata['source'] == timm_file

  images = []
  for i in range(3):
    images.append(f'{ROOT}/images/{i}.jpg')
    with tf.io.gfile.GFile(images[-1], 'wb') as f:
      f.write(_jpeg(i))
    (tmp_path / f'{i}.jpg').write_bytes(_jpeg(i))
  common = ['--size', '32', '--json', '--top_k', '3']
  capsys.readouterr()
  assert predict.main([*images, '--checkpoint', imported, *common]) == 0
  on_bucket = json.loads(capsys.readouterr().out)
  local_params = tmp_path / 'atto_params'
  assert convert_cli.main(['import', str(back), str(local_params)]) == 0
  local_images = [str(tmp_path / f'{i}.jpg') for i in range(3)]
  capsys.readouterr()
  assert predict.main([*local_images, '--checkpoint', str(local_params), *common]) == 0
  on_disk = json.loads(capsys.readouterr().out)
  assert [r['image'] for r in on_bucket] == images
  assert [r['predictions'] for r in on_bucket] == [r['predictions'] for r in on_disk]


def test_the_imagenet22k_builder_writes_to_a_bucket(gcs, tmp_path):
  import test_datasets  # pylint: disable=g-import-not-at-top

  from convnext_jax import datasets  # pylint: disable=g-import-not-at-top

  manual_dir = tmp_path / 'manual'
  manual_dir.mkdir()
  names = set()
  for wnid in test_datasets._WNIDS:  # pylint: disable=protected-access
    files = test_datasets._class_files(wnid, odd_files=False)  # pylint: disable=protected-access
    names |= set(files)
    (manual_dir / f'{wnid}.tar').write_bytes(
        test_datasets._tar_bytes({n: data for n, (data, _, _) in files.items()})  # pylint: disable=protected-access
    )
  # As README's command runs it, in a process of its own (in this one, TensorFlow's record
  # writer would hold the GIL while it waits for the proxy, which runs on Python threads).
  code = (
      'import sys; from convnext_jax import datasets; '
      "b = datasets.prepare('imagenet22k', data_dir=sys.argv[1], manual_dir=sys.argv[2]); "
      "print(b.data_dir, b.info.splits['train'].num_examples, "
      "b.info.splits['validation'].num_examples)"
  )
  proc = subprocess.run(
      [sys.executable, '-c', code, f'{ROOT}/tfds22k', os.fspath(manual_dir)],
      env=multiprocess.cpu_env(**gcs.env),
      capture_output=True,
      text=True,
      timeout=TIMEOUT,
      check=False,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  data_dir, train, validation = proc.stdout.strip().splitlines()[-1].split()
  assert data_dir == f'{ROOT}/tfds22k/imagenet22k/default/1.0.0'
  assert int(train) + int(validation) == len(names)
  builder = datasets.builder('imagenet22k', data_dir=f'{ROOT}/tfds22k')
  assert builder.info.splits['train'].num_examples == int(train)  # Read back from the bucket.


def test_a_refusal_is_one_line_whichever_client_met_it(gcs):
  """The 403 as TensorFlow's file system and tensorstore each report it, described alike."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  import tensorstore as ts  # pylint: disable=g-import-not-at-top

  from convnext_jax import fileio  # pylint: disable=g-import-not-at-top

  gcs.proxy.handle = lambda r: ('status', 403) if _writes_to('refused/')(r) else None
  try:
    with (
        pytest.raises(tf.errors.PermissionDeniedError) as by_tensorflow,
        tf.io.gfile.GFile(f'{ROOT}/refused/a', 'w') as f,
    ):
      f.write('x')
    store = ts.KvStore.open({'driver': 'gcs', 'bucket': BUCKET, 'path': 'refused/'}).result()
    with pytest.raises(ValueError, match='PERMISSION_DENIED') as by_tensorstore:
      store.write('b', b'x').result()
  finally:
    gcs.proxy.handle = lambda request: None
  todo = "give the VM's service account roles/storage.objectUser (or objectAdmin) on the bucket"
  assert fileio.describe_storage_error(by_tensorflow.value) == (
      f'permission denied by Cloud Storage (HTTP 403) on {ROOT}/refused/a: {todo}'
  )
  assert fileio.describe_storage_error(by_tensorstore.value) == (
      f'permission denied by Cloud Storage (HTTP 403): {todo}'
  )
  assert fileio.describe_storage_error(ValueError('HTTP/1.1 403 somewhere else')) is None


def _stat(path: pathlib.Path) -> list[str]:
  """The fields of /proc/PID/stat after the command name: state, parent pid, ..."""
  return path.read_text().rsplit(')', 1)[1].split()


def _children(pid: int) -> list[int]:
  out = []
  for stat in pathlib.Path('/proc').glob('[0-9]*/stat'):
    try:
      if int(_stat(stat)[1]) == pid:
        out.append(int(stat.parent.name))
    except OSError:
      continue
  return out


def _running(pid: int) -> bool:
  try:  # A zombie (ended, not yet reaped by whoever adopted it) is not running.
    return _stat(pathlib.Path('/proc') / str(pid) / 'stat')[0] != 'Z'
  except OSError:
    return False


def test_the_server_ends_with_the_test_run_that_started_it_even_when_killed(tmp_path):
  """SIGKILL to the process that started fake-gcs-server (a test run killed by a CI timeout)
  ends the server too, instead of leaving it serving on its port."""
  env = {k: v for k, v in os.environ.items() if k != 'STORAGE_EMULATOR_HOST'}
  starter = subprocess.Popen(
      [sys.executable, str(REPO / 'tests' / 'gcs_server.py'), str(tmp_path), BUCKET],
      env=env,
      stdout=subprocess.PIPE,
      text=True,
  )
  servers = []
  try:
    assert 'STORAGE_EMULATOR_HOST=' in starter.stdout.readline()  # Serving.
    servers = _children(starter.pid)
    assert len(servers) == 1, servers
    starter.kill()
    starter.wait()
    deadline = time.monotonic() + 10
    while _running(servers[0]) and time.monotonic() < deadline:
      time.sleep(0.05)
    assert not _running(servers[0])
  finally:
    starter.kill()
    for pid in servers:  # Only if the server outlived its starter: the test failed.
      if _running(pid):
        os.kill(pid, signal.SIGKILL)
