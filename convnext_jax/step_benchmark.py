"""`benchmark train`, `benchmark infer` and `benchmark compile`: the trainer's own jitted step,
and the forward pass, timed on synthetic device-resident batches on whatever backend jax has;
and the compile time of forward+backward with and without the scan over blocks.

  python -m convnext_jax.benchmark train [--model convnext_tiny] [--batch 32] [--size 224]
      [--dtype float32|bfloat16] [--remat POLICY] [--scan] [--mesh -1,1,1] [--devices N]
      [--compare torch] [--json FILE]
  python -m convnext_jax.benchmark infer  (the same flags)
  python -m convnext_jax.benchmark compile [--model convnext_xlarge[,convnextv2_huge,...]]
      [--batch 1] [--size 224] [--dtype float32|bfloat16] [--remat POLICY]
      [--depthwise-impl auto|conv|shift] [--json FILE]

`train` times `train_step.make_train_step` as training builds it from the base recipe
(AdamW, EMA, Mixup/CutMix, Random Erasing, label smoothing, drop path, the non-finite guard)
over every local device (or the first `--devices`, laid out by `--mesh`); `infer` the
jitted forward of evaluation. `--remat POLICY` rematerialises each block ('full', or a
`jax.checkpoint_policies` name such as 'dots_saveable'; `--remat` alone is 'full'), `--scan`
runs each stage's blocks as one `lax.scan`; both show in the result's name. Each prints, per
configuration, one line in the format of `benchmark forward`: img/s and ms per step (median
wall time of `--iters` steps after `--warmup`, each waited for with `block_until_ready`), the
ratio to PyTorch eager when compared, compile seconds, TFLOP/s from XLA's cost analysis of the
step as jax lowers it (before XLA's optimizations; per device, times the devices; with
`--scan`, of the same step unscanned, since XLA counts a loop's body once), MFU against the
device's peak dense FLOP/s (`PEAK_TFLOPS`; not meaningful on a CPU, said so), and memory: the
device's peak bytes in use where the backend reports them, else XLA's plan for one device.

`--compare torch` adds transformers' PyTorch ConvNeXt of the same size (no Mixup, EMA or
drop path: its plain AdamW step), at the same batch, channels_last, bfloat16 through
autocast when `--dtype bfloat16`, eager and, on a GPU, `torch.compile`; on a CPU eager only.

`compile` lowers and compiles the gradient of the mean cross-entropy with respect to the
params (train=True, drop path 0.1) on one device from abstract params and images
(`jax.ShapeDtypeStruct`), so it needs no memory for weights: once unscanned and once with
`scan=True`. One line per model: lowering and compile seconds of each, the ratio of their
sums, and XLA's memory plan of each (the scanned one includes the stacked copy of each
stage's params and gradients). The persistent compilation cache is off while it runs.

No TensorFlow is imported: this runs on GPU machines that have none.
"""

import dataclasses
import json
import time

import jax
import numpy as np
import optax

from convnext_jax import config_lib
from convnext_jax import models
from convnext_jax import optim
from convnext_jax import sharding
from convnext_jax import train_step
from convnext_jax.data import batch_ops

# Peak dense TFLOP/s of one chip: (substring of jax's `device_kind`, bfloat16, float32), the
# vendors' figures as ../shared/reference/performance.md lists them; more specific names
# first. float32 on a TPU runs through bf16 passes: no separate peak.
PEAK_TFLOPS = (
    ('TPU v4', 275.0, None),
    ('TPU v5 lite', 197.0, None),
    ('TPU v5e', 197.0, None),
    ('TPU v5p', 459.0, None),
    ('TPU v5', 459.0, None),
    ('TPU v6 lite', 918.0, None),
    ('TPU v6e', 918.0, None),
    ('A100', 312.0, 19.5),
    ('H100', 989.0, 67.0),
    ('H200', 989.0, 67.0),
)
NUM_CLASSES = 1000


