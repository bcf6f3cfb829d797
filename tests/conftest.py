"""Test setup: 8 host CPU devices (for sharding tests) before jax initialises, and fixtures."""

import atexit
import os
import shutil
import sys
import tempfile

import pytest

# Must precede any jax import: jax reads these once, when its backend starts.
os.environ['XLA_FLAGS'] = ' '.join(
    [os.environ.get('XLA_FLAGS', ''), '--xla_force_host_platform_device_count=8']
).strip()
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
# One persistent XLA compilation cache for the session, shared with the tests' subprocesses:
# the training tests compile the same train and eval steps in several runs (the resume test
# took 126 s with it, 172 s without).
if 'JAX_COMPILATION_CACHE_DIR' not in os.environ:
  _cache_dir = tempfile.mkdtemp(prefix='jax_cache_')
  os.environ['JAX_COMPILATION_CACHE_DIR'] = _cache_dir
  atexit.register(shutil.rmtree, _cache_dir, ignore_errors=True)

sys.path.insert(0, os.path.dirname(__file__))  # torch_reference and helpers


@pytest.fixture(scope='session')
def shapes_dir(tmp_path_factory):
  """A data_dir with the built-in `convnext_shapes` dataset prepared (about 10 s, once)."""
  from convnext_jax import datasets  # pylint: disable=g-import-not-at-top (TensorFlow)

  data_dir = str(tmp_path_factory.mktemp('tfds'))
  datasets.prepare('convnext_shapes', data_dir=data_dir)
  return data_dir
