"""Multi-process training, as on a TPU pod slice or a multi-node GPU cluster, on one machine:
processes with 2 CPU devices each, joined by `jax.distributed` on 127.0.0.1
(`tests/multiprocess.py`), each running `tests/mp_worker.py` or `python -m convnext_jax.main`
with the tiny config of `tests/mp_config.py`.

Shown here: 2 processes train with identical losses on both and end with the parameters of
1 process fed the same global batches; every axis of the mesh spanning the 2 processes (data,
FSDP, model) trains identically on both, and a mesh the processes cannot feed is refused up
front; `init_from` into parameters split over both processes (a converted checkpoint; a
training workdir is read by the same restore, from another item: test_checkpoints,
test_fcmae_training); evaluation counts every example exactly once over 3 processes; a
dataset prepared on first use while one process arrives 30 s late; SIGTERM to one process,
then an exact resume (and a resume on 1 process); SIGKILL during an async save, after which
every reader uses the previous step.
"""

import json
import os
import pathlib
import shutil
import socket

import fake_tfds
import helpers
import jax
import mp_config
import multiprocess
import numpy as np
from PIL import Image
import pytest

from convnext_jax import checkpoints
from convnext_jax import run
from convnext_jax import train
from convnext_jax import workdir_lock
from convnext_jax.data import inputs as inputs_lib

CONFIG = 'tests/mp_config.py'
DEVICES = 2  # Per process: more only cost each step and first save more CPU.
TIMEOUT = 600  # Seconds per launch before it counts as hung: they take 20-150 s on 2 cores.
STEPS = 6
# (data, fsdp, model) meshes over 2 processes x 2 devices, each axis spanning the processes:
# data parallel (each process feeds its half of the batch; the reference run), tensor parallel
# (each process feeds the whole batch; initialised from a converted checkpoint) and FSDP (the
# run killed mid-save). That each mesh, and their mixes, train as one device does is
# test_sharding's; here, that both processes run it as one.
MESHES = {
    'data4': (4, 1, 1),
    'model4': (1, 1, 4),
    'killed': (1, 4, 1),
}
MODEL4_STEPS = 3
KILLED_AT = 4  # Process 1 SIGKILLs itself once the save of this step has started.


def worker(data_dir, workdir, runs=(), *flags, config=CONFIG):
  """`tests/mp_worker.py` arguments; it records into `workdir`."""
  return [
      'tests/mp_worker.py',
      f'--config={config}',
      f'--config.dataset.data_dir={data_dir}',
      f'--workdir={workdir}',
      f'--record_dir={workdir}',
      f'--runs={json.dumps(list(runs))}',
      *flags,
  ]


def records(record_dir, name, process) -> list[dict]:
  path = pathlib.Path(record_dir) / f'{name}_p{process}.jsonl'
  return [json.loads(line) for line in path.read_text().splitlines()]


def losses(record_dir, name, process) -> dict[int, float]:
  return {
      r['step']: r['train/loss'] for r in records(record_dir, name, process) if 'train/loss' in r
  }


def raw_and_ema(workdir, step=None):
  return (
      checkpoints.load_params(str(workdir), which='raw', step=step)[0],
      checkpoints.load_params(str(workdir), which='ema', step=step)[0],
  )


def assert_trees_equal(a, b):
  jax.tree.map(np.testing.assert_array_equal, a, b)