def peak_tflops(device_kind: str, dtype: str) -> float | None:
  """The chip's peak dense TFLOP/s for `dtype`, or None where unknown (CPUs among them)."""
  for name, bf16, fp32 in PEAK_TFLOPS:
    if name.lower() in device_kind.lower():
      return bf16 if dtype == 'bfloat16' else fp32
  return None


@dataclasses.dataclass
class Result:
  """One timed configuration."""

  name: str
  batch: int
  seconds: float  # Median per step.
  compile_s: float | None = None
  flops: float | None = None  # Per step, all devices together.
  devices: int = 1
  peak_tflops: float | None = None  # Per device.
  memory: str = 'n/a'

  @property
  def images_per_s(self) -> float:
    return self.batch / self.seconds

  @property
  def tflops(self) -> float | None:
    return None if self.flops is None else self.flops / self.seconds / 1e12

  @property
  def mfu(self) -> float | None:
    if self.tflops is None or not self.peak_tflops:
      return None
    return self.tflops / (self.peak_tflops * self.devices)

  def line(self, torch_seconds: float | None, platform: str) -> str:
    ratio = f'x{torch_seconds / self.seconds:5.2f} vs torch' if torch_seconds else (' ' * 15)
    compile_s = f'{self.compile_s:6.1f} s' if self.compile_s is not None else '     n/a'
    tflops = f'{self.tflops:8.3f}' if self.tflops is not None else '     n/a'
    if self.mfu is not None:
      mfu = f'{100 * self.mfu:5.1f}%'
    else:
      mfu = 'n/a (CPU: not meaningful)' if platform == 'cpu' else 'n/a (peak unknown)'
    return (
        f'  {self.name:42s} {self.images_per_s:8.1f} img/s  {self.seconds * 1e3:8.1f} '
        f'ms/step  {ratio}  compile {compile_s}  {tflops} TFLOP/s  MFU {mfu}  '
        f'memory {self.memory}'
    )

  def record(self) -> dict:
    return dict(
        dataclasses.asdict(self), images_per_s=self.images_per_s, tflops=self.tflops, mfu=self.mfu
    )


def time_calls(step, warmup: int, iters: int) -> float:
  """Median wall seconds of `step()` (which must wait for its result) after `warmup` calls."""
  for _ in range(warmup):
    step()
  times = []
  for _ in range(iters):
    start = time.perf_counter()
    step()
    times.append(time.perf_counter() - start)
  return float(np.median(times))


def _flops(lowered) -> float | None:
  """XLA's FLOP count of one step on one device: the cost analysis of the program as jax
  lowered it, before XLA's optimizations, i.e. the step's own arithmetic whatever the backend
  fuses. Pass the unscanned program for a scanned model: XLA counts a loop's body once (and
  unrolls short loops when it compiles, so even the compiled count would be neither)."""
  analysis = lowered.cost_analysis()
  if isinstance(analysis, (list, tuple)):  # Some jax versions: one dict per partition.
    analysis = analysis[0] if analysis else None
  return float(analysis['flops']) if analysis and 'flops' in analysis else None


def _memory(compiled) -> str:
  stats = jax.local_devices()[0].memory_stats()
  if stats and 'peak_bytes_in_use' in stats:
    return f'{stats["peak_bytes_in_use"] / 2**30:.2f} GiB peak/device'
  planned = _planned_mib(compiled)
  return 'n/a' if planned is None else f'{planned:.0f} MiB/device (XLA plan)'


def _config(args, scan: bool | None = None):
  """The base config with `args`' model, batch and mesh; `scan` overrides `args.scan`."""
  config = config_lib.base()
  config.model.name = args.model
  config.model.dtype = args.dtype
  config.model.remat = args.remat
  config.model.scan = args.scan if scan is None else scan
  config.model.num_classes = NUM_CLASSES
  config.global_batch_size = args.batch
  config.input.image_size = args.size
  config.mesh = tuple(args.mesh)
  return config


