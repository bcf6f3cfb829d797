"""`convnext_shapes`: a small synthetic dataset of coloured shapes, built without any download.

Ten shape classes on 64x64 pixel images, 500 training and 100 validation images per class.
Colours, background, position, size and rotation are drawn at random for every image, so
only the outline and topology of the shape tell the classes apart; no class can be told
from another by its hue. Every class is distinct under any rotation (there is no diamond, a
rotated square, and no X, a rotated plus), so rotation is drawn from the full circle.

The shape is always lighter than its background (a light colour on a dark one, hues at
random). Were both drawn from the whole colour cube, a shape would be as often darker as
lighter than its background: then no pixel, and no linear filter of pixels, correlates with
the label on average, and a small network sits at chance for hundreds of steps before it
finds features that ignore the polarity. With the polarity fixed, the demo's ConvNeXt-atto
learns from its first epoch (docs/benchmarks.md has the runs).

Images are drawn four times larger with Pillow, area-averaged down (anti-aliased edges) and
stored as JPEG, so the input pipeline reads them exactly as it reads ImageNet. Each image is
a pure function of (split, index): a build gives the same bytes every time, for the same
numpy and Pillow versions.

    import convnext_jax.datasets  # registers the builder
    builder = tfds.builder('convnext_shapes', data_dir=data_dir)
    builder.download_and_prepare()  # a few seconds
"""

import io
import math

import numpy as np
from PIL import Image
from PIL import ImageDraw
import tensorflow_datasets as tfds

from convnext_jax.datasets import tfds_compat

IMAGE_SIZE = 64
CLASS_NAMES = (
    'circle',
    'square',
    'triangle',
    'star',
    'plus',
    'ring',
    'crescent',
    'arrow',
    'heart',
    'frame',
)
TRAIN_PER_CLASS = 500
VALIDATION_PER_CLASS = 100
JPEG_QUALITY = 90

_SEED = 20220110  # ConvNeXt's arXiv date; any fixed number would do.
_SPLIT_SEEDS = {'train': 0, 'validation': 1}  # Distinct streams: no image is in both splits.
_SUPERSAMPLE = 4
# Shape radius in pixels of the 64x64 image: at least a quarter of the side, so that a random
# resized crop keeping a third of the image still shows most of the shape.
_MIN_RADIUS, _MAX_RADIUS = 14.0, 26.0
# Backgrounds draw each channel from [0, _DARK_MAX], shapes from [_LIGHT_MIN, 255]; a shape's
# mean channel value is at least _MIN_BRIGHTER above its background's and its colour at
# least _MIN_CONTRAST away (RGB distance), so every shape is plainly visible and lighter.
_DARK_MAX, _LIGHT_MIN = 150.0, 105.0
_MIN_BRIGHTER = 70.0
_MIN_CONTRAST = 110.0
_NOISE_STDDEV = 12.0


def _regular_polygon(num_vertices: int, radius: float, phase: float = math.pi / 2):
  angles = phase + 2 * math.pi * np.arange(num_vertices) / num_vertices
  return np.stack([radius * np.cos(angles), radius * np.sin(angles)], axis=1)


def _star(num_points: int = 5, outer: float = 1.0, inner: float = 0.42):
  angles = math.pi / 2 + math.pi * np.arange(2 * num_points) / num_points
  radii = np.where(np.arange(2 * num_points) % 2 == 0, outer, inner)
  return np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1)


def _plus(arm: float = 1.0, half_width: float = 0.3):
  a, w = arm, half_width
  return np.array(
      [
          (w, w),
          (w, a),
          (-w, a),
          (-w, w),
          (-a, w),
          (-a, -w),
          (-w, -w),
          (-w, -a),
          (w, -a),
          (w, -w),
          (a, -w),
          (a, w),
      ]
  )


def _arrow():
  return np.array(
      [
          (-1.0, -0.2),
          (0.15, -0.2),
          (0.15, -0.55),
          (1.0, 0.0),
          (0.15, 0.55),
          (0.15, 0.2),
          (-1.0, 0.2),
      ]
  )


def _heart(num_points: int = 64):
  # The classic parametric heart, fitted into the unit circle with its point downwards.
  t = np.linspace(0, 2 * math.pi, num_points, endpoint=False)
  x = 16 * np.sin(t) ** 3
  y = 13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t)
  return np.stack([x, -(y + 2.5)], axis=1) / 16.5


