"""Test setup: 8 host CPU devices (for sharding tests) before jax initialises, and fixtures."""

import atexit
import fcntl
import os
import shutil
import sys
import tempfile

import pytest

sys.path.insert(0, os.path.dirname(__file__))  # torch_reference, helpers, multiprocess

from multiprocess import FAST_COMPILE

# Must precede any jax import: jax reads these once, when its backend starts. Every test
# compiles as the multi-process workers do (FAST_COMPILE): the suite is mostly compilation
# of small programs, which LLVM's optimisations slow down more than they speed up. With
# pytest-xdist the workers inherit the flags from the controller: add each once.
_flags = os.environ.get('XLA_FLAGS', '').split()
for _flag in ('--xla_force_host_platform_device_count=8', FAST_COMPILE):
  if _flag not in _flags:
    _flags.append(_flag)
os.environ['XLA_FLAGS'] = ' '.join(_flags)
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
# PyTorch's OpenMP threads sleep when idle instead of spinning for a core another test needs.
os.environ.setdefault('OMP_WAIT_POLICY', 'PASSIVE')
# One persistent XLA compilation cache for the session, shared with the xdist workers and the
# tests' subprocesses: the training tests compile the same train and eval steps in several
# runs.
if 'JAX_COMPILATION_CACHE_DIR' not in os.environ:
  _cache_dir = tempfile.mkdtemp(prefix='jax_cache_')
  os.environ['JAX_COMPILATION_CACHE_DIR'] = _cache_dir
  atexit.register(shutil.rmtree, _cache_dir, ignore_errors=True)
# Every program, not only those that take a second or more to compile: a trainer subprocess
# compiles a dozen small ones (its init, evaluation, checkpoint helpers) that the runs before
# it compiled already; read back, they save it about 2.5 of its 17 CPU-seconds.
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')


@pytest.fixture(scope='session')
def shapes_dir(tmp_path_factory):
  """A data_dir with the built-in `convnext_shapes` dataset prepared (about 10 s), once per
  session: the xdist workers share it (the first prepares it, under a lock; the others find
  it prepared). Tests only read it."""
  from convnext_jax import datasets  # pylint: disable=g-import-not-at-top (TensorFlow)

  base = tmp_path_factory.getbasetemp()
  # Under xdist each worker's base is in the session's own directory (never an older one's).
  session = base.parent if os.environ.get('PYTEST_XDIST_WORKER') else base
  data_dir = session / 'shapes_tfds'
  with open(session / 'shapes_tfds.lock', 'w') as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    datasets.prepare('convnext_shapes', data_dir=str(data_dir))
  return str(data_dir)


# The longest files first (wall time in a suite run, longest first). The workers take whole
# files (`--dist loadfile`) in collection order (`--no-loadscope-reorder`, setup.cfg), so they
# start on these and the many short files fill in behind them, instead of one long file
# running on alone at the end while the other workers wait. test_gcs.py comes first: most of
# its time is a bucket's outage and retries, waiting that the other workers fill.
SLOWEST_FIRST = (
    'test_gcs.py',
    'test_multihost.py',
    'test_train.py',
    'test_fcmae_training.py',
    'test_benchmark.py',
    'test_faults.py',
    'test_roadmap_models.py',
    'test_models.py',
    'test_fcmae.py',
    'test_roadmap_study.py',
    'test_unchanged.py',
    'test_convert.py',
)


def pytest_collection_modifyitems(items):
  rank = {name: i for i, name in enumerate(SLOWEST_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # Stable: the rest in order.
