"""Which checkpoint steps count: every reader (training's resume, `load_params` for export and
predict, `init_from`) takes only the steps orbax has finished, by orbax's own test.

Locally orbax writes a step under a temporary name and renames it when done (the multi-process
crash test in test_multihost covers that). On GCS it writes the step in place and marks it
done with `commit_success.txt` last; a crash leaves the step's files without the marker.
GCS is emulated here as orbax's own tests do it, by having `gcs_utils.is_gcs_path` say yes
for a local directory.
"""

import shutil

import jax
import numpy as np
from orbax.checkpoint._src.path import gcs_utils
import pytest

from convnext_jax import checkpoints


@pytest.fixture
def as_if_on_gcs(tmp_path, monkeypatch):
  is_gcs_path = gcs_utils.is_gcs_path
  monkeypatch.setattr(gcs_utils, 'is_gcs_path',
                      lambda path: str(path).startswith(str(tmp_path)) or is_gcs_path(path))


def _save(workdir, step, value):
  manager = checkpoints.training_manager(workdir, save_interval_steps=1, keep=5,
                                         enable_async=False)
  state = {'params': {'w': np.full(3, value, np.float32)}, 'step': np.int32(step)}
  checkpoints.save_training(manager, step, state, {'model_name': 'convnext_atto'}, force=True)
  manager.close()


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
  manager = checkpoints.training_manager(workdir, save_interval_steps=1, keep=5)
  assert manager.latest_step() == 1  # Where training resumes.
  manager.close()

  # Committed, the same step counts.
  (directory / '2' / 'commit_success.txt').write_text('done')
  assert checkpoints.workdir_steps(workdir) == [1, 2]
