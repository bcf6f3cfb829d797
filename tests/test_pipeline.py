"""Host pipeline: Pillow-equivalent geometry, per-host shards, exactly-once evaluation,
determinism, resuming mid-epoch, and skipping undecodable images."""

import io
import logging
import os
import pathlib
import re
import struct
import subprocess
import sys
import threading
import time

import fake_tfds
import jax
import jax.numpy as jnp
import mp_config
import numpy as np
from PIL import Image
import pytest
import tensorflow as tf

from convnext_jax import classification
from convnext_jax import data as data_lib
from convnext_jax import evaluate
from convnext_jax import sharding
from convnext_jax.data import image_ops
from convnext_jax.data import inputs as inputs_lib
from convnext_jax.data import pipeline
from convnext_jax.data import randaugment as randaugment_lib


def _photo(height=375, width=500, seed=0) -> np.ndarray:
  """ImageNet-sized test picture: gradients, edges, texture and noise."""
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[0:height, 0:width]
  image = np.stack([xx * 255 / width, yy * 255 / height, ((xx + 2 * yy) % 97) * 2.6], -1)
  image[height // 3 : height // 2, width // 4 : width // 2] = (250, 20, 40)
  image += rng.normal(0, 10, image.shape)
  return np.clip(image, 0, 255).astype(np.uint8)


def _pil_center_crop(image: Image.Image, size: int) -> Image.Image:
  left = int(round((image.width - size) / 2.0))
  top = int(round((image.height - size) / 2.0))
  return image.crop((left, top, left + size, top + size))


def _assert_pillow_equal(ours, reference, label=''):
  """Pillow's values, up to one level where a pass lands within float error of a half."""
  assert ours.shape == reference.shape and ours.dtype == np.uint8, label
  diff = np.abs(ours.astype(int) - reference.astype(int))
  assert diff.max() <= 1 and np.mean(diff == 0) >= 0.999, (label, diff.max(), np.mean(diff == 0))


def _pil_resize_then_center_crop(image: Image.Image, short: int, size: int) -> np.ndarray:
  """torchvision's Resize(short) (the long side truncated by int()) then CenterCrop(size)."""
  width, height = image.size
  if width <= height:
    new_size = (short, int(short * height / width))
  else:
    new_size = (int(short * width / height), short)
  return np.asarray(_pil_center_crop(image.resize(new_size, Image.BICUBIC), size))


@pytest.mark.parametrize(
    'height,width',
    [
        (375, 500),
        (500, 333),  # Common ImageNet shapes.
        (375, 503),  # Resized width 343: the crop's left edge is round(59.5) = 60, not 59.
        (1000, 300),  # Beyond 2:1 portrait: Pillow 13 runs its vertical pass first.
    ],
    ids=['landscape', 'portrait', 'half_offset', 'tall'],
)
@pytest.mark.parametrize('codec', ['jpeg', 'png'])
def test_eval_transform_matches_pillow(height, width, codec):
  pixels = _photo(height, width)
  data = fake_tfds.jpeg_bytes(pixels) if codec == 'jpeg' else _encode_png(pixels)
  out = pipeline.EvalPreprocess(224, 0.875)(tf.constant(data)).numpy()
  reference = _pil_resize_then_center_crop(Image.open(io.BytesIO(data)).convert('RGB'), 256, 224)
  # JPEGs: TensorFlow's accurate IDCT decodes as Pillow does, and the fused crop's window
  # reaches past the bicubic kernel, so both codecs must give Pillow's pixels.
  _assert_pillow_equal(out, reference, f'{codec} {height}x{width}')


@pytest.mark.parametrize(
    'height,width,size',
    [
        (375, 500, (256, 341)),  # Downscaling, horizontal pass first.
        (500, 333, (224, 224)),  # Height loses > 2x the width's pixels: vertical first (Pillow 13).
        (60, 90, (128, 300)),  # Upscaling, by different factors per axis.
        (128, 200, (128, 300)),  # One axis only, by 3/2: many results are exact halves.
        (500, 200, (128, 300)),  # Down one axis, up the other; vertical first.
        (7, 400, (224, 50)),  # Extreme aspect ratios.
        (257, 301, (256, 299)),  # Saturated edges overshoot: Pillow clips after each pass.
    ],
)
def test_resize_matches_pillow(height, width, size):
  """The two 8-bit passes in Pillow's order give Pillow's values, on uint8 pixels directly."""
  pixels = _photo(height, width, seed=3)
  ours = image_ops.resize(tf.constant(pixels), size).numpy()
  reference = np.asarray(Image.fromarray(pixels).resize(size[::-1], Image.BICUBIC))
  _assert_pillow_equal(ours, reference, f'{height}x{width} -> {size}')


def test_pillow_pass_order_matters_and_is_pillows():
  """Both orders really differ (so the order tests above can fail), and the order chosen is
  Pillow 13's rule: vertical first iff the height loses more than twice the width's pixels."""
  pixels = _photo(500, 333, seed=3)  # 500 -> 224 loses 276 rows; 333 -> 224 loses 109 columns.
  size = tf.constant([224, 224])
  scale = tf.cast(size, tf.float32) / tf.constant([500.0, 333.0])
  orders = [
      image_ops._pillow_resample(
          tf.constant(pixels), size, scale, tf.zeros([2]), tf.constant(first)
      ).numpy()
      for first in (True, False)
  ]
  assert np.abs(orders[0].astype(int) - orders[1].astype(int)).max() >= 3
  rule = lambda hw, out: bool(image_ops.pillow_vertical_first(hw, out))
  assert rule((500, 333), (224, 224)) and not rule((375, 500), (224, 224))
  assert not rule((500, 375), (341, 256))  # 159 rows lost, 2 x 119 columns: horizontal first.
  assert not rule((100, 100), (300, 10)) and rule((10, 100), (5, 100))  # Height up; only height.
  assert rule((10, 100), (7, 99)) and not rule((10, 100), (8, 99))  # 3 > 2 x 1; 2 is not.


@pytest.mark.parametrize(
    'height,width,size,box',
    [
        (375, 500, (256, 341), (16, 58, 224, 224)),  # The 224/256 centre crop of a landscape.
        (500, 333, (384, 256), (80, 16, 224, 224)),  # Portrait.
        (60, 90, (128, 192), (0, 10, 128, 150)),  # Upscaling, touching the image's edge.
        (375, 500, (64, 85), (5, 7, 50, 60)),  # Strong downscaling, odd offsets.
    ],
)
def test_resize_crop_window_equals_resize_then_crop(height, width, size, box):
  data = fake_tfds.jpeg_bytes(_photo(height, width, seed=1))
  out = image_ops.resize_crop_window(tf.constant(data), tf.constant(size), tf.constant(box))
  full = image_ops.resize(image_ops.decode_rgb(tf.constant(data)), size).numpy()
  top, left, h, w = box
  diff = np.abs(out.numpy().astype(int) - full[top : top + h, left : left + w].astype(int))
  assert out.shape == (h, w, 3) and out.dtype == tf.uint8
  # Float rounding only: the decoded window reaches past the kernel's support.
  assert diff.max() <= 1 and diff.mean() < 0.01, (diff.max(), diff.mean())
  # Non-JPEG input (decoded whole, then cut) gives the same result.
  png = _encode_png(_photo(height, width, seed=1))
  from_png = image_ops.resize_crop_window(tf.constant(png), tf.constant(size), tf.constant(box))
  full_png = image_ops.resize(image_ops.decode_rgb(tf.constant(png)), size).numpy()
  diff = np.abs(from_png.numpy().astype(int) - full_png[top : top + h, left : left + w].astype(int))
  assert diff.max() <= 1 and diff.mean() < 0.01, (diff.max(), diff.mean())


def test_image_shape_reads_png_and_jpeg_headers():
  """Shapes come from the header, so a PNG is decoded once (by decode_and_crop), not twice."""
  for height, width in [(375, 500), (500, 333), (1, 300)]:
    png = _encode_png(_photo(height, width))
    np.testing.assert_array_equal(image_ops.image_shape(tf.constant(png)), [height, width, 3])
    # Only the header is read: the first 40 bytes of the file are enough.
    np.testing.assert_array_equal(image_ops.image_shape(tf.constant(png[:40])), [height, width, 3])
    jpeg = fake_tfds.jpeg_bytes(_photo(height, width))
    np.testing.assert_array_equal(
        image_ops.image_shape(tf.constant(jpeg[:1000])), [height, width, 3]
    )
  gray = io.BytesIO()
  Image.fromarray(_photo(30, 20)[..., 0]).save(gray, 'PNG')
  np.testing.assert_array_equal(image_ops.image_shape(tf.constant(gray.getvalue())), [30, 20, 3])
  bmp = io.BytesIO()  # Other formats: decoded for the shape.
  Image.fromarray(_photo(30, 20)).save(bmp, 'BMP')
  np.testing.assert_array_equal(image_ops.image_shape(tf.constant(bmp.getvalue())), [30, 20, 3])


def _encode_png(image: np.ndarray) -> bytes:
  buffer = io.BytesIO()
  Image.fromarray(image).save(buffer, format='PNG')
  return buffer.getvalue()


def test_eval_crop_modes_match_timm():
  """The official default from 384 is 'squash' at crop_pct 1 (a straight resize to size x
  size); 'center' at crop_pct 1 keeps the aspect (shorter side to size, then the crop); and
  'squash' below 1 resizes both sides to int(size / crop_pct) before the crop, as timm."""
  assert data_lib.default_crop_pct(224) == 0.875 and data_lib.default_crop_pct(384) == 1.0
  assert data_lib.default_crop_mode(224) == 'center'
  assert data_lib.default_crop_mode(384) == 'squash'
  data = fake_tfds.jpeg_bytes(_photo())
  image = Image.open(io.BytesIO(data)).convert('RGB')
  square = pipeline.EvalPreprocess(384, 1.0, 'squash')(tf.constant(data)).numpy()
  _assert_pillow_equal(square, np.asarray(image.resize((384, 384), Image.BICUBIC)), 'squash 1')
  center = pipeline.EvalPreprocess(224, 1.0, 'center')(tf.constant(data)).numpy()
  _assert_pillow_equal(center, _pil_resize_then_center_crop(image, 224, 224), 'center 1')
  squash = pipeline.EvalPreprocess(224, 0.9, 'squash')(tf.constant(data)).numpy()
  reference = _pil_center_crop(image.resize((248, 248), Image.BICUBIC), 224)
  _assert_pillow_equal(squash, np.asarray(reference), 'squash 0.9')
  with pytest.raises(ValueError, match=r'crop_pct must be in \(0, 1\], got 1.5'):
    pipeline.EvalPreprocess(224, 1.5)
  with pytest.raises(ValueError, match="crop_mode must be one of .* got 'border'"):
    pipeline.EvalPreprocess(224, 0.875, 'border')


def test_random_resized_crop_window_statistics():
  windows = np.stack(
      [
          image_ops.random_resized_crop_window([375, 500, 3], tf.constant([7, i])).numpy()
          for i in range(400)
      ]
  )
  top, left, h, w = windows.T
  assert np.all((top >= 0) & (left >= 0) & (top + h <= 375) & (left + w <= 500))
  area = h * w / (375 * 500)
  assert area.min() >= 0.08 * 0.97 and area.max() <= 1.0
  assert np.all((w / h > 0.75 * 0.97) & (w / h < (4 / 3) * 1.03))
  # torchvision's algorithm, sampled with numpy: large boxes often miss the 4:3 frame and are
  # redrawn, which pulls the mean area well below that of U(0.08, 1).
  rng = np.random.default_rng(0)
  target = 375 * 500 * rng.uniform(0.08, 1.0, (20000, 10))
  aspect = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3), (20000, 10)))
  ref_w, ref_h = np.round(np.sqrt(target * aspect)), np.round(np.sqrt(target / aspect))
  fits = (ref_w <= 500) & (ref_h <= 375)
  first = np.argmax(fits, axis=1)
  ref_area = (ref_w * ref_h)[np.arange(20000), first] / (375 * 500)
  assert fits.any(axis=1).all()
  assert area.mean() == pytest.approx(ref_area.mean(), abs=0.03)
  assert np.median(area) == pytest.approx(np.median(ref_area), abs=0.05)
  assert len({tuple(w) for w in windows}) > 390  # Seeds give different crops.
  # Deterministic per seed.
  again = image_ops.random_resized_crop_window([375, 500, 3], tf.constant([7, 3])).numpy()
  np.testing.assert_array_equal(again, windows[3])