@pytest.fixture(scope='module')
def two_processes(shapes_dir, tmp_path_factory):
  """2 processes x 2 devices train three runs, one after the other: 'data4' for STEPS steps
  (the uninterrupted reference of the resume test); 'model4', initialised from a converted
  checkpoint (1000 classes), for MODEL4_STEPS steps with a checkpoint at each, the first at
  lr 0 (warmup starts at 0), so that step 1 keeps the weights as loaded; last 'killed'
  (a checkpoint every 2 steps), whose process 1 SIGKILLs itself once the save of step
  KILLED_AT has started, which ends the launch.
  """
  root = tmp_path_factory.mktemp('two_processes')
  config = mp_config.get_config()
  converted = helpers.random_params(run.model_from_config(config, 1000))
  checkpoints.save_params(
      str(root / 'converted'), converted, {'model_name': 'convnext_atto', 'num_classes': 1000}
  )
  runs = [
      {'name': 'data4', 'overrides': {'mesh': list(MESHES['data4'])}},
      {
          'name': 'model4',
          'overrides': {
              'mesh': list(MESHES['model4']),
              'num_steps': MODEL4_STEPS,
              'optim.warmup_steps': 2,
              'checkpoint_every_steps': 1,
              'init_from.path': str(root / 'converted'),
          },
      },
      {
          'name': 'killed',
          'overrides': {'mesh': list(MESHES['killed']), 'checkpoint_every_steps': 2},
      },
  ]
  results = multiprocess.launch(
      worker(shapes_dir, root, runs, '--signal_process=1', f'--sigkill_at_save={KILLED_AT}'),
      2,
      DEVICES,
      log_dir=root / 'logs',
      timeout=TIMEOUT,
      grace=5,
  ).wait()
  # Every run before 'killed' ended on both processes (each test checks how).
  for name in (r['name'] for r in runs[:-1]):
    for p in (0, 1):
      if not (root / f'{name}_outcome_p{p}.jsonl').exists():
        raise multiprocess.Failed(f'{name} did not end\n{multiprocess.describe(results)}')
  return root, results, converted


class _Replay:
  """Stands in for the training iterator: the given global batches, as this process feeds
  them."""

  next_position = 0
  skipped = 0

  def __init__(self, batches, feed):
    self._batches = iter(batches)
    self._feed = feed

  def __iter__(self):
    return self

  def __next__(self):
    return self._feed.global_arrays(next(self._batches))

  def close(self):
    pass


def test_two_processes_end_as_one_does_fed_the_same_global_batches(
    two_processes, shapes_dir, tmp_path, monkeypatch
):
  root, _, _ = two_processes
  two = [losses(root, 'data4', p) for p in (0, 1)]
  assert sorted(two[0]) == list(range(1, STEPS + 1)) and two[0] == two[1]
  # The global batch of each step: process 0's rows, then process 1's (disjoint halves).
  fed = [np.load(root / f'data4_p{p}_batches.npz') for p in (0, 1)]
  global_batches = [
      {k: np.concatenate([f[f'{k}_{i}'] for f in fed]) for k in ('image', 'label')}
      for i in range(STEPS)
  ]
  assert global_batches[0]['image'].shape == (16, 32, 32, 3)
  assert not np.array_equal(fed[0]['image_0'], fed[1]['image_0'])

  config = mp_config.get_config()
  config.dataset.data_dir = shapes_dir
  monkeypatch.setattr(
      inputs_lib.Inputs,
      'train_iterator',
      lambda self, feed, start: _Replay(global_batches, feed),
  )
  train.train_and_evaluate(config, str(tmp_path / 'one'))  # 1 process x 8 devices.
  for one, two_ in zip(raw_and_ema(tmp_path / 'one'), raw_and_ema(root / 'data4')):
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), one, two_)


@pytest.mark.parametrize('name', list(MESHES))
def test_every_mesh_trains_identically_on_both_processes(two_processes, name):
  root, results, _ = two_processes
  per_process = [losses(root, name, p) for p in (0, 1)]
  if name == 'killed':  # Until the kill: both logged every step before the save of KILLED_AT.
    per_process = [{s: v for s, v in pp.items() if s <= KILLED_AT} for pp in per_process]
    assert sorted(per_process[1]) == list(range(1, KILLED_AT + 1)), per_process
  else:
    outcomes = [records(root, f'{name}_outcome', p)[0] for p in (0, 1)]
    assert [o['outcome'] for o in outcomes] == ['trained', 'trained'], outcomes
    assert outcomes[0]['eval'] == outcomes[1]['eval']
    assert sorted(per_process[1]) == list(
        range(1, (STEPS if name == 'data4' else MODEL4_STEPS) + 1)
    )
  assert per_process[0] == per_process[1]
  data, fsdp, model = MESHES[name]
  shards = 1 if data * fsdp == 1 else 2
  line = (
      f"mesh {{'data': {data}, 'fsdp': {fsdp}, 'model': {model}}}; global batch 16 = "
      f'{16 // shards} per process (data shard '
  )
  for p, log in enumerate(r.log for r in results):
    assert f'{line}{min(p, shards - 1)} of {shards})' in log, name
  # The parameters really were split over both processes' devices.
  spec = {'data4': None, 'model4': "P(None, 'model')", 'killed': "P(None, 'fsdp')"}[name]
  if spec:
    assert all(spec in r.log for r in results), name


