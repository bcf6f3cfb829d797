"""Entry point: `python -m convnext_jax.main --config configs/<name>.py[:args] --workdir DIR`.

Also installed as `convnext-train`. Flags: `--config.<field>=value` overrides any config
field; `--jax_distributed` initialises multi-process JAX before anything touches a device,
from what jax detects of the cluster (Cloud TPU VMs, Slurm, Open MPI, Kubernetes), or from
`--jax_coordinator_address`, `--jax_num_processes` and `--jax_process_id` given by hand (any
other launcher: several processes on one GPU machine, or a cluster jax does not detect; these
imply `--jax_distributed`). A workdir with a checkpoint resumes from it.
"""

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from convnext_jax import train

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
    'config', None, 'Training config file, e.g. configs/convnext_t_in1k.py[:runlocal].',
    lock_config=True)
flags.DEFINE_string('workdir', None, 'Checkpoints and TensorBoard logs (local or gs://).')
flags.DEFINE_bool('jax_distributed', False,
                  'Call jax.distributed.initialize() (multi-host TPU/GPU); the cluster is '
                  'detected unless the flags below say it.')
flags.DEFINE_string('jax_coordinator_address', None,
                    "Process 0's host:port, the same on every process (e.g. 10.0.0.1:1234).")
flags.DEFINE_integer('jax_num_processes', None, 'Number of processes.', lower_bound=1)
flags.DEFINE_integer('jax_process_id', None, "This process's index, 0 .. num_processes - 1.",
                     lower_bound=0)
flags.DEFINE_list('jax_local_device_ids', None,
                  "This process's devices, e.g. 0,1 (default: all it sees).")
flags.mark_flags_as_required(['config', 'workdir'])
flags.register_validator('jax_local_device_ids',
                         lambda ids: ids is None or all(i.isdigit() for i in ids),
                         message='--jax_local_device_ids takes device indices, e.g. 0,1')

_DISTRIBUTED_FLAGS = ('jax_coordinator_address', 'jax_num_processes', 'jax_process_id',
                      'jax_local_device_ids')


def initialize_distributed() -> None:
  """`jax.distributed.initialize` with the flags given (the rest detected by jax), if
  `--jax_distributed` or any of them is set."""
  given = {name[len('jax_'):]: FLAGS[name].value for name in _DISTRIBUTED_FLAGS
           if FLAGS[name].value is not None}
  if not (FLAGS.jax_distributed or given):
    return
  if 'local_device_ids' in given:
    given['local_device_ids'] = [int(i) for i in given['local_device_ids']]
  jax.distributed.initialize(**given)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  initialize_distributed()
  logging.info('JAX %s, process %d/%d, devices: %s', jax.__version__, jax.process_index(),
               jax.process_count(), jax.devices())
  logging.info('config:\n%s', FLAGS.config)
  train.train_and_evaluate(FLAGS.config, FLAGS.workdir)


def run():
  """Console script `convnext-train`."""
  app.run(main)


if __name__ == '__main__':
  run()
