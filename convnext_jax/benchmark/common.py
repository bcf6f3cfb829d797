"""What the benchmark commands share: the versions line, the peak FLOP/s table, one timed
result and its printed line, the timer, XLA's memory plan, the `--json` record and the
`--model` and `--remat` flags.

No TensorFlow and no PyTorch are imported here.
"""

import argparse
import dataclasses
import json
import os
import platform
import subprocess
import sys
import time

import jax
import numpy as np

from convnext_jax import host_malloc
from convnext_jax import models


def _cpu() -> str:
  """The CPU as Linux names it (model, family/model numbers, SIMD level), or the platform's
  name elsewhere: hosts of the same kind differ, and figures are comparable only on one."""
  try:
    with open('/proc/cpuinfo', encoding='utf-8') as f:
      info = dict(
          line.split(':', 1) for line in f.read().split('\n\n')[0].splitlines() if ':' in line
      )
  except OSError:
    return platform.processor() or platform.machine()
  info = {key.strip(): value.strip() for key, value in info.items()}
  details = [f'{key} {info[key]}' for key in ('cpu family', 'model') if key in info]
  if 'flags' in info:  # x86: the widest vector extension.
    flags = set(info['flags'].split())
    details.append(next((f for f in ('avx512f', 'avx2', 'avx') if f in flags), 'no AVX'))
  return f"{info.get('model name', '')} ({', '.join(details)})".lstrip()


def versions() -> str:
  """One line of the software and host facts every benchmark prints before its figures."""
  import flax  # pylint: disable=g-import-not-at-top

  try:
    import torch  # pylint: disable=g-import-not-at-top

    torch_version = torch.__version__
  except ImportError:  # Optional: only `forward` and `convert` need it.
    torch_version = 'not installed'
  return (
      f'python {platform.python_version()}, jax {jax.__version__}, flax {flax.__version__}, '
      f'torch {torch_version}, {os.cpu_count()} CPU cores, {platform.machine()} {_cpu()}, '
      f'jax backend {jax.default_backend()}'
  )


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


def child_peak_rss_mb(argv: list[str], env: dict[str, str] | None = None) -> tuple[float, float]:
  """Runs `python -m argv[0] argv[1:]` in a fresh process; returns (seconds, its peak resident
  memory in MiB). `argv[0]` may be '-c' with code to run instead of a module.

  Raises:
    RuntimeError: the process failed (its stderr).
  """
  code = (
      'import resource, runpy, sys, time; sys.argv = sys.argv[1:]; t = time.perf_counter()\n'
      'try:\n'
      '  if sys.argv[0] == "-c": exec(sys.argv[1])\n'
      '  else: runpy.run_module(sys.argv[0], run_name="__main__")\n'
      'except SystemExit as e:\n  assert not e.code, e.code\n'
      'print("BENCH", time.perf_counter() - t, '
      'resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, file=sys.stderr)\n'
  )
  result = subprocess.run(
      [sys.executable, '-c', code, *argv],
      capture_output=True,
      text=True,
      check=False,
      env=dict(os.environ if env is None else env, TF_CPP_MIN_LOG_LEVEL='3'),
  )
  if result.returncode:
    raise RuntimeError(result.stderr)
  line = [l for l in result.stderr.splitlines() if l.startswith('BENCH')][-1]
  _, seconds, rss = line.split()
  return float(seconds), float(rss)


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


def time_interleaved(steps: dict, warmup: int, iters: int) -> dict[str, float]:
  """Median wall seconds of each `steps[name]()` (each must wait for its result), called in
  turn round after round, so that a shared host's slow spells fall on all of them alike.

  The steps run as the trainer's loop runs its own: with the allocator set up for repeated
  steps (`host_malloc.reuse_large_allocations`; PyTorch's steps in the same process too).
  """
  host_malloc.reuse_large_allocations()
  for _ in range(warmup):
    for step in steps.values():
      step()
  times = {name: [] for name in steps}
  for _ in range(iters):
    for name, step in steps.items():
      start = time.perf_counter()
      step()
      times[name].append(time.perf_counter() - start)
  return {name: float(np.median(t)) for name, t in times.items()}


def planned_mib(compiled) -> float | None:
  """XLA's memory plan of a compiled program on one device, in MiB (None if it has none)."""
  plan = compiled.memory_analysis()
  if plan is None:
    return None
  return (
      plan.argument_size_in_bytes
      + plan.output_size_in_bytes
      + plan.temp_size_in_bytes
      - plan.alias_size_in_bytes
  ) / 2**20


def write_json(path: str, header: dict, device, versions: str, results) -> None:
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


def add_model_argument(parser, default: str, pattern: str = '*', several: bool = False) -> None:
  """Adds `--model NAME`: a registered model matching the shell-style `pattern`, or with
  `several` a comma-separated list of them (parsed into a list).

  The names are checked by argparse rather than listed as `choices`: there are dozens, and
  argparse would print them all inline in the usage and again in the help.
  """
  known = models.list_models(pattern)
  source = 'convnext_jax.models.list_models(' + ('' if pattern == '*' else repr(pattern)) + ')'

  def parse(value: str) -> str | list[str]:
    names = [n.strip() for n in value.split(',') if n.strip()] if several else [value]
    unknown = [n for n in names if n not in known]
    if unknown or not names:
      raise argparse.ArgumentTypeError(
          f'not a model this command takes: {", ".join(map(repr, unknown)) or repr(value)}; '
          f'choose from: {", ".join(known)}'
      )
    return names if several else value

  what = 'one or more models, comma-separated,' if several else 'a model'
  parser.add_argument(
      '--model',
      default=default,
      type=parse,
      metavar='NAME[,NAME...]' if several else 'NAME',
      help=f'{what} from {source}, e.g. convnext_tiny or convnextv2_base (default: {default})',
  )


def add_remat_argument(parser) -> None:
  """Adds `--remat [POLICY]`: '' (off), 'full', or a `jax.checkpoint_policies` name."""
  parser.add_argument(
      '--remat',
      nargs='?',
      const='full',
      default='',
      metavar='POLICY',
      choices=('',) + models.REMAT_POLICIES,
      help="rematerialise each block: 'full' (--remat alone) or a jax.checkpoint_policies "
      'name such as dots_saveable (all: convnext_jax.models.REMAT_POLICIES)',
  )


def add_depthwise_argument(parser) -> None:
  """Adds `--depthwise-impl auto|conv|shift`: the models' `depthwise_impl`."""
  parser.add_argument(
      '--depthwise-impl',
      default='auto',
      choices=('auto', 'conv', 'shift'),
      help="the depthwise convolution's form ('auto': the backend's fast one)",
  )