def test_init_from_into_parameters_split_over_both_processes(two_processes):
  """A converted checkpoint loaded into a model whose MLP kernels are split over the 4
  devices of 2 processes (tensor parallel), the new head initialised: step 1 (at lr 0)
  keeps exactly the weights as loaded."""
  root, _, converted = two_processes
  assert checkpoints.workdir_steps(str(root / 'model4')) == list(range(1, MODEL4_STEPS + 1))
  raw, _ = raw_and_ema(root / 'model4', step=1)
  head = raw.pop('head')
  assert head['kernel'].shape == (128, 10)  # A new 10-class head, at its initialisation.
  assert 0.8 * 0.02 < head['kernel'].std() < 1.2 * 0.02 and not head['bias'].any()
  assert_trees_equal(raw, {k: v for k, v in converted.items() if k != 'head'})
  trained, _ = raw_and_ema(root / 'model4')  # Then it trains, the backbone too.
  stem = 'downsample_layers.0.0'
  assert not np.array_equal(trained[stem]['kernel'], converted[stem]['kernel'])


def test_sigterm_to_one_process_stops_both_at_one_step_and_resumes_exactly(
    two_processes, shapes_dir, tmp_path
):
  root, _, _ = two_processes
  stopped = tmp_path / 'stopped'
  runs = [
      {'name': 'stopped', 'workdir': str(stopped), 'overrides': {'mesh': list(MESHES['data4'])}}
  ]
  results = multiprocess.run(
      worker(shapes_dir, tmp_path, runs, '--signal_process=1', '--sigterm_at_step=2'),
      2,
      DEVICES,
      log_dir=tmp_path / 'logs',
      timeout=TIMEOUT,
  )
  steps = checkpoints.workdir_steps(str(stopped))
  assert len(steps) == 1 and 2 <= steps[0] < STEPS, steps
  for r in results:  # Both saved that step together and exited 0.
    assert f'preempted at step {steps[0]}: checkpoint written, exiting' in r.log
  shutil.copytree(stopped, tmp_path / 'stopped_copy')

  # The same command again, through the entry point itself, resumes and ends exactly as the
  # uninterrupted run did; first while another trainer (this test) holds the workdir's lock:
  # process 0 finds it held and both processes stop with its one line.
  command = multiprocess.trainer_args(CONFIG, stopped, shapes_dir)
  with workdir_lock.WorkdirLock(str(stopped)):
    refused = multiprocess.launch(
        command, 2, DEVICES, log_dir=tmp_path / 'refused_logs', timeout=TIMEOUT
    ).wait()
  for r in refused:
    assert r.returncode == 1, multiprocess.describe(refused)
    assert (
        r.log.strip()
        .splitlines()[-1]
        .startswith(
            f'convnext-train: error: workdir {stopped} is in use by another trainer: host '
            f'{socket.gethostname()}, pid {os.getpid()},'
        )
    ), multiprocess.describe(refused)
  assert checkpoints.workdir_steps(str(stopped)) == steps  # Nothing written meanwhile.
  multiprocess.run(command, 2, DEVICES, log_dir=tmp_path / 'resume_logs', timeout=TIMEOUT)
  assert not (stopped / workdir_lock.LOCK_NAME).exists()  # Released at the end.
  assert checkpoints.workdir_steps(str(stopped)) == [steps[0], STEPS]
  for resumed, straight in zip(raw_and_ema(stopped), raw_and_ema(root / 'data4')):
    assert_trees_equal(resumed, straight)

  # On 1 process (of 8 devices): the data is split differently, so its position is estimated.
  config = mp_config.get_config()
  config.dataset.data_dir = shapes_dir
  train.train_and_evaluate(config, str(tmp_path / 'stopped_copy'))
  assert checkpoints.workdir_steps(str(tmp_path / 'stopped_copy')) == [steps[0], STEPS]
  _, meta = checkpoints.load_params(str(tmp_path / 'stopped_copy'))
  assert meta['process_count'] == 1 and meta['data_shard_count'] == 1
  assert meta['data_positions'] == [STEPS * 16]  # From the estimate, 16 per step.


