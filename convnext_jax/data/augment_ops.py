"""timm's RandAugment image ops on TensorFlow, each reproducing Pillow's arithmetic.

Every op reproduces what timm's `auto_augment.py` does to a PIL image, including Pillow's own
integer arithmetic:

* Point ops (auto_contrast, equalize, invert, posterize, solarize, solarize_add) use Pillow's
  lookup-table formulas and are exact.
* Enhance ops (color, contrast, brightness, sharpness) are Pillow's `Image.blend(degenerate,
  image, factor)` in float32, with the degenerate images built with Pillow's integer formulas
  (ITU-R 601 luma, rounded mean, the SMOOTH 3x3 filter), so they are exact too.
* Geometric ops are Pillow's affine `transform` with BICUBIC resampling (cubic convolution,
  a = -1, edge-clamped 4x4 neighbourhood, fill colour outside the source). Coordinates are
  computed in float64 as Pillow does; the interpolation itself runs in float32, so a value that
  lands within ~1e-5 of an integer can truncate one level differently from Pillow's double.

Conventions shared by every public op, so their docstrings give only what is particular:
* `image` is a uint8 (H, W, 3) tensor (or array) of any size, static or dynamic.
* Other arguments (factors, thresholds, angles, shifts) are Python numbers or scalar tensors,
  so one traced function serves every magnitude.
* `fill`, for the geometric ops, is 3 ints or a (3,) tensor: the colour of output points whose
  source lies outside the image.
* The result is a uint8 tensor of the input's shape. Ops run eagerly or inside
  `tf.data.Dataset.map`, and are exempt from autograph (`image_ops.no_autograph`).

The RandAugment policy that picks and parametrises these ops is in `randaugment`.
"""

import math

import tensorflow as tf

from convnext_jax.data.image_ops import no_autograph

# Luma weights of Pillow's RGB -> L conversion (ITU-R 601-2, 16-bit fixed point).
_LUMA_WEIGHTS = (19595, 38470, 7471)


# ----------------------------------------------------------------------------------------------
# Helpers (`to_float64` and `with_shape_of` serve the RandAugment policy too).


def to_float64(value):
  """A scalar or sequence as float64 without a float32 detour (exact for Python floats)."""
  if tf.is_tensor(value):
    return tf.cast(value, tf.float64)
  if isinstance(value, (list, tuple)):
    return tf.stack([to_float64(v) for v in value])
  return tf.constant(value, tf.float64)


def _fill_colour(fill):
  """The fill as a float32 (3,) vector."""
  if tf.is_tensor(fill):
    return tf.reshape(tf.cast(fill, tf.float32), [3])
  return tf.constant([float(v) for v in fill], tf.float32, shape=[3])


def _to_uint8(values):
  """Pillow's float -> uint8 store: clamp to [0, 255], then truncate."""
  return tf.cast(tf.clip_by_value(values, 0.0, 255.0), tf.uint8)


def _byte_mask(condition):
  """0xFF where `condition` holds, else 0, as uint8 (uint8 multiplies are slow; int8 negation
  and a free bitcast are not)."""
  return tf.bitcast(-tf.cast(condition, tf.int8), tf.uint8)


def with_shape_of(out, image):
  """`out` with `image`'s static shape, which gathers and switch_case branches lose."""
  out.set_shape(image.shape)
  return out


def _planar_indices(image):
  """(3, H*W) int32 channel-planar values offset by 256 * channel, for per-channel tables.

  Planar layout makes the per-channel offset a cheap row broadcast (an add across the channel
  axis of an (H, W, 3) tensor is several times slower).
  """
  planar = tf.transpose(tf.reshape(image, [-1, 3]))
  return tf.cast(planar, tf.int32) + tf.constant([[0], [256], [512]])


def _apply_channel_luts(image, planar_indices, luts):
  """Maps each channel through its row of the (3, 256) table `luts`."""
  mapped = tf.gather(tf.reshape(tf.cast(luts, tf.uint8), [-1]), planar_indices)
  return with_shape_of(tf.reshape(tf.transpose(mapped), tf.shape(image)), image)


def _channel_histograms(planar_indices):
  """(3, 256) int32 histograms, as Pillow's `Image.histogram()` for an RGB image."""
  counts = tf.math.bincount(
      tf.reshape(planar_indices, [-1]), minlength=768, maxlength=768, dtype=tf.int32
  )
  return tf.reshape(counts, [3, 256])


