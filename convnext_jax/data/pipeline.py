"""tf.data pipelines over tfds-prepared datasets, each process reading its data shard.

The split is read in data shards: shard k of n is the k-th even share of the split
(`tfds.even_splits`); the process(es) feeding shard k of the batch read it
(`sharding.BatchFeed`: under data parallelism, one shard per process).

Training: each data shard is an endless stream of epochs. Epoch e's order is a pure function
of (seed, e) (file order and shuffle buffer seeded by it), and every example is augmented
with stateless random ops seeded by (seed, shard, its position in the stream). So the same
seed gives the same batches, and a run restarted at position p re-enters epoch p // N at
offset p % N, skipping only undecoded records of that epoch instead of replaying it.

Evaluation: each data shard is read in order and padded with masked blank examples to a
common number of batches, so that every example of the split is counted exactly once
whatever the host and device counts.

Images that cannot be decoded are dropped (`ignore_errors`) and counted: each example
carries its stream position and file, so a gap between consecutive positions is a skipped
record, and a file that yielded fewer than its records lost some (a warning line per file and
epoch, `StreamTracker`). A damaged record ends TensorFlow's reading of its file; training
positions are numbered within each epoch, so the records lost with it are counted the same
way. A data file that cannot be opened at all is an error, before reading starts.
Batches hold uint8 images; normalisation and the batch-level augmentations run on device
(`convnext_jax.data.batch_ops`).
"""

import concurrent.futures
import dataclasses
import math
import re
import threading
from typing import Any

from absl import logging
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from convnext_jax.data import DEFAULT_CROP_PCT
from convnext_jax.data import IMAGENET_MEAN_FILL
from convnext_jax.data import DatasetError
from convnext_jax.data import check_eval_crop
from convnext_jax.data import image_ops
from convnext_jax.data import randaugment as randaugment_lib
from convnext_jax.data.image_ops import no_autograph


def configure_tensorflow() -> None:
  """Sets up TensorFlow for a process in which it only runs input pipelines.

  Accelerators are hidden from it (JAX owns them), and each TensorFlow op runs on one thread:
  the pipelines' parallel maps already spread the examples over the cores, and TensorFlow's
  default intra-op pool under them keeps fewer cores busy, which tf.data's
  `max_intra_op_parallelism` option does not undo (docs/benchmarks.md has the numbers). Call
  it before TensorFlow runs anything; once it has, the thread setting cannot change and
  this logs a warning instead.

  Raises:
    RuntimeError: TensorFlow was initialised with GPUs visible (it may have claimed their
      memory): create the input pipelines before running TensorFlow code.
  """
  tf.config.set_visible_devices([], 'GPU')
  try:
    tf.config.threading.set_intra_op_parallelism_threads(1)
  except RuntimeError:  # Already initialised with another setting.
    logging.warning(
        'TensorFlow ran before the input pipelines were set up, so its ops keep '
        'their intra-op thread pool, which slows tf.data down '
        '(docs/benchmarks.md); build the pipelines before running TensorFlow code'
    )


@dataclasses.dataclass(frozen=True)
class TrainPreprocess:
  """RandomResizedCrop (fused with JPEG decode) -> bicubic resize -> flip -> RandAugment.

  Attributes:
    image_size: output height and width.
    scale: RandomResizedCrop area range.
    ratio: RandomResizedCrop aspect-ratio range.
    hflip: probability of a horizontal flip (0 disables).
    randaugment: a timm RandAugment spec such as 'rand-m9-mstd0.5-inc1', or None/'' for none.
    fill: RandAugment's fill colour for geometric ops (the dataset mean, 0..255).
  """

  image_size: int = 224
  scale: tuple[float, float] = (0.08, 1.0)
  ratio: tuple[float, float] = (3 / 4, 4 / 3)
  hflip: float = 0.5
  randaugment: str | None = 'rand-m9-mstd0.5-inc1'
  fill: tuple[int, int, int] = IMAGENET_MEAN_FILL

  def __post_init__(self):
    # Parsed once, here, so that a bad spec fails when the pipeline is built.
    config = randaugment_lib.RandAugmentConfig.parse(self.randaugment) if self.randaugment else None
    object.__setattr__(self, '_randaugment_config', config)

  @no_autograph
  def __call__(self, image_bytes, seed):
    crop_seed, flip_seed, augment_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 3))
    shape = image_ops.image_shape(image_bytes)
    window = image_ops.random_resized_crop_window(shape, crop_seed, self.scale, self.ratio)
    image = image_ops.decode_and_crop(image_bytes, window, shape)
    image = image_ops.resize(image, (self.image_size, self.image_size))
    if self.hflip > 0:
      image = image_ops.random_flip(image, flip_seed, self.hflip)
    if self._randaugment_config is not None:
      image = randaugment_lib.rand_augment(image, augment_seed, self._randaugment_config, self.fill)
    return image