def test_random_resized_crop_fallback_is_clamped_centre_crop():
  # A 10x1000 strip: no sampled box of area >= 90% fits within ratio [3/4, 4/3].
  window = image_ops.random_resized_crop_window(
      [10, 1000], tf.constant([0, 1]), scale=(0.9, 1.0)
  ).numpy()
  np.testing.assert_array_equal(window, [0, (1000 - 13) // 2, 10, 13])
  window = image_ops.random_resized_crop_window(
      [1000, 10], tf.constant([0, 1]), scale=(0.9, 1.0)
  ).numpy()
  np.testing.assert_array_equal(window, [(1000 - 13) // 2, 0, 13, 10])


def test_train_crop_and_resize_match_pillow():
  """RandomResizedCrop then Resize(224, BICUBIC) on the PIL image, as timm runs it."""
  data = fake_tfds.jpeg_bytes(_photo())
  image = Image.open(io.BytesIO(data)).convert('RGB')
  preprocess = pipeline.TrainPreprocess(224, hflip=0.0, randaugment=None)
  for i in range(8):
    seed = tf.constant([3, i], tf.int64)
    out = preprocess(tf.constant(data), seed).numpy()
    crop_seed = tf.random.experimental.stateless_split(seed, 3)[0]
    top, left, h, w = image_ops.random_resized_crop_window([375, 500, 3], crop_seed).numpy()
    reference = image.crop((left, top, left + w, top + h)).resize((224, 224), Image.BICUBIC)
    _assert_pillow_equal(out, np.asarray(reference), f'seed {i}: window {(top, left, h, w)}')


def test_the_configs_randaugment_runs_in_the_training_stream(shapes_dir):
  """`config.input.randaugment` reaches the trainer's stream: with it, each image of the first
  batch is the one without it RandAugmented with the last of its example's three seeds (crop,
  flip, RandAugment), as `TrainPreprocess` splits them. (The trainer tests' tiny config runs
  without RandAugment.)"""
  spec = 'rand-m9-mstd0.5-inc1'
  feed = sharding.batch_feed(sharding.make_mesh((1, 1, 1), jax.devices()[:1]))
  first = []
  for randaugment in ('', spec):
    config = mp_config.tiny(shapes_dir)
    config.input.randaugment = randaugment
    stream = inputs_lib.Inputs(config).train_iterator(feed, 0)
    first.append(np.asarray(next(stream)['image']))
    stream.close()
  plain, augmented = first
  seed = pipeline.host_seed(config.seed, 0)
  for position, (image, out) in enumerate(zip(plain, augmented)):  # Positions 0, 1, ...
    seeds = tf.random.experimental.stateless_split(tf.constant([seed, position], tf.int64), 3)
    expected = randaugment_lib.rand_augment(
        image, seeds[2], randaugment_lib.RandAugmentConfig.parse(spec), tuple(config.input.fill)
    )
    np.testing.assert_array_equal(out, expected.numpy(), err_msg=f'position {position}')
  assert not np.array_equal(plain, augmented)


@pytest.mark.parametrize(
    'window',
    [
        (0, 0, 375, 500),  # The whole image.
        (0, 210, 375, 290),  # Tall crop at the image's edges: Pillow 13 resizes vertically first.
        (131, 7, 9, 11),  # Tiny, at odd offsets: upscaled 20x.
        (200, 450, 175, 50),  # Touching the bottom-right corner.
    ],
    ids=['whole', 'tall_edge', 'tiny', 'corner'],
)
def test_decode_and_crop_then_resize_match_pillow(window):
  """The fused JPEG window decode gives the whole decode's pixels, up to the image's edges."""
  top, left, h, w = window
  data = fake_tfds.jpeg_bytes(_photo())
  crop = image_ops.decode_and_crop(tf.constant(data), tf.constant(window))
  image = Image.open(io.BytesIO(data)).convert('RGB').crop((left, top, left + w, top + h))
  np.testing.assert_array_equal(crop.numpy(), np.asarray(image))
  _assert_pillow_equal(
      image_ops.resize(crop, (224, 224)).numpy(),
      np.asarray(image.resize((224, 224), Image.BICUBIC)),
      str(window),
  )


def test_flip_probability_and_determinism():
  image = tf.constant(np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3))
  flips = [
      bool(np.any(image_ops.random_flip(image, tf.constant([1, i])).numpy() != image.numpy()))
      for i in range(400)
  ]
  assert 0.43 < np.mean(flips) < 0.57


# ---------------------------------------------------------------------------------------
# Datasets built with tfds in the test.
# ---------------------------------------------------------------------------------------

NUM = 50


@pytest.fixture(scope='module')
def numbered(tmp_path_factory):
  examples = [(fake_tfds.jpeg_bytes(fake_tfds.numbered_image(i)), i % 5) for i in range(NUM)]
  return fake_tfds.build(
      tmp_path_factory.mktemp('tfds'), {'train': examples, 'validation': examples[:23]}, 5
  )


def _identity(images: np.ndarray) -> list[int]:
  """Recovers numbered_image's index from each (resampled) image's mean colour."""
  if not len(images):
    return []
  bases = np.array([[i % 251, (i * 7) % 251, (i * 13) % 251] for i in range(NUM)], np.float32)
  means = images.reshape(len(images), -1, 3).mean(axis=1)
  return [int(np.argmin(np.abs(bases - m).sum(axis=1))) for m in means]


@pytest.mark.parametrize('shard_count', [2, 3])
def test_host_shards_are_disjoint_and_cover_the_split(numbered, shard_count):
  covered = {}
  for index in range(shard_count):
    shard = pipeline.host_shard(numbered, 'train', index, shard_count)
    for file, skip, take in zip(shard.files, shard.skips, shard.takes):
      for record in range(skip, skip + take):
        assert (file, record) not in covered
        covered[(file, record)] = index
  sizes = [list(covered.values()).count(i) for i in range(shard_count)]
  assert len(covered) == NUM and max(sizes) - min(sizes) <= 1


@pytest.mark.parametrize('shard_count,batch', [(2, 4), (3, 5), (3, 16)])
def test_eval_counts_every_example_exactly_once(numbered, shard_count, batch):
  preprocess = pipeline.EvalPreprocess(32, 0.875)
  seen, batch_counts = [], []
  for index in range(shard_count):
    ds, num_batches = pipeline.eval_dataset(
        numbered,
        pipeline.host_shard(numbered, 'train', index, shard_count),
        per_host_batch=batch,
        preprocess=preprocess,
    )
    batches = list(ds.as_numpy_iterator())
    assert len(batches) == num_batches
    batch_counts.append(len(batches))
    for b in batches:
      assert b['image'].shape == (batch, 32, 32, 3)
      seen += _identity(b['image'][b['mask']])
      assert np.all(b['position'][~b['mask']] == -1)
      np.testing.assert_array_equal(
          b['label'][b['mask']], np.array(_identity(b['image'][b['mask']])) % 5
      )
  assert len(set(batch_counts)) == 1  # Every process runs the same number of steps.
  assert sorted(seen) == list(range(NUM))


def _train_batches(builder, n, shard_index=0, shard_count=1, **kwargs):
  args = dict(
      per_host_batch=8,
      seed=0,
      preprocess=pipeline.TrainPreprocess(32, scale=(0.5, 1.0), randaugment=None),
  )
  args.update(kwargs)
  shard = pipeline.host_shard(builder, 'train', shard_index, shard_count)
  ds = pipeline.train_dataset(builder, shard, **args)
  return [b for _, b in zip(range(n), ds.as_numpy_iterator())]


def test_same_seed_same_batches_and_epochs_reshuffle(numbered):
  first = _train_batches(numbered, 13)
  again = _train_batches(numbered, 13)
  for a, b in zip(first, again):
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])
  other = _train_batches(numbered, 2, seed=1)
  assert not np.array_equal(first[0]['image'], other[0]['image'])
  positions = np.concatenate([b['position'] for b in first])
  np.testing.assert_array_equal(positions, np.arange(13 * 8))
  ids = [i for b in first for i in _identity(b['image'])]
  epoch0, epoch1 = ids[:NUM], ids[NUM : 2 * NUM]
  assert sorted(epoch0) == sorted(epoch1) == list(range(NUM))  # Each epoch sees all once,
  assert epoch0 != epoch1  # in a new order.


def test_resume_continues_the_stream(numbered):
  uninterrupted = _train_batches(numbered, 12)
  # Resume at step 7 (position 56 = epoch 1, offset 6): batches 7.. must be identical.
  resumed = _train_batches(numbered, 5, start_position=7 * 8)
  for a, b in zip(uninterrupted[7:], resumed):
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])


