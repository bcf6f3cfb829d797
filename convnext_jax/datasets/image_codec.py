"""Image bytes as the input pipeline wants them: RGB (or grayscale) JPEG, shared by the builders.

The input pipeline decodes with `tf.image.decode_and_crop_jpeg(..., channels=3)`, which reads
RGB and grayscale JPEGs but not CMYK ones (ImageNet has a few), and no other format (ImageNet
has a PNG named `.JPEG`). So at build time such images are re-encoded to RGB JPEG, once, and
every other JPEG is kept byte for byte. Files that Pillow cannot decode in full (truncated,
corrupt, not an image) are reported so that the caller skips them instead of failing a build
that may have run for hours.
"""

import dataclasses
import enum
import io

from absl import logging
from PIL import Image

from convnext_jax import image_io

# High enough that re-encoding (a handful of ImageNet images, or a user's PNGs) loses little.
JPEG_QUALITY = 95

# Modes that `decode_jpeg(channels=3)` turns into the right RGB pixels.
_PLAIN_JPEG_MODES = ('RGB', 'L')


class Outcome(enum.Enum):
  """What `to_rgb_jpeg` did with one file."""

  KEPT = 'kept'  # Already an RGB or grayscale JPEG: stored unchanged.
  REENCODED = 'reencoded'  # Another format or colour space: converted to RGB JPEG.
  SKIPPED = 'skipped'  # Could not be decoded: leave it out of the dataset.


def to_rgb_jpeg(data: bytes, *, quality: int = JPEG_QUALITY) -> tuple[bytes | None, Outcome]:
  """Returns `data` as JPEG bytes that decode to RGB, and what was done to get them.

  RGB and grayscale JPEGs come back unchanged. Anything else Pillow can read (CMYK JPEG, PNG,
  GIF, BMP, TIFF, WebP, ...) is converted with `Image.convert('RGB')`, as torchvision's
  `ImageFolder` loader does, so a transparent area shows its stored colour, and the first frame
  of an animation is used; except that 16-bit grayscale keeps the high byte of each sample
  (`image_io.to_rgb`, which `convnext-predict` uses too) where Pillow would clip it to
  white. EXIF orientation is ignored, as `tf.io.decode_jpeg` ignores it.

  Args:
    data: the encoded file.
    quality: JPEG quality of re-encoded images.

  Returns:
    `(jpeg_bytes, outcome)`; `jpeg_bytes` is None when `outcome` is `Outcome.SKIPPED`.
  """
  try:
    with Image.open(io.BytesIO(data)) as image:
      if image.format == 'JPEG' and image.mode in _PLAIN_JPEG_MODES:
        # Decoding at 1/8 scale still reads every entropy-coded byte, so a truncated or
        # corrupt file fails here as it would in full, at a fraction of the IDCT cost.
        image.draft(image.mode, (1, 1))
        image.load()
        return data, Outcome.KEPT
      rgb = image_io.to_rgb(image)
    buffer = io.BytesIO()
    rgb.save(buffer, format='JPEG', quality=quality)
    return buffer.getvalue(), Outcome.REENCODED
  # Pillow raises many exception types for bad files (OSError, SyntaxError, ValueError,
  # DecompressionBombError, ...); one bad file among millions must not end a build.
  except Exception as e:  # pylint: disable=broad-except
    logging.log_every_n(
        logging.WARNING, 'Skipping an undecodable image (%s: %s).', 100, type(e).__name__, e
    )
    return None, Outcome.SKIPPED


@dataclasses.dataclass
class OutcomeCounts:
  """How many images of one split were kept, re-encoded and skipped."""

  kept: int = 0
  reencoded: int = 0
  skipped: int = 0

  def add(self, outcome: Outcome) -> None:
    setattr(self, outcome.value, getattr(self, outcome.value) + 1)

  def log(self, what: str) -> None:
    """Logs the counts, as a warning when images were skipped."""
    level = logging.WARNING if self.skipped else logging.INFO
    logging.log(
        level,
        '%s: %d images kept as they were, %d re-encoded to RGB JPEG, %d skipped as undecodable.',
        what,
        self.kept,
        self.reencoded,
        self.skipped,
    )
