"""RandAugment as timm runs it (`rand-m9-mstd0.5-inc1`, the ConvNeXt recipe), on TensorFlow.

`randaugment_spec.RandAugmentConfig.parse` reads timm's spec strings (re-exported here);
`rand_augment` is the policy: per image it draws the ops, whether each fires and at what
magnitude, maps magnitudes to op arguments as timm's `LEVEL_TO_ARG` does, and runs the drawn
ops (`augment_ops`, which reproduce Pillow's).

`rand_augment` draws all randomness from stateless ops keyed by the caller's seed, so an
image's augmentation is reproducible and independent of pipeline parallelism.
"""

import functools
import math
from typing import NamedTuple

import tensorflow as tf

from convnext_jax.data import IMAGENET_MEAN_FILL
from convnext_jax.data import augment_ops
from convnext_jax.data.image_ops import no_autograph
from convnext_jax.data.randaugment_spec import INCREASING_TRANSFORMS
from convnext_jax.data.randaugment_spec import LEVEL_DENOM
from convnext_jax.data.randaugment_spec import TRANSFORMS
from convnext_jax.data.randaugment_spec import RandAugmentConfig
from convnext_jax.data.randaugment_spec import transform_names

# The ConvNeXt recipe's settings, `rand-m9-mstd0.5-inc1`.
RECIPE = RandAugmentConfig()


class LayerDecisions(NamedTuple):
  """RandAugment's random choices for one image, each of shape [num_layers].

  Attributes:
    op_index: int32 index into `transform_names(config)`.
    apply: bool, whether the op runs (probability `prob`).
    magnitude: float32 magnitude, already clipped to [0, magnitude_max].
    negate: bool, whether signed arguments (angles, shears, shifts, enhance deltas) flip.
  """

  op_index: tf.Tensor
  apply: tf.Tensor
  magnitude: tf.Tensor
  negate: tf.Tensor


@no_autograph
def rand_augment_decisions(seed, config: RandAugmentConfig) -> LayerDecisions:
  """Draws RandAugment's choices for one image from stateless ops keyed by `seed`.

  Args:
    seed: shape-[2] int32 or int64 tensor (equal values give equal choices either way).
    config: the RandAugment settings.

  Returns:
    The choices, as timm's `RandAugment.__call__` and `AugmentOp.__call__` make them.
  """
  # int64 throughout, so equal seed values give equal choices whatever their dtype.
  seed = tf.cast(tf.convert_to_tensor(seed), tf.int64)
  op_seed, apply_seed, magnitude_seed, negate_seed = tf.unstack(
      tf.random.experimental.stateless_split(seed, 4)
  )
  shape = [config.num_layers]
  op_index = tf.random.stateless_uniform(
      shape, op_seed, minval=0, maxval=len(transform_names(config)), dtype=tf.int32
  )
  apply = tf.random.stateless_uniform(shape, apply_seed) < config.prob
  if config.magnitude_std == math.inf:
    magnitude = tf.random.stateless_uniform(shape, magnitude_seed, maxval=config.magnitude)
  elif config.magnitude_std > 0:
    magnitude = config.magnitude + config.magnitude_std * tf.random.stateless_normal(
        shape, magnitude_seed
    )
  else:
    magnitude = tf.fill(shape, tf.constant(config.magnitude, tf.float32))
  magnitude = tf.clip_by_value(magnitude, 0.0, config.magnitude_max)
  # timm negates when random() > 0.5.
  negate = tf.random.stateless_uniform(shape, negate_seed) > 0.5
  return LayerDecisions(op_index, apply, magnitude, negate)


@no_autograph
def level_to_arg(name, magnitude, negate=False, translate_pct=0.45):
  """timm's `LEVEL_TO_ARG[name]`: the op argument for a magnitude, in float64 as in timm.

  Args:
    name: an op name from `INCREASING_TRANSFORMS` or `TRANSFORMS`.
    magnitude: number or scalar tensor on the 0..10 scale (already clipped).
    negate: bool or scalar bool tensor, timm's random sign flip for signed arguments.
    translate_pct: the translation range for 'TranslateXRel' / 'TranslateYRel'.

  Returns:
    A scalar tensor (int32 for posterize/solarize levels, else float64), or None for ops
    without an argument.

  Raises:
    ValueError: for an unknown op name.
  """
  level = augment_ops.to_float64(magnitude) / LEVEL_DENOM
  sign = tf.where(
      tf.cast(negate, tf.bool), tf.constant(-1.0, tf.float64), tf.constant(1.0, tf.float64)
  )

  def truncate(value):  # Python's int() on a non-negative float.
    return tf.cast(value, tf.int32)

  if name in ('AutoContrast', 'Equalize', 'Invert'):
    return None
  if name == 'Rotate':
    return sign * (level * 30.0)
  if name in ('ShearX', 'ShearY'):
    return sign * (level * 0.3)
  if name in ('TranslateXRel', 'TranslateYRel'):
    return sign * (level * translate_pct)
  if name == 'Posterize':
    return truncate(level * 4.0)
  if name == 'PosterizeIncreasing':
    return 4 - truncate(level * 4.0)
  if name == 'Solarize':
    return tf.minimum(256, truncate(level * 256.0))
  if name == 'SolarizeIncreasing':
    return 256 - tf.minimum(256, truncate(level * 256.0))
  if name == 'SolarizeAdd':
    return tf.minimum(128, truncate(level * 110.0))
  if name in ('Color', 'Contrast', 'Brightness', 'Sharpness'):
    return level * 1.8 + 0.1
  if name in (
      'ColorIncreasing',
      'ContrastIncreasing',
      'BrightnessIncreasing',
      'SharpnessIncreasing',
  ):
    return tf.maximum(tf.constant(0.1, tf.float64), 1.0 + sign * (level * 0.9))
  raise ValueError(
      f'Unknown RandAugment op {name!r}; expected one of {INCREASING_TRANSFORMS} '
      f'or {TRANSFORMS}.'
  )