@pytest.mark.parametrize('shard_count', [2, 3])
def test_hosts_read_disjoint_examples(numbered, shard_count):
  per_host = [
      _train_batches(numbered, 2, per_host_batch=4, shard_index=i, shard_count=shard_count)
      for i in range(shard_count)
  ]
  ids = [{i for b in host for i in _identity(b['image'])} for host in per_host]
  for a in range(shard_count):
    for b in range(a + 1, shard_count):
      assert not ids[a] & ids[b]


class _ConstantModel:
  """Stands in for a ConvNeXt in the classification eval step: the same logits for every
  image."""

  def apply(self, variables, images, train):
    del train
    return jnp.broadcast_to(variables['params'], (images.shape[0], 5))


def test_evaluate_averages_over_real_examples_only(numbered):
  """23 validation examples in batches of 8: one padded example, whose label is 0, like the
  constant prediction below. Top-1 is 5/23 (labels i % 5 == 0 for i in 0, 5, ..., 20), not
  6/24 (padding counted) or 5/24 (divided by the padded count)."""
  shard = pipeline.host_shard(numbered, 'validation', 0, 1)
  dataset, num_batches = pipeline.eval_dataset(
      numbered, shard, per_host_batch=8, preprocess=pipeline.EvalPreprocess(32, 0.875)
  )
  assert num_batches == 3
  feed = sharding.batch_feed(sharding.make_mesh((-1, 1, 1)))
  objective = classification.Classification(
      _ConstantModel(), 5, jnp.float32, classification.Augmentation(), data_parallel_size=1
  )
  step = jax.jit(objective.eval_step)
  # Classes ranked 0 > 4 > 3 > 1 > 2: top-5 is everything; 'other' never ranks 0 first.
  params = {
      'constant': jnp.array([5.0, 2.0, 1.0, 3.0, 4.0]),
      'other': jnp.array([0.0, 1.0, 0.0, 0.0, 0.0]),
  }
  results, skipped = evaluate.evaluate(step, params, dataset, num_batches, feed, shard)
  assert skipped == 0
  assert results['constant/top1'] == pytest.approx(5 / 23, rel=1e-6)
  assert results['constant/top5'] == 1.0
  # Label 1 is i % 5 == 1: i in 1, 6, 11, 16, 21.
  assert results['other/top1'] == pytest.approx(5 / 23, rel=1e-6)


