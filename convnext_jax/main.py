"""Entry point: `python -m convnext_jax.main --config configs/<name>.py[:args] --workdir DIR`.

Also installed as `convnext-train`. Flags: `--config.<field>=value` overrides any config
field; `--jax_distributed` initialises multi-process JAX before anything touches a device,
from what jax detects of the cluster (Cloud TPU VMs, Slurm, Open MPI, Kubernetes), or from
`--jax_coordinator_address`, `--jax_num_processes` and `--jax_process_id` given by hand (any
other launcher: several processes on one GPU machine, or a cluster jax does not detect; these
imply `--jax_distributed`). A workdir with a checkpoint resumes from it.

A mistake in the flags or the config (an unknown key, a value out of range, a missing
`init_from.path`, a mesh that does not fit the devices) ends the run before anything heavy
runs or the workdir is created, with one line on stderr, `convnext-train: error: ...`, and
exit status 2; a run that cannot go on (`train.RUN_ERRORS`) ends with one such line and exit
status 1.

The console shows the trainer's own lines and every warning; `--verbose` adds the full
config, parameter tables and the libraries' INFO records (`console`). TensorFlow's C++ log
(the oneDNN notices of the input pipeline) is off unless TF_CPP_MIN_LOG_LEVEL is set.
"""

import functools
import importlib.util
import os
import re
import sys

# Before TensorFlow is imported (through `train`): its C++ log reads this once it is set up.
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')

# pylint: disable=g-import-not-at-top,wrong-import-position
from absl import app
from absl import flags
from absl import logging
import jax
import ml_collections
from ml_collections import config_flags

from convnext_jax import console

with console.native_notices_dropped():  # What TensorFlow prints while it loads (oneDNN).
  from convnext_jax import config_check
  from convnext_jax import fileio
  from convnext_jax import train

PROG = 'convnext-train'
USAGE = 'python -m convnext_jax.main --config configs/<name>.py[:args] --workdir DIR'

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
    'config',
    None,
    'Training config file, e.g. configs/convnext_t_in1k.py[:runlocal].',
    lock_config=True,
)
flags.DEFINE_string('workdir', None, 'Checkpoints and TensorBoard logs (local or gs://).')
flags.DEFINE_bool(
    'jax_distributed',
    False,
    'Call jax.distributed.initialize() (multi-host TPU/GPU); the cluster is '
    'detected unless the flags below say it.',
)
flags.DEFINE_string(
    'jax_coordinator_address',
    None,
    "Process 0's host:port, the same on every process (e.g. 10.0.0.1:1234).",
)
flags.DEFINE_integer('jax_num_processes', None, 'Number of processes.', lower_bound=1)
flags.DEFINE_integer(
    'jax_process_id', None, "This process's index, 0 .. num_processes - 1.", lower_bound=0
)
flags.DEFINE_list(
    'jax_local_device_ids', None, "This process's devices, e.g. 0,1 (default: all it sees)."
)
flags.DEFINE_bool(
    'verbose',
    False,
    'Also show the full config, parameter tables and the INFO logs of the '
    "libraries (orbax, tensorstore, jax, clu, tfds); default: the trainer's "
    'own progress and every warning.',
)
flags.mark_flags_as_required(['config', 'workdir'])
flags.register_validator(
    'jax_local_device_ids',
    lambda ids: ids is None or all(i.isdigit() for i in ids),
    message='--jax_local_device_ids takes device indices, e.g. 0,1',
)

_DISTRIBUTED_FLAGS = (
    'jax_coordinator_address',
    'jax_num_processes',
    'jax_process_id',
    'jax_local_device_ids',
)


def initialize_distributed() -> None:
  """`jax.distributed.initialize` with the flags given (the rest detected by jax), if
  `--jax_distributed` or any of them is set."""
  given = {
      name[len('jax_') :]: FLAGS[name].value
      for name in _DISTRIBUTED_FLAGS
      if FLAGS[name].value is not None
  }
  if not (FLAGS.jax_distributed or given):
    return
  if 'local_device_ids' in given:
    given['local_device_ids'] = [int(i) for i in given['local_device_ids']]
  jax.distributed.initialize(**given)


def report(message, status: int, prog: str = PROG) -> int:
  """Prints `prog: error: message` as the last line on stderr; returns `status`."""
  logging.flush()
  sys.stdout.flush()
  print(f'{prog}: error: {message}', file=sys.stderr, flush=True)
  return status


def parse_flags(argv: list[str], prog: str = PROG, usage: str = USAGE) -> list[str]:
  """absl's flag parsing, with a mistake in the flags or the config file reported as one line
  (exit status 2) instead of a usage dump or a traceback.

  Args:
    argv: the command line.
    prog, usage: the command's name and usage line, for the messages (other commands built
      on these flags, such as `convnext_jax.roadmap`, pass their own).

  Returns:
    The arguments left after the flags, for `main`.
  """
  report_ = functools.partial(report, prog=prog)
  try:
    args = FLAGS(argv)
  except flags.Error as e:
    sys.exit(report_(_flag_error_message(e, argv, usage), 2))
  except (AttributeError, KeyError, OSError):
    # ml_collections raises these, untranslated, for an override of a key the config does not
    # have and for a config file it cannot load.
    message = _config_load_error(argv) or _unknown_override(argv)
    if message is None:
      raise
    sys.exit(report_(message, 2))
  if not isinstance(FLAGS.config, ml_collections.ConfigDict):
    sys.exit(
        report_(
            _config_load_error(argv)
            or f'config file {_config_argument(argv)}: get_config() returned '
            f'{type(FLAGS.config).__name__}; it must return an '
            'ml_collections.ConfigDict',
            2,
        )
    )
  return args


