"""Benchmarks that print the figures recorded in docs/benchmarks.md (never timed tests).

  python -m convnext_jax.benchmark forward [--model convnext_tiny] [--batch 8] [--size 224]
      Forward img/s of the jitted Flax model beside PyTorch eager (transformers' ConvNext,
      same weights) in this one process; float32.
  python -m convnext_jax.benchmark train|infer [--model convnext_tiny] [--batch 32] [--size 224]
      [--dtype float32|bfloat16] [--remat POLICY] [--scan] [--mesh -1,1,1] [--compare torch]
      [--json FILE]
      The trainer's jitted step (or the forward) on any backend: img/s, step ms, compile s,
      TFLOP/s from XLA's cost analysis, MFU, memory; beside PyTorch (`step_benchmark`).
  python -m convnext_jax.benchmark compile [--model convnext_xlarge,...] [--batch 1]
      [--size 224] [--dtype float32|bfloat16] [--remat POLICY] [--depthwise-impl auto|conv]
      [--json FILE]
      Lowering and compile seconds of forward+backward from abstract params, without and with
      `scan=True` (`step_benchmark`).
  python -m convnext_jax.benchmark convert [--model convnext_xlarge] [--workdir DIR]
      Writes a random official .pth of the model, then times `convnext-convert import` and
      `export` (official, timm, hf), each in a fresh process, with its peak resident memory.
  python -m convnext_jax.benchmark input [--images 256] [--size 224] [--batch 64] [--repeats 5]
      Training and evaluation preprocessing on ImageNet-sized JPEGs it generates, beside a
      Pillow implementation of the same transforms (timm's): images/s on one CPU core, then
      on all cores as the training pipelines run (Pillow in worker processes), with images/s
      per core; the median of rounds that alternate between the two.

`forward` and `convert` need torch (and transformers for `forward`) and import no
TensorFlow; `input` imports TensorFlow.
"""

import argparse
import dataclasses
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from convnext_jax import convert
from convnext_jax import models
from convnext_jax import step_benchmark
from convnext_jax.data import eval_crop
from convnext_jax.data import pil_reference


def _cpu() -> str:
  """The CPU as Linux names it (model, family/model numbers, SIMD level), or the platform's
  name elsewhere: hosts of the same kind differ, and figures are comparable only on one."""
  try:
    with open('/proc/cpuinfo', encoding='utf-8') as f:
      info = dict(
          line.split(':', 1) for line in f.read().split('\n\n')[0].splitlines() if ':' in line
      )
  except OSError:
    return platform.processor() or platform.machine()
  info = {key.strip(): value.strip() for key, value in info.items()}
  details = [f'{key} {info[key]}' for key in ('cpu family', 'model') if key in info]
  if 'flags' in info:  # x86: the widest vector extension.
    flags = set(info['flags'].split())
    details.append(next((f for f in ('avx512f', 'avx2', 'avx') if f in flags), 'no AVX'))
  return f"{info.get('model name', '')} ({', '.join(details)})".lstrip()


def versions() -> str:
  import flax  # pylint: disable=g-import-not-at-top

  try:
    import torch  # pylint: disable=g-import-not-at-top

    torch_version = torch.__version__
  except ImportError:  # Optional: only `forward` and `convert` need it.
    torch_version = 'not installed'
  return (
      f'python {platform.python_version()}, jax {jax.__version__}, flax {flax.__version__}, '
      f'torch {torch_version}, {os.cpu_count()} CPU cores, {platform.machine()} {_cpu()}, '
      f'jax backend {jax.default_backend()}'
  )


