"""Which checkpoint steps count: every reader (training's resume, `load_params` for export and
predict, `init_from`) takes only the steps orbax has finished, by orbax's own test. And what
`init_from` and predict say of weights that do not fit the model.

Locally orbax writes a step under a temporary name and renames it when done (the multi-process
crash test in test_multihost covers that). On GCS it writes the step in place and marks it
done with `commit_success.txt` last; a crash leaves the step's files without the marker.
GCS is emulated here as orbax's own tests do it, by having `gcs_utils.is_gcs_path` say yes
for a local directory.
"""

import re
import shutil

import helpers
import jax
import numpy as np
from orbax.checkpoint._src.path import gcs_utils
from PIL import Image
import pytest

from convnext_jax import checkpoints
from convnext_jax import models
from convnext_jax import predict


@pytest.fixture
def as_if_on_gcs(tmp_path, monkeypatch):
  is_gcs_path = gcs_utils.is_gcs_path
  monkeypatch.setattr(
      gcs_utils,
      'is_gcs_path',
      lambda path: str(path).startswith(str(tmp_path)) or is_gcs_path(path),
  )


def _save(workdir, step, value):
  ckpts = checkpoints.TrainingCheckpoints(
      workdir, save_interval_steps=1, keep=5, enable_async=False
  )
  state = {'params': {'w': np.full(3, value, np.float32)}, 'step': np.int32(step)}
  ckpts.save(step, state, {'model_name': 'convnext_atto'}, force=True)
  ckpts.close()


def test_a_step_written_in_place_counts_only_once_committed(tmp_path, as_if_on_gcs):
  workdir = str(tmp_path / 'run')
  _save(workdir, 1, 1.0)
  directory = checkpoints.checkpoint_dir(workdir)
  assert (directory / '1' / 'commit_success.txt').exists()  # Written in place, committed.
  assert sorted(p.name for p in directory.iterdir()) == ['1']  # No temporary name.
  # A crash while step 2 was written in place: all its files, but no commit marker.
  shutil.copytree(directory / '1', directory / '2')
  (directory / '2' / 'commit_success.txt').unlink()

  assert checkpoints.workdir_steps(workdir) == [1]
  params, metadata = checkpoints.load_params(workdir, which='raw')  # Export and predict.
  assert metadata['step'] == 1
  np.testing.assert_array_equal(params['w'], np.ones(3))
  with pytest.raises(checkpoints.CheckpointError, match='no finished checkpoint at step 2'):
    checkpoints.load_params(workdir, which='raw', step=2)
  target = {'w': jax.numpy.zeros(3)}
  loaded, _, metadata = checkpoints.load_params_into(workdir, target, which='raw')  # init_from
  assert metadata['step'] == 1
  np.testing.assert_array_equal(loaded['w'], np.ones(3))
  # Committed, the same step counts (in a copy: the trainer's manager, below, clears away
  # what a crash left uncommitted).
  committed = tmp_path / 'committed'
  shutil.copytree(tmp_path / 'run', committed)
  (committed / 'checkpoints' / '2' / 'commit_success.txt').write_text('done')
  assert checkpoints.workdir_steps(str(committed)) == [1, 2]

  ckpts = checkpoints.TrainingCheckpoints(workdir, save_interval_steps=1, keep=5)
  assert ckpts.latest_step() == 1  # Where training resumes.
  ckpts.close()


# ----------------------------------------------------------------------------------------
# Damaged steps: verified before use, the newest intact one taken, the damaged set aside.
# ----------------------------------------------------------------------------------------


def _trained_workdir(root, steps=(1, 2), enable_async=True):
  """Steps saved as the trainer saves them (asynchronously: sealed in orbax's thread)."""
  workdir = str(root / 'run')
  ckpts = checkpoints.TrainingCheckpoints(
      workdir, save_interval_steps=1, keep=5, enable_async=enable_async
  )
  for step in steps:
    state = {'params': {'w': _weights(step)}, 'step': np.int32(step)}
    ckpts.save(step, state, {'model_name': 'convnext_atto', 'step': step}, force=True)
  ckpts.close()
  return workdir


def _weights(step):
  # Random, so that the array data is the largest file of a step (it does not compress).
  return np.random.default_rng(step).standard_normal(4096).astype(np.float32)


def _broken_manifest(step_dir):
  path = step_dir / 'state' / 'manifest.ocdbt'
  path.write_bytes(b'\0' * path.stat().st_size)