def test_sigkill_during_an_async_save_leaves_the_previous_step_to_every_reader(two_processes):
  root, results, _ = two_processes
  assert results[1].returncode == -9, multiprocess.describe(results)
  assert results[0].returncode != 0  # Killed, or failed on losing its peer.
  workdir = root / 'killed'
  directory = workdir / checkpoints.CHECKPOINT_DIR
  assert any(
      p.name.startswith(f'{KILLED_AT}.orbax-checkpoint-tmp') for p in directory.iterdir()
  ), sorted(
      p.name for p in directory.iterdir()
  )  # Step KILLED_AT was being written.
  before = KILLED_AT - 2
  assert checkpoints.workdir_steps(str(workdir)) == [before]
  assert checkpoints.load_params(str(workdir))[1]['step'] == before  # Export, predict.
  ckpts = checkpoints.TrainingCheckpoints(str(workdir), save_interval_steps=2, keep=3)
  assert ckpts.latest_step() == before  # Where training resumes.
  ckpts.close()


NUM_EVAL = 37  # Prime: no batch size here divides it.


@pytest.fixture(scope='module', autouse=True)
def _late_launch(tmp_path_factory):
  """3 processes x 2 devices over a class folder prepared on first use, process 1 arriving
  30 s late: a run on a mesh they cannot feed, then a count of what evaluation sees. Started
  before this module's other tests (autouse), so that its 30 s of waiting overlaps them."""
  root = tmp_path_factory.mktemp('late')
  folder = root / 'folder'
  for split, count in (('train', 2), ('val', 1)):  # Label i: validation image i.
    for label in range(NUM_EVAL):
      directory = folder / split / f'c{label:02d}'
      directory.mkdir(parents=True)
      for k in range(count):
        Image.fromarray(fake_tfds.numbered_image(label * 3 + k)).save(directory / f'{k}.png')
  runs = [{'name': 'straddle', 'overrides': {'mesh': [2, 1, 3]}}]
  launch = multiprocess.launch(
      worker(
          root / 'tfds',
          root,
          runs,
          '--count_eval',
          '--delay_process=1',
          '--delay_s=30',
          config=f'{CONFIG}:folder={folder}',
      ),
      3,
      2,
      log_dir=root / 'logs',
      timeout=TIMEOUT,
  )
  yield root, launch
  launch.wait()  # Ends it, if no test did.


@pytest.fixture(scope='module')
def late_process(_late_launch):
  root, launch = _late_launch
  return root, launch.check()


def test_first_use_preparation_waits_for_a_late_process(late_process):
  root, results = late_process
  assert ['preparing class_folder' in r.log for r in results] == [True, False, False]
  assert len(list((root / 'tfds' / 'class_folder').iterdir())) == 1


def test_a_mesh_the_processes_cannot_feed_is_refused_up_front(late_process):
  root, _ = late_process
  for p in range(3):
    outcome = records(root, 'straddle_outcome', p)[0]
    assert outcome['outcome'] == 'refused'
    assert (
        "mesh {'data': 2, 'fsdp': 1, 'model': 3} cannot be fed by 3 processes: the batch axes"
    ) in outcome['error']
    assert 'process 1: rows [0, 1]' in outcome['error']


def test_evaluation_counts_every_example_exactly_once(late_process):
  root, _ = late_process
  seen = [records(root, 'evaluate', p)[0] for p in range(3)]
  assert seen[0]['shard'] == [0, 3] and seen[2]['shard'] == [2, 3]
  assert seen[0]['num_batches'] == 4  # ceil(13 / 4): shards of 13, 12, 12 in batches of 4.
  for s in seen:
    assert s['seen/count'] == NUM_EVAL and s['skipped'] == 0
    assert [s[f'seen/label{i}'] for i in range(NUM_EVAL)] == [1.0] * NUM_EVAL
