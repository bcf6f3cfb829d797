"""One process of a multi-process test (started by `tests/multiprocess.py`).

It takes the flags of `convnext_jax.main` (the config, `--jax_coordinator_address` and the
rest), joins the processes with `main.initialize_distributed`, and then
  * trains each run of `--runs` (JSON: [{"name", "overrides", optional "workdir"}], in
    `--workdir`/<name> by default) with `train.train_and_evaluate`, one after the other; a
    run refused up front for its mesh is recorded as refused and the next one starts;
  * with `--count_eval`, builds the config's inputs and counts, per label, the validation
    examples that `evaluate.evaluate` sees (for a dataset whose labels are 0..N-1, one
    example each).

Instrumentation, for the tests only:
  --record_dir       every process's scalars (`<run>_p<i>.jsonl`) and, for training, the
                     batch rows it fed (`<run>_p<i>_batches.npz`), and each run's outcome;
  --delay_process / --delay_s   that process sleeps after joining, before any work;
  --signal_process with --sigterm_at_step (SIGTERM to itself after that step, when the
                     next batch is read; the steps after it are slowed) or
                     --sigkill_at_save (SIGKILL to itself once that step's save has started).
"""

import copy
import json
import os
import pathlib
import signal
import sys
import time

from absl import app
from absl import flags
from clu import metric_writers
from clu import metrics
import flax
import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from convnext_jax import checkpoints  # pylint: disable=g-import-not-at-top
from convnext_jax import evaluate
from convnext_jax import main as main_lib
from convnext_jax import run as run_lib
from convnext_jax import sharding
from convnext_jax import train
from convnext_jax import validation
from convnext_jax.data import inputs as inputs_lib
from convnext_jax.data import pipeline

FLAGS = flags.FLAGS
flags.DEFINE_bool('count_eval', False, 'Count the examples evaluation sees, by label.')
flags.DEFINE_string('runs', '[]', 'JSON list of {"name", "overrides", "workdir"} (train).')
flags.DEFINE_string('record_dir', None, 'Where scalars, fed batches and outcomes go.')
flags.DEFINE_integer('delay_process', -1, 'This process sleeps --delay_s after joining.')
flags.DEFINE_float('delay_s', 0.0, 'See --delay_process.')
flags.DEFINE_integer('signal_process', -1, 'The process that signals itself.')
flags.DEFINE_integer('sigterm_at_step', -1, 'SIGTERM after this step (see --signal_process).')
flags.DEFINE_integer('sigkill_at_save', -1, 'SIGKILL once the save of this step has started.')

_run_name = ['']
# jax's SIGTERM listener looks for the signal once a second, and the processes then agree on
# a step to stop at: the steps after the signal take at least this long (as a pod's steps
# do), so that the run stops well before its last step however fast this machine runs it.
_STEP_AFTER_SIGTERM_S = 1.0


def _record(name: str, line: dict) -> None:
  if FLAGS.record_dir:
    path = pathlib.Path(FLAGS.record_dir) / f'{name}_p{jax.process_index()}.jsonl'
    with open(path, 'a') as f:
      f.write(json.dumps(line) + '\n')


def _instrument() -> dict[str, list]:
  """Installs the test instrumentation; returns where the fed training batches collect."""
  create_writer = metric_writers.create_default_writer

  def recording_writer(*args, **kwargs):
    writer = create_writer(*args, **kwargs)
    write_scalars = writer.write_scalars

    def write(step, scalars):
      _record(_run_name[0], {'step': int(step), **{k: float(v) for k, v in scalars.items()}})
      write_scalars(step, scalars)

    writer.write_scalars = write
    return writer

  metric_writers.create_default_writer = recording_writer

  fed = {}
  to_global = pipeline.to_global_arrays

  def recording_to_global(batch, feed):
    if 'mask' not in batch:  # Training batches (evaluation ones carry a mask).
      batches = fed.setdefault(_run_name[0], [])
      batches.append({k: np.asarray(batch[k]) for k in ('image', 'label')})
      # Batch k + 1 is read once step k has been dispatched.
      if jax.process_index() == FLAGS.signal_process and FLAGS.sigterm_at_step >= 0:
        if len(batches) == FLAGS.sigterm_at_step + 1:
          os.kill(os.getpid(), signal.SIGTERM)
        elif len(batches) > FLAGS.sigterm_at_step + 1:
          time.sleep(_STEP_AFTER_SIGTERM_S)
    return to_global(batch, feed)

  pipeline.to_global_arrays = recording_to_global

  save = checkpoints.TrainingCheckpoints.save

  def killing_save(self, step, *args, **kwargs):
    started = save(self, step, *args, **kwargs)
    if step == FLAGS.sigkill_at_save and jax.process_index() == FLAGS.signal_process:
      os.kill(os.getpid(), signal.SIGKILL)  # The async save of `step` is under way.
    return started

  checkpoints.TrainingCheckpoints.save = killing_save
  return fed