def _last_nonzero(histograms):
  """Index of the highest non-empty bin of each histogram (255 when all are empty)."""
  present = tf.cast(histograms > 0, tf.int32)
  return 255 - tf.argmax(tf.reverse(present, [1]), axis=1, output_type=tf.int32)


def _luma(image, channels):
  """Pillow's RGB -> L, (R*19595 + G*38470 + B*7471 + 0x8000) >> 16, as float32 (H, W, channels).

  One matmul does the weighted sum; every product and partial sum is an integer below 2**24,
  so float32 holds them exactly whatever the summation order. Asking for 3 identical
  channels gives the greyscale image in RGB without a (slow) broadcast along channels.
  That needs a true float32 matmul: on a GPU with TF32 the products would be rounded, but the
  pipelines run on the host CPU (`pipeline.configure_tensorflow` hides GPUs from TensorFlow).
  """
  weights = tf.constant([[float(w)] * channels for w in _LUMA_WEIGHTS], tf.float32)
  pixels = tf.reshape(tf.cast(image, tf.float32), [-1, 3])
  weighted = tf.linalg.matmul(pixels, weights) + float(0x8000)
  luma = tf.floor(weighted / 65536.0)  # Exact: dividing by a power of two.
  return tf.reshape(luma, tf.concat([tf.shape(image)[:2], [channels]], 0))


def _blend(degenerate, image, factor):
  """Pillow's `Image.blend(degenerate, image, factor)`: what every ImageEnhance op returns.

  Pillow takes `factor` as a C float and computes `in1 + factor * (in2 - in1)` in float32,
  clamping only when extrapolating; clamping an interpolation changes nothing, so one path
  serves both.
  """
  factor = tf.cast(factor, tf.float32)
  low = tf.cast(degenerate, tf.float32)
  out = low + factor * (tf.cast(image, tf.float32) - low)
  return with_shape_of(_to_uint8(out), image)


# ----------------------------------------------------------------------------------------------
# Point ops.


@no_autograph
def auto_contrast(image):
  """`ImageOps.autocontrast(image)`: stretches each channel's [min, max] to [0, 255]."""
  image = tf.convert_to_tensor(image)
  indices = _planar_indices(image)
  histograms = _channel_histograms(indices)
  low = tf.argmax(tf.cast(histograms > 0, tf.int32), axis=1, output_type=tf.int32)
  high = _last_nonzero(histograms)
  # Pillow's float64 arithmetic: scale = 255 / (hi - lo), offset = -lo * scale, and
  # int(ix * scale + offset) truncating toward zero, which casting does too.
  scale = 255.0 / tf.cast(tf.maximum(high - low, 1), tf.float64)
  offset = tf.cast(-low, tf.float64) * scale
  levels = tf.range(256)
  stretched = tf.cast(
      tf.cast(levels, tf.float64)[None, :] * scale[:, None] + offset[:, None], tf.int32
  )
  luts = tf.where((high > low)[:, None], tf.clip_by_value(stretched, 0, 255), levels[None, :])
  return _apply_channel_luts(image, indices, luts)


