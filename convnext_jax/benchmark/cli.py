"""`python -m convnext_jax.benchmark COMMAND`: the command line of the benchmarks.

Each command's flags and its work live in its own module (`forward`, `conversion`,
`preprocessing` for `input`, `step` for `train` and `infer`, `profile`, `compilation` for
`compile`, `resume`); this one only dispatches, and imports no TensorFlow (only `input` does,
when it runs).
"""

import argparse

from convnext_jax import host_malloc
from convnext_jax.benchmark import common
from convnext_jax.benchmark import compilation
from convnext_jax.benchmark import conversion
from convnext_jax.benchmark import forward
from convnext_jax.benchmark import preprocessing
from convnext_jax.benchmark import profile
from convnext_jax.benchmark import resume
from convnext_jax.benchmark import step


def main(argv=None) -> None:
  """Parses `argv` (default: sys.argv[1:]) and runs the command it names."""
  parser = argparse.ArgumentParser(prog='python -m convnext_jax.benchmark')
  sub = parser.add_subparsers(dest='command', required=True)
  p = sub.add_parser('forward', help='Flax vs PyTorch eager forward throughput')
  forward.add_arguments(p)
  p.set_defaults(run=forward.run)
  p = sub.add_parser('train', help="the trainer's jitted step: img/s, FLOPs, MFU, memory")
  step.add_arguments(p)
  p.set_defaults(run=lambda args: step.run(args, True, common.versions()))
  p = sub.add_parser('infer', help='the jitted forward: img/s, FLOPs, MFU, memory')
  step.add_arguments(p)
  p.set_defaults(run=lambda args: step.run(args, False, common.versions()))
  p = sub.add_parser('profile', help="where the trainer's step spends its time, part by part")
  profile.add_arguments(p)
  p.set_defaults(run=lambda args: profile.run(args, common.versions()))
  p = sub.add_parser(
      'compile',
      help='forward+backward lowering and compile s, without and with scan over blocks',
  )
  compilation.add_arguments(p)
  p.set_defaults(run=lambda args: compilation.run(args, common.versions()))
  p = sub.add_parser('convert', help='conversion time and peak memory')
  conversion.add_arguments(p)
  p.set_defaults(run=conversion.run)
  p = sub.add_parser('input', help='preprocessing images/s per CPU core, tf.data vs Pillow')
  preprocessing.add_arguments(p)
  p.set_defaults(run=preprocessing.run)
  p = sub.add_parser('resume', help="a resuming trainer's peak memory, in train states")
  resume.add_arguments(p)
  p.set_defaults(run=resume.run)
  args = parser.parse_args(argv)
  host_malloc.configure()  # As the trainer does, before the backend starts its threads.
  args.run(args)