def _set(config, dotted: str, value) -> None:
  *parents, leaf = dotted.split('.')
  for part in parents:
    config = config[part]
  config[leaf] = tuple(value) if isinstance(value, list) else value


def _train(fed) -> None:
  for run in json.loads(FLAGS.runs):
    _run_name[0] = run['name']
    config = copy.deepcopy(FLAGS.config)
    for key, value in run.get('overrides', {}).items():
      _set(config, key, value)
    try:
      result = train.train_and_evaluate(
          config, run.get('workdir') or os.path.join(FLAGS.workdir, run['name'])
      )
      outcome = {'outcome': 'trained', 'eval': result}
    except validation.ConfigError as e:
      if 'mesh' not in str(e):
        raise
      outcome = {'outcome': 'refused', 'error': str(e)}
    _record(run['name'] + '_outcome', outcome)
    if FLAGS.record_dir and run['name'] in fed:
      batches = fed.pop(run['name'])
      np.savez(
          pathlib.Path(FLAGS.record_dir) / f'{run["name"]}_p{jax.process_index()}_batches',
          **{f'{k}_{i}': b[k] for i, b in enumerate(batches) for k in b},
      )


def _count_eval() -> None:
  """Counts the examples of each label (label i: the split's example i) that evaluation
  sees, with the evaluation loop and feed of training but a counting step."""
  config = FLAGS.config
  mesh = sharding.make_mesh(config.mesh)
  feed = sharding.batch_feed(mesh)
  inputs = inputs_lib.Inputs(config)
  n = inputs.facts.num_classes

  @flax.struct.dataclass
  class Count(metrics.Metric):
    """How many real (unmasked) examples have label `of` (any label when None)."""

    total: jnp.ndarray
    of = None

    @classmethod
    def from_model_output(cls, label, mask, **_):
      hits = mask if cls.of is None else mask & (label == cls.of)
      return cls(jnp.sum(hits.astype(jnp.int32)))

    def merge(self, other):
      return type(self)(self.total + other.total)

    def compute(self):
      return self.total

  counts = {'count': Count}
  for i in range(n):
    counts[f'label{i}'] = flax.struct.dataclass(type(f'Label{i}', (Count,), {'of': i}))
  collection = metrics.Collection.create(**counts)

  def step(params_by_name, batch):
    del params_by_name
    return {'seen': collection.single_from_model_output(label=batch['label'], mask=batch['mask'])}

  eval_step = jax.jit(step, out_shardings=sharding.replicated(mesh))
  sizes = run_lib.batches(config, feed, sharding.data_parallel_size(mesh))
  for ev in inputs.evaluators(feed, sizes.eval_global, run_lib.eval_input(config)):
    values, skipped = evaluate.evaluate(eval_step, {}, ev.dataset, ev.num_batches, feed, ev.shard)
    _record(
        'evaluate',
        {
            'evaluator': ev.name,
            'skipped': skipped,
            'num_batches': ev.num_batches,
            'shard': [feed.shard_index, feed.shard_count],
            **values,
        },
    )


def worker_main(argv):
  del argv
  fed = _instrument()
  main_lib.initialize_distributed()
  if jax.process_index() == FLAGS.delay_process:
    time.sleep(FLAGS.delay_s)
  _train(fed)
  if FLAGS.count_eval:
    _count_eval()


if __name__ == '__main__':
  app.run(worker_main)
