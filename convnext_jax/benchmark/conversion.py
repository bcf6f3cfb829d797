"""`benchmark convert`: the time and peak memory of `convnext-convert import` and `export`.

  python -m convnext_jax.benchmark convert [--model convnext_xlarge] [--workdir DIR]

Writes a random official .pth of the model, then times `python -m convnext_jax.convert_cli`
import and export (official, timm, hf), each in a fresh process, with its peak resident
memory. Needs torch; imports no TensorFlow.
"""

import os
import tempfile

import numpy as np

from convnext_jax import convert
from convnext_jax import models
from convnext_jax.benchmark import common


def run(args) -> None:
  """Prints the versions, the checkpoint's size and one line per conversion step."""
  import torch  # pylint: disable=g-import-not-at-top

  workdir = args.workdir or tempfile.mkdtemp(prefix='convnext_bench_')
  src = os.path.join(workdir, f'{args.model}_official.pth')
  print(common.versions())
  shapes = models.param_shapes(models.create_model(args.model))
  maps = convert.layouts.tensor_maps(args.model, 1000, 'official')
  rng = np.random.default_rng(0)
  state_dict = {
      m.torch_key: torch.from_numpy(
          rng.standard_normal(m.torch_shape, dtype=np.float32) * np.float32(0.02)
      )
      for m in maps
  }
  torch.save({'model': state_dict}, src)
  del state_dict
  size_mb = os.path.getsize(src) / 2**20
  print(
      f'{args.model}: {models.count_params(shapes):,} parameters, official .pth '
      f'{size_mb:.0f} MB (float32); each step a fresh `python -m convnext_jax.convert_cli` '
      'process, time includes its imports'
  )
  ckpt = os.path.join(workdir, 'orbax')
  steps = [
      ('import official .pth -> orbax', ['import', src, ckpt]),
      ('export orbax -> official .pth', ['export', ckpt, os.path.join(workdir, 'o.pth')]),
      (
          'export orbax -> timm .safetensors',
          ['export', ckpt, os.path.join(workdir, 'o.safetensors')],
      ),
      ('export orbax -> hf directory', ['export', ckpt, os.path.join(workdir, 'hf')]),
  ]
  for name, argv in steps:
    seconds, rss = common.child_peak_rss_mb(['convnext_jax.convert_cli', *argv, '--overwrite'])
    print(
        f'  {name:36s} {seconds:6.1f} s   peak RSS {rss:7.0f} MB = '
        f'{rss / size_mb:4.2f}x the checkpoint'
    )
  if not args.workdir:
    import shutil  # pylint: disable=g-import-not-at-top

    shutil.rmtree(workdir)


def add_arguments(parser) -> None:
  common.add_model_argument(parser, 'convnext_xlarge')
  parser.add_argument('--workdir', help='keep the files here (default: a temporary directory)')
