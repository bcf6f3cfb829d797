"""`benchmark train` and `benchmark infer`: the trainer's own jitted step, and the forward
pass, timed on synthetic device-resident batches on whatever backend jax has.

  python -m convnext_jax.benchmark train [--model convnext_tiny] [--batch 32] [--size 224]
      [--dtype float32|bfloat16] [--remat POLICY] [--scan] [--mesh -1,1,1] [--devices N]
      [--compare torch] [--json FILE]
  python -m convnext_jax.benchmark infer  (the same flags)

Both build the trainer's own `run.Run` from the base recipe's config (AdamW, EMA,
Mixup/CutMix, Random Erasing, label smoothing, drop path, the non-finite guard) with the
flags' model, batch, size, dtype and mesh, over every local device (or the first `--devices`,
laid out by `--mesh`): `train` times its jitted train step, `infer` its jitted eval step (the
forward pass of evaluation). `--remat POLICY` rematerialises each block ('full', or a
`jax.checkpoint_policies` name such as 'dots_saveable'; `--remat` alone is 'full'), `--scan`
runs each stage's blocks as one `lax.scan`, `--depthwise-impl conv|shift` forces a depthwise
convolution form (default: the backend's); each shows in the result's name. Each prints, per
configuration, one line in the format of `benchmark forward`: img/s and ms per step (median
wall time of `--iters` steps after `--warmup`, each waited for with `block_until_ready`; the
configurations' steps are called in turn, so that a shared host's slow spells, which move
single runs by tens of percent, fall on all of them alike), the
ratio to PyTorch eager when compared, compile seconds, TFLOP/s from XLA's cost analysis of the
step as jax lowers it (before XLA's optimizations; per device, times the devices; with
`--scan`, of the same step unscanned, since XLA counts a loop's body once), MFU against the
device's peak dense FLOP/s (`common.PEAK_TFLOPS`; not meaningful on a CPU, said so), and
memory: the device's peak bytes in use where the backend reports them, else XLA's plan for one
device.

`--compare torch` adds transformers' PyTorch ConvNeXt of the same size (no Mixup, EMA or
drop path: its plain AdamW step), at the same batch, channels_last, bfloat16 through
autocast when `--dtype bfloat16`, eager and, on a GPU, `torch.compile`; on a CPU eager only.
For `train` it also times our step work-matched: the trainer's same step function built with
Mixup/CutMix, Random Erasing and the EMA off (drop path, label smoothing and the guard stay),
so that both ratios show: the recipe's step, and the same work as PyTorch's.

No TensorFlow is imported: this runs on GPU machines that have none.
"""

from collections.abc import Callable
import dataclasses
import time

import jax
import numpy as np

from convnext_jax import config_lib
from convnext_jax import models
from convnext_jax import run as run_lib
from convnext_jax import sharding
from convnext_jax import train_step
from convnext_jax import validation
from convnext_jax.benchmark import common
from convnext_jax.benchmark.common import Result
from convnext_jax.benchmark.common import time_calls
from convnext_jax.data import DatasetFacts

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


# The schedule the timed steps run in: 1000 steps of which 10 warm up (the lr varies, as in
# training; what it is does not change the step's cost).
NUM_STEPS = 1000
WARMUP_STEPS = 10


def _config(args, scan: bool | None = None, work_matched: bool = False):
  """The base config with `args`' model, batch, size, dtype and mesh; `scan` overrides
  `args.scan`; `work_matched` turns Mixup/CutMix, Random Erasing and the EMA off (the work
  PyTorch's plain step does not do)."""
  config = config_lib.base()
  if work_matched or models.get_spec(args.model).masked_autoencoder:
    # FCMAE pre-training's recipe has none of these either (`config_lib.fcmae_pretrain`).
    config.input.mixup_alpha = config.input.cutmix_alpha = 0.0
    config.input.random_erasing = 0.0
    config.ema.decay = 0.0
  config.model.name = args.model
  config.model.dtype = args.dtype
  config.model.remat = args.remat
  config.model.scan = args.scan if scan is None else scan
  config.model.num_classes = NUM_CLASSES
  if args.depthwise_impl != 'auto':
    config.model.overrides.depthwise_impl = args.depthwise_impl
  config.global_batch_size = args.batch
  config.input.image_size = args.size
  config.num_steps = NUM_STEPS
  config.optim.warmup_steps = WARMUP_STEPS
  config.mesh = tuple(args.mesh)
  return config


def _build(args, mesh, scan: bool | None = None, work_matched: bool = False) -> run_lib.Run:
  """The trainer's run of `_config(args, scan, work_matched)` on `mesh`.

  Raises:
    SystemExit: the config fails a check (e.g. a batch the mesh cannot split), one line.
  """
  try:
    return run_lib.Run.build(
        _config(args, scan, work_matched),
        DatasetFacts(NUM_STEPS * args.batch, NUM_CLASSES),
        mesh,
    )
  except validation.ConfigError as e:
    raise SystemExit(f'benchmark: {e}') from None


def _batch(r: run_lib.Run, args, training: bool):
  """A synthetic global batch as the input pipeline delivers it, on the run's sharding."""
  rng = np.random.default_rng(0)
  batch = {
      'image': rng.integers(0, 256, (args.batch, args.size, args.size, 3), np.uint8),
      'label': rng.integers(0, NUM_CLASSES, (args.batch,), np.int32),
  }
  if not training:
    batch['mask'] = np.ones((args.batch,), np.float32)
  return jax.device_put(batch, r.batch_sharding)


