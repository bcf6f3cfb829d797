"""`benchmark resume`: the peak memory of a trainer resuming a workdir, in train states.

  python -m convnext_jax.benchmark resume [--model convnext_large] [--workdir DIR]

A trainer started on a workdir whose last step is already done only initialises and restores
(no compile, no save): what it holds above a process that merely imports the trainer's stack
is what resuming costs, the memory a pod user loses on every restart. Prints the train state's
size (params, AdamW moments and EMA: the abstract state of the trainer's own run), the peak
resident memory of a process that imports `convnext_jax.main`, that of the resuming trainer,
and the difference in train states.

The workdir is made once, by the trainer itself: one step of the model on the built-in
dataset at 32 px with `scan=True` (fast to compile; neither changes the state); a later call
with the same `--workdir` measures again. Every process runs on one CPU device. Imports no
TensorFlow (the trainer's processes do).
"""

import os
import subprocess
import sys
import tempfile

import jax

from convnext_jax import configs
from convnext_jax import run as run_lib
from convnext_jax import sharding
from convnext_jax.benchmark import common
from convnext_jax.data import DatasetFacts

# The trainer's flags: the base recipe shrunk to one step of a tiny batch (config_lib.runlocal),
# with the model asked for; EMA on, as in the ImageNet-1K recipes.
CONFIG = 'convnext_t_in1k:runlocal'


def _overrides(model: str, data_dir: str) -> list[str]:
  return [
      f'--config.model.name={model}',
      '--config.model.scan=True',
      '--config.input.image_size=32',
      '--config.global_batch_size=2',
      '--config.num_steps=1',
      '--config.optim.warmup_steps=0',
      '--config.eval_batch_size=2',
      '--config.dataset.eval_split=validation[:2]',
      '--config.checkpoint_every_steps=1',
      f'--config.dataset.data_dir={data_dir}',
  ]


def _state_mib(model: str) -> dict[str, float]:
  """MiB of each part of the trainer's state for `model` (from its abstract state)."""
  config = configs.load(CONFIG)
  config.model.name = model
  config.input.image_size = 32
  config.global_batch_size = 2
  mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
  r = run_lib.Run.build(config, DatasetFacts(1000, 10), mesh)

  def mib(tree) -> float:
    return sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(tree)) / 2**20

  return {key: mib(value) for key, value in r.abstract_state.items()}


def run(args) -> None:
  """Prints the versions and the figures (see the module docstring)."""
  root = args.workdir or tempfile.mkdtemp(prefix='convnext_resume_')
  workdir = os.path.join(root, 'run')
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=1', JAX_PLATFORMS='cpu')
  command = [
      'convnext_jax.main',
      f'--config={CONFIG}',
      *_overrides(args.model, os.path.join(root, 'tfds')),
      f'--workdir={workdir}',
  ]
  print(common.versions())
  if not os.path.isdir(workdir):
    print(f'training one step of {args.model} into {workdir} (once) ...', flush=True)
    subprocess.run(
        [sys.executable, '-m', *command],
        env=dict(env, TF_CPP_MIN_LOG_LEVEL='3'),
        check=True,
        capture_output=True,
    )
  parts = _state_mib(args.model)
  state = sum(parts.values())
  imports = common.child_peak_rss_mb(['-c', 'from convnext_jax import main'], env)[1]
  seconds, resumed = common.child_peak_rss_mb(command, env)
  above = resumed - imports
  listing = ', '.join(f'{key} {value:.0f}' for key, value in sorted(parts.items()) if value >= 1)
  print(
      f'{args.model}: train state {state:.0f} MiB ({listing}); peak RSS of a process that '
      f'imports the trainer {imports:.0f} MiB; of the trainer resuming its last step '
      f'{resumed:.0f} MiB ({seconds:.0f} s); above the imports {above:.0f} MiB = '
      f'{above / state:.2f} train states'
  )


def add_arguments(parser) -> None:
  common.add_model_argument(parser, 'convnext_large', 'convnext*')
  parser.add_argument(
      '--workdir', help='the trained workdir goes here, and is reused (default: a temporary one)'
  )