def _cmyk_jpeg(array):
  buffer = io.BytesIO()
  Image.fromarray(array).convert('CMYK').save(buffer, 'JPEG', quality=95)
  return buffer.getvalue()


def test_undecodable_images_are_skipped_and_counted(tmp_path):
  images = [fake_tfds.numbered_image(i) for i in range(6)]
  gray = io.BytesIO()
  Image.fromarray(images[4]).convert('L').save(gray, 'JPEG', quality=95)
  examples = [
      (fake_tfds.jpeg_bytes(images[0]), 0),
      (fake_tfds.png_bytes(images[1]), 1),  # A PNG stored as an ImageNet JPEG.
      (_cmyk_jpeg(images[2]), 2),
      (fake_tfds.jpeg_bytes(images[3])[:300], 0),  # Truncated: undecodable.
      (gray.getvalue(), 1),
      (b'not an image at all', 2),
  ]
  builder = fake_tfds.build(tmp_path, {'train': examples}, 3, num_shards=1, name='broken')
  ds, num_batches = pipeline.eval_dataset(
      builder,
      pipeline.host_shard(builder, 'train', 0, 1),
      per_host_batch=4,
      preprocess=pipeline.EvalPreprocess(32, 1.0),
  )
  tracker = pipeline.StreamTracker()
  kept = []
  for batch in ds.as_numpy_iterator():
    tracker.update(batch['position'])
    kept += list(batch['label'][batch['mask']])
  tracker.close(len(examples))
  assert num_batches == 2 and tracker.skipped == 2 and len(kept) == 4
  assert sorted(kept) == [0, 1, 1, 2]

  tracker = pipeline.StreamTracker()
  train = _train_batches(builder, 4, per_host_batch=4)  # 16 kept = 4 epochs of 4 decodable.
  for batch in train:
    assert batch['image'].shape == (4, 32, 32, 3)
    tracker.update(batch['position'])
  # Positions 0..23 are 4 epochs; the undecodable ones after the last kept one are not
  # counted yet (their batch has not come).
  assert tracker.next_position - 16 == tracker.skipped and 6 <= tracker.skipped <= 8


