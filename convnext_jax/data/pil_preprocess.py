"""Preprocessing on Pillow, for code that must run without TensorFlow.

`eval_transform` is `convnext-predict`'s preprocessing: timm's evaluation transform, the one
`pipeline.EvalPreprocess` computes with TensorFlow ops for evaluation during training.
`to_rgb` is the one conversion of a decoded image to 8-bit RGB that the dataset builders
(`datasets.image_codec`) and `convnext-predict` share, so that a 16-bit PNG gives the same
pixels in training and in prediction.
"""

import io

import numpy as np
from PIL import Image

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


def eval_transform(
    encoded: bytes, size: int = 224, crop_pct: float = 0.875, crop_mode: str = 'center'
) -> np.ndarray:
  """timm's evaluation transform of an encoded image: uint8 (size, size, 3).

  Resize(int(size / crop_pct)) of the shorter side, the aspect ratio kept ('center'), or of
  both sides ('squash'), bicubic; then CenterCrop(size).
  """
  image = to_rgb(Image.open(io.BytesIO(encoded)))
  short = int(size / crop_pct)
  if crop_mode == 'squash':
    new = (short, short)
  elif image.width <= image.height:
    new = (short, int(short * image.height / image.width))
  else:
    new = (int(short * image.width / image.height), short)
  image = image.resize(new, Image.Resampling.BICUBIC)
  left = int(round((image.width - size) / 2.0))
  top = int(round((image.height - size) / 2.0))
  return np.asarray(image.crop((left, top, left + size, top + size)))
