"""RandAugment on TensorFlow against Pillow (what timm runs), eagerly and inside tf.data.

Every op is compared with Pillow on the same images: a 37x53 synthetic image (gradients,
hard edges, saturated and flat blocks, noise) and a 224x224 natural-looking JPEG decode.
The tf.data runs erase the static height and width, as a decoded image has none.

Tolerances: point ops are table lookups and must be exact. Enhance ops replicate Pillow's
float32 blend, so they are exact on x86 builds; a compiler that fuses Pillow's multiply-add
could move a value across an integer, hence max |diff| <= 1 (measured: exact). Geometric ops
interpolate in float32 where Pillow uses float64 (coordinates and fill decisions are float64 in
both), so a value within ~1e-5 of an integer can truncate one level apart: max |diff| <= 1 and
>= 99.5% of values exact. Measured: rotations 99.999%, shears and general affines 99.95%,
translations 99.65%: a shift whose fraction is a short decimal (0.8 for 20% of 224 pixels)
gives every pixel the same cubic weights, multiples of 0.001, so many exact values are whole
numbers that either side's rounding can put just below.
"""

import inspect
import io
import math

import numpy as np
from PIL import Image
from PIL import ImageEnhance
from PIL import ImageOps
import pytest
import tensorflow as tf

from convnext_jax import config_lib
from convnext_jax.data import IMAGENET_MEAN_FILL
from convnext_jax.data import augment_ops
from convnext_jax.data import pipeline
from convnext_jax.data import randaugment as ra

# timm's fill colour: the ImageNet mean in 0..255, rounded (`img_mean`).
FILL = tuple(round(255 * mean) for mean in (0.485, 0.456, 0.406))


