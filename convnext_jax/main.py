"""Entry point: `python -m convnext_jax.main --config configs/<name>.py[:args] --workdir DIR`.

Also installed as `convnext-train`. Flags: `--config.<field>=value` overrides any config
field; `--jax_distributed` initialises multi-process JAX (Cloud TPU pod slices, GPU
clusters) before anything touches a device. A workdir with a checkpoint resumes from it.
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
                  'Call jax.distributed.initialize() (multi-host TPU/GPU).')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  if FLAGS.jax_distributed:
    jax.distributed.initialize()
  logging.info('JAX %s, process %d/%d, devices: %s', jax.__version__, jax.process_index(),
               jax.process_count(), jax.devices())
  logging.info('config:\n%s', FLAGS.config)
  train.train_and_evaluate(FLAGS.config, FLAGS.workdir)


def run():
  """Console script `convnext-train`."""
  app.run(main)


if __name__ == '__main__':
  run()
