"""The one conversion of a decoded image to 8-bit RGB, shared by the dataset builders
(`datasets.image_codec`) and prediction (`data.pil_preprocess`), so that an image gives the
same pixels in training and in prediction. Pillow and NumPy only.
"""

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