@no_autograph
def equalize(image):
  """`ImageOps.equalize(image)`: per-channel histogram equalisation with Pillow's rounding."""
  image = tf.convert_to_tensor(image)
  indices = _planar_indices(image)
  histograms = _channel_histograms(indices)
  last_count = tf.gather(histograms, _last_nonzero(histograms), batch_dims=1)
  # Pillow: step = (count - count of the top bin) // 255; lut[i] = (step // 2 + pixels below i)
  # // step, left unchanged when step is 0 (which covers single-valued channels).
  step = (tf.reduce_sum(histograms, axis=1) - last_count) // 255
  below = tf.cumsum(histograms, axis=1, exclusive=True)
  luts = (step[:, None] // 2 + below) // tf.maximum(step, 1)[:, None]
  # Pillow clips table entries to 255 when it applies the table.
  luts = tf.where((step > 0)[:, None], tf.minimum(luts, 255), tf.range(256)[None, :])
  return _apply_channel_luts(image, indices, luts)


@no_autograph
def invert(image):
  """`ImageOps.invert(image)`: 255 - value."""
  return 255 - tf.convert_to_tensor(image)


@no_autograph
def posterize(image, bits):
  """Keeps the `bits` most significant bits of every value, as timm's posterize.

  `bits` >= 8 returns the image and <= 0 gives black: what Pillow < 11 returned for 0 bits,
  which timm reaches at magnitude 10 (newer Pillow raises).
  """
  image = tf.convert_to_tensor(image)
  dropped = 8 - tf.clip_by_value(tf.cast(bits, tf.int32), 0, 8)
  mask = 255 - (tf.bitwise.left_shift(1, dropped) - 1)
  return tf.bitwise.bitwise_and(image, tf.cast(mask, tf.uint8))


def _first_level_at_or_above(threshold):
  """The smallest integer level >= threshold, clipped to [0, 256], as int32."""
  level = tf.math.ceil(to_float64(threshold))
  return tf.cast(tf.clip_by_value(level, 0.0, 256.0), tf.int32)


@no_autograph
def solarize(image, threshold):
  """`ImageOps.solarize(image, threshold)`: inverts values >= threshold (256: none, 0: all)."""
  image = tf.convert_to_tensor(image)
  # uint8 arithmetic instead of a table lookup (gathers are slow): 255 - v == v ^ 255. A
  # threshold above 255 selects nothing, which a uint8 comparison cannot express, hence the
  # separate factor.
  first = _first_level_at_or_above(threshold)
  selected = (image >= tf.cast(tf.minimum(first, 255), tf.uint8)) & (first < 256)
  return tf.bitwise.bitwise_xor(image, _byte_mask(selected))


@no_autograph
def solarize_add(image, addition, threshold=128):
  """timm's solarize_add: adds `addition`, saturating, to values below `threshold`."""
  image = tf.convert_to_tensor(image)
  first = _first_level_at_or_above(threshold)
  # A threshold of 256 (255 < threshold) cannot be a uint8: every value is then below it.
  below = _byte_mask((image < tf.cast(tf.minimum(first, 255), tf.uint8)) | (first > 255))
  addition = tf.clip_by_value(tf.cast(addition, tf.int32), -255, 255)
  # Saturating uint8 add and subtract, v + min(a, 255 - v) and v - min(s, v), on the selected
  # values only (the mask zeroes a and s elsewhere).
  up = tf.bitwise.bitwise_and(below, tf.cast(tf.maximum(addition, 0), tf.uint8))
  down = tf.bitwise.bitwise_and(below, tf.cast(tf.maximum(-addition, 0), tf.uint8))
  out = image + tf.minimum(up, 255 - image)
  return out - tf.minimum(down, out)


# ----------------------------------------------------------------------------------------------
# Enhance ops: Image.blend(degenerate, image, factor).


@no_autograph
def color(image, factor):
  """`ImageEnhance.Color(image).enhance(factor)`: 0 gives greyscale, 1 the image."""
  image = tf.convert_to_tensor(image)
  return _blend(_luma(image, channels=3), image, factor)


@no_autograph
def contrast(image, factor):
  """`ImageEnhance.Contrast(image).enhance(factor)`: 0 gives the mean grey, 1 the image."""
  image = tf.convert_to_tensor(image)
  luma = tf.cast(_luma(image, channels=1), tf.int64)
  count = tf.cast(tf.size(luma), tf.int64)
  # Pillow's int(mean + 0.5), in integers: floor((2 * sum + count) / (2 * count)).
  mean = (2 * tf.reduce_sum(luma) + count) // tf.maximum(2 * count, 1)
  return _blend(mean, image, factor)


@no_autograph
def brightness(image, factor):
  """`ImageEnhance.Brightness(image).enhance(factor)`: 0 gives black, 1 the image."""
  image = tf.convert_to_tensor(image)
  return _blend(tf.zeros([], tf.uint8), image, factor)


@no_autograph
def sharpness(image, factor):
  """`ImageEnhance.Sharpness(image).enhance(factor)`: 0 smooths, 1 keeps, 2 sharpens.

  Pillow's SMOOTH kernel, [[1, 1, 1], [1, 5, 1], [1, 1, 1]] / 13, leaves the 1-pixel border
  unchanged, so the result's border is the input's.
  """
  image = tf.convert_to_tensor(image)

  def sharpen():
    pixels = tf.cast(image, tf.float32)
    rows = pixels[:-2] + pixels[1:-1] + pixels[2:]
    weighted = rows[:, :-2] + rows[:, 1:-1] + rows[:, 2:] + 4.0 * pixels[1:-1, 1:-1]
    # Pillow truncates the float32 sum S / 13 + 0.5; S is an integer, so S / 13 is never
    # within 1/26 of a rounding boundary and an exactly rounded division gives the same.
    smoothed = tf.floor((2.0 * weighted + 13.0) / 26.0)
    middle = tf.concat(
        [image[1:-1, :1], _blend(smoothed, image[1:-1, 1:-1], factor), image[1:-1, -1:]], axis=1
    )
    return tf.concat([image[:1], middle, image[-1:]], axis=0)

  shape = tf.shape(image)
  # Images under 3x3 are all border.
  out = tf.cond((shape[0] >= 3) & (shape[1] >= 3), sharpen, lambda: image)
  return with_shape_of(out, image)


# ----------------------------------------------------------------------------------------------
# Geometric ops: Pillow's affine transform with bicubic resampling.


def _cubic_weights(d):
  """Pillow's cubic convolution (a = -1) as weights of the neighbours' differences.

  Pillow's BICUBIC macro evaluates v2 + d*(p2 + d*(p3 + d*p4)) over neighbours v1..v4 with
  p2 = v3 - v1, p3 = 2*(v1 - v2) + v3 - v4, p4 = -v1 + v2 - v3 + v4. Regrouped around v2 that
  is v2 + w1*(v1 - v2) + w3*(v3 - v2) + w4*(v4 - v2): equal neighbours (flat areas, the fill
  colour) and d = 0 return v2 exactly, where a plain weighted sum can land just below it and
  truncate a level lower.

  Args:
    d: float tensor in [0, 1), the fractional position past v2.

  Returns:
    (w1, w3, w4), float tensors shaped like `d`.
  """
  rest = 1.0 - d
  return -d * rest * rest, d * (1.0 + d - d * d), -d * d * rest


def _interpolate(taps, weights):
  """v2 + w1*(v1 - v2) + w3*(v3 - v2) + w4*(v4 - v2) for taps (v1, v2, v3, v4)."""
  v1, v2, v3, v4 = taps
  w1, w3, w4 = weights
  return v2 + w1 * (v1 - v2) + w3 * (v3 - v2) + w4 * (v4 - v2)


def _fill_uint8(fill):
  return tf.cast(tf.round(_fill_colour(fill)), tf.uint8)


def _shift_rows(image, slope, offset, fill):
  """Pillow's AFFINE (1, slope, offset, 0, 1, 0), BICUBIC: row y moves by slope*(y+.5)+offset.

  Every pixel of a row samples its own row at the same fractional position, so one gather of
  a (W + 3)-pixel window per row and four shifted slices of it give all the taps, with one
  set of weights per row: far cheaper than gathering a neighbourhood per pixel.
  """
  shape = tf.shape(image)
  height, width = shape[0], shape[1]
  width64 = tf.cast(width, tf.float64)
  row_shift = to_float64(slope) * (tf.cast(tf.range(height), tf.float64) + 0.5)
  offset = to_float64(offset)
  # Pillow's per-pixel coordinate ((x + .5) + slope*(y + .5)) + offset decides what is inside;
  # along a row it increases with x, so the inside pixels form one run.
  x_src = ((tf.cast(tf.range(width), tf.float64) + 0.5)[None, :] + row_shift[:, None]) + offset
  inside = tf.cast((x_src >= 0.0) & (x_src < width64), tf.int32)
  first_inside = tf.argmax(inside, axis=1, output_type=tf.int32)
  end_inside = first_inside + tf.reduce_sum(inside, axis=1)
  # Within a row the sample points are x + shift (less half a pixel, after Pillow's -0.5):
  # integer part x + floor(shift), fraction the same for the whole row.
  shift = row_shift + offset
  shift_floor = tf.floor(shift)
  fraction = tf.cast(shift - shift_floor, tf.float32)[:, None, None]
  # Far-off rows are all fill; clipping keeps the int32 column arithmetic in range.
  start = tf.cast(tf.clip_by_value(shift_floor, -width64 - 4.0, width64 + 4.0), tf.int32) - 1
  columns = tf.clip_by_value(tf.range(width + 3)[None, :] + start[:, None], 0, width - 1)
  window = tf.gather(tf.cast(image, tf.float32), columns, axis=1, batch_dims=1)
  taps = [window[:, i : i + width] for i in range(4)]
  values = _to_uint8(_interpolate(taps, _cubic_weights(fraction)))
  # Fill outside the run, via a byte mask over (H, W * 3) (a select is much slower).
  channel_column = tf.range(3 * width)[None, :]
  keep = (channel_column >= 3 * first_inside[:, None]) & (channel_column < 3 * end_inside[:, None])
  keep = tf.reshape(_byte_mask(keep), tf.shape(image))
  fill_row = tf.reshape(tf.tile(_fill_uint8(fill), [width]), [1, -1, 3])
  out = tf.bitwise.bitwise_or(
      tf.bitwise.bitwise_and(values, keep),
      tf.bitwise.bitwise_and(fill_row, tf.bitwise.invert(keep)),
  )
  return with_shape_of(out, image)


def _shift_columns(image, slope, offset, fill):
  """Pillow's AFFINE (1, 0, 0, slope, 1, offset), BICUBIC: `_shift_rows` on the transpose."""
  transposed = tf.transpose(image, [1, 0, 2])
  return with_shape_of(tf.transpose(_shift_rows(transposed, slope, offset, fill), [1, 0, 2]), image)


def _to_channels(planes):
  """(K, H, W) float32 -> (K, H, W, 3) with each value repeated over channels.

  A (K*H*W, 1) x (1, 3) matmul of ones: exact, and cheaper than broadcasting along the
  channel axis, which TensorFlow does slowly.
  """
  repeated = tf.linalg.matmul(tf.reshape(planes, [-1, 1]), tf.ones([1, 3], tf.float32))
  return tf.reshape(repeated, tf.concat([tf.shape(planes), [3]], 0))


def _affine_2d(image, coeffs, fill):
  """Pillow's affine transform with BICUBIC resampling, for any matrix."""
  a, b, c, d, e, f = coeffs
  shape = tf.shape(image)
  height, width = shape[0], shape[1]
  height64 = tf.cast(height, tf.float64)
  width64 = tf.cast(width, tf.float64)
  # Pillow's float64 coordinate arithmetic, in its order of operations.
  x_out = tf.cast(tf.range(width), tf.float64)[None, :] + 0.5
  y_out = tf.cast(tf.range(height), tf.float64)[:, None] + 0.5
  x_src = (a * x_out + b * y_out) + c
  y_src = (d * x_out + e * y_out) + f
  inside = (x_src >= 0.0) & (x_src < width64) & (y_src >= 0.0) & (y_src < height64)
  x_src -= 0.5
  y_src -= 0.5
  x_floor = tf.floor(x_src)
  y_floor = tf.floor(y_src)
  fractions = tf.cast(tf.stack([x_src - x_floor, y_src - y_floor]), tf.float32)
  # Outside points are never read; clipping keeps their float -> int casts defined.
  x_floor = tf.cast(tf.clip_by_value(x_floor, -1.0, width64), tf.int32)
  y_floor = tf.cast(tf.clip_by_value(y_floor, -1.0, height64), tf.int32)

  # Source padded by 2 edge pixels on each side (Pillow clamps neighbours to the edge), plus a
  # 4-column block of fill on the right that outside points read, all 16 taps of them, so they
  # interpolate to exactly the fill colour without a select.
  pixels = tf.cast(image, tf.float32)
  fill_block = tf.broadcast_to(_fill_colour(fill), [height, 4, 3])
  padded = tf.concat(
      [pixels[:, :1], pixels[:, :1], pixels, pixels[:, -1:], pixels[:, -1:], fill_block], axis=1
  )
  padded = tf.concat([padded[:1], padded[:1], padded, padded[-1:], padded[-1:]], axis=0)
  padded_width = width + 8
  # Tap (j, i) of a point is padded pixel (y_floor + 1 + j, x_floor + 1 + i).
  corner = (y_floor + 1) * padded_width + (x_floor + 1)
  fill_corner = width + 4
  corner = fill_corner + tf.cast(inside, tf.int32) * (corner - fill_corner)
  offsets = tf.reshape(tf.range(4)[:, None] * padded_width + tf.range(4)[None, :], [16, 1, 1])
  taps = tf.unstack(tf.gather(tf.reshape(padded, [-1, 3]), corner[None] + offsets))

  weights = tf.unstack(
      _to_channels(
          tf.concat(
              [tf.stack(_cubic_weights(fractions[0])), tf.stack(_cubic_weights(fractions[1]))], 0
          )
      )
  )
  rows = [_interpolate(taps[4 * j : 4 * j + 4], weights[:3]) for j in range(4)]
  return _to_uint8(_interpolate(rows, weights[3:]))


@no_autograph
def affine_transform(image, matrix, fill):
  """`Image.transform(size, Image.AFFINE, matrix, Image.BICUBIC, fillcolor=fill)`.

  `matrix` is (a, b, c, d, e, f), 6 numbers or scalar tensors or a (6,) tensor: output pixel
  (x, y) samples the input at (a x' + b y' + c, d x' + e y' + f), x' = x + 0.5 and
  y' = y + 0.5 being pixel centres.
  """
  image = tf.convert_to_tensor(image)
  coeffs = tf.unstack(tf.reshape(to_float64(matrix), [6]))
  a, b, c, d, e, f = coeffs
  # Shears and translations keep rows (or columns) apart: a 1D pass gives Pillow's result
  # (its vertical pass returns the row unchanged when dy is 0) at a fraction of the cost.
  one, zero = tf.constant(1.0, tf.float64), tf.constant(0.0, tf.float64)
  rows_only = tf.equal(a, one) & tf.equal(d, zero) & tf.equal(e, one) & tf.equal(f, zero)
  columns_only = tf.equal(a, one) & tf.equal(b, zero) & tf.equal(c, zero) & tf.equal(e, one)
  out = tf.case(
      [
          (rows_only, lambda: _shift_rows(image, b, c, fill)),
          (columns_only, lambda: _shift_columns(image, d, f, fill)),
      ],
      default=lambda: _affine_2d(image, coeffs, fill),
  )
  return with_shape_of(out, image)


@no_autograph
def rotate(image, degrees, fill):
  """`Image.rotate(degrees, Image.BICUBIC, fillcolor=fill)`: counter-clockwise, about the centre."""
  image = tf.convert_to_tensor(image)
  shape = tf.shape(image)
  centre_x = tf.cast(shape[1], tf.float64) / 2.0
  centre_y = tf.cast(shape[0], tf.float64) / 2.0
  # Pillow: angle % 360, then -radians(angle), and cos/sin rounded to 15 decimals (which
  # makes quarter turns exact).
  angle = -(tf.math.floormod(to_float64(degrees), 360.0) * (math.pi / 180.0))
  cos = tf.round(tf.cos(angle) * 1e15) / 1e15
  sin = tf.round(tf.sin(angle) * 1e15) / 1e15
  offset_x = (cos * -centre_x + sin * -centre_y + 0.0) + centre_x
  offset_y = (-sin * -centre_x + cos * -centre_y + 0.0) + centre_y
  # Straight to the 2D path: it is exact where a rotation samples pixel centres (0 and quarter
  # turns), and skipping affine_transform's dispatch keeps the traced graph small.
  out = _affine_2d(image, [cos, sin, offset_x, -sin, cos, offset_y], fill)
  return with_shape_of(out, image)


@no_autograph
def shear_x(image, factor, fill):
  """timm's shear_x: AFFINE (1, factor, 0, 0, 1, 0), bicubic."""
  return _shift_rows(tf.convert_to_tensor(image), factor, 0.0, fill)


@no_autograph
def shear_y(image, factor, fill):
  """timm's shear_y: AFFINE (1, 0, 0, factor, 1, 0), bicubic."""
  return _shift_columns(tf.convert_to_tensor(image), factor, 0.0, fill)


@no_autograph
def translate_x_rel(image, pct, fill):
  """timm's translate_x_rel: AFFINE (1, 0, pct * width, 0, 1, 0); pct > 0 moves content left."""
  image = tf.convert_to_tensor(image)
  pixels = to_float64(pct) * tf.cast(tf.shape(image)[1], tf.float64)
  return _shift_rows(image, 0.0, pixels, fill)


@no_autograph
def translate_y_rel(image, pct, fill):
  """timm's translate_y_rel: AFFINE (1, 0, 0, 0, 1, pct * height), bicubic."""
  image = tf.convert_to_tensor(image)
  pixels = to_float64(pct) * tf.cast(tf.shape(image)[0], tf.float64)
  return _shift_columns(image, 0.0, pixels, fill)
