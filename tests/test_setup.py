"""The test environment itself: 8 CPU devices, no TensorFlow in the model/convert path, and
setup.cfg's list of packages."""

import configparser
import pathlib
import subprocess
import sys

import jax


def test_eight_cpu_devices():
  assert jax.device_count() == 8
  assert {d.platform for d in jax.devices()} == {'cpu'}


def test_models_and_convert_import_without_tensorflow():
  # Also the train step, prediction and the benchmarks: the machines that run them (a GPU
  # box timing the train step) may have no TensorFlow.
  code = (
      'import sys; import convnext_jax.models, convnext_jax.convert, '
      'convnext_jax.convert_cli, convnext_jax.checkpoints, convnext_jax.train_step, '
      'convnext_jax.predict, convnext_jax.benchmark, convnext_jax.workdir_lock; '
      "bad = sorted(m for m in sys.modules if m.split('.')[0] in "
      "('tensorflow', 'tensorflow_datasets', 'tf_keras', 'keras')); "
      'print(bad); sys.exit(1 if bad else 0)'
  )
  result = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=False)
  assert result.returncode == 0, result.stdout + result.stderr


def test_setup_cfg_lists_every_package():
  # setup.cfg lists the packages by hand (convnext_jax.configs is the top-level configs/), so
  # a new package directory left off the list would be missing from the wheel.
  repo = pathlib.Path(__file__).resolve().parents[1]
  setup = configparser.ConfigParser()
  setup.read(repo / 'setup.cfg')
  listed = setup['options']['packages'].split()
  found = sorted(
      '.'.join(init.parent.relative_to(repo).parts)
      for init in repo.glob('convnext_jax/**/__init__.py')
  )
  assert sorted(listed) == sorted([*found, 'convnext_jax.configs'])
  assert setup['options']['package_dir'].split() == ['convnext_jax.configs', '=', 'configs']
  assert (repo / 'configs' / '__init__.py').is_file()
