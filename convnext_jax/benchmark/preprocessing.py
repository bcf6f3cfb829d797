"""`benchmark input`: training and evaluation preprocessing, tf.data beside Pillow.

  python -m convnext_jax.benchmark input [--images 256] [--size 224] [--batch 64] [--repeats 5]

Runs on ImageNet-sized JPEGs it generates, beside a Pillow implementation of the same
transforms (timm's, `pil_reference`): images/s on one CPU core, then on all cores as the
training pipelines run (Pillow in worker processes), with images/s per core; the median of
rounds that alternate between the two. The only benchmark that needs TensorFlow: it is
imported when the command runs, so that this module imports without it.
"""

import dataclasses
import os
import statistics
import time

import numpy as np

from convnext_jax.benchmark import common
from convnext_jax.benchmark import pil_reference
from convnext_jax.data import eval_crop


def _synthetic_jpegs(count: int, seed: int = 0) -> list[bytes]:
  """ImageNet-like JPEGs: about 500x375 (some portrait), quality 90, with gradients, shapes,
  texture and noise so that the encoder and RandAugment see photographic statistics."""
  import io  # pylint: disable=g-import-not-at-top

  from PIL import Image  # pylint: disable=g-import-not-at-top
  from PIL import ImageDraw  # pylint: disable=g-import-not-at-top
  from PIL import ImageFilter  # pylint: disable=g-import-not-at-top

  rng = np.random.default_rng(seed)
  images = []
  for i in range(count):
    width, height = (500, 375) if i % 4 else (375, 500)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    colors = rng.uniform(0, 255, (2, 3))
    t = xx * rng.uniform(-1, 1) + yy * rng.uniform(-1, 1)
    t = (t - t.min()) / (np.ptp(t) + 1e-6)
    array = colors[0] * t[..., None] + colors[1] * (1 - t[..., None])
    array += rng.normal(0, 12, array.shape)
    image = Image.fromarray(np.clip(array, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(6):
      x0, y0 = rng.integers(0, width - 40), rng.integers(0, height - 40)
      box = [x0, y0, x0 + rng.integers(20, 200), y0 + rng.integers(20, 200)]
      fill = tuple(int(c) for c in rng.integers(0, 256, 3))
      (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=fill)
    image = image.filter(ImageFilter.GaussianBlur(0.7))
    buffer = io.BytesIO()
    image.save(buffer, 'JPEG', quality=90)
    images.append(buffer.getvalue())
  return images


def _timed_images(next_batch, images: int) -> tuple[float, float]:
  """Calls next_batch() for `images` images; (images per second, CPU seconds per second)."""
  start, cpu = time.perf_counter(), time.process_time()
  done = 0
  while done < images:
    done += next_batch()
  wall = time.perf_counter() - start
  return done / wall, (time.process_time() - cpu) / wall


def _pil_parallel_round(
    pool, kind: str, start: int, images: int, batch: int
) -> tuple[float, float]:
  """`images` Pillow transforms in the pool's workers, collated into batches in this process;
  (images per second, CPU seconds per second of this process and the workers together)."""
  wall, cpu = time.perf_counter(), time.process_time()
  worker_cpu, pending, done = 0.0, [], 0
  tasks = [(kind, start + i) for i in range(images)]
  for image, seconds in pool.imap(pil_reference.worker_transform, tasks, chunksize=4):
    worker_cpu += seconds
    pending.append(image)
    if len(pending) == batch:
      done += len(np.stack(pending))
      pending = []
  done += len(pending)
  wall = time.perf_counter() - wall
  return done / wall, (time.process_time() - cpu + worker_cpu) / wall


def run(args) -> None:
  """Prints the versions, the settings and the tf.data and Pillow rows, one core then all."""
  import multiprocessing  # pylint: disable=g-import-not-at-top

  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  from convnext_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  from convnext_jax.data import randaugment  # pylint: disable=g-import-not-at-top

  if args.tf_default_threads:  # For comparison with TensorFlow's own thread pool sizing.
    tf.config.set_visible_devices([], 'GPU')
  else:  # As the training process does.
    pipeline.configure_tensorflow()
  cores = os.cpu_count()
  jpegs = _synthetic_jpegs(args.images)
  mean_kb = np.mean([len(j) for j in jpegs]) / 1024
  print(
      f'{args.images} synthetic JPEGs, 500x375 / 375x500, quality 90, mean {mean_kb:.0f} KB; '
      f'output batches of {args.batch} x {args.size}x{args.size}x3 uint8'
  )
  print(
      f'tensorflow {tf.__version__}, '
      + common.versions()
      + ', TensorFlow intra-op threads: '
      + ('default' if args.tf_default_threads else '1 (pipeline.configure_tensorflow)')
  )
  train = pipeline.TrainPreprocess(args.size, randaugment=args.randaugment)
  pil_randaugment = None  # The same RandAugment settings for the Pillow pipeline.
  if args.randaugment:
    config = randaugment.RandAugmentConfig.parse(args.randaugment)
    if not config.increasing:
      raise SystemExit(
          f"benchmark input: --randaugment {args.randaugment!r} uses timm's "
          'original op set, and the Pillow side implements the increasing one: '
          "add '-inc1'"
      )
    pil_randaugment = dataclasses.asdict(config)
    del pil_randaugment['increasing']
  evaluate = pipeline.EvalPreprocess(args.size, *eval_crop(args.size))

  def tf_dataset(fn, with_seed, parallel):
    ds = tf.data.Dataset.from_tensor_slices(jpegs).repeat().enumerate()
    if with_seed:
      example = lambda i, b: fn(b, tf.stack([tf.constant(0, tf.int64), i]))
    else:
      example = lambda i, b: fn(b)
    options = tf.data.Options()
    options.deterministic = True
    if parallel:  # As pipeline.train_dataset and eval_dataset run it.
      ds = ds.map(example, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
      return (
          ds.batch(args.batch, drop_remainder=True).prefetch(tf.data.AUTOTUNE).with_options(options)
      )
    options.threading.private_threadpool_size = 1
    options.threading.max_intra_op_parallelism = 1
    options.autotune.enabled = False
    # No graph rewrites: map_and_batch fusion would produce the next batch in the background,
    # on time that the timer (and the Pillow rounds it alternates with) does not see.
    options.experimental_optimization.apply_default_optimizations = False
    options.experimental_optimization.map_and_batch_fusion = False
    return ds.map(example).batch(args.batch).with_options(options)

  def tf_one_core(fn, with_seed):
    iterator = iter(tf_dataset(fn, with_seed, parallel=False))
    return lambda images: _timed_images(lambda: len(next(iterator)), images)

  def tf_all_cores(fn, with_seed):
    ds = tf_dataset(fn, with_seed, parallel=True)

    def timed_round(images):
      # A fresh iterator each round, so that no prefetching runs into Pillow's rounds.
      iterator = iter(ds)
      _timed_images(lambda: len(next(iterator)), args.batch * cores)
      return _timed_images(lambda: len(next(iterator)), images)

    return timed_round

  def pil_one_core(fn):
    # Like a PyTorch DataLoader worker: transform each image, then collate the batch.
    rng = np.random.default_rng(0)
    position = 0

    def next_batch():
      nonlocal position
      images = [fn(jpegs[(position + i) % len(jpegs)], rng) for i in range(args.batch)]
      position += args.batch
      return len(np.stack(images))

    return lambda images: _timed_images(next_batch, images)

  def pil_all_cores(pool, kind):
    position = 0

    def timed_round(images):
      nonlocal position
      _pil_parallel_round(pool, kind, position, args.batch * cores, args.batch)
      result = _pil_parallel_round(pool, kind, position + args.batch * cores, images, args.batch)
      position += args.batch * cores + images
      return result

    return timed_round

  spec = args.randaugment or 'none'
  train_name = f'train: decode+RRC, bicubic, flip, RandAugment {spec}'
  eval_name = (
      f'eval: resize {int(args.size / evaluate.crop_pct)} ({evaluate.crop_mode}), '
      'centre crop (fused)'
  )
  print(
      f'median of {args.repeats} rounds (after warm-up), tf.data and Pillow alternating; '
      '[min-max]; cores = CPU time / wall time, of all threads and worker processes'
  )
  print(
      f'one core: {args.iters} images per round; tf.data on one thread (private pool of 1, '
      'synchronous map), Pillow in a Python loop, np.stack per batch'
  )
  _compare(
      args,
      [
          (
              train_name,
              tf_one_core(train, True),
              pil_one_core(
                  lambda b, r: pil_reference.train_transform(b, r, args.size, pil_randaugment)
              ),
          ),
          (
              eval_name,
              tf_one_core(evaluate, False),
              pil_one_core(
                  lambda b, r: pil_reference.eval_transform(
                      b, args.size, evaluate.crop_pct, evaluate.crop_mode
                  )
              ),
          ),
      ],
      args.iters,
  )
  print(
      f'all {cores} cores: {args.iters * cores} images per round; tf.data as train_dataset '
      f'and eval_dataset run (parallel map, prefetch), Pillow in {cores} worker processes '
      '(as DataLoader workers) collated here; per core = img/s / cores'
  )
  context = multiprocessing.get_context('spawn')  # This process runs JAX and TF threads.
  with context.Pool(
      cores,
      pil_reference.init_worker,
      (jpegs, args.size, pil_randaugment, evaluate.crop_pct, evaluate.crop_mode),
  ) as pool:
    _compare(
        args,
        [
            (train_name, tf_all_cores(train, True), pil_all_cores(pool, 'train')),
            (eval_name, tf_all_cores(evaluate, False), pil_all_cores(pool, 'eval')),
        ],
        args.iters * cores,
    )


def _compare(args, rows, images: int):
  """Times each row's (tf.data, Pillow) round functions in alternation and prints them."""
  print(f'  {"pipeline":66s} {"tf.data img/s":>36s} {"Pillow img/s":>36s}')
  for name, tf_round, pil_round in rows:
    results = {'tf': [], 'pil': []}
    tf_round(args.warmup)
    pil_round(args.warmup)
    for _ in range(args.repeats):
      results['tf'].append(tf_round(images))
      results['pil'].append(pil_round(images))
    cells = []
    for key in ('tf', 'pil'):
      rates = [rate for rate, _ in results[key]]
      per_core = statistics.median(rate / c for rate, c in results[key])
      cores = statistics.median(c for _, c in results[key])
      cells.append(
          f'{statistics.median(rates):5.0f} [{min(rates):.0f}-{max(rates):.0f}] '
          f'{cores:4.2f} cores {per_core:4.0f}/core'
      )
    ratio = statistics.median(r for r, _ in results['tf']) / statistics.median(
        r for r, _ in results['pil']
    )
    print(f'  {name:66s} {cells[0]:>36s} {cells[1]:>36s}  x{ratio:.2f}')


def add_arguments(parser) -> None:
  parser.add_argument('--images', type=int, default=256, help='distinct JPEGs to generate')
  parser.add_argument('--size', type=int, default=224)
  parser.add_argument('--randaugment', default='rand-m9-mstd0.5-inc1')
  parser.add_argument('--batch', type=int, default=64, help='images per batch, as a host batch')
  parser.add_argument('--warmup', type=int, default=128, help='images before timing starts')
  parser.add_argument(
      '--iters',
      type=int,
      default=320,
      help='images per timed round on one core (times the core count on all cores)',
  )
  parser.add_argument('--repeats', type=int, default=5, help='timed rounds per pipeline')
  parser.add_argument(
      '--tf-default-threads',
      action='store_true',
      help="keep TensorFlow's default intra-op thread pool, for comparison",
  )
