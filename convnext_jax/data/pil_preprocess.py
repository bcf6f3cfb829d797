"""Preprocessing on Pillow, for code that must run without TensorFlow.

`eval_transform` is `convnext-predict`'s preprocessing: timm's evaluation transform, the one
`pipeline.EvalPreprocess` computes with TensorFlow ops for evaluation during training. It
decodes with `image_io.to_rgb`, as the dataset builders do, so that a 16-bit PNG gives the
same pixels in training and in prediction.
"""

import io

import numpy as np
from PIL import Image

from convnext_jax.image_io import to_rgb


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