def _synthetic(height, width, seed=0):
  """Gradients, a saturated block, a flat block, hard edges and a noisy corner."""
  rng = np.random.default_rng(seed)
  y, x = np.mgrid[0:height, 0:width]
  image = np.stack(
      [x * 255 // (width - 1), y * 255 // (height - 1), (3 * x + 5 * y) % 256], axis=-1
  ).astype(np.uint8)
  image[height // 5 : height // 2, width // 6 : width // 2] = (255, 0, 40)
  image[height // 2 :, width // 2 : 3 * width // 4] = (90, 90, 90)
  image[height // 3 :, ::7] = 0
  image[height - height // 3 :, : width // 3] = rng.integers(0, 256, (height // 3, width // 3, 3))
  return image


def _jpeg_decoded(size=224):
  """A smooth scene with edges and texture, through a JPEG round trip (Pillow's decoder)."""
  y, x = np.mgrid[0:size, 0:size] / size
  scene = np.stack(
      [
          128 + 100 * np.sin(6 * x + 2 * y),
          128 + 90 * np.cos(5 * y - 3 * x),
          255 * (((x - 0.5) ** 2 + (y - 0.5) ** 2) < 0.1),
      ],
      axis=-1,
  )
  scene += np.random.default_rng(1).normal(0, 12, scene.shape)
  encoded = io.BytesIO()
  Image.fromarray(np.clip(scene, 0, 255).astype(np.uint8)).save(encoded, 'JPEG', quality=85)
  return np.asarray(Image.open(io.BytesIO(encoded.getvalue())).convert('RGB'))


IMAGES = {'synthetic_37x53': _synthetic(37, 53), 'jpeg_224': _jpeg_decoded()}


def _eager_and_graph(fn, image, args):
  """fn(image, arg) for each arg: eagerly with Python arguments, and in a tf.data map with
  unknown height/width and the arguments as tensors (one trace for all of them)."""
  eager = [fn(tf.constant(image), arg).numpy() for arg in args]

  def mapped(x):
    x = tf.compat.v1.placeholder_with_default(x, [None, None, 3])
    return tf.map_fn(
        lambda arg: fn(x, arg),
        tf.constant(np.asarray(args)),
        fn_output_signature=tf.TensorSpec([None, None, 3], tf.uint8),
    )

  graph = next(iter(tf.data.Dataset.from_tensors(image).map(mapped)))
  return eager, list(graph.numpy())


def _check(ours, expected, exact, label):
  assert ours.dtype == np.uint8 and ours.shape == expected.shape, label
  diff = np.abs(ours.astype(np.int16) - expected.astype(np.int16))
  if exact:
    assert diff.max() == 0, f'{label}: {np.count_nonzero(diff)} values differ'
  else:
    assert diff.max() <= 1, f'{label}: max |diff| {diff.max()}'
    assert np.mean(diff == 0) >= 0.995, f'{label}: only {np.mean(diff == 0):.5f} exact'


def _compare(fn, reference, args, exact):
  for name, image in IMAGES.items():
    eager, graph = _eager_and_graph(fn, image, args)
    for arg, ours_eager, ours_graph in zip(args, eager, graph):
      expected = np.asarray(reference(Image.fromarray(image), arg))
      _check(ours_eager, expected, exact, f'{name} arg={arg} eager')
      _check(ours_graph, expected, exact, f'{name} arg={arg} tf.data')


def _solarize_add_reference(image, addition, threshold=128):
  """timm's solarize_add: a table of min(255, i + add) below the threshold."""
  lut = [min(255, i + addition) if i < threshold else i for i in range(256)]
  return image.point(lut * 3)


def _posterize_reference(image, bits):
  """timm's posterize; 0 bits is black, as Pillow < 11 returned (newer Pillow raises)."""
  if bits >= 8:
    return image
  if bits <= 0:
    return Image.new('RGB', image.size)
  return ImageOps.posterize(image, bits)


# ----------------------------------------------------------------------------------------------
# Point ops: exact.


def test_auto_contrast_equalize_invert_match_pillow():
  _compare(
      lambda x, _: augment_ops.auto_contrast(x),
      lambda im, _: ImageOps.autocontrast(im),
      [0],
      exact=True,
  )
  # The shared images span (nearly) 0..255 per channel, where autocontrast does little: here
  # every channel has its own narrow range to stretch.
  narrow = np.random.default_rng(2).integers([30, 90, 0], [200, 141, 17], (29, 31, 3))
  narrow = narrow.astype(np.uint8)
  expected = np.asarray(ImageOps.autocontrast(Image.fromarray(narrow)))
  assert not np.array_equal(expected, narrow)
  np.testing.assert_array_equal(augment_ops.auto_contrast(narrow).numpy(), expected)
  np.testing.assert_array_equal(
      augment_ops.equalize(narrow).numpy(), np.asarray(ImageOps.equalize(Image.fromarray(narrow)))
  )
  _compare(
      lambda x, _: augment_ops.equalize(x), lambda im, _: ImageOps.equalize(im), [0], exact=True
  )
  _compare(lambda x, _: augment_ops.invert(x), lambda im, _: ImageOps.invert(im), [0], exact=True)


@pytest.mark.parametrize(
    'pixels',
    [
        np.full((5, 7, 3), 77, np.uint8),  # Single value per channel: both leave it unchanged.
        np.concatenate([np.full((5, 7, 3), 100, np.uint8), np.full((5, 7, 3), 104, np.uint8)]),
        np.concatenate([np.zeros((1, 7, 3), np.uint8), np.full((9, 7, 3), 200, np.uint8)]),
    ],
    ids=['flat', 'two_levels', 'dominant_top_bin'],
)
def test_auto_contrast_and_equalize_degenerate_histograms(pixels):
  np.testing.assert_array_equal(
      augment_ops.auto_contrast(pixels).numpy(),
      np.asarray(ImageOps.autocontrast(Image.fromarray(pixels))),
  )
  np.testing.assert_array_equal(
      augment_ops.equalize(pixels).numpy(), np.asarray(ImageOps.equalize(Image.fromarray(pixels)))
  )


def test_posterize_matches_timm():
  _compare(augment_ops.posterize, _posterize_reference, [0, 1, 2, 3, 4, 7, 8, 9], exact=True)


def test_solarize_matches_pillow():
  _compare(augment_ops.solarize, ImageOps.solarize, [0, 26, 127.5, 128, 230, 255, 256], exact=True)


def test_solarize_add_matches_timm():
  _compare(augment_ops.solarize_add, _solarize_add_reference, [0, 11, 99, 110, 128], exact=True)
  _compare(
      lambda x, t: augment_ops.solarize_add(x, 60, threshold=t),
      lambda im, t: _solarize_add_reference(im, 60, threshold=t),
      [0, 200, 256],
      exact=True,
  )


# ----------------------------------------------------------------------------------------------
# Enhance ops: Image.blend in float32.

FACTORS = [0.0, 0.1, 0.55, 1.0, 1.45, 1.9, 2.6]


@pytest.mark.parametrize(
    'op,enhancer',
    [
        (augment_ops.color, ImageEnhance.Color),
        (augment_ops.contrast, ImageEnhance.Contrast),
        (augment_ops.brightness, ImageEnhance.Brightness),
        (augment_ops.sharpness, ImageEnhance.Sharpness),
    ],
    ids=['color', 'contrast', 'brightness', 'sharpness'],
)
def test_enhance_ops_match_pillow(op, enhancer):
  _compare(op, lambda im, factor: enhancer(im).enhance(factor), FACTORS, exact=False)


def test_enhance_ops_are_exact_at_factor_one_and_degenerate_at_zero():
  image = IMAGES['synthetic_37x53']
  for op in (
      augment_ops.color,
      augment_ops.contrast,
      augment_ops.brightness,
      augment_ops.sharpness,
  ):
    np.testing.assert_array_equal(op(image, 1.0).numpy(), image)
  np.testing.assert_array_equal(augment_ops.brightness(image, 0.0).numpy(), np.zeros_like(image))
  grey = np.asarray(Image.fromarray(image).convert('L'))
  np.testing.assert_array_equal(
      augment_ops.color(image, 0.0).numpy(), np.repeat(grey[..., None], 3, -1)
  )
  mean = int(np.mean(grey) + 0.5)
  np.testing.assert_array_equal(augment_ops.contrast(image, 0.0).numpy(), np.full_like(image, mean))


# ----------------------------------------------------------------------------------------------
# Geometric ops: Pillow's affine transform, BICUBIC.


def _pil_affine(image, matrix):
  return image.transform(image.size, Image.AFFINE, tuple(matrix), Image.BICUBIC, fillcolor=FILL)


def test_rotate_matches_pillow():
  _compare(
      lambda x, deg: augment_ops.rotate(x, deg, FILL),
      lambda im, deg: im.rotate(deg, Image.BICUBIC, fillcolor=FILL),
      [-27.0, -13.3, 0.0, 27.0, 90.0, 180.0, -400.0],
      exact=False,
  )


def test_shears_match_pillow():
  factors = [-0.27, -0.05, 0.0, 0.12, 0.27]
  _compare(
      lambda x, factor: augment_ops.shear_x(x, factor, FILL),
      lambda im, factor: _pil_affine(im, (1, factor, 0, 0, 1, 0)),
      factors,
      exact=False,
  )
  _compare(
      lambda x, factor: augment_ops.shear_y(x, factor, FILL),
      lambda im, factor: _pil_affine(im, (1, 0, 0, factor, 1, 0)),
      factors,
      exact=False,
  )


def test_translations_match_pillow():
  pcts = [-0.4, -0.1, 0.0, 0.2, 0.4, 1.5]
  _compare(
      lambda x, pct: augment_ops.translate_x_rel(x, pct, FILL),
      lambda im, pct: _pil_affine(im, (1, 0, pct * im.size[0], 0, 1, 0)),
      pcts,
      exact=False,
  )
  _compare(
      lambda x, pct: augment_ops.translate_y_rel(x, pct, FILL),
      lambda im, pct: _pil_affine(im, (1, 0, 0, 0, 1, pct * im.size[1])),
      pcts,
      exact=False,
  )


def test_general_affine_transform_matches_pillow():
  matrices = [
      (1, 0, 0, 0, 1, 0),  # Identity: rows path, an exact copy.
      (1, 0, 3, 0, 1, 0),  # Whole-pixel shift: exact.
      (1.1, 0.2, -4.5, -0.15, 0.9, 6.25),  # Scale, shear and shift: the 2D path.
      (0.7, 0, 2.2, 0, 1.3, -1.7),  # Axis-aligned scaling.
      (1, 0, 0, 0.3, 1, 2.5),  # Shear plus a fractional vertical shift: 2D, not columns.
  ]
  _compare(
      lambda x, m: augment_ops.affine_transform(x, m, FILL), _pil_affine, matrices, exact=False
  )
  image = IMAGES['synthetic_37x53']
  np.testing.assert_array_equal(
      augment_ops.affine_transform(image, matrices[0], FILL).numpy(), image
  )
  shifted = augment_ops.affine_transform(image, matrices[1], FILL).numpy()
  np.testing.assert_array_equal(shifted[:, :-3], image[:, 3:])
  np.testing.assert_array_equal(shifted[:, -3:], np.broadcast_to(FILL, shifted[:, -3:].shape))


def test_ops_take_scalar_tensor_arguments():
  image = IMAGES['synthetic_37x53']
  pairs = [
      (
          augment_ops.rotate(image, tf.constant(27.0, tf.float64), FILL),
          augment_ops.rotate(image, 27.0, FILL),
      ),
      (
          augment_ops.shear_x(image, tf.constant(-0.27, tf.float64), tf.constant(FILL)),
          augment_ops.shear_x(image, -0.27, FILL),
      ),
      (
          augment_ops.translate_y_rel(image, tf.constant(0.4, tf.float64), FILL),
          augment_ops.translate_y_rel(image, 0.4, FILL),
      ),
      (augment_ops.posterize(image, tf.constant(3)), augment_ops.posterize(image, 3)),
      (augment_ops.solarize(image, tf.constant(128)), augment_ops.solarize(image, 128)),
      (augment_ops.solarize_add(image, tf.constant(99)), augment_ops.solarize_add(image, 99)),
      (augment_ops.color(image, tf.constant(0.55)), augment_ops.color(image, 0.55)),
      (
          augment_ops.sharpness(image, tf.constant(1.9, tf.float64)),
          augment_ops.sharpness(image, 1.9),
      ),
  ]
  for from_tensor, from_number in pairs:
    np.testing.assert_array_equal(from_tensor.numpy(), from_number.numpy())


@pytest.mark.parametrize('shape', [(1, 1), (2, 5), (6, 1)])
def test_tiny_images(shape):
  image = _synthetic(8, 8)[: shape[0], : shape[1]].copy()
  pil = Image.fromarray(image)
  np.testing.assert_array_equal(augment_ops.sharpness(image, 1.9).numpy(), image)  # All border.
  _check(
      augment_ops.equalize(image).numpy(),
      np.asarray(ImageOps.equalize(pil)),
      exact=True,
      label='eq',
  )
  geometric = [
      (augment_ops.rotate(image, 27.0, FILL), pil.rotate(27.0, Image.BICUBIC, fillcolor=FILL)),
      (augment_ops.shear_y(image, 0.27, FILL), _pil_affine(pil, (1, 0, 0, 0.27, 1, 0))),
      (
          augment_ops.translate_x_rel(image, -0.4, FILL),
          _pil_affine(pil, (1, 0, -0.4 * shape[1], 0, 1, 0)),
      ),
  ]
  for ours, expected in geometric:
    assert ours.shape == image.shape
    assert np.abs(ours.numpy().astype(np.int16) - np.asarray(expected)).max() <= 1


# ----------------------------------------------------------------------------------------------
# RandAugment: configuration, level mapping, randomness.


@pytest.mark.parametrize(
    'spec,expected',
    [
        ('rand-m9-mstd0.5-inc1', ra.RandAugmentConfig()),
        (
            'rand-m7-n3-p0.7',
            ra.RandAugmentConfig(
                num_layers=3, magnitude=7.0, magnitude_std=0.0, prob=0.7, increasing=False
            ),
        ),
        ('rand', ra.RandAugmentConfig(magnitude=10.0, magnitude_std=0.0, increasing=False)),
        ('rand-inc1-m9-mstd101', ra.RandAugmentConfig(magnitude_std=math.inf)),
        (
            'rand-m15-mmax20-inc0-n1',
            ra.RandAugmentConfig(
                num_layers=1,
                magnitude=15.0,
                magnitude_std=0.0,
                magnitude_max=20.0,
                increasing=False,
            ),
        ),
    ],
)
def test_config_parse(spec, expected):
  assert ra.RandAugmentConfig.parse(spec) == expected


@pytest.mark.parametrize(
    'spec,message',
    [
        ('m9-mstd0.5', "must start with 'rand'"),
        ('augmix-m9', "must start with 'rand'"),
        ('rand-x3', 'cannot read section'),
        ('rand-m', 'cannot read section'),
        ('rand-inc', 'cannot read section'),
        ('rand-m9-', 'cannot read section'),
        ('rand-m9x', 'not a valid value'),
        ('rand-n2.5', 'not a valid value'),
        ('rand-tweights', 'not implemented'),
        ('rand-p1.5', 'prob'),
        ('rand-mmax0', 'magnitude_max'),
    ],
)
def test_config_parse_errors(spec, message):
  with pytest.raises(ValueError, match=message):
    ra.RandAugmentConfig.parse(spec)


def test_config_validation():
  with pytest.raises(ValueError, match='num_layers'):
    ra.RandAugmentConfig(num_layers=-1)
  with pytest.raises(ValueError, match='magnitude_std'):
    ra.RandAugmentConfig(magnitude_std=-0.5)
  with pytest.raises(ValueError, match='prob'):
    ra.RandAugmentConfig(prob=float('nan'))


def _timm_level_to_arg(name, m, negate, translate_pct=0.45):
  """timm's LEVEL_TO_ARG, restated in plain Python (float64), with its sign flip given."""
  sign = -1.0 if negate else 1.0
  return {
      'Rotate': lambda: sign * ((m / 10.0) * 30.0),
      'ShearX': lambda: sign * ((m / 10.0) * 0.3),
      'TranslateYRel': lambda: sign * ((m / 10.0) * translate_pct),
      'Posterize': lambda: int((m / 10.0) * 4),
      'PosterizeIncreasing': lambda: 4 - int((m / 10.0) * 4),
      'Solarize': lambda: min(256, int((m / 10.0) * 256)),
      'SolarizeIncreasing': lambda: 256 - min(256, int((m / 10.0) * 256)),
      'SolarizeAdd': lambda: min(128, int((m / 10.0) * 110)),
      'Contrast': lambda: (m / 10.0) * 1.8 + 0.1,
      'SharpnessIncreasing': lambda: max(0.1, 1.0 + sign * ((m / 10.0) * 0.9)),
  }[name]()


@pytest.mark.parametrize(
    'name',
    [
        'Rotate',
        'ShearX',
        'TranslateYRel',
        'Posterize',
        'PosterizeIncreasing',
        'Solarize',
        'SolarizeIncreasing',
        'SolarizeAdd',
        'Contrast',
        'SharpnessIncreasing',
    ],
)
def test_level_to_arg_matches_timm(name):
  for magnitude in [0.0, 0.5, 2.5, 5.0, 7.3, 9.0, 9.99, 10.0, 13.0]:
    for negate in (False, True):
      ours = ra.level_to_arg(name, magnitude, negate, translate_pct=0.3).numpy()
      assert ours == _timm_level_to_arg(name, magnitude, negate, 0.3), (magnitude, negate)
  assert ra.level_to_arg('Equalize', 9.0) is None
  with pytest.raises(ValueError, match='Unknown RandAugment op'):
    ra.level_to_arg('Cutout', 9.0)


def test_level_to_arg_spot_values():
  # Magnitude 9, the recipe's mean: rotate 27 degrees, shear 0.27, translate 40.5% of the side,
  # keep 1 bit, solarize from 26, add 99, enhance by 1 +- 0.81.
  expected = {
      'Rotate': 27.0,
      'ShearY': 0.27,
      'TranslateXRel': 0.405,
      'PosterizeIncreasing': 1,
      'SolarizeIncreasing': 26,
      'SolarizeAdd': 99,
      'ColorIncreasing': 1.81,
  }
  for name, value in expected.items():
    assert ra.level_to_arg(name, 9.0).numpy() == pytest.approx(value, abs=1e-12), name
  assert ra.level_to_arg('BrightnessIncreasing', 10.0, negate=True).numpy() == pytest.approx(0.1)
  assert ra.level_to_arg('PosterizeIncreasing', 10.0).numpy() == 0


def _decisions(config, count, salt=0):
  """Decisions for seeds (i, salt), i < count, stacked: each field (count, num_layers)."""
  seeds = tf.stack(
      [tf.range(count, dtype=tf.int64), tf.fill([count], tf.cast(salt, tf.int64))], axis=1
  )
  batch = (
      tf.data.Dataset.from_tensor_slices(seeds)
      .map(lambda s: tuple(ra.rand_augment_decisions(s, config)))
      .batch(count)
  )
  return ra.LayerDecisions(*(t.numpy() for t in next(iter(batch))))


def test_decisions_distribution():
  config = ra.RandAugmentConfig()
  draws = _decisions(config, 3000)
  assert draws.op_index.shape == (3000, 2)
  counts = np.bincount(draws.op_index.ravel(), minlength=15)
  expected = 6000 / 15
  # Uniform with replacement: every op within 5 binomial standard deviations of 400.
  assert np.all(np.abs(counts - expected) < 5 * math.sqrt(expected * (1 - 1 / 15))), counts
  assert abs(draws.apply.mean() - 0.5) < 0.03
  assert abs(draws.negate.mean() - 0.5) < 0.03
  # The two layers are drawn independently.
  assert abs(np.mean(draws.op_index[:, 0] == draws.op_index[:, 1]) - 1 / 15) < 0.02
  magnitude = draws.magnitude
  assert magnitude.min() >= 0.0 and magnitude.max() == 10.0  # N(9, 0.5) clipped at 10.
  assert abs(np.mean(magnitude == 10.0) - 0.0228) < 0.01  # P(N(9, 0.5) > 10).
  assert abs(np.median(magnitude) - 9.0) < 0.05
  unclipped = magnitude[magnitude < 10.0]
  assert 0.4 < unclipped.std() < 0.5


def test_decisions_respect_prob_and_magnitude_modes():
  rare = _decisions(ra.RandAugmentConfig(prob=0.2, num_layers=3), 2000)
  assert rare.op_index.shape == (2000, 3)
  assert abs(rare.apply.mean() - 0.2) < 0.025
  wide = _decisions(ra.RandAugmentConfig(magnitude=5.0, magnitude_std=5.0), 2000)
  assert wide.magnitude.min() == 0.0 and wide.magnitude.max() == 10.0  # Clipped both ends.
  uniform = _decisions(ra.RandAugmentConfig(magnitude=9.0, magnitude_std=math.inf), 2000)
  assert 0.0 <= uniform.magnitude.min() < 0.1 and 8.9 < uniform.magnitude.max() < 9.0
  assert abs(uniform.magnitude.mean() - 4.5) < 0.2
  fixed = _decisions(ra.RandAugmentConfig(magnitude=7.0, magnitude_std=0.0), 50)
  np.testing.assert_array_equal(fixed.magnitude, 7.0)
  always = _decisions(ra.RandAugmentConfig(prob=1.0), 200)
  assert always.apply.all()
  never = _decisions(ra.RandAugmentConfig(prob=0.0), 200)
  assert not never.apply.any()
  original_set = _decisions(ra.RandAugmentConfig(increasing=False), 1000)
  assert set(np.unique(original_set.op_index)) == set(range(len(ra.TRANSFORMS)))


# timm's ops on PIL images by RandAugment name, with the arguments `_timm_level_to_arg`
# gives; ops that share a level mapping map to the name it is stated under.
_PIL_OPS = {
    'AutoContrast': lambda im, _: ImageOps.autocontrast(im),
    'Equalize': lambda im, _: ImageOps.equalize(im),
    'Invert': lambda im, _: ImageOps.invert(im),
    'Rotate': lambda im, deg: im.rotate(deg, Image.BICUBIC, fillcolor=FILL),
    'PosterizeIncreasing': _posterize_reference,
    'SolarizeIncreasing': ImageOps.solarize,
    'SolarizeAdd': _solarize_add_reference,
    'ColorIncreasing': lambda im, f: ImageEnhance.Color(im).enhance(f),
    'ContrastIncreasing': lambda im, f: ImageEnhance.Contrast(im).enhance(f),
    'BrightnessIncreasing': lambda im, f: ImageEnhance.Brightness(im).enhance(f),
    'SharpnessIncreasing': lambda im, f: ImageEnhance.Sharpness(im).enhance(f),
    'ShearX': lambda im, f: _pil_affine(im, (1, f, 0, 0, 1, 0)),
    'ShearY': lambda im, f: _pil_affine(im, (1, 0, 0, f, 1, 0)),
    'TranslateXRel': lambda im, p: _pil_affine(im, (1, 0, p * im.size[0], 0, 1, 0)),
    'TranslateYRel': lambda im, p: _pil_affine(im, (1, 0, 0, 0, 1, p * im.size[1])),
}
_LEVEL_NAMES = {
    'TranslateXRel': 'TranslateYRel',
    'ShearY': 'ShearX',
    'ColorIncreasing': 'SharpnessIncreasing',
    'ContrastIncreasing': 'SharpnessIncreasing',
    'BrightnessIncreasing': 'SharpnessIncreasing',
}


_POINT_OPS = (
    'AutoContrast',
    'Equalize',
    'Invert',
    'PosterizeIncreasing',
    'SolarizeIncreasing',
    'SolarizeAdd',
)


def _timm_reference(image, name, magnitude, negate):
  """One op as timm's AugmentOp applies it once it fires, on a PIL image."""
  arg = None
  if name not in ('AutoContrast', 'Equalize', 'Invert'):
    arg = _timm_level_to_arg(_LEVEL_NAMES.get(name, name), magnitude, negate)
  return _PIL_OPS[name](image, arg)


@pytest.fixture(scope='module')
def augmented():
  """rand_augment of the synthetic image in tf.data (unknown shape) for seeds (i, 9), i < 40,
  with the decisions drawn for each: [(output, LayerDecisions)]."""
  config = ra.RandAugmentConfig()
  image = IMAGES['synthetic_37x53']

  def augment(seed):
    x = tf.compat.v1.placeholder_with_default(tf.constant(image), [None, None, 3])
    return ra.rand_augment(x, seed, config), tuple(ra.rand_augment_decisions(seed, config))

  seeds = tf.stack([tf.range(40, dtype=tf.int64), tf.fill([40], tf.constant(9, tf.int64))], 1)
  dataset = tf.data.Dataset.from_tensor_slices(seeds).map(augment)
  assert dataset.element_spec[0] == tf.TensorSpec((None, None, 3), tf.uint8)
  return [
      (out.numpy(), ra.LayerDecisions(*(d.numpy() for d in decisions)))
      for out, decisions in dataset
  ]


def test_rand_augment_is_deterministic_per_seed_and_varies_across_seeds(augmented):
  image = IMAGES['synthetic_37x53']
  config = ra.RandAugmentConfig()
  for i in (0, 1, 2, 3, 5, 8):
    # int32 seeds here, int64 in tf.data: equal values give equal augmentations.
    eager = ra.rand_augment(image, tf.constant([i, 9]), config).numpy()
    np.testing.assert_array_equal(eager, augmented[i][0])
    np.testing.assert_array_equal(ra.rand_augment(image, tf.constant([i, 9]), config), eager)
  # Every seed draws its own magnitudes; outputs coincide only when no op fires (probability
  # 1/4), or an op is the identity on this image (autocontrast: it spans 0..255 already).
  assert len({d.magnitude.tobytes() for _, d in augmented}) == 40
  assert len({out.tobytes() for out, _ in augmented}) >= 20


def test_rand_augment_equals_its_decisions_applied_in_order(augmented):
  """End to end: the drawn ops, applied via Pillow with timm's argument mapping."""
  config = ra.RandAugmentConfig()
  image = IMAGES['synthetic_37x53']
  applied = 0
  for ours, (op_index, apply, magnitude, negate) in augmented:
    expected = Image.fromarray(image)
    for layer in range(config.num_layers):
      if not apply[layer]:
        continue
      applied += 1
      expected = _timm_reference(
          expected,
          ra.INCREASING_TRANSFORMS[op_index[layer]],
          float(magnitude[layer]),
          bool(negate[layer]),
      )
    diff = np.abs(ours.astype(np.int16) - np.asarray(expected))
    # One geometric op's 1-level differences can be spread by a following equalize.
    assert np.mean(diff <= 1) >= 0.99, (op_index, apply, magnitude)
  assert applied >= 25


def test_every_op_dispatches_by_name_to_timms_op():
  """One always-applied layer per seed, over seeds until each of the 15 ops has been drawn:
  `rand_augment`'s `switch_case` branch for every name gives timm's op (Pillow) at the drawn
  magnitude and sign, in tf.data with an unknown image shape."""
  config = ra.RandAugmentConfig(num_layers=1, prob=1.0)
  image = IMAGES['synthetic_37x53']
  seeds = tf.stack([tf.range(60, dtype=tf.int64), tf.fill([60], tf.constant(3, tf.int64))], 1)

  def augment(seed):
    x = tf.compat.v1.placeholder_with_default(tf.constant(image), [None, None, 3])
    return ra.rand_augment(x, seed, config), tuple(ra.rand_augment_decisions(seed, config))

  seen = set()
  for ours, decisions in tf.data.Dataset.from_tensor_slices(seeds).map(augment):
    op_index, apply, magnitude, negate = (d.numpy()[0] for d in decisions)
    assert apply
    name = ra.INCREASING_TRANSFORMS[op_index]
    seen.add(name)
    expected = _timm_reference(Image.fromarray(image), name, float(magnitude), bool(negate))
    _check(
        ours.numpy(),
        np.asarray(expected),
        exact=name in _POINT_OPS,
        label=f'{name} m={magnitude:.3f} negate={negate}',
    )
  assert seen == set(ra.INCREASING_TRANSFORMS)


def test_rand_augment_shapes_and_types(augmented):
  assert all(out.shape == (37, 53, 3) and out.dtype == np.uint8 for out, _ in augmented)
  image = IMAGES['synthetic_37x53']
  dataset = tf.data.Dataset.from_tensors(image).map(
      lambda x: ra.rand_augment(x, tf.constant([1, 2]), ra.RandAugmentConfig())
  )
  assert dataset.element_spec == tf.TensorSpec((37, 53, 3), tf.uint8)  # Static shape kept.
  assert next(iter(dataset)).shape == (37, 53, 3)
  untouched = ra.rand_augment(image, tf.constant([5, 6]), ra.RandAugmentConfig(num_layers=0))
  np.testing.assert_array_equal(untouched.numpy(), image)
  with pytest.raises(TypeError, match='uint8'):
    ra.rand_augment(image.astype(np.float32), tf.constant([1, 2]))


def test_fill_defaults_are_timms_imagenet_mean():
  assert FILL == (124, 116, 104)
  assert IMAGENET_MEAN_FILL == FILL
  assert config_lib.base().input.fill == FILL
  assert pipeline.TrainPreprocess().fill == FILL
  for fn in (ra.rand_augment, ra.apply_transform):
    assert inspect.signature(fn).parameters['fill'].default == FILL, fn.__name__