@dataclasses.dataclass(frozen=True)
class EvalPreprocess:
  """timm's evaluation transform: resize to int(size / crop_pct), bicubic, then the centre
  size x size crop.

  Attributes:
    image_size: output height and width.
    crop_pct: the crop's fraction of the resized image's side, in (0, 1].
    crop_mode: 'center' resizes the shorter side (torchvision `Resize(int)`, the aspect kept);
      'squash' resizes both sides, as the official recipe does at 384 with crop_pct 1.
  """

  image_size: int = 224
  crop_pct: float = DEFAULT_CROP_PCT
  crop_mode: str = 'center'

  def __post_init__(self):
    check_eval_crop(self.crop_pct, self.crop_mode)

  @no_autograph
  def __call__(self, image_bytes):
    shape = image_ops.image_shape(image_bytes)
    scale_size = int(self.image_size / self.crop_pct)
    if self.crop_mode == 'squash':
      size = tf.constant([scale_size, scale_size])
    else:
      size = image_ops.shorter_side_size(shape[0], shape[1], scale_size)
    # The centre crop, decoded and resized alone (see `resize_crop_window`).
    return image_ops.resize_crop_window(
        image_bytes, size, image_ops.center_crop_box(size, self.image_size), shape
    )


# ----------------------------------------------------------------------------------------
# Data shards of a split.
# ----------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class HostShard:
  """The records of one data shard: (file, skip, take) triples, in split order.

  Attributes:
    split: the split it is a share of, e.g. 'train'.
    files, skips, takes: where its records are.
    index, count: it is data shard `index` of `count` (`sharding.BatchFeed`'s).
  """

  split: str
  files: tuple[str, ...]
  skips: tuple[int, ...]
  takes: tuple[int, ...]
  index: int = 0
  count: int = 1

  @property
  def num_examples(self) -> int:
    return sum(self.takes)

  @property
  def share(self) -> str:
    """The share of `split` it reads, as tfds names it."""
    return str(_share(self.split, self.index, self.count))


def _share(split: str, index: int, count: int):
  return tfds.even_splits(split, n=count, drop_remainder=False)[index]


def host_shard(
    builder: tfds.core.DatasetBuilder, split: str, shard_index: int, shard_count: int
) -> HostShard:
  """Data shard `shard_index` of `shard_count`: an even share of `split` (shares differ by at
  most one example).

  Raises:
    ValueError: the dataset is not stored as TFRecord files, or a share would be empty.
  """
  file_format = getattr(builder.info, 'file_format', None)
  if file_format is not None and 'tfrecord' not in str(file_format).lower():
    raise ValueError(
        f'{builder.name}: the input pipeline reads TFRecord datasets, this one is '
        f'stored as {file_format}; prepare it with --file_format=tfrecord'
    )
  instructions = builder.info.splits[_share(split, shard_index, shard_count)].file_instructions
  shard = HostShard(
      split,
      tuple(i.filename for i in instructions),
      tuple(int(i.skip) for i in instructions),
      tuple(int(i.take) for i in instructions),
      shard_index,
      shard_count,
  )
  if not shard.num_examples:
    raise ValueError(
        f'{builder.name} {split}: data shard {shard_index} of {shard_count} '
        'gets no examples; use fewer processes or a larger split'
    )
  return shard


def check_readable(name: str, shard: HostShard) -> None:
  """Every file of a data shard can be opened and is not empty, checked before reading.

  tf.data would drop a file it cannot open with the undecodable images (`ignore_errors`),
  and the run would go on without it; a missing or forbidden file (404, 403 on a bucket) is
  a mistake to fix instead. The files are checked in parallel (one request each on GCS).

  Raises:
    DatasetError: the first file that cannot be read, and why.
  """

  def problem(path):
    try:  # A stat needs the same permission as a read (storage.objects.get on GCS).
      if tf.io.gfile.stat(path).length <= 0:
        return f'{path} is empty'
    except tf.errors.NotFoundError:
      return f'{path} does not exist'
    except tf.errors.OpError as e:
      return f'{path} cannot be read: {type(e).__name__}: {e.message.splitlines()[0]}'
    return None

  with concurrent.futures.ThreadPoolExecutor(min(32, len(shard.files))) as pool:
    for reason in pool.map(problem, shard.files):
      if reason:
        raise DatasetError(
            f'dataset {name}: {reason}; prepare the dataset again (or restore the file) '
            'in its data dir'
        )


