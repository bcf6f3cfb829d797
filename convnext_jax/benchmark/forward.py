"""`benchmark forward`: forward img/s of the jitted Flax model beside PyTorch eager
(transformers' ConvNeXt, the same random weights converted) in this one process; float32.

  python -m convnext_jax.benchmark forward [--model convnext_tiny] [--batch 8] [--size 224]

The Flax model runs three ways: the backend's depthwise form with this package's compiler
options, the same with XLA's default options, and the grouped convolution. Needs torch and
transformers; imports no TensorFlow.
"""

import jax
import jax.numpy as jnp
import numpy as np

from convnext_jax import convert
from convnext_jax import models
from convnext_jax.benchmark import common


def run(args) -> None:
  """Prints the versions, a header and one line per variant: img/s, ms, ratio, logit diff."""
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top

  spec = models.get_spec(args.model)
  config_cls, model_cls = (
      (transformers.ConvNextV2Config, transformers.ConvNextV2ForImageClassification)
      if spec.use_grn
      else (transformers.ConvNextConfig, transformers.ConvNextForImageClassification)
  )
  torch.manual_seed(0)
  hf = model_cls(
      config_cls(
          hidden_sizes=list(spec.dims),
          depths=list(spec.depths),
          num_labels=1000,
          layer_norm_eps=1e-6,
      )
  ).eval()
  _, params = convert.torch_to_flax(hf.state_dict())
  params = jax.device_put(params)
  images = (
      np.random.default_rng(0)
      .standard_normal((args.batch, 3, args.size, args.size))
      .astype(np.float32)
  )
  images_nhwc = jnp.asarray(images.transpose(0, 2, 3, 1))
  images_torch = torch.from_numpy(images)

  print(common.versions())
  print(
      f'{args.model} forward, batch {args.batch}, {args.size}x{args.size}, float32; torch '
      f'threads {torch.get_num_threads()}; median of {args.iters} after {args.warmup} warm-up'
  )
  results = {}
  variants = [
      ('auto', models.compiler_options(), ''),
      ('auto', None, ', XLA default options'),
      ('conv', models.compiler_options(), ''),
  ]
  for impl, options, note in variants:
    model = models.create_model(args.model, depthwise_impl=impl)
    fn = jax.jit(lambda p, x, model=model: model.apply({'params': p}, x), compiler_options=options)
    logits = fn(params, images_nhwc).block_until_ready()
    seconds = common.time_calls(
        lambda fn=fn: fn(params, images_nhwc).block_until_ready(), args.warmup, args.iters
    )
    results[f'jax (depthwise {impl}{note})'] = (seconds, np.asarray(logits))
  with torch.inference_mode():
    torch_logits = hf(images_torch).logits.numpy()
    seconds = common.time_calls(lambda: hf(images_torch), args.warmup, args.iters)
  results['torch eager (transformers)'] = (seconds, torch_logits)

  torch_seconds = results['torch eager (transformers)'][0]
  for name, (seconds, logits) in results.items():
    diff = np.abs(logits - torch_logits).max()
    print(
        f'  {name:42s} {args.batch / seconds:8.1f} img/s  {seconds * 1e3:8.1f} ms/batch  '
        f'x{torch_seconds / seconds:5.2f} vs torch  max|dlogits| {diff:.1e}'
    )


def add_arguments(parser) -> None:
  # Against transformers' ConvNeXt: the ConvNeXt zoo only.
  common.add_model_argument(parser, 'convnext_tiny', 'convnext*')
  parser.add_argument('--batch', type=int, default=8)
  parser.add_argument('--size', type=int, default=224)
  parser.add_argument('--warmup', type=int, default=2)
  parser.add_argument('--iters', type=int, default=10)