# What each damage does to step 2, and the reason the check must give (written by hand).
DAMAGES = {
    'random_bytes': (helpers.scramble_array_data, r'state/\S+ does not match the checksum'),
    'truncated_file': (helpers.truncate_array_data, r'state/\S+ has \d+ bytes, \d+ were written'),
    'no_array_metadata': (
        lambda d: (d / 'state' / '_METADATA').unlink(),
        r'state/_METADATA is missing',
    ),
    'no_metadata_json': (
        lambda d: (d / 'metadata' / 'metadata').unlink(),
        r'metadata/metadata is missing',
    ),
    'no_state': (lambda d: shutil.rmtree(d / 'state'), r'state/\S+ is missing'),
    'broken_manifest': (_broken_manifest, r'state/manifest.ocdbt does not match the checksum'),
}


@pytest.mark.parametrize('damage', sorted(DAMAGES))
def test_a_damaged_newest_step_is_named_and_the_intact_one_before_it_used(tmp_path, damage):
  workdir = _trained_workdir(tmp_path)
  directory = checkpoints.checkpoint_dir(workdir)
  assert (directory / '2' / checkpoints.CHECKSUMS_FILE).exists()
  assert checkpoints.verify_step(directory / '2') is None
  damage_fn, reason = DAMAGES[damage]
  damage_fn(tmp_path / 'run' / 'checkpoints' / '2')

  step, damaged = checkpoints.find_usable_step(workdir)
  assert step == 1 and [s for s, _ in damaged] == [2]
  assert re.match(reason, damaged[0][1]), damaged
  # Export, predict and init_from read step 1; asked for step 2, they say why not.
  params, metadata = checkpoints.load_params(workdir, which='raw')
  assert metadata['step'] == 1
  np.testing.assert_array_equal(params['w'], _weights(1))
  with pytest.raises(
      checkpoints.CheckpointError, match=f'checkpoint step 2 in {directory} is damaged'
  ):
    checkpoints.load_params(workdir, which='raw', step=2)
  _, _, metadata = checkpoints.load_params_into(workdir, {'w': jax.numpy.zeros(4096)}, which='raw')
  assert metadata['step'] == 1
  # The trainer resumes from step 1 and moves step 2 aside, not deleting it.
  ckpts = checkpoints.TrainingCheckpoints(workdir, save_interval_steps=1, keep=5)
  abstract = {
      'params': {'w': jax.ShapeDtypeStruct((4096,), np.float32)},
      'step': jax.ShapeDtypeStruct((), np.int32),
  }
  step, state, _ = ckpts.restore_latest(abstract)
  ckpts.close()
  assert step == 1 and int(state['step']) == 1
  assert checkpoints.workdir_steps(workdir) == [1]
  assert (tmp_path / 'run' / checkpoints.DAMAGED_DIR / '2' / 'state').exists() or (
      damage == 'no_state'
  )
  assert (tmp_path / 'run' / checkpoints.DAMAGED_DIR / '2' / 'metadata').exists() or (
      damage == 'no_metadata_json'
  )


# When a restore fails, tensorstore reads still in flight complete into the event loop orbax
# has closed; Python reports each as an unraisable 'Event loop is closed' (harmless here).
@pytest.mark.filterwarnings('ignore::pytest.PytestUnraisableExceptionWarning')
def test_an_unsealed_step_that_fails_to_restore_is_set_aside(tmp_path):
  """A step without checksums (written before they existed) is tried; if orbax cannot
  restore it, the trainer falls back to the step before."""
  workdir = _trained_workdir(tmp_path)
  step_dir = tmp_path / 'run' / 'checkpoints' / '2'
  (step_dir / checkpoints.CHECKSUMS_FILE).unlink()
  assert checkpoints.verify_step(checkpoints.checkpoint_dir(workdir) / '2') is None
  _broken_manifest(step_dir)
  ckpts = checkpoints.TrainingCheckpoints(workdir, save_interval_steps=1, keep=5)
  abstract = {
      'params': {'w': jax.ShapeDtypeStruct((4096,), np.float32)},
      'step': jax.ShapeDtypeStruct((), np.int32),
  }
  step, state, _ = ckpts.restore_latest(abstract)
  ckpts.close()
  assert step == 1
  np.testing.assert_array_equal(state['params']['w'], _weights(1))
  assert (tmp_path / 'run' / checkpoints.DAMAGED_DIR / '2').is_dir()


def test_every_step_damaged_is_one_error_naming_each(tmp_path):
  workdir = _trained_workdir(tmp_path)
  for step in ('1', '2'):
    helpers.truncate_array_data(tmp_path / 'run' / 'checkpoints' / step)
  with pytest.raises(
      checkpoints.CheckpointError,
      match=r'every checkpoint in .* is damaged \(step 2: .*; step 1: .*\)',
  ):
    checkpoints.find_usable_step(workdir)