def _record_offsets(path) -> list[tuple[int, int]]:
  """(offset, data length) of each record of a TFRecord file, read from its framing by hand:
  an 8-byte little-endian length, its 4-byte CRC, the data, the data's 4-byte CRC."""
  data = path.read_bytes()
  offsets, at = [], 0
  while at < len(data):
    (length,) = struct.unpack('<Q', data[at : at + 8])
    offsets.append((at, length))
    at += 8 + 4 + length + 4
  assert at == len(data)
  return offsets


def test_a_damaged_record_is_counted_and_warned_of_and_a_missing_file_refused(tmp_path, caplog):
  n = 40
  examples = [(fake_tfds.jpeg_bytes(fake_tfds.numbered_image(i)), i % 5) for i in range(n)]
  builder = fake_tfds.build(tmp_path, {'train': examples}, 5, num_shards=1, name='damaged')
  (path,) = [pathlib.Path(f) for f in pipeline.host_shard(builder, 'train', 0, 1).files]
  offsets = _record_offsets(path)
  assert len(offsets) == n
  # One byte of record 15's data flipped: its checksum fails, and TensorFlow's reader cannot
  # go on past it, so records 15..39 are lost to each epoch: 25 per epoch, counted.
  damaged = 15
  at, length = offsets[damaged]
  data = bytearray(path.read_bytes())
  data[at + 12 + length // 2] ^= 0xFF
  path.write_bytes(bytes(data))

  shard = pipeline.host_shard(builder, 'train', 0, 1)
  ds = pipeline.train_dataset(
      builder,
      shard,
      per_host_batch=5,
      seed=0,
      preprocess=pipeline.TrainPreprocess(32, randaugment=None),
      shuffle_buffer=8,
  )
  tracker = pipeline.StreamTracker(name='damaged train', shard=shard)
  with caplog.at_level(logging.WARNING, logger='absl'):
    for batch in ds.as_numpy_iterator():
      tracker.update(batch['position'], batch['file'])
      if tracker.next_position > 2 * n:  # Into the third epoch: two epochs' losses seen.
        break
  assert tracker.skipped == 2 * (n - damaged)
  warnings = [r.getMessage() for r in caplog.records if 'could not be read' in r.getMessage()]
  # One line per epoch, naming the file and where the reader stopped: at the damaged data,
  # after the record's 12-byte header (offsets from the framing read above, not TensorFlow).
  assert warnings == [
      f'damaged train: {n - damaged} of the {n} records of {path} could not be read or '
      f"decoded in epoch {epoch} (a damaged record: TensorFlow's reader stops at byte "
      f'{at + 12}; prepare the dataset again, or restore the file): skipped, '
      f'{(epoch + 1) * (n - damaged)} so far'
      for epoch in (0, 1)
  ], warnings

  # Evaluation reads the file once: the same line, for its one pass (`evaluate` itself).
  caplog.clear()
  dataset, num_batches = pipeline.eval_dataset(
      builder, shard, per_host_batch=8, preprocess=pipeline.EvalPreprocess(32, 1.0)
  )
  feed = sharding.batch_feed(sharding.make_mesh((1, 1, 1), jax.devices()[:1]))
  with caplog.at_level(logging.WARNING, logger='absl'):
    _, skipped = evaluate.evaluate(
        lambda params, batch: {}, {}, dataset, num_batches, feed, shard, name='damaged eval'
    )
  assert skipped == n - damaged
  warnings = [r.getMessage() for r in caplog.records if 'could not be read' in r.getMessage()]
  assert warnings == [
      f'damaged eval: {n - damaged} of the {n} records of {path} could not be read or decoded '
      f"(a damaged record: TensorFlow's reader stops at byte {at + 12}; prepare the dataset "
      f'again, or restore the file): skipped, {n - damaged} so far'
  ], warnings

  path.unlink()  # A file that is gone (a 404 on a bucket): refused up front, by name.
  for make in (
      lambda: _train_batches(builder, 1),
      lambda: pipeline.eval_dataset(
          builder, shard, per_host_batch=4, preprocess=pipeline.EvalPreprocess(32, 1.0)
      ),
  ):
    with pytest.raises(data_lib.DatasetError) as error:
      make()
    assert str(error.value) == (
        f'dataset damaged: {path} does not exist; prepare the dataset again (or restore '
        'the file) in its data dir'
    )


def test_input_benchmark_command(tmp_path):
  """`python -m convnext_jax.benchmark input` (docs/benchmarks.md) runs, times both pipelines
  on one core and on all cores, and reports them beside Pillow's."""
  result = subprocess.run(
      [
          sys.executable,
          '-m',
          'convnext_jax.benchmark',
          'input',
          '--images',
          '4',
          '--batch',
          '4',
          '--warmup',
          '4',
          '--iters',
          '8',
          '--repeats',
          '2',
      ],
      capture_output=True,
      text=True,
      check=False,
      cwd=tmp_path,
      env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL='3'),
  )
  assert result.returncode == 0, result.stderr[-2000:]
  assert 'intra-op threads: 1' in result.stdout, result.stdout
  rows = [
      line for line in result.stdout.splitlines() if line.lstrip().startswith(('train:', 'eval:'))
  ]
  assert len(rows) == 4, result.stdout
  for i, row in enumerate(rows):
    # Median [min-max], cores and images/s per core, for tf.data and for Pillow.
    numbers = re.findall(r'(\d+) \[(\d+)-(\d+)\] ([\d.]+) cores +(\d+)/core', row)
    assert len(numbers) == 2, row
    for median, low, high, cores, per_core in numbers:
      assert 0 < int(low) <= int(median) <= int(high) and int(per_core) > 0, row
      # The first two rows run on one core, the others on all of them.
      assert float(cores) < (1.5 if i < 2 else os.cpu_count() + 0.5), row


