"""The same preprocessing on Pillow, as timm/torchvision run it: the benchmark's comparison.

Not used for training. `train_transform` is RandomResizedCrop (bicubic) -> horizontal flip
-> RandAugment (timm's op definitions and level mappings); `eval_transform` is Resize of
the shorter side -> CenterCrop (or a square resize at crop_pct 1). Both return uint8 arrays,
the form the tf.data pipeline hands to the device.
"""

import io
import math
import os
import time

import numpy as np
from PIL import Image
from PIL import ImageEnhance
from PIL import ImageOps

_BICUBIC = Image.Resampling.BICUBIC
_FILL = (124, 116, 104)


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
  return image.transform(image.size, Image.Transform.AFFINE, matrix, _BICUBIC, fillcolor=_FILL)


def _signed(value, rng):
  return -value if rng.random() > 0.5 else value


def _enhance(cls):
  return lambda im, m, rng: cls(im).enhance(max(0.1, 1.0 + _signed(m / 10 * 0.9, rng)))


def _posterize(image, bits):
  # ImageOps.posterize refuses 0 bits (magnitude 10); older Pillow, which timm was written
  # against, returned black. The LUT keeps that behaviour.
  mask = ~(2**(8 - bits) - 1) & 0xFF
  return image.point([v & mask for v in range(256)] * 3)


def _solarize_add(image, add):
  lut = [min(255, i + add) if i < 128 else i for i in range(256)]
  return image.point(lut * 3)


# timm's increasing RandAugment set: op(image, magnitude, rng).
_OPS = [
    lambda im, m, rng: ImageOps.autocontrast(im),
    lambda im, m, rng: ImageOps.equalize(im),
    lambda im, m, rng: ImageOps.invert(im),
    lambda im, m, rng: im.rotate(_signed(m / 10 * 30, rng), _BICUBIC, fillcolor=_FILL),
    lambda im, m, rng: _posterize(im, 4 - int(m / 10 * 4)),
    lambda im, m, rng: ImageOps.solarize(im, 256 - min(256, int(m / 10 * 256))),
    lambda im, m, rng: _solarize_add(im, min(128, int(m / 10 * 110))),
    _enhance(ImageEnhance.Color),
    _enhance(ImageEnhance.Contrast),
    _enhance(ImageEnhance.Brightness),
    _enhance(ImageEnhance.Sharpness),
    lambda im, m, rng: _affine(im, (1, _signed(m / 10 * 0.3, rng), 0, 0, 1, 0)),
    lambda im, m, rng: _affine(im, (1, 0, 0, _signed(m / 10 * 0.3, rng), 1, 0)),
    lambda im, m, rng: _affine(im, (1, 0, _signed(m / 10 * 0.45, rng) * im.size[0], 0, 1, 0)),
    lambda im, m, rng: _affine(im, (1, 0, 0, 0, 1, _signed(m / 10 * 0.45, rng) * im.size[1])),
]


def rand_augment(image, rng, magnitude=9.0, magnitude_std=0.5, num_layers=2, prob=0.5):
  """timm's RandAugment 'rand-m{magnitude}-mstd{std}-inc1' on a PIL image."""
  for op in rng.choice(len(_OPS), num_layers, replace=True):
    if rng.random() > prob:
      continue
    m = min(10.0, max(0.0, rng.normal(magnitude, magnitude_std)))
    image = _OPS[op](image, m, rng)
  return image


def train_transform(jpeg: bytes, rng, size: int = 224, randaugment: str | None = 'rand'):
  image = Image.open(io.BytesIO(jpeg)).convert('RGB')
  top, left, h, w = _rrc_window(image.width, image.height, rng)
  image = image.crop((left, top, left + w, top + h)).resize((size, size), _BICUBIC)
  if rng.random() < 0.5:
    image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
  if randaugment:
    image = rand_augment(image, rng)
  return np.asarray(image)


def eval_transform(jpeg: bytes, size: int = 224, crop_pct: float = 0.875):
  image = Image.open(io.BytesIO(jpeg)).convert('RGB')
  if crop_pct >= 1.0:
    return np.asarray(image.resize((size, size), _BICUBIC))
  short = int(size / crop_pct)
  if image.width <= image.height:
    new = (short, int(short * image.height / image.width))
  else:
    new = (int(short * image.width / image.height), short)
  image = image.resize(new, _BICUBIC)
  left = int(round((image.width - size) / 2.0))
  top = int(round((image.height - size) / 2.0))
  return np.asarray(image.crop((left, top, left + size, top + size)))


# A process pool's worker (the benchmark's Pillow pipeline on every core, as DataLoader
# workers run it): the images and settings, sent once by `init_worker`.
_WORKER = {}


def init_worker(jpegs, size: int, randaugment: str | None, crop_pct: float):
  _WORKER.update(jpegs=jpegs, size=size, randaugment=randaugment, crop_pct=crop_pct,
                 rng=np.random.default_rng(os.getpid()))


def worker_transform(task):
  """task (kind, index): ('train' or 'eval', image index) -> (uint8 array, CPU seconds)."""
  kind, index = task
  start = time.process_time()
  jpeg = _WORKER['jpegs'][index % len(_WORKER['jpegs'])]
  if kind == 'train':
    image = train_transform(jpeg, _WORKER['rng'], _WORKER['size'], _WORKER['randaugment'])
  else:
    image = eval_transform(jpeg, _WORKER['size'], _WORKER['crop_pct'])
  return image, time.process_time() - start