def _square(half_side: float):
  h = half_side
  return np.array([(-h, -h), (h, -h), (h, h), (-h, h)])


# Each class is a list of (polygon or disk, value) drawn in order on a blank mask: 255 adds the
# region, 0 cuts it out again (the hole of a ring or frame, the bite of a crescent). Polygons
# are (n, 2) arrays, disks are ('disk', centre_x, centre_y, radius), all within the unit
# circle before scaling and rotation.
_SHAPES = {
    'circle': [(('disk', 0.0, 0.0, 0.9), 255)],
    'square': [(_square(0.7), 255)],
    'triangle': [(_regular_polygon(3, 1.0), 255)],
    'star': [(_star(), 255)],
    'plus': [(_plus(), 255)],
    'ring': [(('disk', 0.0, 0.0, 0.95), 255), (('disk', 0.0, 0.0, 0.55), 0)],
    'crescent': [(('disk', 0.0, 0.0, 0.9), 255), (('disk', 0.45, 0.0, 0.75), 0)],
    'arrow': [(_arrow(), 255)],
    'heart': [(_heart(), 255)],
    'frame': [(_square(0.75), 255), (_square(0.45), 0)],
}
assert tuple(_SHAPES) == CLASS_NAMES


def _shape_mask(name: str, centre: np.ndarray, radius: float, angle: float) -> np.ndarray:
  """Coverage in [0, 1] of one shape on the final image grid (anti-aliased)."""
  scale = _SUPERSAMPLE
  size = IMAGE_SIZE * scale
  rotation = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
  mask = Image.new('L', (size, size), 0)
  draw = ImageDraw.Draw(mask)
  for part, value in _SHAPES[name]:
    if isinstance(part, tuple):  # A disk: rotation moves its centre only.
      _, x, y, r = part
      cx, cy = (centre + radius * rotation @ np.array([x, y])) * scale
      rr = r * radius * scale
      draw.ellipse((cx - rr, cy - rr, cx + rr, cy + rr), fill=value)
    else:
      points = (centre + radius * part @ rotation.T) * scale
      draw.polygon([tuple(p) for p in points], fill=value)
  mask = mask.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BOX)
  return np.asarray(mask, np.float32) / 255.0


def _line_mask(start: np.ndarray, end: np.ndarray, width: float) -> np.ndarray:
  scale = _SUPERSAMPLE
  mask = Image.new('L', (IMAGE_SIZE * scale, IMAGE_SIZE * scale), 0)
  ImageDraw.Draw(mask).line(
      [tuple(start * scale), tuple(end * scale)], fill=255, width=max(1, round(width * scale))
  )
  mask = mask.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BOX)
  return np.asarray(mask, np.float32) / 255.0


def _background(rng: np.random.Generator) -> tuple[np.ndarray, list[np.ndarray]]:
  """A dark solid, two-colour gradient or noisy background, and its main colours."""
  kind = rng.integers(3)
  first = rng.uniform(0, _DARK_MAX, size=3)
  if kind == 0:
    return np.broadcast_to(first, (IMAGE_SIZE, IMAGE_SIZE, 3)).astype(np.float32), [first]
  if kind == 1:
    second = rng.uniform(0, _DARK_MAX, size=3)
    direction = rng.uniform(0, 2 * math.pi)
    coords = np.arange(IMAGE_SIZE, dtype=np.float32) / (IMAGE_SIZE - 1) - 0.5
    ramp = math.cos(direction) * coords[None, :] + math.sin(direction) * coords[:, None]
    ramp = (ramp - ramp.min()) / (ramp.max() - ramp.min())
    image = first * (1 - ramp[..., None]) + second * ramp[..., None]
    return image.astype(np.float32), [first, second]
  noise = rng.normal(0.0, _NOISE_STDDEV, size=(IMAGE_SIZE, IMAGE_SIZE, 3))
  return np.clip(first + noise, 0, 255).astype(np.float32), [first]


def _contrasting_colour(rng: np.random.Generator, background: list[np.ndarray]) -> np.ndarray:
  """A light colour, plainly lighter than and far from every `background` colour."""
  # Rejection sampling with a fixed number of draws (so the stream, and the bytes, are fixed);
  # the fallback is the draw that comes closest to both conditions.
  best, best_score = None, -math.inf
  for _ in range(64):
    colour = rng.uniform(_LIGHT_MIN, 255, size=3)
    brighter = min(float(colour.mean() - b.mean()) for b in background)
    distance = min(float(np.linalg.norm(colour - b)) for b in background)
    if brighter >= _MIN_BRIGHTER and distance >= _MIN_CONTRAST:
      return colour
    score = min(brighter - _MIN_BRIGHTER, distance - _MIN_CONTRAST)
    if score > best_score:
      best, best_score = colour, score
  return best


