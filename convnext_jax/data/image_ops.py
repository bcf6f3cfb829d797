"""Host-side image ops on TensorFlow: fused JPEG decode and crop, Pillow-equivalent resizing.

Every op takes encoded bytes or uint8 (H, W, 3) tensors, runs eagerly and inside
`tf.data.Dataset.map`, and draws randomness only from stateless ops seeded by the caller, so
an example's augmentation is a function of (seed, its position in the stream).

The geometry follows torchvision/timm on PIL images, which the official ConvNeXt recipe
uses: RandomResizedCrop's sampling and fallback, `Resize(int)`'s shorter-side rule, and
CenterCrop's rounding. Resizing is Pillow's bicubic: antialiased (kernel widened when
downscaling), one pass per axis in Pillow's order, each rounded and clipped to 8 bits.
"""

import math

import tensorflow as tf

# For the data package's traced functions: they have no tensor-dependent Python control flow,
# so autograph's source conversion would only make tracing them (in tf.data or tf.function)
# several times slower.
no_autograph = tf.autograph.experimental.do_not_convert


def random_resized_crop_window(
    image_shape, seed, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), attempts: int = 10
):
  """torchvision's RandomResizedCrop window: (top, left, height, width), int32.

  Up to `attempts` draws of an area fraction in `scale` and a log-uniform aspect ratio in
  `ratio`; the first whose (rounded) box fits is used, at a uniform position. If none fits,
  the centre crop of the whole image with its aspect ratio clamped into `ratio`.

  Args:
    image_shape: (height, width, ...) of the image, a tensor or sequence.
    seed: shape-[2] integer tensor for stateless random ops.
    scale: range of the crop area as a fraction of the image area.
    ratio: range of the crop aspect ratio (width / height).
    attempts: number of tries before the fallback.
  """
  height = tf.cast(image_shape[0], tf.float32)
  width = tf.cast(image_shape[1], tf.float32)
  area_seed, ratio_seed, top_seed, left_seed = tf.unstack(
      tf.random.experimental.stateless_split(seed, 4)
  )
  target_area = (
      height
      * width
      * tf.random.stateless_uniform([attempts], area_seed, minval=scale[0], maxval=scale[1])
  )
  log_ratio = tf.random.stateless_uniform(
      [attempts], ratio_seed, minval=math.log(ratio[0]), maxval=math.log(ratio[1])
  )
  aspect = tf.exp(log_ratio)
  # Python's round() (used by torchvision) rounds half to even, as tf.round does.
  w = tf.round(tf.sqrt(target_area * aspect))
  h = tf.round(tf.sqrt(target_area / aspect))
  fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
  first = tf.argmax(tf.cast(fits, tf.int32))  # Index of the first fitting attempt.
  in_ratio = width / height
  fallback_w = tf.where(in_ratio > ratio[1], tf.round(height * ratio[1]), width)
  fallback_h = tf.where(in_ratio < ratio[0], tf.round(width / ratio[0]), height)
  found = tf.reduce_any(fits)
  crop_h = tf.cast(tf.where(found, h[first], fallback_h), tf.int32)
  crop_w = tf.cast(tf.where(found, w[first], fallback_w), tf.int32)
  height_i = tf.cast(image_shape[0], tf.int32)
  width_i = tf.cast(image_shape[1], tf.int32)
  # Uniform integer offsets in [0, H - h] and [0, W - w], inclusive.
  top = tf.random.stateless_uniform(
      [], top_seed, minval=0, maxval=height_i - crop_h + 1, dtype=tf.int32
  )
  left = tf.random.stateless_uniform(
      [], left_seed, minval=0, maxval=width_i - crop_w + 1, dtype=tf.int32
  )
  top = tf.where(found, top, (height_i - crop_h) // 2)
  left = tf.where(found, left, (width_i - crop_w) // 2)
  return tf.stack([top, left, crop_h, crop_w])


# TensorFlow's default JPEG IDCT is libjpeg's fast integer one; the accurate one gives
# Pillow's pixels (tests/test_pipeline.py) and is no slower.
_DCT_METHOD = 'INTEGER_ACCURATE'


def decode_rgb(image_bytes):
  """Decodes JPEG, PNG, GIF or BMP bytes to uint8 (H, W, 3); grayscale and CMYK become RGB."""
  return tf.cond(
      tf.io.is_jpeg(image_bytes),
      lambda: tf.io.decode_jpeg(image_bytes, channels=3, dct_method=_DCT_METHOD),
      lambda: tf.io.decode_image(image_bytes, channels=3, expand_animations=False),
  )


_PNG_SIGNATURE = b'\x89PNG\r\n\x1a\n'


def _png_shape(image_bytes):
  """(height, width, 3) from a PNG's IHDR chunk: big-endian width and height at bytes 16-23."""
  fields = tf.cast(tf.io.decode_raw(tf.strings.substr(image_bytes, 16, 8), tf.uint8), tf.int32)
  fields = tf.reshape(fields, [2, 4])
  width_height = tf.reduce_sum(fields * tf.constant([1 << 24, 1 << 16, 1 << 8, 1]), axis=1)
  return tf.stack([width_height[1], width_height[0], 3])


def image_shape(image_bytes):
  """(height, width, channels) of encoded image bytes from the header for JPEG and PNG, so
  that the pixels are decoded once, by `decode_and_crop`; other formats are decoded for it.

  Channels are the file's for JPEG (1, 3 or 4) and 3 otherwise; callers use height and width.
  """
  is_png = tf.equal(tf.strings.substr(image_bytes, 0, len(_PNG_SIGNATURE)), _PNG_SIGNATURE)
  # A PNG header shorter than its IHDR fields is left to the decoder's error.
  is_png &= tf.strings.length(image_bytes) >= 24
  return tf.case(
      [
          (tf.io.is_jpeg(image_bytes), lambda: tf.image.extract_jpeg_shape(image_bytes)),
          (is_png, lambda: _png_shape(image_bytes)),
      ],
      default=lambda: tf.shape(decode_rgb(image_bytes)),
  )


# The fused JPEG decode upsamples chroma without the neighbours outside its window, which
# changes its edge pixels (up to ~25 levels): decoding this many more pixels on each side, one
# MCU of 4:2:0 chroma, and cutting them off gives the whole-image decode's pixels.
_JPEG_WINDOW_MARGIN = 16


def decode_and_crop(image_bytes, window, shape=None):
  """Decodes only the `window` (top, left, height, width) of an image to uint8 (h, w, 3),
  with the pixels of decoding it whole and then cropping.

  JPEGs use the fused `decode_and_crop_jpeg`, which skips the DCT work outside its window
  (here the window and a margin, cut off after); other formats (ImageNet has a PNG named
  .JPEG) are decoded whole, then cropped.

  Args:
    image_bytes: encoded image.
    window: int32 (top, left, height, width) inside the image.
    shape: the image's `image_shape`, if the caller has it already (else read here).
  """
  window = tf.cast(window, tf.int32)

  def jpeg():
    image_size = tf.cast((image_shape(image_bytes) if shape is None else shape)[:2], tf.int32)
    start = tf.maximum(window[:2] - _JPEG_WINDOW_MARGIN, 0)
    stop = tf.minimum(window[:2] + window[2:] + _JPEG_WINDOW_MARGIN, image_size)
    wide = tf.image.decode_and_crop_jpeg(
        image_bytes, tf.concat([start, stop - start], 0), channels=3, dct_method=_DCT_METHOD
    )
    return tf.slice(wide, tf.concat([window[:2] - start, [0]], 0), tf.concat([window[2:], [3]], 0))

  def other():
    image = decode_rgb(image_bytes)
    return tf.slice(image, [window[0], window[1], 0], [window[2], window[3], 3])

  return tf.cond(tf.io.is_jpeg(image_bytes), jpeg, other)


def _round_like_pillow(values):
  """A resampling pass's result as Pillow stores it, 8 bits, rounded half up and clipped to
  [0, 255]; kept in float32 (whole numbers) for the next pass, cast to uint8 after the last."""
  return tf.clip_by_value(tf.floor(values + 0.5), 0.0, 255.0)


def _resample_rows(rows, size, scale, translation):
  """Resamples (N, M) along its first axis to (size, M) float32: `ScaleAndTranslate` with the
  M values of a row passed as one pixel's channels.

  TensorFlow's CPU kernel runs its innermost loop over channels, so with 3 channels it is
  scalar code; with a whole row as the channels it is a vectorised weighted sum of rows. The
  other axis has size 1 and scale 1, where the kernel's single tap has weight 1 exactly.
  """
  out = tf.raw_ops.ScaleAndTranslate(
      images=rows[None, :, None, :],
      size=tf.stack([size, 1]),
      scale=tf.stack([scale, 1.0]),
      translation=tf.stack([translation, 0.0]),
      kernel_type='keyscubic',
      antialias=True,
  )
  return out[0, :, 0, :]


def _vertical_pass(image, size, scale, translation):
  """(H, W, 3) uint8 or float32 -> float32 (size, W, 3): one pass down the columns, rounded
  to whole levels as Pillow's 8-bit pass is."""
  shape = tf.shape(image)
  rows = _resample_rows(tf.reshape(image, [shape[0], -1]), size, scale, translation)
  return tf.reshape(_round_like_pillow(rows), [size, shape[1], 3])


def _horizontal_pass(image, size, scale, translation):
  """(H, W, 3) -> float32 (H, size, 3): the vertical pass on the transposed image."""
  transposed = tf.transpose(image, [1, 0, 2])
  return tf.transpose(_vertical_pass(transposed, size, scale, translation), [1, 0, 2])


def pillow_vertical_first(in_size, out_size):
  """Whether Pillow resizes (H, W) `in_size` to `out_size` vertical pass first.

  Pillow 13 runs the vertical pass first when the height loses more than twice as many
  pixels as the width; Pillow 12 and earlier always ran the horizontal pass first. The two
  orders agree but for the 8-bit rounding and clipping of the intermediate image, so at
  overshooting edges they can differ by several levels. Shorter-side resizes of photos up to
  2:1 portrait, and square resizes of landscapes, are horizontal first in both.
  """
  in_size = tf.cast(in_size, tf.int32)
  out_size = tf.cast(out_size, tf.int32)
  lost = in_size - out_size
  return (lost[0] > 0) & (lost[0] > 2 * lost[1])


def _pillow_resample(image, size, scale, translation, vertical_first):
  """Pillow's bicubic resize of uint8 (H, W, 3) to uint8 (size[0], size[1], 3), as its
  ImagingResample computes it: one antialiased cubic pass per axis (a = -0.5, kernel widened
  by the downscale factor), each rounded and clipped to 8 bits, in Pillow's order.

  Each pass is `ScaleAndTranslate` on rows with the rest of the image as channels, about 3x
  faster than the single op on (H, W, 3) (docs/benchmarks.md); the horizontal pass runs on
  the transposed image. The intermediate holds Pillow's 8-bit values as float32, whose
  transposes and resampling are faster than uint8's. Pillow accumulates in 22-bit fixed point,
  this in float32: a pass's value can differ, by one level, where its exact result is within
  rounding error of a half (about 1 value in 10^4 measured; tests/test_pipeline.py).

  Args:
    image: uint8 (H, W, 3) tensor.
    size: output (height, width), int32.
    scale: (height, width) output / input scale factors, float32.
    translation: (height, width) offsets in output pixels: output pixel i samples input
      position (i + 0.5 - translation) / scale.
    vertical_first: bool scalar tensor, Pillow's pass order (`pillow_vertical_first` of the
      whole image's input and output sizes).
  """
  size = tf.cast(size, tf.int32)
  scale = tf.cast(scale, tf.float32)
  translation = tf.cast(translation, tf.float32)
  vertical = lambda x: _vertical_pass(x, size[0], scale[0], translation[0])
  horizontal = lambda x: _horizontal_pass(x, size[1], scale[1], translation[1])
  out = tf.cond(
      vertical_first, lambda: horizontal(vertical(image)), lambda: vertical(horizontal(image))
  )
  return tf.cast(out, tf.uint8)


def resize(image, size):
  """Bicubic resize of uint8 (H, W, 3) to `size` (height, width): Pillow's
  `Image.resize(size, BICUBIC)` (see `_pillow_resample`)."""
  in_size = tf.shape(image)[:2]
  scale = tf.cast(size, tf.float32) / tf.cast(in_size, tf.float32)
  return _pillow_resample(image, size, scale, tf.zeros([2]), pillow_vertical_first(in_size, size))


def resize_crop_window(image_bytes, size, crop_box, shape=None):
  """The window `crop_box` of the image resized to `size`, decoding and resizing only what
  the window needs.

  Same pixels as `resize(decode_rgb(image_bytes), size)` cut to `crop_box` = (top, left,
  height, width) in resized coordinates, up to float rounding (the passes run in the order
  Pillow chooses for the whole image): the JPEG is decoded only in the rows and columns the
  bicubic kernel touches (about 60% of a 500x375 photo for the 224/256 centre crop), and only
  the kept output pixels are computed.

  Args:
    image_bytes: encoded image (JPEG is decoded cropped; other formats whole).
    size: (height, width) of the full resized image.
    crop_box: (top, left, height, width) of the output window inside that resized image.
    shape: the image's `image_shape`, if the caller has it already (else read here).

  Returns:
    uint8 (crop height, crop width, 3).
  """
  if shape is None:
    shape = image_shape(image_bytes)
  in_size = tf.cast(shape[:2], tf.float32)
  size = tf.cast(size, tf.float32)
  box = tf.cast(crop_box, tf.float32)
  scale = size / in_size
  # Output pixel i of the full resize samples input position (i + 0.5) / scale - 0.5 with a
  # cubic kernel of radius 2, widened to 2 / scale when downscaling (antialiasing).
  radius = 2.0 * tf.maximum(1.0, 1.0 / scale)
  first = (box[:2] + 0.5) / scale - 0.5 - radius
  last = (box[:2] + box[2:] - 0.5) / scale - 0.5 + radius
  start = tf.maximum(tf.cast(tf.math.floor(first), tf.int32) - 1, 0)
  stop = tf.minimum(tf.cast(tf.math.ceil(last), tf.int32) + 2, shape[:2])
  window = tf.concat([start, stop - start], 0)
  image = decode_and_crop(image_bytes, window, shape)
  # In the window's coordinates: output i samples (i + 0.5 - t) / scale with t chosen so that
  # this equals (top + i + 0.5) / scale - start.
  translation = tf.cast(start, tf.float32) * scale - box[:2]
  return _pillow_resample(
      image, crop_box[2:], scale, translation, pillow_vertical_first(shape[:2], size)
  )


def shorter_side_size(height, width, shorter: int):
  """torchvision `Resize(shorter)`: the shorter side becomes `shorter`, the longer one
  `int(shorter * long / short)` (truncated)."""
  height = tf.cast(height, tf.int64)
  width = tf.cast(width, tf.int64)
  short = tf.minimum(height, width)
  long_side = tf.maximum(height, width)
  new_long = (shorter * long_side) // short
  size = tf.where(height <= width, tf.stack([shorter, new_long]), tf.stack([new_long, shorter]))
  return tf.cast(size, tf.int32)


def center_crop_box(image_size, size: int):
  """torchvision CenterCrop's (top, left, size, size) in an image of (height, width)."""
  image_size = tf.cast(image_size, tf.int32)
  # round((H - size) / 2) with Python's (and tf.round's) half-to-even rounding.
  top_left = tf.cast(tf.round(tf.cast(image_size - size, tf.float32) / 2.0), tf.int32)
  return tf.concat([top_left, [size, size]], 0)


def random_flip(image, seed, prob: float = 0.5):
  """Mirrors the image left-right with probability `prob`."""
  flip = tf.random.stateless_uniform([], seed) < prob
  return tf.cond(flip, lambda: tf.reverse(image, axis=[1]), lambda: image)
