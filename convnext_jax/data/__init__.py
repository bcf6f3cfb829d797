"""Input code: tf.data preprocessing on the host, batch augmentation on device.

`inputs` turns a config into prepared tfds datasets, the training iterator of global arrays
and the evaluation sets; `pipeline` builds the tf.data pipelines from the ops of `image_ops`,
`augment_ops` and `randaugment`; `batch_ops` augments batches on device. The tfds builders of
the project's own datasets are in `convnext_jax.datasets`.

This package module itself is TensorFlow-free and imports nothing (configs, the run and
prediction use it), and so are `batch_ops`, `randaugment_spec` and `pil_preprocess`;
`inputs`, `pipeline`, `image_ops`, `augment_ops` and `randaugment` import TensorFlow. The
Pillow statement of timm's training pipeline that `benchmark input` compares against is
`convnext_jax.benchmark.pil_reference`.
"""

import dataclasses

# RandAugment's fill colour for geometric ops: the ImageNet mean in 0..255, rounded, as timm
# passes it (`img_mean`).
IMAGENET_MEAN_FILL = (124, 116, 104)

# The official evaluation crop below 384 px: resize the shorter side to size / 0.875.
DEFAULT_CROP_PCT = 0.875

# Evaluation resizes, as timm names them: 'center' resizes the shorter side to
# int(size / crop_pct), keeping the aspect ratio; 'squash' resizes both sides to it. Either
# then takes the centre size x size crop.
CROP_MODES = ('center', 'squash')


class DatasetError(ValueError):
  """A dataset that cannot be read as configured (not prepared, no such split, prepared where
  another process cannot see it); the message is one line saying what to do."""


@dataclasses.dataclass(frozen=True)
class DatasetFacts:
  """What a run needs to know of its training data: from the prepared dataset's info
  (`inputs.Inputs`), or stated by a benchmark or a test."""

  num_train_examples: int
  num_classes: int
  class_names: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class EvalInput:
  """Evaluation preprocessing: resize to int(image_size / crop_pct) (`crop_mode` 'center':
  the shorter side; 'squash': both), then the centre crop."""

  image_size: int
  crop_pct: float
  crop_mode: str


def default_crop_pct(image_size: int) -> float:
  """The official evaluation crop: 0.875 below 384 pixels, none (1.0) from 384 up."""
  return DEFAULT_CROP_PCT if image_size < 384 else 1.0


def default_crop_mode(image_size: int) -> str:
  """The official evaluation resize: 'center' below 384 pixels, 'squash' from 384 up
  (the official `build_transform` warps to size x size there)."""
  return 'center' if image_size < 384 else 'squash'


def check_eval_crop(crop_pct: float, crop_mode: str) -> None:
  """Raises ValueError for a crop fraction outside (0, 1] or an unknown crop mode."""
  if not 0.0 < crop_pct <= 1.0:
    raise ValueError(f'eval crop_pct must be in (0, 1], got {crop_pct!r}')
  if crop_mode not in CROP_MODES:
    raise ValueError(f'eval crop_mode must be one of {CROP_MODES}, got {crop_mode!r}')


def eval_crop(
    image_size: int, crop_pct: float | None = None, crop_mode: str | None = None
) -> tuple[float, str]:
  """(crop_pct, crop_mode) for evaluating at `image_size`: the official defaults where unset
  (None, a negative crop_pct, an empty crop_mode).

  Raises:
    ValueError: a set value is out of range (`check_eval_crop`).
  """
  if crop_pct is None or crop_pct < 0:
    crop_pct = default_crop_pct(image_size)
  crop_mode = crop_mode or default_crop_mode(image_size)
  check_eval_crop(crop_pct, crop_mode)
  return crop_pct, crop_mode