def summary(config: ml_collections.ConfigDict) -> str:
  """One line of what a config trains: model, data, schedule, optimizer, mesh."""
  c = config
  duration = f'{c.num_steps} steps' if c.num_steps > 0 else f'{c.num_epochs:g} epochs'
  accum = f' in {c.grad_accum_steps} micro-batches' if c.grad_accum_steps > 1 else ''
  ema = f'EMA {c.ema.decay:g}' if c.ema.decay > 0 else 'no EMA'
  init = f', init from {c.init_from.path}' if c.init_from.path else ''
  return (
      f'{c.model.name} ({c.model.dtype}) on {c.dataset.name} at {c.input.image_size} px, '
      f'batch {c.global_batch_size}{accum}, {duration}, AdamW lr {c.optim.lr:g} '
      f'wd {c.optim.weight_decay:g}, {ema}, mesh {tuple(c.mesh)}{init} '
      '(--verbose prints all of it)'
  )


def _config_argument(argv: list[str]) -> str | None:
  """The value of --config in `argv` ('file.py[:args]'), or None."""
  for i, arg in enumerate(argv):
    match = re.fullmatch(r'--?config(=(.*))?', arg)
    if match:
      return match.group(2) if match.group(1) else (argv[i + 1] if i + 1 < len(argv) else None)
  return None


def _load_config(argv: list[str]):
  """The config file's config, loaded again as config_flags does, without the overrides (for
  messages); raises what the file or its get_config raises."""
  path, *arg = _config_argument(argv).split(':', 1)
  spec = importlib.util.spec_from_file_location('convnext_train_config', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(*arg)


def _config_load_error(argv: list[str]) -> str | None:
  """Why the config file cannot be loaded, or None when it can."""
  argument = _config_argument(argv)
  if argument is None:
    return None
  path = argument.split(':', 1)[0]
  if not os.path.isfile(path):
    return (
        f'config file {path} not found; --config takes a file such as '
        'configs/convnext_t_in1k.py[:runlocal]'
    )
  try:
    config = _load_config(argv)
  except (TypeError, ValueError, OSError) as e:  # What a get_config raises for its user.
    return f'config file {argument}: {_one_line(e)}'
  if isinstance(config, ml_collections.ConfigDict):
    return None
  return (
      f'config file {argument}: get_config() returned {type(config).__name__}; it must '
      'return an ml_collections.ConfigDict'
  )


def _unknown_override(argv: list[str]) -> str | None:
  """The message for the first --config.<key> override of a key the config lacks, or None."""
  if _config_argument(argv) is None:
    return None
  config = _load_config(argv)
  if not isinstance(config, ml_collections.ConfigDict):
    return None
  known = config_check.flat_keys(config)
  for arg in argv:
    match = re.match(r'--?(?:no)?config\.([^=]+)', arg)
    if match and match.group(1) not in known:
      return str(config_check.unknown_key_error(match.group(1), config))
  return None


_FLAG_TYPES = {'int': 'an integer', 'float': 'a number', 'bool': 'true or false'}


def _flag_error_message(error: flags.Error, argv: list[str], usage: str = USAGE) -> str:
  """One line for an absl flag error: a bad override value, a config file whose
  get_config raised, an unknown or missing flag."""
  text = str(error)
  if text.startswith('flag --config='):  # Also when get_config returned None.
    problem = _config_load_error(argv)
    if problem:
      return problem
  missing = re.search(r'Flag --(\w+) must have a value other than None', text)
  if missing:
    return f'--{missing.group(1)} is required: {usage}'
  cause = error.__context__
  # A value absl's parser refused reads `flag --NAME=VALUE: CAUSE`.
  match = cause is not None and re.fullmatch(
      r'flag --([^=]+)=(.*): ' + re.escape(str(cause)), str(error), re.DOTALL
  )
  if match:
    name, value = match.groups()
    if name == 'config':
      return f'config file {value}: {_one_line(_innermost(error))}'
    if name.startswith('config.') and name in FLAGS:
      expected = _FLAG_TYPES.get(FLAGS[name].flag_type())
      if expected:
        return f'{name} must be {expected}, got {value!r}'
      return f'--{name}={value}: {_one_line(cause)}'
  return _one_line(error)


def _innermost(error: BaseException) -> BaseException:
  """The exception at the root of `error`'s chain (what a config file raised)."""
  while (error.__cause__ or error.__context__) is not None:
    error = error.__cause__ or error.__context__
  return error


def _one_line(error) -> str:
  return ' '.join(str(error).split())


def main(argv):
  if len(argv) > 1:
    return report(f'unexpected arguments {argv[1:]}; flags take the form --name=value', 2)
  console.configure(FLAGS.verbose)
  try:
    config_check.check(FLAGS.config)
  except config_check.ConfigError as e:
    return report(e, 2)
  initialize_distributed()
  logging.info(
      'JAX %s, process %d/%d, devices: %s',
      jax.__version__,
      jax.process_index(),
      jax.process_count(),
      jax.devices(),
  )
  try:
    config_check.check_mesh(FLAGS.config)
  except config_check.ConfigError as e:
    return report(e, 2)
  logging.info('config %s: %s', _config_argument(sys.argv), summary(FLAGS.config))
  logging.info('config:\n%s', FLAGS.config, extra=console.DETAIL)
  try:
    # A full disk is the one line below, without orbax's echoes of it from other threads.
    with fileio.quiet_disk_full_echoes():
      train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  except train.RUN_ERRORS as e:
    return report(e, 1)
  return 0


def run():
  """Console script `convnext-train`."""
  app.run(main, flags_parser=parse_flags)


if __name__ == '__main__':
  run()