def bench_forward(args):
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top

  spec = models.get_spec(args.model)
  config_cls, model_cls = (
      (transformers.ConvNextV2Config, transformers.ConvNextV2ForImageClassification)
      if spec.use_grn
      else (transformers.ConvNextConfig, transformers.ConvNextForImageClassification)
  )
  torch.manual_seed(0)
  hf = model_cls(
      config_cls(
          hidden_sizes=list(spec.dims),
          depths=list(spec.depths),
          num_labels=1000,
          layer_norm_eps=1e-6,
      )
  ).eval()
  _, params = convert.torch_to_flax(hf.state_dict())
  params = jax.device_put(params)
  images = (
      np.random.default_rng(0)
      .standard_normal((args.batch, 3, args.size, args.size))
      .astype(np.float32)
  )
  images_nhwc = jnp.asarray(images.transpose(0, 2, 3, 1))
  images_torch = torch.from_numpy(images)

  print(versions())
  print(
      f'{args.model} forward, batch {args.batch}, {args.size}x{args.size}, float32; torch '
      f'threads {torch.get_num_threads()}; median of {args.iters} after {args.warmup} warm-up'
  )
  results = {}
  variants = [
      ('auto', models.compiler_options(), ''),
      ('auto', None, ', XLA default options'),
      ('conv', models.compiler_options(), ''),
  ]
  for impl, options, note in variants:
    model = models.create_model(args.model, depthwise_impl=impl)
    fn = jax.jit(lambda p, x, model=model: model.apply({'params': p}, x), compiler_options=options)
    logits = fn(params, images_nhwc).block_until_ready()
    seconds = step_benchmark.time_calls(
        lambda fn=fn: fn(params, images_nhwc).block_until_ready(), args.warmup, args.iters
    )
    results[f'jax (depthwise {impl}{note})'] = (seconds, np.asarray(logits))
  with torch.inference_mode():
    torch_logits = hf(images_torch).logits.numpy()
    seconds = step_benchmark.time_calls(lambda: hf(images_torch), args.warmup, args.iters)
  results['torch eager (transformers)'] = (seconds, torch_logits)

  torch_seconds = results['torch eager (transformers)'][0]
  for name, (seconds, logits) in results.items():
    diff = np.abs(logits - torch_logits).max()
    print(
        f'  {name:42s} {args.batch / seconds:8.1f} img/s  {seconds * 1e3:8.1f} ms/batch  '
        f'x{torch_seconds / seconds:5.2f} vs torch  max|dlogits| {diff:.1e}'
    )


def _child_peak_rss_mb(argv) -> tuple[float, float]:
  """Runs argv in a fresh process; returns (seconds, peak RSS in MB of that process)."""
  code = (
      'import resource, runpy, sys, time; sys.argv = sys.argv[1:]; t = time.perf_counter()\n'
      'try:\n  runpy.run_module(sys.argv[0], run_name="__main__")\n'
      'except SystemExit as e:\n  assert not e.code, e.code\n'
      'print("BENCH", time.perf_counter() - t, '
      'resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, file=sys.stderr)\n'
  )
  result = subprocess.run(
      [sys.executable, '-c', code, *argv],
      capture_output=True,
      text=True,
      check=False,
      env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL='3'),
  )
  if result.returncode:
    raise RuntimeError(result.stderr)
  line = [l for l in result.stderr.splitlines() if l.startswith('BENCH')][-1]
  _, seconds, rss = line.split()
  return float(seconds), float(rss)


