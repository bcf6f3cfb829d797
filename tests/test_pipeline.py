"""Host pipeline: Pillow-equivalent geometry, per-host shards, exactly-once evaluation,
determinism, resuming mid-epoch, and skipping undecodable images."""

import io
import os
import re
import subprocess
import sys

import numpy as np
from PIL import Image
import pytest
import tensorflow as tf

from convnext_jax.data import image_ops
from convnext_jax.data import pipeline
import fake_tfds


def _photo(height=375, width=500, seed=0) -> np.ndarray:
  """ImageNet-sized test picture: gradients, edges, texture and noise."""
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[0:height, 0:width]
  image = np.stack([xx * 255 / width, yy * 255 / height, ((xx + 2 * yy) % 97) * 2.6], -1)
  image[height // 3:height // 2, width // 4:width // 2] = (250, 20, 40)
  image += rng.normal(0, 10, image.shape)
  return np.clip(image, 0, 255).astype(np.uint8)


def _pil_center_crop(image: Image.Image, size: int) -> Image.Image:
  left = int(round((image.width - size) / 2.0))
  top = int(round((image.height - size) / 2.0))
  return image.crop((left, top, left + size, top + size))


@pytest.mark.parametrize('height,width', [(375, 500), (500, 333)])
def test_eval_transform_matches_pillow(height, width):
  data = fake_tfds.jpeg_bytes(_photo(height, width))
  out = pipeline.EvalPreprocess(224, 0.875)(tf.constant(data)).numpy()
  assert out.shape == (224, 224, 3) and out.dtype == np.uint8
  # torchvision: Resize(256) keeps the aspect with int() on the long side, then CenterCrop.
  image = Image.open(io.BytesIO(data)).convert('RGB')
  short, long_side = min(height, width), max(height, width)
  new_long = int(256 * long_side / short)
  size = (new_long, 256) if width > height else (256, new_long)
  reference = np.asarray(_pil_center_crop(image.resize(size, Image.BICUBIC), 224))
  diff = np.abs(out.astype(int) - reference.astype(int))
  assert diff.max() <= 2 and diff.mean() < 0.2, (diff.max(), diff.mean())


@pytest.mark.parametrize('height,width,size,translation', [
    (375, 500, (256, 341), (0.0, 0.0)),  # Downscaling.
    (60, 90, (128, 300), (0.0, 0.0)),  # Upscaling, by different factors per axis.
    (334, 334, (224, 224), (-12.5, -40.25)),  # Translated, as a centre crop is.
    (7, 400, (224, 50), (3.0, 0.0)),  # Extreme aspect ratios.
])
def test_separable_resample_equals_scale_and_translate(height, width, size, translation):
  """The row/column passes compute what the single ScaleAndTranslate op computes."""
  image = tf.constant(_photo(height, width, seed=2))
  scale = tf.constant(size, tf.float32) / tf.constant([height, width], tf.float32)
  ours = image_ops._scale_and_translate(image, size, scale, translation).numpy()
  reference = tf.raw_ops.ScaleAndTranslate(
      images=tf.cast(image, tf.float32)[None], size=size, scale=scale,
      translation=tf.constant(translation), kernel_type='keyscubic', antialias=True)[0].numpy()
  assert ours.shape == (*size, 3)
  np.testing.assert_allclose(ours, reference, rtol=0, atol=1e-3)


@pytest.mark.parametrize('height,width,size,box', [
    (375, 500, (256, 341), (16, 58, 224, 224)),  # The 224/256 centre crop of a landscape.
    (500, 333, (384, 256), (80, 16, 224, 224)),  # Portrait.
    (60, 90, (128, 192), (0, 10, 128, 150)),  # Upscaling, touching the image's edge.
    (375, 500, (64, 85), (5, 7, 50, 60)),  # Strong downscaling, odd offsets.
])
def test_resize_crop_window_equals_resize_then_crop(height, width, size, box):
  data = fake_tfds.jpeg_bytes(_photo(height, width, seed=1))
  out = image_ops.resize_crop_window(tf.constant(data), tf.constant(size), tf.constant(box))
  full = image_ops.resize(image_ops.decode_rgb(tf.constant(data)), size).numpy()
  top, left, h, w = box
  diff = np.abs(out.numpy().astype(int) - full[top:top + h, left:left + w].astype(int))
  assert out.shape == (h, w, 3) and out.dtype == tf.uint8
  # Float rounding only: the decoded window reaches past the kernel's support.
  assert diff.max() <= 1 and diff.mean() < 0.01, (diff.max(), diff.mean())
  # Non-JPEG input (decoded whole, then cut) gives the same result.
  png = _encode_png(_photo(height, width, seed=1))
  from_png = image_ops.resize_crop_window(tf.constant(png), tf.constant(size), tf.constant(box))
  full_png = image_ops.resize(image_ops.decode_rgb(tf.constant(png)), size).numpy()
  diff = np.abs(from_png.numpy().astype(int) - full_png[top:top + h, left:left + w].astype(int))
  assert diff.max() <= 1 and diff.mean() < 0.01, (diff.max(), diff.mean())


def test_image_shape_reads_png_and_jpeg_headers():
  """Shapes come from the header, so a PNG is decoded once (by decode_and_crop), not twice."""
  for height, width in [(375, 500), (500, 333), (1, 300)]:
    png = _encode_png(_photo(height, width))
    np.testing.assert_array_equal(image_ops.image_shape(tf.constant(png)), [height, width, 3])
    # Only the header is read: the first 40 bytes of the file are enough.
    np.testing.assert_array_equal(image_ops.image_shape(tf.constant(png[:40])),
                                  [height, width, 3])
    jpeg = fake_tfds.jpeg_bytes(_photo(height, width))
    np.testing.assert_array_equal(image_ops.image_shape(tf.constant(jpeg[:1000])),
                                  [height, width, 3])
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


def test_eval_at_384_resizes_without_crop():
  assert pipeline.default_crop_pct(224) == 0.875 and pipeline.default_crop_pct(384) == 1.0
  data = fake_tfds.jpeg_bytes(_photo())
  out = pipeline.EvalPreprocess(384, 1.0)(tf.constant(data)).numpy()
  reference = np.asarray(Image.open(io.BytesIO(data)).convert('RGB').resize((384, 384),
                                                                            Image.BICUBIC))
  diff = np.abs(out.astype(int) - reference.astype(int))
  assert out.shape == (384, 384, 3) and diff.max() <= 2 and diff.mean() < 0.25


def test_random_resized_crop_window_statistics():
  windows = np.stack([
      image_ops.random_resized_crop_window([375, 500, 3], tf.constant([7, i])).numpy()
      for i in range(400)
  ])
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
  window = image_ops.random_resized_crop_window([10, 1000], tf.constant([0, 1]),
                                                scale=(0.9, 1.0)).numpy()
  np.testing.assert_array_equal(window, [0, (1000 - 13) // 2, 10, 13])
  window = image_ops.random_resized_crop_window([1000, 10], tf.constant([0, 1]),
                                                scale=(0.9, 1.0)).numpy()
  np.testing.assert_array_equal(window, [(1000 - 13) // 2, 0, 13, 10])


def test_train_crop_and_resize_match_pillow():
  data = fake_tfds.jpeg_bytes(_photo())
  preprocess = pipeline.TrainPreprocess(224, hflip=0.0, randaugment=None)
  seed = tf.constant([3, 11], tf.int64)
  out = preprocess(tf.constant(data), seed).numpy()
  crop_seed = tf.random.experimental.stateless_split(seed, 3)[0]
  top, left, h, w = image_ops.random_resized_crop_window([375, 500, 3], crop_seed).numpy()
  image = Image.open(io.BytesIO(data)).convert('RGB')
  reference = np.asarray(image.crop((left, top, left + w, top + h)).resize((224, 224),
                                                                           Image.BICUBIC))
  diff = np.abs(out.astype(int) - reference.astype(int))
  # The fused decode-and-crop differs only along the crop's edge columns (chroma upsampling).
  assert np.median(diff) == 0 and diff.mean() < 0.5, diff.mean()
  interior = diff[:, 8:-8]
  assert interior.max() <= 2


def test_flip_probability_and_determinism():
  image = tf.constant(np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3))
  flips = [bool(np.any(image_ops.random_flip(image, tf.constant([1, i])).numpy()
                       != image.numpy())) for i in range(400)]
  assert 0.43 < np.mean(flips) < 0.57


# ---------------------------------------------------------------------------------------
# Datasets built with tfds in the test.
# ---------------------------------------------------------------------------------------

NUM = 50


@pytest.fixture(scope='module')
def numbered(tmp_path_factory):
  examples = [(fake_tfds.jpeg_bytes(fake_tfds.numbered_image(i)), i % 5) for i in range(NUM)]
  return fake_tfds.build(tmp_path_factory.mktemp('tfds'), {'train': examples,
                                                           'validation': examples[:23]}, 5)


def _identity(images: np.ndarray) -> list[int]:
  """Recovers numbered_image's index from each (resampled) image's mean colour."""
  if not len(images):
    return []
  bases = np.array([[i % 251, (i * 7) % 251, (i * 13) % 251] for i in range(NUM)], np.float32)
  means = images.reshape(len(images), -1, 3).mean(axis=1)
  return [int(np.argmin(np.abs(bases - m).sum(axis=1))) for m in means]


@pytest.mark.parametrize('process_count', [2, 3])
def test_host_shards_are_disjoint_and_cover_the_split(numbered, process_count):
  covered = {}
  for index in range(process_count):
    shard = pipeline.host_shard(numbered, 'train', index, process_count)
    for file, skip, take in zip(shard.files, shard.skips, shard.takes):
      for record in range(skip, skip + take):
        assert (file, record) not in covered
        covered[(file, record)] = index
  sizes = [list(covered.values()).count(i) for i in range(process_count)]
  assert len(covered) == NUM and max(sizes) - min(sizes) <= 1


@pytest.mark.parametrize('process_count,batch', [(2, 4), (3, 5), (3, 16)])
def test_eval_counts_every_example_exactly_once(numbered, process_count, batch):
  preprocess = pipeline.EvalPreprocess(32, 0.875)
  seen, batch_counts = [], []
  for index in range(process_count):
    ds, num_batches = pipeline.eval_dataset(numbered, 'train', per_host_batch=batch,
                                            preprocess=preprocess, process_index=index,
                                            process_count=process_count)
    batches = list(ds.as_numpy_iterator())
    assert len(batches) == num_batches
    batch_counts.append(len(batches))
    for b in batches:
      assert b['image'].shape == (batch, 32, 32, 3)
      seen += _identity(b['image'][b['mask']])
      assert np.all(b['position'][~b['mask']] == -1)
      np.testing.assert_array_equal(b['label'][b['mask']] , np.array(
          _identity(b['image'][b['mask']])) % 5)
  assert len(set(batch_counts)) == 1  # Every process runs the same number of steps.
  assert sorted(seen) == list(range(NUM))


def _train_batches(builder, n, **kwargs):
  args = dict(per_host_batch=8, seed=0, preprocess=pipeline.TrainPreprocess(
      32, scale=(0.5, 1.0), randaugment=None))
  args.update(kwargs)
  ds = pipeline.train_dataset(builder, 'train', **args)
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
  epoch0, epoch1 = ids[:NUM], ids[NUM:2 * NUM]
  assert sorted(epoch0) == sorted(epoch1) == list(range(NUM))  # Each epoch sees all once,
  assert epoch0 != epoch1  # in a new order.


def test_resume_continues_the_stream(numbered):
  uninterrupted = _train_batches(numbered, 12)
  # Resume at step 7 (position 56 = epoch 1, offset 6): batches 7.. must be identical.
  resumed = _train_batches(numbered, 5, start_position=7 * 8)
  for a, b in zip(uninterrupted[7:], resumed):
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])


@pytest.mark.parametrize('process_count', [2, 3])
def test_hosts_read_disjoint_examples(numbered, process_count):
  per_host = [_train_batches(numbered, 2, per_host_batch=4, process_index=i,
                             process_count=process_count) for i in range(process_count)]
  ids = [set(i for b in host for i in _identity(b['image'])) for host in per_host]
  for a in range(process_count):
    for b in range(a + 1, process_count):
      assert not ids[a] & ids[b]


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
  ds, num_batches = pipeline.eval_dataset(builder, 'train', per_host_batch=4,
                                          preprocess=pipeline.EvalPreprocess(32, 1.0))
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


def test_input_benchmark_command(tmp_path):
  """`python -m convnext_jax.benchmark input` (docs/benchmarks.md) runs, times both pipelines
  on one core and on all cores, and reports them beside Pillow's."""
  result = subprocess.run(
      [sys.executable, '-m', 'convnext_jax.benchmark', 'input', '--images', '4', '--batch', '4',
       '--warmup', '4', '--iters', '8', '--repeats', '2'],
      capture_output=True, text=True, check=False, cwd=tmp_path,
      env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL='3'))
  assert result.returncode == 0, result.stderr[-2000:]
  assert 'intra-op threads: 1' in result.stdout, result.stdout
  rows = [line for line in result.stdout.splitlines() if line.lstrip().startswith(('train:',
                                                                                   'eval:'))]
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
  code = ('import tensorflow as tf\n'
          'from convnext_jax.data import pipeline\n'
          'pipeline.configure_tensorflow()\n'
          'assert tf.config.threading.get_intra_op_parallelism_threads() == 1\n'
          'assert not tf.config.get_visible_devices("GPU")\n'
          'print(int(tf.reduce_sum(tf.range(4))))\n')
  late = ('import tensorflow as tf\n'
          'from convnext_jax.data import pipeline\n'
          'print(int(tf.reduce_sum(tf.range(4))))\n'
          'pipeline.configure_tensorflow()\n'
          'assert tf.config.threading.get_intra_op_parallelism_threads() == 0\n')
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='3')
  for source, warns in ((code, False), (late, True)):
    result = subprocess.run([sys.executable, '-c', source], capture_output=True, text=True,
                            check=False, env=env)
    assert result.returncode == 0 and result.stdout.split() == ['6'], result.stderr[-2000:]
    assert ('intra-op thread pool' in result.stderr) == warns, result.stderr[-2000:]