def test_the_best_step_is_kept_after_a_restart(tmp_path):
  """Orbax writes each step's metrics beside it, so a restarted run still knows the best."""
  workdir = str(tmp_path / 'run')
  state = {'w': np.zeros(3, np.float32)}
  ckpts = checkpoints.TrainingCheckpoints(
      workdir, save_interval_steps=1, keep=2, best_metric='top1'
  )
  for step, top1 in ((1, 0.9), (2, 0.1)):
    ckpts.save(step, state, {}, metrics={'top1': top1}, force=True)
  ckpts.close()
  ckpts = checkpoints.TrainingCheckpoints(
      workdir, save_interval_steps=1, keep=2, best_metric='top1'
  )  # A restart.
  for step in (3, 4, 5):
    ckpts.save(step, state, {}, force=True)
  ckpts.close()
  assert checkpoints.workdir_steps(workdir) == [1, 4, 5]  # The best, and the last two.


def test_non_finite_weights_are_refused(tmp_path):
  """What export and predict read: a step holding NaN (saved by a version without the
  trainer's non-finite guard) is an error naming it, not weights."""
  workdir = str(tmp_path / 'run')
  ckpts = checkpoints.TrainingCheckpoints(
      workdir, save_interval_steps=1, keep=5, enable_async=False
  )
  weights = _weights(3)
  weights[7] = np.nan
  ckpts.save(3, {'params': {'w': weights}, 'step': np.int32(3)}, {'model_name': 'x'}, force=True)
  ckpts.close()
  with pytest.raises(
      checkpoints.CheckpointError,
      match=r'step 3 of .* holds non-finite weights \(1 arrays, e.g. w\)',
  ):
    checkpoints.load_params(workdir, which='raw')


def test_init_from_names_every_difference_but_a_new_head():
  initial = {
      'stem/kernel': (4, 4, 3, 8),
      'stem/bias': (8,),
      'gamma': (8,),
      'head/kernel': (8, 5),
      'head/bias': (5,),
  }
  loaded = {
      'stem/kernel': (4, 4, 3, 8),
      'stem/bias': (16,),
      'extra': (2,),
      'head/kernel': (8, 10),
      'head/bias': (10,),
  }
  with pytest.raises(checkpoints.CheckpointError) as info:
    checkpoints.compare_params(initial, loaded)
  assert str(info.value) == (
      'init_from does not match the model: missing 1: gamma; unexpected 1: extra; '
      'mis-shaped 1: stem/bias (16,) != expected (8,); set config.init_from.strict=False to '
      'keep initial values for these'
  )
  assert checkpoints.compare_params(initial, loaded, strict=False) == {
      'taken': ['stem/kernel'],
      'missing': ['gamma'],
      'unexpected': ['extra'],
      'misshaped': ['stem/bias (16,) -> (8,)'],
      'reinitialized': ['head/kernel (8, 10) -> (8, 5)', 'head/bias (10,) -> (5,)'],
  }
  # A checkpoint saved without a head: the model's head starts fresh, nothing else differs.
  headless = {n: s for n, s in initial.items() if not n.startswith('head/')}
  report = checkpoints.compare_params(initial, headless)
  assert report['reinitialized'] == ['head/kernel', 'head/bias'] and not report['missing']
  assert report['taken'] == ['stem/kernel', 'stem/bias', 'gamma']


def test_predict_names_what_does_not_fit_and_exits_1(tmp_path, capsys):
  shapes = models.weight_shapes(models.create_model('convnext_atto', num_classes=3))
  weights = jax.tree.map(lambda s: np.zeros(s.shape, np.float32), shapes)
  del weights['stages.3.1']['gamma']
  weights['downsample_layers.0.0']['bias'] = np.zeros(41, np.float32)  # convnext_atto: 40.
  weights['extra'] = {'kernel': np.zeros(2, np.float32)}
  path = str(tmp_path / 'misfit')
  checkpoints.save_params(path, weights, {'model_name': 'convnext_atto', 'num_classes': 3})
  message = (
      f'checkpoint {path} does not fit convnext_atto with 3 classes: missing 1: '
      'stages.3.1/gamma; unexpected 1: extra/kernel; mis-shaped 1: downsample_layers.0.0/bias '
      '(41,) != expected (40,); was it written by convnext_jax?'
  )
  with pytest.raises(predict.PredictError) as info:
    predict.load_model(path)
  assert str(info.value) == message
  image = str(tmp_path / 'grey.png')
  Image.new('RGB', (40, 40), (128, 128, 128)).save(image)
  code = predict.main(['--checkpoint', path, '--size', '32', image])
  out, err = capsys.readouterr()
  assert code == 1 and not out  # A runtime failure: argparse keeps 2 for usage errors.
  assert err == f'convnext-predict: error: {message}\n'


def test_predict_flag_out_of_range_is_a_usage_error(capsys):
  with pytest.raises(SystemExit) as info:
    predict.main(['--checkpoint', 'unused', '--top_k', '0', 'unused.png'])
  assert info.value.code == 2
  assert capsys.readouterr().err.splitlines()[-1] == (
      'convnext-predict: error: --top_k must be at least 1, got 0'
  )
