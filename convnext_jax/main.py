"""Entry point: `python -m convnext_jax.main --config NAME_OR_FILE[:args] --workdir DIR`.

Also installed as `convnext-train`. `--config` takes a config file (`configs/demo.py`) or the
name of a config shipped with the package (`demo`, `convnext_t_in1k:runlocal`); flags
`--config.<field>=value` override any config field; `--jax_distributed` initialises
multi-process JAX before anything touches a device, from what jax detects of the cluster
(Cloud TPU VMs, Slurm, Open MPI, Kubernetes), or from `--jax_coordinator_address`,
`--jax_num_processes` and `--jax_process_id` given by hand (any other launcher: several
processes on one GPU machine, or a cluster jax does not detect; these imply
`--jax_distributed`). A workdir with a checkpoint resumes from it.

A mistake in the flags or the config (`validation`: an unknown key, a value out of range, a
missing `init_from.path`, a mesh that does not fit the devices) ends the run before anything
heavy runs or the workdir is created, with one line on stderr, `convnext-train: error: ...`,
and exit status 2; a run that cannot go on (`train.RUN_ERRORS`) ends with one such line and
exit status 1.

The console shows the trainer's own lines and every warning; `--verbose` adds the full
config, parameter tables and the libraries' INFO records (`console`). TensorFlow's C++ log
(the oneDNN notices of the input pipeline) is off unless TF_CPP_MIN_LOG_LEVEL is set.
"""

import os
import sys

# Before TensorFlow is imported (through `train`): its C++ log reads this once it is set up.
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')

# pylint: disable=g-import-not-at-top,wrong-import-position
from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from convnext_jax import console
from convnext_jax import fileio
from convnext_jax import host_malloc
from convnext_jax import validation  # No TensorFlow: flag mistakes are reported without it.

PROG = 'convnext-train'
USAGE = 'python -m convnext_jax.main --config NAME_OR_FILE[:args] --workdir DIR'

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
    'config',
    None,
    'Training config: a file (configs/convnext_t_in1k.py) or the name of a shipped config '
    '(convnext_t_in1k), with arguments after a colon (demo:runlocal).',
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


def fail(message, prog: str = PROG) -> int:
  """Reports a run that cannot go on (`report`, exit status 1) and ends the process then,
  even if threads of the failed operation would hold its exit
  (`console.exit_without_stuck_threads`)."""
  return console.exit_without_stuck_threads(report(message, 1, prog))


def parse_flags(argv: list[str], prog: str = PROG, usage: str = USAGE) -> list[str]:
  """absl's flag parsing, with a mistake in the flags or the config reported as one line (exit
  status 2) instead of a usage dump or a traceback (`validation.command_line`).

  Args:
    argv: the command line.
    prog, usage: the command's name and usage line, for the messages (other commands built
      on these flags, such as `convnext_jax.roadmap_study`, pass their own).

  Returns:
    The arguments left after the flags, for `main`.
  """
  try:
    argv = validation.command_line(argv, usage)
    return FLAGS(argv)
  except validation.ConfigError as e:
    sys.exit(report(e, 2, prog))
  except flags.Error as e:
    sys.exit(report(validation.flag_error(e, usage), 2, prog))


def main(argv):
  if len(argv) > 1:
    return report(f'unexpected arguments {argv[1:]}; flags take the form --name=value', 2)
  host_malloc.configure()  # Before the backend and TensorFlow start their threads.
  with console.native_notices_dropped():  # What TensorFlow prints while it loads (oneDNN).
    from convnext_jax import train  # TensorFlow, for the input pipeline: once flags are right.

  console.configure(FLAGS.verbose)
  initialize_distributed()
  logging.info(
      'JAX %s, process %d/%d, devices: %s',
      jax.__version__,
      jax.process_index(),
      jax.process_count(),
      jax.devices(),
  )
  try:
    # A full disk or a bucket's refusal is the one line below, without orbax's echoes of it
    # from other threads.
    with fileio.quiet_write_error_echoes():
      train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  except validation.ConfigError as e:
    return report(e, 2)
  except train.RUN_ERRORS as e:
    return fail(e)
  except Exception as e:  # pylint: disable=broad-except
    storage = fileio.describe_storage_error(e)  # A bucket's refusal, from any path of the run.
    if storage is None:
      raise
    return fail(storage)
  return 0


def run():
  """Console script `convnext-train`."""
  app.run(main, flags_parser=parse_flags)


if __name__ == '__main__':
  run()
