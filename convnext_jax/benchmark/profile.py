"""`benchmark profile`: where the trainer's step spends its time.

  python -m convnext_jax.benchmark profile [--model convnext_atto] [--batch 32] [--size 64]
      [--dtype float32|bfloat16] [--remat POLICY] [--scan] [--depthwise-impl ...] [--mesh ...]
      [--top 15] [--trace-dir DIR]

Two tables, for the run `benchmark train` builds (the trainer's own `run.Run`, the base recipe
with the flags' model, batch, size and dtype):

1. **Parts**: the median wall times of the whole train step and of three jitted programs
   on the same batch, timed in turn: the on-device augmentation (`Classification.augment`),
   the loss (the forward pass is the loss less the augmentation) and the update after the
   backward pass (`train_step.make_update`: AdamW, the EMA and the non-finite guard). The
   backward pass is the rest of the step; as XLA fuses across these boundaries inside the
   step, that rest also holds what fusion saves or costs there.
2. **Ops**, from a `jax.profiler` trace of the train step: every event named after an
   instruction of the compiled program (on XLA:CPU each executed thunk, i.e. each fusion,
   library call or copy), its duration summed over the traced steps, grouped by part (the
   instruction's op name: 'augment', 'optimizer', 'ema' and 'guard' scopes, autodiff's
   'transpose(...)' or the depthwise conv's 'depthwise_backward' for the backward, the rest of
   the differentiated loss forward; instructions XLA adds without a name, such as copies and
   the random number generators' loop bookkeeping, as 'unnamed') and by layer (the model's
   submodule: dwconv, norm, pwconv1, gelu, ...), each with its share of the traced time; then
   the top fusions one by one.

On XLA:CPU thunks run one after another (each parallel inside), so the traced time is close
to the step's wall time; on accelerators the device's kernels are traced the same way.
`--trace-dir` keeps the trace for TensorBoard's profiler or Perfetto.

No TensorFlow is imported.
"""

import collections
import dataclasses
import functools
import glob
import os
import re
import tempfile

import jax
import jax.numpy as jnp

from convnext_jax import sharding
from convnext_jax.benchmark import common
from convnext_jax.benchmark import step as step_benchmark

TRACED_STEPS = 5

# Layers of the models by the last submodule name in an op name ('stages.0.1/dwconv/...').
_LAYER = re.compile(
    r'(?:^|/)(stem|downsample_layers\.\d+\.\d+|stages\.\d+\.\d+|head|norm)(?:/(\w+))?'
)


@dataclasses.dataclass(frozen=True)
class Op:
  """One instruction of the compiled step and the time its events took per step."""

  name: str
  op_name: str  # Its metadata: jax's name stack.
  seconds: float
  count: int  # Events per step.

  @property
  def part(self) -> str:
    return part_of(self.op_name)

  @property
  def layer(self) -> str:
    return layer_of(self.op_name)


def part_of(op_name: str) -> str:
  """'augmentation', 'backward', 'forward', 'optimizer+EMA+guard' or 'unnamed' (what XLA
  added without an op name: copies, loop bookkeeping) for an instruction's op name."""
  scopes = set(re.split(r'[/()]', op_name))
  if 'augment' in scopes:
    return 'augmentation'
  if scopes & {'optimizer', 'ema', 'guard'}:
    return 'optimizer+EMA+guard'
  if 'transpose' in scopes or 'depthwise_backward' in scopes:
    return 'backward'
  if 'jvp' in scopes:
    return 'forward'
  return 'unnamed'


def layer_of(op_name: str) -> str:
  """The model layer an op belongs to: 'dwconv', 'norm', 'pwconv1', 'gelu' ('erf'), ...,
  'downsample' for the stem and downsampling layers, '' outside the model."""
  matches = list(_LAYER.finditer(op_name))
  if not matches:
    return ''
  module, sub = matches[-1].groups()
  if module.startswith(('downsample_layers', 'stem')):
    return 'downsample'
  if module.startswith('stages'):
    return sub or module
  return module


def _instruction_names(hlo_text: str) -> dict[str, str]:
  """{instruction name: its op_name metadata} of a compiled program's HLO text."""
  names = {}
  for m in re.finditer(r'^\s*(?:ROOT )?%?([\w.\-]+) = [^\n]*', hlo_text, re.M):
    meta = re.search(r'op_name="([^"]*)"', m.group(0))
    names.setdefault(m.group(1), meta.group(1) if meta else '')
  return names