def test_configure_tensorflow_runs_ops_on_one_thread():
  """The training process's TensorFlow: no GPUs, one intra-op thread; a warning, not an
  error, if TensorFlow already ran."""
  code = (
      'import tensorflow as tf\n'
      'from convnext_jax.data import pipeline\n'
      'pipeline.configure_tensorflow()\n'
      'assert tf.config.threading.get_intra_op_parallelism_threads() == 1\n'
      'assert not tf.config.get_visible_devices("GPU")\n'
      'print(int(tf.reduce_sum(tf.range(4))))\n'
  )
  late = (
      'import tensorflow as tf\n'
      'from convnext_jax.data import pipeline\n'
      'print(int(tf.reduce_sum(tf.range(4))))\n'
      'pipeline.configure_tensorflow()\n'
      'assert tf.config.threading.get_intra_op_parallelism_threads() == 0\n'
  )
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='3')
  for source, warns in ((code, False), (late, True)):
    result = subprocess.run(
        [sys.executable, '-c', source], capture_output=True, text=True, check=False, env=env
    )
    assert result.returncode == 0 and result.stdout.split() == ['6'], result.stderr[-2000:]
    assert ('intra-op thread pool' in result.stderr) == warns, result.stderr[-2000:]


class _SlowToDelete:
  """Stands in for a tf.data dataset whose numpy iterator takes a second to delete, as a
  tf.data iterator waits up to a minute for its autotuning thread; it records the thread
  that deleted it."""

  def __init__(self):
    self.deleting = threading.Event()
    self.deleted_on = []

  def as_numpy_iterator(self):
    dataset = self

    class Iterator:

      def __iter__(self):
        return self

      def __next__(self):
        raise StopIteration

      def __del__(self):
        dataset.deleting.set()
        time.sleep(1.0)
        dataset.deleted_on.append(threading.current_thread())

    return Iterator()


