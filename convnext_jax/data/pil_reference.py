"""The same preprocessing on Pillow, as timm/torchvision run it: the benchmark's comparison.

Not used for training. `train_transform` is RandomResizedCrop (bicubic) -> horizontal flip
-> RandAugment (timm's op definitions and level mappings); `eval_transform` is Resize of
the shorter side (or of both, 'squash') -> CenterCrop. Both return uint8 arrays,
the form the tf.data pipeline hands to the device.

`to_rgb` is the one conversion of a decoded image to 8-bit RGB that the dataset builders
(`datasets.image_codec`) and `convnext-predict` share, so that a 16-bit PNG gives the same
pixels in training and in prediction. This module does not import TensorFlow.
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

# Single-channel modes of 16-bit samples.
_UINT16_MODES = ('I;16', 'I;16L', 'I;16B', 'I;16N')
# Formats whose 32-bit mode 'I' can only hold 16-bit samples: Pillow opens 16-bit PGMs, and
# before version 10 16-bit grayscale PNGs, as 'I'.
_UINT16_AS_I_FORMATS = ('PNG', 'PPM')


def to_rgb(image: Image.Image) -> Image.Image:
  """`image.convert('RGB')`, with 16-bit grayscale reduced to 8 bits by keeping the high byte.

  Pillow's own conversion clips 16-bit samples at 255, which turns a 16-bit grayscale PNG
  white almost everywhere. Keeping the high byte (v >> 8) is what Pillow already does to
  16-bit RGB and RGBA PNGs, so an image gives the same pixels whether it was saved as 16-bit
  grayscale or 16-bit colour. 32-bit integer ('I' from TIFF) and float ('F') images still go
  through Pillow's conversion (values clipped to 0..255): their files do not say which value
  is white.

  Args:
    image: a freshly opened Pillow image (its `format` tells a 16-bit 'I' image apart).

  Returns:
    An 8-bit 'RGB' image.
  """
  if image.mode in _UINT16_MODES or (image.mode == 'I' and image.format in _UINT16_AS_I_FORMATS):
    high_bytes = np.asarray(image).astype(np.uint32) >> 8
    image = Image.fromarray(high_bytes.astype(np.uint8))
  return image.convert('RGB')


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
    lambda im, m, rng, _: im.rotate(_signed(m / 10 * 30, rng), _BICUBIC, fillcolor=_FILL),
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


def eval_transform(
    jpeg: bytes, size: int = 224, crop_pct: float = 0.875, crop_mode: str = 'center'
):
  """timm's evaluation transform: Resize(int(size / crop_pct)) of the shorter side
  ('center') or of both ('squash'), bicubic, then CenterCrop(size)."""
  image = to_rgb(Image.open(io.BytesIO(jpeg)))
  short = int(size / crop_pct)
  if crop_mode == 'squash':
    new = (short, short)
  elif image.width <= image.height:
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
