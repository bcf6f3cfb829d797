"""From a config to prepared tfds datasets, the training iterator of global arrays, and the
evaluation sets: the trainer's input side (TensorFlow)."""

import dataclasses
import time
from typing import Any

from absl import logging
import jax
import ml_collections
import tensorflow as tf

from convnext_jax import console
from convnext_jax import datasets
from convnext_jax import multihost
from convnext_jax import sharding
from convnext_jax.data import DatasetError
from convnext_jax.data import DatasetFacts
from convnext_jax.data import EvalInput
from convnext_jax.data import pipeline

# Datasets built locally from nothing (or from the user's folder): prepared on first use.
_AUTO_PREPARE = ('convnext_shapes', 'class_folder')


def _builder(name: str, data_dir: str, builder_kwargs: dict[str, Any]):
  """A prepared tfds builder; local datasets are prepared once, by process 0.

  Process 0 decides whether the dataset needs preparing and every process follows that one
  decision, through the coordination service (which waits for late processes, unlike a
  device collective), so that all take the same path through preparation and its barrier.

  Raises:
    DatasetError: the dataset is not prepared and is not one built locally, or it was
      prepared by process 0 where this process cannot see it (a data_dir that is not shared).
  """
  builder = datasets.builder(name, data_dir=data_dir or None, **builder_kwargs)
  prepared = (
      multihost.decide_on_process_0(f'{name} prepared', lambda: str(int(builder.is_prepared())))
      == '1'
  )
  if not prepared:
    if name.split('/')[0] not in _AUTO_PREPARE:
      raise DatasetError(
          f'dataset {name} is not prepared in {builder.data_dir_root}; prepare it first (see '
          "README 'Datasets'), or set config.dataset.data_dir to where it was prepared"
      )
    if jax.process_index() == 0:
      logging.info('preparing %s in %s (once) ...', name, builder.data_dir_root)
      start = time.perf_counter()
      with console.library_output():  # tfds' banners and progress bars, with --verbose.
        datasets.prepare(name, data_dir=data_dir or None, **builder_kwargs)
      logging.info('prepared %s in %s', name, console.duration(time.perf_counter() - start))
    multihost.barrier(f'{name} prepared by process 0')
    builder = datasets.builder(name, data_dir=data_dir or None, **builder_kwargs)
  if not builder.is_prepared():
    raise DatasetError(
        f'dataset {name} is prepared for process 0 but not visible to process '
        f'{jax.process_index()} in {builder.data_dir_root}; every process must read the '
        'same config.dataset.data_dir (e.g. on gs://)'
    )
  return builder


# For `train`, which calls it before anything (clu's metric writer included) runs TensorFlow.
configure_tensorflow = pipeline.configure_tensorflow


def _split_size(builder, name: str, split: str) -> int:
  """The examples of `split` of a prepared dataset.

  Raises:
    DatasetError: the dataset has no such split (the message lists the ones it has).
  """
  try:
    return builder.info.splits[split].num_examples
  except (KeyError, ValueError):
    raise DatasetError(
        f'dataset {name} has no split {split!r}; it has {", ".join(sorted(builder.info.splits))}'
        ' (config.dataset.train_split / eval_split / extra_eval)'
    ) from None


class TrainIterator:
  """Global `jax.Array` batches of the training stream; tracks its position and skips."""

  def __init__(
      self,
      dataset: tf.data.Dataset,
      feed: sharding.BatchFeed,
      start_position: int,
      name: str,
      shard: pipeline.HostShard,
  ):
    self._batches = pipeline.Batches(dataset)
    self._feed = feed
    self._tracker = pipeline.StreamTracker(start_position, name, shard)

  def __iter__(self):
    return self

  def __next__(self):
    batch = next(self._batches)
    self._tracker.update(batch['position'], batch['file'])
    return pipeline.to_global_arrays(batch, self._feed)

  @property
  def next_position(self) -> int:
    """Where this data shard's stream resumes after the batches handed out so far."""
    return self._tracker.next_position

  @property
  def skipped(self) -> int:
    return self._tracker.skipped

  def close(self) -> None:
    """Releases the pipeline without waiting for its threads (`pipeline.Batches`)."""
    self._batches.close()


@dataclasses.dataclass
class Evaluator:
  name: str
  dataset: tf.data.Dataset
  num_batches: int
  shard: pipeline.HostShard  # This process's data shard (to name what could not be read).

  @property
  def num_examples(self) -> int:
    return self.shard.num_examples


class Inputs:
  """The datasets of one config: sizes, classes, and pipelines on demand."""

  def __init__(self, config: ml_collections.ConfigDict):
    configure_tensorflow()  # No-op if done already, as `train` does.
    self._config = config
    cd = config.dataset
    self._kwargs = dict(cd.builder_kwargs)
    self.builder = _builder(cd.name, cd.data_dir, self._kwargs)
    label = self.builder.info.features[cd.label_key]
    self.facts = DatasetFacts(
        num_train_examples=_split_size(self.builder, cd.name, cd.train_split),
        num_classes=label.num_classes,
        class_names=tuple(label.names),
    )

  def train_iterator(self, feed: sharding.BatchFeed, start_position: int) -> TrainIterator:
    """The training stream of this process's data shard, from `start_position`, as global
    batches of `config.global_batch_size`."""
    c = self._config
    preprocess = pipeline.TrainPreprocess(
        c.input.image_size,
        scale=tuple(c.input.scale),
        ratio=tuple(c.input.ratio),
        hflip=c.input.hflip,
        randaugment=c.input.randaugment or None,
        fill=tuple(c.input.fill),
    )
    shard = pipeline.host_shard(
        self.builder, c.dataset.train_split, feed.shard_index, feed.shard_count
    )
    dataset = pipeline.train_dataset(
        self.builder,
        shard,
        per_host_batch=feed.local_batch(c.global_batch_size),
        preprocess=preprocess,
        seed=c.seed,
        start_position=start_position,
        shuffle_buffer=c.input.shuffle_buffer,
        label_key=c.dataset.label_key,
        threads=c.input.threads or None,
    )
    name = f'{c.dataset.name} {c.dataset.train_split}'
    return TrainIterator(dataset, feed, start_position, name, shard)

  def evaluators(
      self, feed: sharding.BatchFeed, global_batch: int, eval_input: EvalInput
  ) -> list[Evaluator]:
    """The main evaluation split, then `dataset.extra_eval` ('name:split[:label_key]'), read
    in global batches of `global_batch`, preprocessed as `eval_input` says."""
    cd = self._config.dataset
    sets = [(cd.name.split('/')[0], self.builder, cd.eval_split, cd.label_key)]
    for entry in cd.extra_eval:
      name, split, *label_key = entry.split(':')
      builder = _builder(name, cd.data_dir, {})
      sets.append((name.split('/')[0], builder, split, label_key[0] if label_key else 'label'))
    preprocess = pipeline.EvalPreprocess(
        eval_input.image_size, eval_input.crop_pct, eval_input.crop_mode
    )
    out = []
    for name, builder, split, label_key in sets:
      _split_size(builder, name, split)  # A split the dataset lacks: one line, before reading.
      shard = pipeline.host_shard(builder, split, feed.shard_index, feed.shard_count)
      dataset, num_batches = pipeline.eval_dataset(
          builder,
          shard,
          per_host_batch=feed.local_batch(global_batch),
          preprocess=preprocess,
          label_key=label_key,
          num_classes=self.facts.num_classes,
          threads=self._config.input.threads or None,
      )
      out.append(
          Evaluator(f'{name}_{split}' if len(sets) > 1 else name, dataset, num_batches, shard)
      )
    return out