# What the fake datasets stand for: one file of 4 records.
_SHARD = pipeline.HostShard('train', ('train.tfrecord',), (0,), (4,))


def _close_train_stream(dataset):
  inputs_lib.TrainIterator(dataset, None, 0, 'train', _SHARD).close()


def _evaluate(dataset):
  evaluate.evaluate(None, {}, dataset, 0, None, _SHARD)  # No batches: 4 records skipped.


@pytest.mark.parametrize('done_with', [_close_train_stream, _evaluate])
def test_the_trainer_never_waits_for_a_tf_data_iterator_to_delete(done_with, monkeypatch):
  """The training stream's close and an evaluation return at once, and their iterator is
  deleted on a daemon thread, even when that thread runs first: each `Thread.start` here
  returns only once its thread has ended or begun a deletion. (Before, the caller still held
  a reference while the thread dropped its own, so the caller deleted the iterator and
  waited: a demo run's exit waited 40 s.)"""
  dataset = _SlowToDelete()
  start_thread = threading.Thread.start

  def runs_first(thread):
    start_thread(thread)
    while thread.is_alive() and not dataset.deleting.wait(0.01):
      pass

  monkeypatch.setattr(threading.Thread, 'start', runs_first)
  started = time.monotonic()
  done_with(dataset)
  assert time.monotonic() - started < 0.5
  monkeypatch.undo()
  assert dataset.deleting.wait(5)
  for _ in range(500):
    if dataset.deleted_on:
      break
    time.sleep(0.01)
  assert dataset.deleted_on and dataset.deleted_on[0].daemon, dataset.deleted_on