def _variant(args) -> str:
  """'float32', 'bfloat16, remat=dots_saveable, scan', ...: what the result's name shows."""
  parts = [args.dtype]
  if args.remat:
    parts.append(f'remat={args.remat}')
  if args.scan:
    parts.append('scan')
  return ', '.join(parts)


def _jax_result(kind, args, mesh, peak, seconds, compile_s, flops, compiled) -> Result:
  """The Result of a timed jax program (`kind` 'train' or 'infer'); `flops` is one device's."""
  return Result(
      f'jax {kind} ({_variant(args)})',
      args.batch,
      seconds,
      compile_s,
      None if flops is None else flops * mesh.size,
      mesh.size,
      peak,
      _memory(compiled),
  )


def _jax_train(args, mesh, peak) -> Result:
  config = _config(args)
  num_shards = sharding.data_parallel_size(mesh)
  model = train_step.create_model(config, NUM_CLASSES, num_shards)
  lr_fn = optim.lr_schedule(config.optim.lr, config.optim.min_lr, 10, 1000)
  optimizer = optim.make_optimizer(
      lr_fn,
      models.param_shapes(model, args.size),
      train_step.model_spec(config),
      weight_decay=config.optim.weight_decay,
      layer_decay=config.optim.layer_decay,
      layer_decay_scheme=config.optim.layer_decay_scheme,
  )
  state, shardings, _ = train_step.create_train_state(
      config, model, optimizer, mesh, args.size, use_ema=True
  )
  batch_sharding = sharding.batch_sharding(mesh)
  rng = np.random.default_rng(0)
  batch = jax.device_put(
      {
          'image': rng.integers(0, 256, (args.batch, args.size, args.size, 3), np.uint8),
          'label': rng.integers(0, NUM_CLASSES, (args.batch,), np.int32),
      },
      batch_sharding,
  )

  def jitted(config):
    return jax.jit(
        train_step.make_train_step(
            train_step.create_model(config, NUM_CLASSES, num_shards),
            optimizer,
            lr_fn,
            config,
            NUM_CLASSES,
            num_shards,
        ),
        in_shardings=(shardings, batch_sharding),
        out_shardings=(shardings, None, None),
        donate_argnums=(0,),
        compiler_options=models.compiler_options(training=True),
    )

  start = time.perf_counter()
  lowered = jitted(config).lower(state, batch)
  compiled = lowered.compile()
  compile_s = time.perf_counter() - start
  flops = _flops(jitted(_config(args, scan=False)).lower(state, batch) if args.scan else lowered)

  def step():
    nonlocal state
    state, _, _ = compiled(state, batch)
    jax.block_until_ready(state)

  seconds = time_calls(step, args.warmup, args.iters)
  return _jax_result('train', args, mesh, peak, seconds, compile_s, flops, compiled)


def _jax_infer(args, mesh, peak) -> Result:
  config = _config(args)
  model = train_step.create_model(config, NUM_CLASSES)
  dtype = train_step.DTYPES[args.dtype]
  # All the variables: a BatchNorm model's forward reads its running averages too.
  variables = jax.jit(
      lambda key: model.init(key, np.zeros((1, args.size, args.size, 3), np.float32)),
      out_shardings=sharding.replicated(mesh),
  )(jax.random.key(0))
  batch_sharding = sharding.batch_sharding(mesh)
  images = jax.device_put(
      np.random.default_rng(0).integers(0, 256, (args.batch, args.size, args.size, 3), np.uint8),
      batch_sharding,
  )

  def jitted(model):
    return jax.jit(
        lambda v, x: model.apply(v, batch_ops.normalize(x, dtype=dtype), train=False),
        in_shardings=(sharding.replicated(mesh), batch_sharding),
        compiler_options=models.compiler_options(),
    )

  start = time.perf_counter()
  lowered = jitted(model).lower(variables, images)
  compiled = lowered.compile()
  compile_s = time.perf_counter() - start
  flops = _flops(
      jitted(train_step.create_model(_config(args, scan=False), NUM_CLASSES)).lower(
          variables, images
      )
      if args.scan
      else lowered
  )
  seconds = time_calls(
      lambda: jax.block_until_ready(compiled(variables, images)), args.warmup, args.iters
  )
  return _jax_result('infer', args, mesh, peak, seconds, compile_s, flops, compiled)