def _variant(args) -> str:
  """'float32', 'bfloat16, remat=dots_saveable, scan', ...: what the result's name shows."""
  parts = [args.dtype]
  if args.remat:
    parts.append(f'remat={args.remat}')
  if args.scan:
    parts.append('scan')
  if args.depthwise_impl != 'auto':
    parts.append(f'depthwise {args.depthwise_impl}')
  return ', '.join(parts)


def _jax_result(kind, args, mesh, peak, seconds, compile_s, flops, compiled) -> Result:
  """The Result of a timed jax program (`kind` 'train', 'train, work-matched' or 'infer');
  `flops` is one device's."""
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


@dataclasses.dataclass(frozen=True)
class _Timed:
  """A configuration to time: its `step()` (which waits for its result) and `result(seconds)`,
  the Result it is once its median step time is known."""

  step: Callable[[], None]
  result: Callable[[float], Result]


def _jax_train(args, mesh, peak, work_matched: bool = False) -> _Timed:
  r = _build(args, mesh, work_matched=work_matched)
  state = r.init_state()
  batch = _batch(r, args, training=True)
  start = time.perf_counter()
  lowered = r.train_step.lower(state, batch)
  compiled = lowered.compile()
  compile_s = time.perf_counter() - start
  if args.scan:
    lowered = _build(args, mesh, False, work_matched).train_step.lower(state, batch)
  flops = _flops(lowered)

  def step():
    nonlocal state
    state, _, _ = compiled(state, batch)
    jax.block_until_ready(state)

  kind = 'train, work-matched' if work_matched else 'train'
  return _Timed(
      step,
      lambda seconds: _jax_result(kind, args, mesh, peak, seconds, compile_s, flops, compiled),
  )


def _jax_infer(args, mesh, peak) -> _Timed:
  r = _build(args, mesh)
  state = r.init_state()
  params = {'raw': state[train_step.PARAMS]}
  # A BatchNorm model's forward reads its running averages too.
  stats = state.get(train_step.BATCH_STATS)
  inputs = (params, _batch(r, args, training=False), stats)
  start = time.perf_counter()
  lowered = r.eval_step.lower(*inputs)
  compiled = lowered.compile()
  compile_s = time.perf_counter() - start
  if args.scan:
    lowered = _build(args, mesh, scan=False).eval_step.lower(*inputs)
  flops = _flops(lowered)
  return _Timed(
      lambda: jax.block_until_ready(compiled(*inputs)),
      lambda seconds: _jax_result('infer', args, mesh, peak, seconds, compile_s, flops, compiled),
  )


def _torch(args, training: bool) -> tuple[_Timed, Result | None]:
  """transformers' ConvNeXt of the same size: its eager step to time beside ours, and on a
  GPU the Result of its `torch.compile` step (timed here, alone: it needs its own warm-up
  and peak-memory count)."""
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
  eager = _Timed(
      make_step(model),
      lambda seconds: Result(f'torch eager {what} ({args.dtype})', args.batch, seconds),
  )
  if device != 'cuda':
    return eager, None
  step = make_step(torch.compile(model))
  start = time.perf_counter()
  step()  # Compiles.
  compile_s = time.perf_counter() - start
  torch.cuda.reset_peak_memory_stats()
  seconds = time_calls(step, args.warmup, args.iters)
  return eager, Result(
      f'torch.compile {what} ({args.dtype})',
      args.batch,
      seconds,
      compile_s,
      memory=f'{torch.cuda.max_memory_allocated() / 2**30:.2f} GiB peak',
  )


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
  if args.compare == 'torch' and models.get_spec(args.model).masked_autoencoder:
    raise SystemExit(
        f'benchmark: --compare torch has no PyTorch {args.model} to time (the official FCMAE '
        'needs MinkowskiEngine); drop --compare'
    )
  timed = [(_jax_train if training else _jax_infer)(args, mesh, peak)]
  compiled_torch = None
  if args.compare == 'torch':
    if training:
      timed.append(_jax_train(args, mesh, peak, work_matched=True))
    eager, compiled_torch = _torch(args, training)
    timed.append(eager)
  seconds = common.time_interleaved(dict(enumerate(t.step for t in timed)), args.warmup, args.iters)
  results = [t.result(seconds[i]) for i, t in enumerate(timed)]
  if compiled_torch is not None:
    results.append(compiled_torch)
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


def add_arguments(parser, compare: bool = True) -> None:
  """The flags of `train` and `infer` (`compare`: with `--compare` and `--json`)."""
  common.add_model_argument(parser, 'convnext_tiny')
  parser.add_argument('--batch', type=int, default=32, help='global batch (all devices)')
  parser.add_argument('--size', type=int, default=224)
  parser.add_argument('--dtype', default='float32', choices=config_lib.COMPUTE_DTYPES)
  common.add_remat_argument(parser)
  parser.add_argument(
      '--scan', action='store_true', help="one lax.scan over each stage's blocks (same params)"
  )
  common.add_depthwise_argument(parser)
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
  if compare:
    parser.add_argument('--compare', choices=('torch',), help='also time PyTorch')
    parser.add_argument('--json', metavar='FILE', help='write the results as JSON')
