"""The test environment itself: 8 CPU devices, and no TensorFlow in the model/convert path."""

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
