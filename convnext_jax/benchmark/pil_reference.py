"""A reference for `benchmark input`: timm's training pipeline on Pillow.

Not used by training, evaluation or prediction. `train_transform` is what timm/torchvision
run: RandomResizedCrop (bicubic) -> horizontal flip -> RandAugment (timm's op definitions
and level mappings, with its increasing op set), returning the uint8 array the tf.data
pipeline hands to the device. The benchmark times it, and the evaluation transform
(`pil_preprocess.eval_transform`, which `convnext-predict` runs), on every core as
DataLoader workers would (`init_worker`, `worker_transform`), beside the tf.data pipelines.
This module does not import TensorFlow.
"""

import io
import math
import os
import time

import numpy as np
from PIL import Image
from PIL import ImageEnhance
from PIL import ImageOps

from convnext_jax.data import IMAGENET_MEAN_FILL
from convnext_jax.data.pil_preprocess import eval_transform
from convnext_jax.image_io import to_rgb

_BICUBIC = Image.Resampling.BICUBIC


def _rrc_window(width, height, rng, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
  area = width * height
  for _ in range(10):
    target = area * rng.uniform(*scale)
    aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
    w = int(round(math.sqrt(target * aspect)))
    h = int(round(math.sqrt(target / aspect)))
    if 0 < w <= width and 0 < h <= height:
      return rng.integers(0, height - h + 1), rng.integers(0, width - w + 1), h, w
  in_ratio = width / height
  w, h = width, height
  if in_ratio < ratio[0]:
    h = int(round(width / ratio[0]))
  elif in_ratio > ratio[1]:
    w = int(round(height * ratio[1]))
  return (height - h) // 2, (width - w) // 2, h, w


def _affine(image, matrix):
  return image.transform(
      image.size, Image.Transform.AFFINE, matrix, _BICUBIC, fillcolor=IMAGENET_MEAN_FILL
  )


def _signed(value, rng):
  return -value if rng.random() > 0.5 else value


def _enhance(cls):
  return lambda im, m, rng, _: cls(im).enhance(max(0.1, 1.0 + _signed(m / 10 * 0.9, rng)))


def _posterize(image, bits):
  # ImageOps.posterize refuses 0 bits (magnitude 10); older Pillow, which timm was written
  # against, returned black. The LUT keeps that behaviour.
  mask = ~(2 ** (8 - bits) - 1) & 0xFF
  return image.point([v & mask for v in range(256)] * 3)


def _solarize_add(image, add):
  lut = [min(255, i + add) if i < 128 else i for i in range(256)]
  return image.point(lut * 3)


# timm's increasing RandAugment set: op(image, magnitude, rng, translate_pct).
_OPS = [
    lambda im, m, rng, _: ImageOps.autocontrast(im),
    lambda im, m, rng, _: ImageOps.equalize(im),
    lambda im, m, rng, _: ImageOps.invert(im),
    lambda im, m, rng, _: im.rotate(
        _signed(m / 10 * 30, rng), _BICUBIC, fillcolor=IMAGENET_MEAN_FILL
    ),
    lambda im, m, rng, _: _posterize(im, 4 - int(m / 10 * 4)),
    lambda im, m, rng, _: ImageOps.solarize(im, 256 - min(256, int(m / 10 * 256))),
    lambda im, m, rng, _: _solarize_add(im, min(128, int(m / 10 * 110))),
    _enhance(ImageEnhance.Color),
    _enhance(ImageEnhance.Contrast),
    _enhance(ImageEnhance.Brightness),
    _enhance(ImageEnhance.Sharpness),
    lambda im, m, rng, _: _affine(im, (1, _signed(m / 10 * 0.3, rng), 0, 0, 1, 0)),
    lambda im, m, rng, _: _affine(im, (1, 0, 0, _signed(m / 10 * 0.3, rng), 1, 0)),
    lambda im, m, rng, t: _affine(im, (1, 0, _signed(m / 10 * t, rng) * im.size[0], 0, 1, 0)),
    lambda im, m, rng, t: _affine(im, (1, 0, 0, 0, 1, _signed(m / 10 * t, rng) * im.size[1])),
]


def rand_augment(
    image,
    rng,
    num_layers=2,
    magnitude=9.0,
    magnitude_std=0.5,
    magnitude_max=10.0,
    prob=0.5,
    translate_pct=0.45,
):
  """timm's RandAugment with its increasing op set ('inc1') on a PIL image; the defaults
  are 'rand-m9-mstd0.5-inc1', the arguments `randaugment.RandAugmentConfig`'s fields."""
  for op in rng.choice(len(_OPS), num_layers, replace=True):
    if rng.random() > prob:
      continue
    if magnitude_std == math.inf:  # timm's mstd > 100: uniform in [0, m].
      m = rng.uniform(0.0, magnitude)
    elif magnitude_std > 0:
      m = rng.normal(magnitude, magnitude_std)
    else:
      m = magnitude
    image = _OPS[op](image, min(magnitude_max, max(0.0, m)), rng, translate_pct)
  return image


def train_transform(jpeg: bytes, rng, size: int = 224, randaugment: dict | None = None):
  """RandomResizedCrop -> flip -> RandAugment (`rand_augment(**randaugment)`, if given)."""
  image = to_rgb(Image.open(io.BytesIO(jpeg)))
  top, left, h, w = _rrc_window(image.width, image.height, rng)
  image = image.crop((left, top, left + w, top + h)).resize((size, size), _BICUBIC)
  if rng.random() < 0.5:
    image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
  if randaugment is not None:
    image = rand_augment(image, rng, **randaugment)
  return np.asarray(image)


# A process pool's worker (the benchmark's Pillow pipeline on every core, as DataLoader
# workers run it): the images and settings, sent once by `init_worker`.
_WORKER = {}


def init_worker(
    jpegs, size: int, randaugment: dict | None, crop_pct: float, crop_mode: str = 'center'
):
  _WORKER.update(
      jpegs=jpegs,
      size=size,
      randaugment=randaugment,
      crop_pct=crop_pct,
      crop_mode=crop_mode,
      rng=np.random.default_rng(os.getpid()),
  )


def worker_transform(task):
  """task (kind, index): ('train' or 'eval', image index) -> (uint8 array, CPU seconds)."""
  kind, index = task
  start = time.process_time()
  jpeg = _WORKER['jpegs'][index % len(_WORKER['jpegs'])]
  if kind == 'train':
    image = train_transform(jpeg, _WORKER['rng'], _WORKER['size'], _WORKER['randaugment'])
  else:
    image = eval_transform(jpeg, _WORKER['size'], _WORKER['crop_pct'], _WORKER['crop_mode'])
  return image, time.process_time() - start