def _torch_results(args, training: bool) -> list[Result]:
  """transformers' ConvNeXt of the same size: eager, and `torch.compile` on a GPU."""
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top

  spec = models.get_spec(args.model)
  config_cls, model_cls = (
      (transformers.ConvNextV2Config, transformers.ConvNextV2ForImageClassification)
      if spec.use_grn
      else (transformers.ConvNextConfig, transformers.ConvNextForImageClassification)
  )
  device = 'cuda' if torch.cuda.is_available() else 'cpu'
  torch.manual_seed(0)
  model = model_cls(
      config_cls(
          hidden_sizes=list(spec.dims),
          depths=list(spec.depths),
          num_labels=NUM_CLASSES,
          layer_norm_eps=1e-6,
      )
  )
  model = model.to(device, memory_format=torch.channels_last).train(training)
  images = torch.randn(args.batch, 3, args.size, args.size, device=device).to(
      memory_format=torch.channels_last
  )
  labels = torch.randint(0, NUM_CLASSES, (args.batch,), device=device)
  autocast = dict(device_type=device, dtype=torch.bfloat16, enabled=args.dtype == 'bfloat16')
  sync = torch.cuda.synchronize if device == 'cuda' else (lambda: None)

  def make_step(net):
    if not training:

      def infer():
        with torch.inference_mode(), torch.autocast(**autocast):
          net(images)
        sync()

      return infer
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=0.05)

    def train():
      with torch.autocast(**autocast):
        loss = torch.nn.functional.cross_entropy(net(images).logits.float(), labels)
      loss.backward()
      optimizer.step()
      optimizer.zero_grad(set_to_none=True)
      sync()

    return train

  what = 'train' if training else 'infer'
  results = [
      Result(
          f'torch eager {what} ({args.dtype})',
          args.batch,
          time_calls(make_step(model), args.warmup, args.iters),
      )
  ]
  if device == 'cuda':
    step = make_step(torch.compile(model))
    start = time.perf_counter()
    step()  # Compiles.
    compile_s = time.perf_counter() - start
    torch.cuda.reset_peak_memory_stats()
    seconds = time_calls(step, args.warmup, args.iters)
    results.append(
        Result(
            f'torch.compile {what} ({args.dtype})',
            args.batch,
            seconds,
            compile_s,
            memory=f'{torch.cuda.max_memory_allocated() / 2**30:.2f} GiB peak',
        )
    )
  return results


def run(args, training: bool, versions: str) -> list[Result]:
  """Times the configurations `args` asks for and prints `versions`, then one line each."""
  devices = jax.local_devices()[: args.devices] if args.devices else None
  mesh = sharding.make_mesh(args.mesh, devices)
  device = jax.local_devices()[0]
  peak = peak_tflops(device.device_kind, args.dtype)
  what = 'training step' if training else 'forward'
  print(versions)
  print(
      f'{args.model} {what}, batch {args.batch}, {args.size}x{args.size}, {args.dtype}; '
      f'{device.device_kind} x {mesh.size}, mesh {dict(mesh.shape)}; median of '
      f'{args.iters} after {args.warmup} warm-up'
  )
  results = [(_jax_train if training else _jax_infer)(args, mesh, peak)]
  if args.compare == 'torch':
    results += _torch_results(args, training)
  torch_seconds = next((r.seconds for r in results if r.name.startswith('torch eager')), None)
  for result in results:
    print(result.line(torch_seconds, device.platform), flush=True)
  if args.json:
    header = {
        'command': 'train' if training else 'infer',
        'model': args.model,
        'batch': args.batch,
        'size': args.size,
        'dtype': args.dtype,
    }
    _write_json(args.json, header, device, versions, results)
  return results