def _read_records(shard: HostShard, file_seed=None, cycle_length: int = 16):
  """(file index in the shard, serialized record) of a shard's records; file order shuffled by
  `file_seed` (a tensor) if given."""
  files = tf.data.Dataset.from_tensor_slices(
      (
          np.arange(len(shard.files), dtype=np.int32),
          list(shard.files),
          np.asarray(shard.skips, np.int64),
          np.asarray(shard.takes, np.int64),
      )
  )
  if file_seed is not None:
    files = files.shuffle(len(shard.files), seed=file_seed)

  def records(index, f, skip, take):
    read = tf.data.TFRecordDataset(f, buffer_size=8 << 20).skip(skip).take(take)
    return read.map(lambda record: (index, record))

  return files.interleave(
      records,
      cycle_length=min(cycle_length, len(shard.files)),
      block_length=1,
      num_parallel_calls=tf.data.AUTOTUNE,
      deterministic=True,
  )


def _parse(builder, record, label_key: str):
  features = builder.info.features.deserialize_example(
      record, decoders={'image': tfds.decode.SkipDecoding()}
  )
  return features['image'], features[label_key]


def _options(threads: int | None) -> tf.data.Options:
  options = tf.data.Options()
  options.deterministic = True
  if threads:
    options.threading.private_threadpool_size = threads
    options.threading.max_intra_op_parallelism = 1
  return options


class Batches:
  """A tf.data dataset's numpy batches, whose iterator `close()` deletes off this thread.

  Deleting a tf.data iterator waits until tf.data's autotuning thread ends its current
  sleep, which grows to a minute once a pipeline has run a minute or two: in the thread that
  drops the last reference, it would hold the trainer after every evaluation and at its
  exit (docs/benchmarks.md). The iterator is held only here, in a one-item list that
  `close()` hands to a daemon thread to empty: every other reference is a temporary of
  `__next__`, gone by then, so the deletion (and its wait) is always that thread's; the
  process does not wait for it. Closing twice, or iterating after closing, is harmless.
  """

  def __init__(self, dataset: tf.data.Dataset):
    self._held = [dataset.as_numpy_iterator()]

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    if not self._held:
      raise StopIteration
    return next(self._held[0])

  def close(self) -> None:
    held, self._held = self._held, []
    if held:
      threading.Thread(target=held.clear, name='release-tf-data-iterator', daemon=True).start()


# ----------------------------------------------------------------------------------------
# Training stream.
# ----------------------------------------------------------------------------------------


def to_global_arrays(batch: dict[str, np.ndarray], feed) -> dict[str, Any]:
  """This process's batch as global `jax.Array`s (`feed`: a `sharding.BatchFeed`).

  `position` and `file` stay on the host (they are bookkeeping, see `StreamTracker`).
  """
  return feed.global_arrays({k: v for k, v in batch.items() if k not in ('position', 'file')})


def host_seed(seed: int, shard_index: int) -> int:
  """A per-data-shard seed, so that shards draw different augmentations."""
  return (seed * 1_000_003 + shard_index) % (2**62)


