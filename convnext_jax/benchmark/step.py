"""`benchmark train` and `benchmark infer`: the trainer's own jitted step, and the forward
pass, timed on synthetic device-resident batches on whatever backend jax has.

  python -m convnext_jax.benchmark train [--model convnext_tiny] [--batch 32] [--size 224]
      [--dtype float32|bfloat16] [--remat POLICY] [--scan] [--mesh -1,1,1] [--devices N]
      [--compare torch] [--json FILE]
  python -m convnext_jax.benchmark infer  (the same flags)

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
device's peak dense FLOP/s (`common.PEAK_TFLOPS`; not meaningful on a CPU, said so), and
memory: the device's peak bytes in use where the backend reports them, else XLA's plan for one
device.

`--compare torch` adds transformers' PyTorch ConvNeXt of the same size (no Mixup, EMA or
drop path: its plain AdamW step), at the same batch, channels_last, bfloat16 through
autocast when `--dtype bfloat16`, eager and, on a GPU, `torch.compile`; on a CPU eager only.

No TensorFlow is imported: this runs on GPU machines that have none.
"""

import time

import jax
import numpy as np

from convnext_jax import config_lib
from convnext_jax import models
from convnext_jax import optim
from convnext_jax import sharding
from convnext_jax import train_step
from convnext_jax.benchmark import common
from convnext_jax.benchmark.common import Result
from convnext_jax.benchmark.common import time_calls
from convnext_jax.data import batch_ops

NUM_CLASSES = 1000


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
  planned = common.planned_mib(compiled)
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
  peak = common.peak_tflops(device.device_kind, args.dtype)
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
    common.write_json(args.json, header, device, versions, results)
  return results


def add_arguments(parser) -> None:
  common.add_model_argument(parser, 'convnext_tiny')
  parser.add_argument('--batch', type=int, default=32, help='global batch (all devices)')
  parser.add_argument('--size', type=int, default=224)
  parser.add_argument('--dtype', default='float32', choices=tuple(train_step.DTYPES))
  common.add_remat_argument(parser)
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
