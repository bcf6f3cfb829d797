"""`benchmark compile`: the lowering and compile seconds of forward+backward, without and with
the scan over each stage's blocks.

  python -m convnext_jax.benchmark compile [--model convnext_xlarge[,convnextv2_huge,...]]
      [--batch 1] [--size 224] [--dtype float32|bfloat16] [--remat POLICY]
      [--depthwise-impl auto|conv|shift] [--json FILE]

It lowers and compiles the gradient of the mean cross-entropy with respect to the params
(train=True, drop path 0.1) on one device from abstract params and images
(`jax.ShapeDtypeStruct`), so it needs no memory for weights: once unscanned and once with
`scan=True`. One line per model: lowering and compile seconds of each, the ratio of their
sums, and XLA's memory plan of each (the scanned one includes the stacked copy of each
stage's params and gradients). The persistent compilation cache is off while it runs.

No TensorFlow is imported.
"""

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from convnext_jax import config_lib
from convnext_jax import models
from convnext_jax.benchmark import common

COMPILE_DROP_PATH_RATE = 0.1


@dataclasses.dataclass
class CompileResult:
  """Seconds to lower and compile one model's forward+backward, unscanned and scanned."""

  model: str
  lower_s: float
  compile_s: float
  memory_mib: float | None
  scan_lower_s: float
  scan_compile_s: float
  scan_memory_mib: float | None

  @property
  def ratio(self) -> float:
    """(lower + compile) unscanned over scanned: how many times faster scan compiles."""
    return (self.lower_s + self.compile_s) / (self.scan_lower_s + self.scan_compile_s)

  def line(self) -> str:
    def memory(mib):
      return 'n/a' if mib is None else f'{mib:.0f} MiB'

    return (
        f'  {self.model:26s} lower {self.lower_s:7.2f} s  compile {self.compile_s:7.2f} s'
        f'  | scan: lower {self.scan_lower_s:7.2f} s  compile {self.scan_compile_s:7.2f} s'
        f'  | unscanned/scan x{self.ratio:6.2f}  | XLA plan {memory(self.memory_mib)}, '
        f'scan {memory(self.scan_memory_mib)}'
    )

  def record(self) -> dict:
    return dict(dataclasses.asdict(self), ratio=self.ratio)


def compile_seconds(
    model_name: str,
    batch: int,
    size: int,
    dtype: str,
    scan: bool,
    remat: str = '',
    depthwise_impl: str = 'auto',
) -> tuple[float, float, float | None]:
  """(lowering s, compile s, XLA's planned MiB) of the params' gradient, from shapes only.

  The loss is the mean cross-entropy of the logits, train=True with drop path
  `COMPILE_DROP_PATH_RATE`; params, images and labels are `jax.ShapeDtypeStruct`s.
  """
  model = models.create_model(
      model_name,
      dtype=jnp.dtype(dtype),
      remat=remat,
      scan=scan,
      drop_path_rate=COMPILE_DROP_PATH_RATE,
      depthwise_impl=depthwise_impl,
  )
  params = models.param_shapes(model, size)
  images = jax.ShapeDtypeStruct((batch, size, size, 3), np.float32)
  labels = jax.ShapeDtypeStruct((batch,), np.int32)

  # A new function per call: nothing is reused from an earlier trace.
  def loss(params, images, labels, key):
    logits = model.apply({'params': params}, images, train=True, rngs={'drop_path': key})
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

  grad = jax.jit(jax.grad(loss), compiler_options=models.compiler_options(training=True))
  start = time.perf_counter()
  lowered = grad.lower(params, images, labels, jax.random.key(0))
  lowered_at = time.perf_counter()
  compiled = lowered.compile()
  done = time.perf_counter()
  return lowered_at - start, done - lowered_at, common.planned_mib(compiled)


def run(args, versions: str) -> list[CompileResult]:
  """Prints `versions`, a header and one `CompileResult.line()` per model of `args.model` (a
  list of names, as `add_arguments` parses it)."""
  device = jax.local_devices()[0]
  print(versions)
  remat = f', remat={args.remat}' if args.remat else ''
  impl = '' if args.depthwise_impl == 'auto' else f', depthwise {args.depthwise_impl}'
  print(
      f'forward+backward compile from abstract params (grad of mean cross-entropy, '
      f'train=True, drop path {COMPILE_DROP_PATH_RATE}), batch {args.batch}, '
      f'{args.size}x{args.size}, {args.dtype}{remat}{impl}; {device.device_kind}; '
      'unscanned, then scan=True',
      flush=True,
  )
  # Compile times must not be cache hits of an earlier run.
  cache_was_on = jax.config.jax_enable_compilation_cache
  jax.config.update('jax_enable_compilation_cache', False)
  results = []
  try:
    for name in args.model:
      timings = [
          compile_seconds(
              name, args.batch, args.size, args.dtype, scan, args.remat, args.depthwise_impl
          )
          for scan in (False, True)
      ]
      results.append(CompileResult(name, *timings[0], *timings[1]))
      print(results[-1].line(), flush=True)
  finally:
    jax.config.update('jax_enable_compilation_cache', cache_was_on)
  if args.json:
    header = {
        'command': 'compile',
        'batch': args.batch,
        'size': args.size,
        'dtype': args.dtype,
        'remat': args.remat,
        'depthwise_impl': args.depthwise_impl,
        'drop_path_rate': COMPILE_DROP_PATH_RATE,
    }
    common.write_json(args.json, header, device, versions, results)
  return results


def add_arguments(parser) -> None:
  # Scan vs no scan: the roadmap's models have no scan.
  common.add_model_argument(parser, 'convnext_xlarge', 'convnext*', several=True)
  parser.add_argument('--batch', type=int, default=1)
  parser.add_argument('--size', type=int, default=224)
  parser.add_argument('--dtype', default='float32', choices=config_lib.COMPUTE_DTYPES)
  common.add_remat_argument(parser)
  common.add_depthwise_argument(parser)
  parser.add_argument('--json', metavar='FILE', help='write the results as JSON')
