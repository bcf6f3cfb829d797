"""Faults a long run meets, tried on the real trainer (`python -m convnext_jax.main`): a run
that diverges, a damaged newest checkpoint, a full disk. Each ends with what stays on disk,
the exit status and the last line of stderr checked. (A second trainer on a workdir in use:
test_workdir_lock's, and end to end test_multihost's and test_gcs's.)

The runs train `tests/mp_config.py` (a 1-1-2-1 ConvNeXt at 32 px) on one CPU device.
"""

import json
import pathlib
import shutil
import subprocess
import sys

import helpers
import jax
import multiprocess
import numpy as np
import pytest

from convnext_jax import checkpoints

REPO = pathlib.Path(__file__).resolve().parents[1]
TIMEOUT = 300
CONFIG = REPO / 'tests' / 'mp_config.py'
# Checkpoints every 2 steps, the last 3 kept (and the best), no evaluation unless asked.
SAVE_FLAGS = (
    '--config.checkpoint_every_steps=2',
    '--config.keep_checkpoints=3',
    '--config.eval_every_steps=100',
    '--config.log_every_steps=2',
)


def _command(workdir, data_dir, *flags):
  return [
      sys.executable,
      *multiprocess.trainer_args(CONFIG, workdir, data_dir, *SAVE_FLAGS, *flags),
  ]


def _env():
  return multiprocess.cpu_env()


def train(workdir, data_dir, *flags) -> subprocess.CompletedProcess:
  return subprocess.run(
      _command(workdir, data_dir, *flags),
      env=_env(),
      cwd=REPO,
      check=False,
      capture_output=True,
      text=True,
      timeout=TIMEOUT,
  )


def last_line(text: str) -> str:
  return text.strip().splitlines()[-1]


def _params(workdir, step, which='raw'):
  return checkpoints.load_params(str(workdir), which=which, step=step)[0]


def _flat(tree):
  return np.concatenate([np.ravel(x) for x in jax.tree.leaves(tree)])


@pytest.fixture(scope='module')
def six_steps(shapes_dir, tmp_path_factory):
  """A healthy run: 6 steps, evaluated at 2 and 4 (so a best step is on record), checkpoints
  2, 4, 6."""
  workdir = tmp_path_factory.mktemp('healthy') / 'run'
  proc = train(workdir, shapes_dir, '--config.num_steps=6', '--config.eval_every_steps=2')
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert checkpoints.workdir_steps(str(workdir)) == [2, 4, 6]
  return workdir


def test_a_diverging_run_stops_without_losing_the_good_checkpoints(six_steps, shapes_dir, tmp_path):
  workdir = tmp_path / 'run'
  shutil.copytree(six_steps, workdir)
  directory = workdir / checkpoints.CHECKPOINT_DIR
  # The best evaluated step, read from the metrics the healthy run wrote beside each step.
  top1 = {
      step: json.loads((directory / str(step) / 'metrics' / 'metrics').read_text())['top1']
      for step in (2, 4, 6)
  }
  best = max(top1, key=lambda s: (top1[s], s))

  # Resumed with an absurd learning rate: non-finite from a step or two on.
  proc = train(
      workdir,
      shapes_dir,
      '--config.num_steps=30',
      '--config.optim.lr=1e9',
      '--config.nonfinite.max_consecutive=3',
  )
  assert proc.returncode == 1, proc.stderr[-3000:]
  assert last_line(proc.stderr).startswith(
      'convnext-train: error: training diverged: 3 step(s) in a row'
  ), proc.stderr[-3000:]
  assert not (workdir / 'LOCK').exists()  # Released on the way out.
  steps = checkpoints.workdir_steps(str(workdir))
  assert best in steps, (top1, steps)
  assert max(steps) > 6  # It went on through the skipped steps before stopping.
  for step in steps:
    for which in ('raw', 'ema'):
      assert np.isfinite(_flat(_params(workdir, step, which))).all(), (step, which)


def test_a_damaged_newest_checkpoint_is_set_aside_and_the_one_before_resumed(
    six_steps, shapes_dir, tmp_path
):
  damaged = tmp_path / 'damaged'
  shutil.copytree(six_steps, damaged)
  helpers.scramble_array_data(damaged / checkpoints.CHECKPOINT_DIR / '6')

  proc = train(damaged, shapes_dir, '--config.num_steps=8')
  assert proc.returncode == 0, proc.stderr[-3000:]
  directory = damaged / checkpoints.CHECKPOINT_DIR
  assert (
      f'checkpoint step 6 in {directory} is damaged (state/' in proc.stderr
      and 'does not match the checksum written with it)' in proc.stderr
  ), proc.stderr[-3000:]
  assert 'resumed from step 4' in proc.stderr
  assert (damaged / checkpoints.DAMAGED_DIR / '6' / 'state').is_dir()  # Kept, not deleted.
  assert not (damaged / 'LOCK').exists()
  # Trained on from step 4 (that a resume continues exactly is test_batchnorm_training's).
  assert checkpoints.workdir_steps(str(damaged))[-1] == 8


def _disk_usage(path) -> int:
  return sum(p.stat().st_blocks * 512 for p in pathlib.Path(path).rglob('*'))


def test_a_full_disk_ends_the_run_with_one_line_and_keeps_the_checkpoints(
    six_steps, shapes_dir, tmp_path
):
  disk = tmp_path / 'disk'
  disk.mkdir()
  step_size = _disk_usage(six_steps / checkpoints.CHECKPOINT_DIR / '6')
  # Room for the workdir as it is and half a checkpoint more: step 8 cannot be written.
  size = (_disk_usage(six_steps) + step_size // 2) // 1024
  workdir = disk / 'run'
  report = (
      f'{sys.executable} -c "import sys; from convnext_jax import checkpoints as c; '
      'steps = c.workdir_steps(sys.argv[1]); '
      'print(steps, [c.verify_step(c.checkpoint_dir(sys.argv[1]) / str(s)) '
      'for s in steps])" "$DISK/run"; ls "$DISK/run/checkpoints"'
  )
  code, _, err, listing = helpers.run_on_small_disk(
      _command(workdir, shapes_dir, '--config.num_steps=12'),
      str(disk),
      f'{size}k',
      before=f'cp -r {six_steps} "$DISK/run"',
      after=report,
      env=_env(),
  )
  assert code == 1, err[-3000:]
  assert last_line(err) == (
      f'convnext-train: error: checkpoint step 8 could not be written to {workdir}/'
      'checkpoints: no space left on device (ENOSPC); the steps before it are intact: free '
      'space (or lower config.keep_checkpoints) and run again to resume from the newest'
  ), err[-3000:]
  assert 'Traceback' not in err and 'Event loop is closed' not in err, err[-3000:]
  steps_line, *names = listing.splitlines()
  assert steps_line == '[2, 4, 6] [None, None, None]'  # Intact, every one.
  assert '8.orbax-checkpoint-tmp' in names  # Cleared at the next start (orbax's cleanup).
