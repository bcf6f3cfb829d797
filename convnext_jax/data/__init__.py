"""Input pipelines: tf.data preprocessing on the host, batch augmentation on device.

This package module itself is TensorFlow-free (prediction uses it); `pipeline`,
`image_ops` and `randaugment` import TensorFlow.
"""

# The official evaluation crop below 384 px: resize the shorter side to size / 0.875.
DEFAULT_CROP_PCT = 0.875


def default_crop_pct(image_size: int) -> float:
  """The official evaluation crop: 0.875 below 384 pixels, none (1.0) from 384 up."""
  return DEFAULT_CROP_PCT if image_size < 384 else 1.0