def bench_convert(args):
  import torch  # pylint: disable=g-import-not-at-top

  workdir = args.workdir or tempfile.mkdtemp(prefix='convnext_bench_')
  src = os.path.join(workdir, f'{args.model}_official.pth')
  print(versions())
  shapes = models.param_shapes(models.create_model(args.model))
  maps = convert.layouts.tensor_maps(args.model, 1000, 'official')
  rng = np.random.default_rng(0)
  state_dict = {
      m.torch_key: torch.from_numpy(
          rng.standard_normal(m.torch_shape, dtype=np.float32) * np.float32(0.02)
      )
      for m in maps
  }
  torch.save({'model': state_dict}, src)
  del state_dict
  size_mb = os.path.getsize(src) / 2**20
  print(
      f'{args.model}: {models.count_params(shapes):,} parameters, official .pth '
      f'{size_mb:.0f} MB (float32); each step a fresh `python -m convnext_jax.convert` '
      'process, time includes its imports'
  )
  ckpt = os.path.join(workdir, 'orbax')
  steps = [
      ('import official .pth -> orbax', ['import', src, ckpt]),
      ('export orbax -> official .pth', ['export', ckpt, os.path.join(workdir, 'o.pth')]),
      (
          'export orbax -> timm .safetensors',
          ['export', ckpt, os.path.join(workdir, 'o.safetensors')],
      ),
      ('export orbax -> hf directory', ['export', ckpt, os.path.join(workdir, 'hf')]),
  ]
  for name, argv in steps:
    seconds, rss = _child_peak_rss_mb(['convnext_jax.convert', *argv, '--overwrite'])
    print(
        f'  {name:36s} {seconds:6.1f} s   peak RSS {rss:7.0f} MB = '
        f'{rss / size_mb:4.2f}x the checkpoint'
    )
  if not args.workdir:
    import shutil  # pylint: disable=g-import-not-at-top

    shutil.rmtree(workdir)


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


def bench_input(args):
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
      + versions()
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


def main(argv=None):
  parser = argparse.ArgumentParser(prog='python -m convnext_jax.benchmark')
  sub = parser.add_subparsers(dest='command', required=True)
  p = sub.add_parser('forward', help='Flax vs PyTorch eager forward throughput')
  # Against transformers' ConvNeXt: the ConvNeXt zoo only.
  p.add_argument('--model', default='convnext_tiny', choices=models.list_models('convnext*'))
  p.add_argument('--batch', type=int, default=8)
  p.add_argument('--size', type=int, default=224)
  p.add_argument('--warmup', type=int, default=2)
  p.add_argument('--iters', type=int, default=10)
  p.set_defaults(run=bench_forward)
  p = sub.add_parser('train', help="the trainer's jitted step: img/s, FLOPs, MFU, memory")
  step_benchmark.add_arguments(p)
  p.set_defaults(run=lambda args: step_benchmark.run(args, True, versions()))
  p = sub.add_parser('infer', help='the jitted forward: img/s, FLOPs, MFU, memory')
  step_benchmark.add_arguments(p)
  p.set_defaults(run=lambda args: step_benchmark.run(args, False, versions()))
  p = sub.add_parser(
      'compile',
      help='forward+backward lowering and compile s, without and with scan over blocks',
  )
  step_benchmark.add_compile_arguments(p)
  p.set_defaults(run=lambda args: step_benchmark.run_compile(args, versions()))
  p = sub.add_parser('convert', help='conversion time and peak memory')
  p.add_argument('--model', default='convnext_xlarge', choices=models.list_models())
  p.add_argument('--workdir', help='keep the files here (default: a temporary directory)')
  p.set_defaults(run=bench_convert)
  p = sub.add_parser('input', help='preprocessing images/s per CPU core, tf.data vs Pillow')
  p.add_argument('--images', type=int, default=256, help='distinct JPEGs to generate')
  p.add_argument('--size', type=int, default=224)
  p.add_argument('--randaugment', default='rand-m9-mstd0.5-inc1')
  p.add_argument('--batch', type=int, default=64, help='images per batch, as a host batch')
  p.add_argument('--warmup', type=int, default=128, help='images before timing starts')
  p.add_argument(
      '--iters',
      type=int,
      default=320,
      help='images per timed round on one core (times the core count on all cores)',
  )
  p.add_argument('--repeats', type=int, default=5, help='timed rounds per pipeline')
  p.add_argument(
      '--tf-default-threads',
      action='store_true',
      help="keep TensorFlow's default intra-op thread pool, for comparison",
  )
  p.set_defaults(run=bench_input)
  args = parser.parse_args(argv)
  args.run(args)


if __name__ == '__main__':
  main()