def trace_ops(compiled, call, steps: int, trace_dir: str | None) -> list[Op]:
  """Runs `call()` (one step, waited for) `steps` times under `jax.profiler` and returns the
  compiled program's instructions that appear in the trace, with their time per step."""
  names = _instruction_names(compiled.as_text())
  with tempfile.TemporaryDirectory() as scratch:
    directory = trace_dir or scratch
    jax.profiler.start_trace(directory)
    try:
      for _ in range(steps):
        call()
    finally:
      jax.profiler.stop_trace()
    files = sorted(glob.glob(os.path.join(directory, '**', '*.xplane.pb'), recursive=True))
    if not files:
      raise SystemExit(f'benchmark profile: jax.profiler wrote no trace into {directory}')
    data = jax.profiler.ProfileData.from_file(files[-1])
  total = collections.Counter()
  count = collections.Counter()
  for plane in data.planes:
    for line in plane.lines:
      for event in line.events:
        if event.name in names:
          total[event.name] += event.duration_ns
          count[event.name] += 1
  return [Op(name, names[name], total[name] / steps / 1e9, count[name] // steps) for name in total]


def parts(r, step, state, batch, warmup: int, iters: int) -> dict[str, float]:
  """Median wall seconds of the augmentation, loss and update of the run `r`, each its own
  jitted program on `state` and `batch`, and of `step()` (the whole train step), timed in
  turn (`common.time_interleaved`)."""
  objective = r.objective
  key = jax.random.key(0)
  params, stats = state['params'], state.get('batch_stats')
  loss_args = (params, stats, batch, key)
  loss_program = jax.jit(objective.loss).lower(*loss_args).compile()
  loss, new_stats = loss_program(*loss_args)
  grads = jax.tree.map(jnp.ones_like, params)  # The update's cost does not depend on them.
  augment_args, update_args = (batch, key), (state, loss, grads, new_stats)
  augment_program = jax.jit(
      lambda batch, key: objective.augment(key, batch['image'], batch['label'])
  )
  programs = {
      'augment': (augment_program.lower(*augment_args).compile(), augment_args),
      'loss': (loss_program, loss_args),
      'update': (jax.jit(r.update).lower(*update_args).compile(), update_args),
  }
  calls = {
      name: functools.partial(lambda c, a: jax.block_until_ready(c(*a)), compiled, args)
      for name, (compiled, args) in programs.items()
  }
  calls['step'] = step
  return common.time_interleaved(calls, warmup, iters)


def _row(label: str, seconds: float, whole: float) -> str:
  return f'  {label:44s} {seconds * 1e3:9.1f} ms  {100 * seconds / whole:5.1f}%'


def run(args, versions: str) -> None:
  """Prints the parts table and the ops tables of `args`' run."""
  devices = jax.local_devices()[: args.devices] if args.devices else None
  mesh = sharding.make_mesh(args.mesh, devices)
  device = jax.local_devices()[0]
  r = step_benchmark._build(args, mesh)  # pylint: disable=protected-access
  state = r.init_state()
  batch = step_benchmark._batch(r, args, training=True)  # pylint: disable=protected-access
  print(versions)
  print(
      f'{args.model} training step, batch {args.batch}, {args.size}x{args.size}, {args.dtype}; '
      f"{device.device_kind} x {mesh.size}; the trainer's step and its parts, median of "
      f'{args.iters} after {args.warmup} warm-up'
  )
  compiled = r.train_step.lower(state, batch).compile()
  params_and_state = jax.tree.map(jnp.copy, state)  # The step donates `state`.

  def step():
    nonlocal state
    state, _, _ = compiled(state, batch)
    jax.block_until_ready(state)

  timed = parts(r, step, params_and_state, batch, args.warmup, args.iters)
  whole = timed['step']
  forward = timed['loss'] - timed['augment']
  backward = whole - timed['loss'] - timed['update']
  print('\nparts (augmentation, loss and update each timed as its own jitted program):')
  print(_row('on-device augmentation', timed['augment'], whole))
  print(_row('forward (loss, less augmentation)', forward, whole))
  print(_row('backward (the rest of the step)', backward, whole))
  print(_row('optimizer+EMA+guard', timed['update'], whole))
  print(_row('train step', whole, whole))

  ops = trace_ops(compiled, step, TRACED_STEPS, args.trace_dir)
  traced = sum(op.seconds for op in ops)
  print(
      f'\nops of the train step, traced over {TRACED_STEPS} steps: {traced * 1e3:.1f} ms of '
      f'events per step ({100 * traced / whole:.0f}% of its wall time), '
      f'{sum(op.count for op in ops)} events'
  )
  by_part = collections.Counter()
  by_layer = collections.Counter()
  events = collections.Counter()
  for op in ops:
    by_part[op.part] += op.seconds
    by_layer[(op.part, op.layer or '(other)')] += op.seconds
    events[(op.part, op.layer or '(other)')] += op.count
  print('by part:')
  for part, seconds in by_part.most_common():
    print(_row(part, seconds, traced))
  print('by part and layer:')
  for (part, layer), seconds in by_layer.most_common(args.top):
    print(_row(f'{part}: {layer}', seconds, traced) + f'  {events[(part, layer)]:5d} events')
  print(f'top {args.top} instructions:')
  for op in sorted(ops, key=lambda op: -op.seconds)[: args.top]:
    where = op.op_name.split('/', 1)[-1][-70:]
    print(_row(op.name, op.seconds, traced) + f'  {op.part}: {where}')


def add_arguments(parser) -> None:
  step_benchmark.add_arguments(parser, compare=False)
  parser.set_defaults(model='convnext_atto', size=64)
  parser.add_argument('--top', type=int, default=15, help='rows of the grouped and per-op tables')
  parser.add_argument('--trace-dir', help='keep the jax.profiler trace here')