def draw_example(label: int, rng: np.random.Generator) -> np.ndarray:
  """Draws one image of class `label`: a (64, 64, 3) uint8 array.

  Args:
    label: index into `CLASS_NAMES`.
    rng: the image's own random stream.

  Returns:
    The image, before JPEG encoding.
  """
  image, background_colours = _background(rng)
  if rng.uniform() < 0.5:
    # A thin line is no class's shape, so it distracts without changing the label.
    start = rng.uniform(0, IMAGE_SIZE, size=2)
    length = rng.uniform(10, 25)
    heading = rng.uniform(0, 2 * math.pi)
    end = start + length * np.array([math.cos(heading), math.sin(heading)])
    colour = rng.uniform(0, 255, size=3)
    alpha = _line_mask(start, end, rng.uniform(1.0, 2.0))[..., None]
    image = image * (1 - alpha) + colour * alpha
  radius = rng.uniform(_MIN_RADIUS, _MAX_RADIUS)
  # Keep the whole shape inside the image (the arrow and star reach the unit circle).
  margin = 1.05 * radius
  centre = rng.uniform(margin, IMAGE_SIZE - margin, size=2)
  angle = rng.uniform(0, 2 * math.pi)
  colour = _contrasting_colour(rng, background_colours)
  alpha = _shape_mask(CLASS_NAMES[label], centre, radius, angle)[..., None]
  image = image * (1 - alpha) + colour * alpha
  return np.clip(np.round(image), 0, 255).astype(np.uint8)


def encode_example(split: str, index: int) -> tuple[bytes, int]:
  """JPEG bytes and label of example `index` of `split`; labels cycle through the classes."""
  label = index % len(CLASS_NAMES)
  rng = np.random.default_rng([_SEED, _SPLIT_SEEDS[split], index])
  buffer = io.BytesIO()
  Image.fromarray(draw_example(label, rng)).save(buffer, format='JPEG', quality=JPEG_QUALITY)
  return buffer.getvalue(), label


class ConvnextShapes(tfds_compat.SourceFileCodePath, tfds.core.GeneratorBasedBuilder):
  """Synthetic coloured shapes, 10 classes, 64x64 JPEGs; needs no download."""

  name = 'convnext_shapes'
  VERSION = tfds.core.Version('2.0.0')
  RELEASE_NOTES = {
      '1.0.0': 'Initial release: 10 shape classes, 5000 train and 1000 validation images.',
      '2.0.0': 'Light shapes on dark backgrounds (any hue): learnable from the first steps.',
  }

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=(
            'Synthetic coloured shapes for smoke tests and demos of image classifiers: 10 '
            f'classes ({", ".join(CLASS_NAMES)}) drawn on 64x64 images with a random light '
            'shape colour on a random dark background (solid, two-colour gradient or noisy), '
            'random position, size and rotation, and sometimes a thin distracting line. '
            'Hues carry no class information; only the shape does. Class-balanced: '
            f'{TRAIN_PER_CLASS} training and {VALIDATION_PER_CLASS} validation images per '
            'class. Generated deterministically (fixed seed per split and index) and stored '
            f'as JPEG (quality {JPEG_QUALITY}).'
        ),
        features=tfds.features.FeaturesDict(
            {
                'image': tfds.features.Image(shape=(None, None, 3), encoding_format='jpeg'),
                'label': tfds.features.ClassLabel(names=CLASS_NAMES),
                'file_name': tfds.features.Text(),
            }
        ),
        supervised_keys=('image', 'label'),
        homepage='https://arxiv.org/abs/2201.03545',  # The ConvNeXt paper this project follows.
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    del dl_manager  # Nothing to download.
    num_classes = len(CLASS_NAMES)
    return {
        'train': self._generate_examples('train', TRAIN_PER_CLASS * num_classes),
        'validation': self._generate_examples('validation', VALIDATION_PER_CLASS * num_classes),
    }

  def _generate_examples(self, split: str, num_examples: int):
    for index in range(num_examples):
      image, label = encode_example(split, index)
      yield index, {'image': image, 'label': label, 'file_name': f'{split}_{index:05d}.jpg'}