def _write_json(path: str, header: dict, device, versions: str, results) -> None:
  """Writes a run's `--json` record: `header` (the settings), the device kind, the versions
  and each result's record."""
  record = dict(
      header,
      device_kind=device.device_kind,
      versions=versions,
      results=[r.record() for r in results],
  )
  with open(path, 'w', encoding='utf-8') as f:
    json.dump(record, f, indent=2)


def add_arguments(parser) -> None:
  parser.add_argument('--model', default='convnext_tiny', choices=models.list_models())
  parser.add_argument('--batch', type=int, default=32, help='global batch (all devices)')
  parser.add_argument('--size', type=int, default=224)
  parser.add_argument('--dtype', default='float32', choices=tuple(train_step.DTYPES))
  _add_remat_argument(parser)
  parser.add_argument(
      '--scan', action='store_true', help="one lax.scan over each stage's blocks (same params)"
  )
  parser.add_argument(
      '--mesh',
      type=lambda s: tuple(int(v) for v in s.split(',')),
      default=(-1, 1, 1),
      help='data,fsdp,model (default: every local device on data)',
  )
  parser.add_argument(
      '--devices', type=int, default=0, help='use the first N local devices (default: all)'
  )
  parser.add_argument('--warmup', type=int, default=2)
  parser.add_argument('--iters', type=int, default=10)
  parser.add_argument('--compare', choices=('torch',), help='also time PyTorch')
  parser.add_argument('--json', metavar='FILE', help='write the results as JSON')


def _add_remat_argument(parser) -> None:
  parser.add_argument(
      '--remat',
      nargs='?',
      const='full',
      default='',
      metavar='POLICY',
      choices=('',) + models.REMAT_POLICIES,
      help="rematerialise each block: 'full' (the default of --remat alone) or "
      f'a jax.checkpoint_policies name: {", ".join(models.REMAT_POLICIES[1:])}',
  )


# ---------------------------------------------------------------------------------------
# benchmark compile

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


def _planned_mib(compiled) -> float | None:
  plan = compiled.memory_analysis()
  if plan is None:
    return None
  return (
      plan.argument_size_in_bytes
      + plan.output_size_in_bytes
      + plan.temp_size_in_bytes
      - plan.alias_size_in_bytes
  ) / 2**20


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
      dtype=train_step.DTYPES[dtype],
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
  return lowered_at - start, done - lowered_at, _planned_mib(compiled)


def run_compile(args, versions: str) -> list[CompileResult]:
  """Prints `versions`, a header and one `CompileResult.line()` per model of `args.model`."""
  names = [n.strip() for n in args.model.split(',') if n.strip()]
  known = models.list_models('convnext*')  # Scan vs no scan: the roadmap's have no scan.
  unknown = [n for n in names if n not in known]
  if unknown or not names:
    raise SystemExit(
        f'benchmark compile: unknown model(s) {unknown or args.model!r}; known: '
        f'{", ".join(known)}'
    )
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
    for name in names:
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
    _write_json(args.json, header, device, versions, results)
  return results


def add_compile_arguments(parser) -> None:
  parser.add_argument(
      '--model', default='convnext_xlarge', help='one or more registered models, comma-separated'
  )
  parser.add_argument('--batch', type=int, default=1)
  parser.add_argument('--size', type=int, default=224)
  parser.add_argument('--dtype', default='float32', choices=tuple(train_step.DTYPES))
  _add_remat_argument(parser)
  parser.add_argument(
      '--depthwise-impl',
      default='auto',
      choices=('auto', 'conv', 'shift'),
      help="the models' depthwise_impl ('auto': the backend's fast form)",
  )
  parser.add_argument('--json', metavar='FILE', help='write the results as JSON')