def train_dataset(
    builder: tfds.core.DatasetBuilder,
    shard: HostShard,
    *,
    per_host_batch: int,
    preprocess: TrainPreprocess,
    seed: int,
    start_position: int = 0,
    shuffle_buffer: int = 10_000,
    label_key: str = 'label',
    threads: int | None = None,
) -> tf.data.Dataset:
  """The endless, deterministic training stream of one data shard, batched.

  Args:
    builder: a prepared tfds builder.
    shard: the data shard to read (`host_shard`).
    per_host_batch: examples per batch of this shard (global batch / shard count).
    preprocess: the per-example transform.
    seed: run seed; epoch order and augmentation derive from it.
    start_position: stream position to start at (0, or a checkpoint's `next_position`).
    shuffle_buffer: examples in the shuffle buffer (after a per-epoch file shuffle).
    label_key: the label feature.
    threads: tf.data thread-pool size (None: TensorFlow's default).

  Returns:
    Batches {'image': (B, S, S, 3) uint8, 'label': (B,) int32, 'position': (B,) int64,
    'file': (B,) int32 (each example's file, an index into `shard.files`)}.
  """
  epoch_size = shard.num_examples
  start_epoch, offset = divmod(int(start_position), epoch_size)
  logging.info(
      '%s %s: data shard %d/%d reads %s (%d examples, %d per batch) from position %d '
      '(epoch %d + %d)',
      builder.name,
      shard.split,
      shard.index,
      shard.count,
      shard.share,
      epoch_size,
      per_host_batch,
      start_position,
      start_epoch,
      offset,
  )
  seed_host = host_seed(seed, shard.index)

  def epoch_records(epoch):
    epoch_seed = tf.cast(seed_host, tf.int64) * 100_003 + epoch
    records = _read_records(shard, file_seed=epoch_seed)
    # Numbered within the epoch: records that could not be read (a damaged file ends early)
    # leave a gap before the next epoch's first position, so they count as skipped too.
    return records.shuffle(shuffle_buffer, seed=epoch_seed + 1).enumerate(epoch * epoch_size)

  def example(position, file_and_record):
    file_index, record = file_and_record
    image_bytes, label = _parse(builder, record, label_key)
    seed_pair = tf.stack([tf.constant(seed_host, tf.int64), position])
    return {
        'image': preprocess(image_bytes, seed_pair),
        'label': tf.cast(label, tf.int32),
        'position': position,
        'file': file_index,
    }

  check_readable(builder.name, shard)
  ds = tf.data.Dataset.range(start_epoch, 2**62).flat_map(epoch_records).skip(offset)
  ds = ds.map(example, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  ds = ds.ignore_errors(log_warning=True)
  ds = ds.batch(per_host_batch, drop_remainder=True)
  return ds.prefetch(tf.data.AUTOTUNE).with_options(_options(threads))


# ----------------------------------------------------------------------------------------
# Evaluation: every example exactly once.
# ----------------------------------------------------------------------------------------


def eval_num_batches(builder, split: str, per_host_batch: int, shard_count: int) -> int:
  """Batches every shard yields: enough for the largest one."""
  largest = max(host_shard(builder, split, i, shard_count).num_examples for i in range(shard_count))
  return math.ceil(largest / per_host_batch)


def eval_dataset(
    builder: tfds.core.DatasetBuilder,
    shard: HostShard,
    *,
    per_host_batch: int,
    preprocess: EvalPreprocess,
    label_key: str = 'label',
    num_classes: int | None = None,
    threads: int | None = None,
) -> tuple[tf.data.Dataset, int]:
  """One pass over a data shard, padded to the batch count every shard of its split runs.

  Args:
    builder, shard, per_host_batch, threads: as for training.
    preprocess: the evaluation transform.
    label_key: the label feature. A sequence feature (e.g. ImageNet-ReaL's 'real_label')
      becomes a multi-hot (B, num_classes) float32 label, and examples with no label are
      masked out, as the ReaL protocol does.
    num_classes: needed for sequence labels.

  Returns:
    (dataset, num_batches): batches {'image', 'label', 'mask' (bool), 'position', 'file' (as
    for training)}; padding examples have mask False, position and file -1.
  """
  num_batches = eval_num_batches(builder, shard.split, per_host_batch, shard.count)
  logging.info(
      '%s %s: data shard %d/%d evaluates %s (%d examples) in %d batches of %d',
      builder.name,
      shard.split,
      shard.index,
      shard.count,
      shard.share,
      shard.num_examples,
      num_batches,
      per_host_batch,
  )
  size = preprocess.image_size
  multi_label = isinstance(builder.info.features[label_key], tfds.features.Sequence)
  if multi_label and not num_classes:
    raise ValueError(f'{builder.name}: {label_key!r} holds label lists; pass num_classes')

  def example(position, file_and_record):
    file_index, record = file_and_record
    image_bytes, label = _parse(builder, record, label_key)
    if multi_label:
      mask = tf.size(label) > 0
      label = tf.reduce_max(tf.one_hot(label, num_classes, dtype=tf.float32), axis=0)
    else:
      mask = tf.constant(True)
      label = tf.cast(label, tf.int32)
    return {
        'image': preprocess(image_bytes),
        'label': label,
        'mask': mask,
        'position': position,
        'file': file_index,
    }

  check_readable(builder.name, shard)
  ds = _read_records(shard).enumerate()
  ds = ds.map(example, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  ds = ds.ignore_errors(log_warning=True)
  blank = {
      'image': tf.zeros([size, size, 3], tf.uint8),
      'label': tf.zeros([num_classes], tf.float32) if multi_label else tf.constant(0, tf.int32),
      'mask': tf.constant(False),
      'position': tf.constant(-1, tf.int64),
      'file': tf.constant(-1, tf.int32),
  }
  # Padding after the real examples; `take` fixes the count even if some were skipped.
  ds = ds.concatenate(tf.data.Dataset.from_tensors(blank).repeat())
  ds = ds.take(num_batches * per_host_batch).batch(per_host_batch, drop_remainder=True)
  return ds.prefetch(tf.data.AUTOTUNE).with_options(_options(threads)), num_batches


# ----------------------------------------------------------------------------------------
# Bookkeeping of positions and skipped records.
# ----------------------------------------------------------------------------------------


class StreamTracker:
  """Follows a batch stream's positions: where to resume, and how many records were skipped.

  Positions of consecutive kept examples increase by one unless records in between could
  not be read or decoded, so the skipped count is exact once their batches have been
  consumed. Given the `shard` (whose batches say each example's file) and a `name`, skips are
  warning lines too: one per file and epoch (or pass, for a finite one that `close` ends),
  naming the file and the byte at which a damaged record stops TensorFlow's reader.
  """

  def __init__(
      self,
      start_position: int = 0,
      name: str = '',
      shard: HostShard | None = None,
  ):
    self.next_position = int(start_position)
    self.skipped = 0
    self._name = name
    self._shard = shard
    if shard is not None:
      self._epoch, into = divmod(int(start_position), shard.num_examples)
      self._whole_epoch = into == 0  # Files are checked only in epochs seen from the start.
      self._counts = np.zeros(len(shard.files), np.int64)
      self._damage = {}  # file -> what TensorFlow's reader says of it

  def update(self, positions: np.ndarray, files: np.ndarray | None = None) -> None:
    """Takes a batch's `position` (and, with a `shard`, `file`) entries."""
    positions = np.asarray(positions)
    keep = positions >= 0  # Evaluation padding has position -1.
    order = np.argsort(positions[keep], kind='stable')
    positions = positions[keep][order]
    if not positions.size:
      return
    gaps = np.diff(positions, prepend=self.next_position - 1) - 1
    self.skipped += int(np.maximum(gaps, 0).sum())
    self.next_position = int(positions[-1]) + 1
    if self._shard is not None and files is not None:
      files = np.asarray(files)[keep][order]
      epochs = positions // self._shard.num_examples
      for epoch in np.unique(epochs):
        while self._epoch < epoch:
          self._end_epoch()
        np.add.at(self._counts, files[epochs == epoch], 1)

  def close(self, end_position: int) -> None:
    """Counts records skipped after the last kept one (a finite pass ending at `end`) and,
    with a `shard`, warns of each file that lost records in the pass."""
    self.skipped += max(0, int(end_position) - self.next_position)
    self.next_position = max(self.next_position, int(end_position))
    if self._shard is not None:
      self._end_epoch(when='')

  def _end_epoch(self, when: str | None = None) -> None:
    """Warns of each file that lost records in the epoch (`when`: how the line says which;
    default ' in epoch N'), then starts the next."""
    if when is None:
      when = f' in epoch {self._epoch}'
    if self._whole_epoch and self._name:
      takes = np.asarray(self._shard.takes)
      for i in np.flatnonzero(self._counts < takes):
        path = self._shard.files[i]
        logging.warning(
            '%s: %d of the %d records of %s could not be read or decoded%s%s: skipped, %d '
            'so far',
            self._name,
            takes[i] - self._counts[i],
            takes[i],
            path,
            when,
            self._damage_of(path),
            self.skipped,
        )
    self._counts[:] = 0
    self._epoch += 1
    self._whole_epoch = True

  def _damage_of(self, path: str) -> str:
    """' (a damaged record at byte N: ...)' if TensorFlow's reader stops in `path`, else ''
    (the file reads to its end: its lost records were undecodable images). Read once."""
    if path not in self._damage:
      self._damage[path] = ''
      try:
        for _ in tf.compat.v1.io.tf_record_iterator(path):
          pass
      except tf.errors.OpError as e:
        where = re.search(r'record at (\d+)', e.message)
        at = f' at byte {where.group(1)}' if where else ''
        self._damage[path] = (
            f" (a damaged record: TensorFlow's reader stops{at}; prepare the dataset again, "
            'or restore the file)'
        )
    return self._damage[path]
