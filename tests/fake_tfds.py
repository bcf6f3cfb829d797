"""A tiny tfds builder for pipeline tests: given encoded images and labels, written as
TFRecord shards exactly like a real prepared dataset."""

import io

import numpy as np
from PIL import Image
import tensorflow_datasets as tfds


def jpeg_bytes(array: np.ndarray, quality: int = 90) -> bytes:
  buffer = io.BytesIO()
  Image.fromarray(array).save(buffer, 'JPEG', quality=quality)
  return buffer.getvalue()


def png_bytes(array: np.ndarray) -> bytes:
  buffer = io.BytesIO()
  Image.fromarray(array).save(buffer, 'PNG')
  return buffer.getvalue()


def numbered_image(index: int, height: int = 40, width: int = 48) -> np.ndarray:
  """An image whose mean colour encodes `index` (recoverable after mild resampling)."""
  rng = np.random.default_rng(index)
  base = np.array([index % 251, (index * 7) % 251, (index * 13) % 251], np.float32)
  noise = rng.normal(0, 2, (height, width, 3))
  return np.clip(base + noise, 0, 255).astype(np.uint8)


def build(data_dir, splits: dict, num_classes: int, num_shards: int = 3, name='fake'):
  """Prepares a dataset with `splits`: {split: [(image_bytes, label), ...]}; returns it."""

  class FakeImages(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    VERSION = tfds.core.Version('1.0.0')

    def _info(self):
      return tfds.core.DatasetInfo(
          builder=self,
          features=tfds.features.FeaturesDict(
              {
                  'image': tfds.features.Image(shape=(None, None, 3), encoding_format='jpeg'),
                  'label': tfds.features.ClassLabel(num_classes=num_classes),
                  'file_name': tfds.features.Text(),
              }
          ),
      )

    def _split_generators(self, dl_manager):
      del dl_manager
      return {split: self._generate_examples(split) for split in splits}

    def _generate_examples(self, split):
      for i, (image, label) in enumerate(splits[split]):
        yield f'{split}_{i:05d}', {'image': image, 'label': label, 'file_name': f'{split}_{i:05d}'}

  FakeImages.name = name
  builder = FakeImages(data_dir=str(data_dir))
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(num_shards=num_shards))
  return builder