_OPS = {
    'AutoContrast': lambda image, arg, fill: augment_ops.auto_contrast(image),
    'Equalize': lambda image, arg, fill: augment_ops.equalize(image),
    'Invert': lambda image, arg, fill: augment_ops.invert(image),
    'Rotate': augment_ops.rotate,
    'Posterize': lambda image, arg, fill: augment_ops.posterize(image, arg),
    'Solarize': lambda image, arg, fill: augment_ops.solarize(image, arg),
    'SolarizeAdd': lambda image, arg, fill: augment_ops.solarize_add(image, arg),
    'Color': lambda image, arg, fill: augment_ops.color(image, arg),
    'Contrast': lambda image, arg, fill: augment_ops.contrast(image, arg),
    'Brightness': lambda image, arg, fill: augment_ops.brightness(image, arg),
    'Sharpness': lambda image, arg, fill: augment_ops.sharpness(image, arg),
    'ShearX': augment_ops.shear_x,
    'ShearY': augment_ops.shear_y,
    'TranslateXRel': augment_ops.translate_x_rel,
    'TranslateYRel': augment_ops.translate_y_rel,
}
for _name in ('Posterize', 'Solarize', 'Color', 'Contrast', 'Brightness', 'Sharpness'):
  _OPS[_name + 'Increasing'] = _OPS[_name]


@no_autograph
def apply_transform(
    image, name, magnitude, negate=False, translate_pct=0.45, fill=IMAGENET_MEAN_FILL
):
  """Applies one RandAugment op at a magnitude, as timm's `AugmentOp` does once it fires.

  Args:
    image: uint8 (H, W, 3) tensor.
    name: an op name from `INCREASING_TRANSFORMS` or `TRANSFORMS`.
    magnitude: number or scalar tensor on the 0..10 scale (already clipped).
    negate: bool or scalar bool tensor, the sign flip for signed arguments.
    translate_pct: the translation range.
    fill: fill colour of the geometric ops.

  Returns:
    uint8 (H, W, 3) tensor.
  """
  image = tf.convert_to_tensor(image)
  arg = level_to_arg(name, magnitude, negate, translate_pct)
  return augment_ops.with_shape_of(_OPS[name](image, arg, fill), image)


@no_autograph
def rand_augment(image, seed, config: RandAugmentConfig = RECIPE, fill=IMAGENET_MEAN_FILL):
  """timm's RandAugment on one image, deterministic in `seed`.

  Draws `config.num_layers` ops uniformly with replacement; each runs with probability
  `config.prob` at a magnitude drawn around `config.magnitude` (see `rand_augment_decisions`).
  Only the drawn op is executed (`tf.switch_case`).

  Args:
    image: uint8 (H, W, 3) tensor, static or dynamic height and width.
    seed: shape-[2] int32 or int64 tensor for stateless random ops.
    config: the RandAugment settings.
    fill: fill colour of the geometric ops; timm uses the ImageNet mean.

  Returns:
    uint8 (H, W, 3) tensor.

  Raises:
    TypeError: if `image` is not uint8.
  """
  image = tf.convert_to_tensor(image)
  if image.dtype != tf.uint8:
    raise TypeError(
        f'rand_augment takes uint8 images (as decoded); got {image.dtype.name}. '
        'Apply it before converting to float.'
    )
  names = transform_names(config)
  decisions = rand_augment_decisions(seed, config)
  # Index len(names) is the identity: the op was drawn but not applied.
  branch_index = tf.where(decisions.apply, decisions.op_index, len(names))

  def layer_body(layer, current):
    branches = [
        functools.partial(
            apply_transform,
            current,
            name,
            decisions.magnitude[layer],
            decisions.negate[layer],
            config.translate_pct,
            fill,
        )
        for name in names
    ]
    branches.append(functools.partial(tf.identity, current))
    return layer + 1, augment_ops.with_shape_of(
        tf.switch_case(branch_index[layer], branches), current
    )

  # A loop rather than a Python unroll traces the 15 op branches once, whatever num_layers.
  _, image = tf.while_loop(
      lambda layer, _: layer < config.num_layers, layer_body, (tf.constant(0), image)
  )
  return image
