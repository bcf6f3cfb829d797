"""`class_folder`: a tfds dataset from a folder of images sorted into one directory per class.

    root/train/<class>/**/<image>         required; class names = its sorted sub-directories
    root/val/<class>/**/<image>           optional, becomes split 'validation'
                                          (`root/validation/` is accepted too)
    root/test/<class>/**/<image>          optional

Every split must have the same class directories as `train`. Any image Pillow reads is
stored as JPEG (non-JPEGs and CMYK JPEGs re-encoded to RGB, JPEGs kept as they are), so the
input pipeline reads the result exactly as it reads tfds `imagenet2012`; files that cannot be
decoded are skipped and counted.

Each folder gets its own config, named after the folder (`<basename>_<hash of the path>`, or
`config_name=`), so several folders share one data_dir without clashing:

    import convnext_jax.datasets  # registers the builder
    builder = tfds.builder('class_folder', root='/data/flowers', data_dir=data_dir)
    builder.download_and_prepare()
    # Later, also without the images: tfds.builder('class_folder/flowers_1a2b3c4d', ...)

The name differs from tfds's own `tfds.folder_dataset.ImageFolder` (`image_folder`), which
reads images in place and stores no records.
"""

import dataclasses
import hashlib
import os
import posixpath
import re

from absl import logging
from etils import epath
import tensorflow_datasets as tfds

from convnext_jax import fileio
from convnext_jax.datasets import image_codec
from convnext_jax.datasets import tfds_compat

# Directory name -> tfds split name; 'val' and 'validation' mean the same split.
SPLIT_DIRS = {'train': 'train', 'val': 'validation', 'validation': 'validation', 'test': 'test'}


def _is_hidden(path: epath.Path) -> bool:
  # .DS_Store, ._resource forks, .ipynb_checkpoints: not images, and not classes.
  return path.name.startswith('.')


def _root_string(root: epath.PathLike) -> str:
  root = os.fspath(root)
  return root if fileio.is_remote(root) else os.path.abspath(root)


def default_config_name(root: epath.PathLike) -> str:
  """`<folder name>_<8 hex digits of SHA-256(absolute path)>`: unique per folder, readable."""
  root = _root_string(root).rstrip('/')
  base = re.sub(r'[^a-z0-9]+', '_', posixpath.basename(root).lower()).strip('_') or 'folder'
  return f'{base}_{hashlib.sha256(root.encode()).hexdigest()[:8]}'


def find_splits(root: epath.PathLike) -> dict[str, epath.Path]:
  """Split name -> directory, for the split directories present under `root`.

  Raises:
    FileNotFoundError: `root/train` is missing.
    ValueError: both `val` and `validation` are present.
  """
  root = epath.Path(root)
  if not (root / 'train').is_dir():
    raise FileNotFoundError(
        f'No {root / "train"} directory: a class folder is laid out as '
        'root/train/<class>/<image> (plus optional val/ and test/)'
    )
  splits = {}
  for dir_name, split in SPLIT_DIRS.items():
    path = root / dir_name
    if path.is_dir():
      if split in splits:
        raise ValueError(
            f'Both {splits[split]} and {path} exist under {root}; both would be '
            f'split {split!r}: keep one'
        )
      splits[split] = path
  return splits


def class_names(split_dir: epath.Path) -> list[str]:
  """The sorted, non-hidden sub-directory names of a split directory."""
  return sorted(p.name for p in split_dir.iterdir() if p.is_dir() and not _is_hidden(p))


def list_images(class_dir: epath.Path) -> list[epath.Path]:
  """Every non-hidden file under `class_dir` (any depth), in sorted path order."""
  # `walk`, not `rglob('*')`: epath's GPath (local and gs://) refuses recursive globs.
  files = []
  for directory, _, file_names in epath.Path(class_dir).walk():
    relative = directory.relative_to(class_dir)
    if any(part.startswith('.') for part in relative.parts):
      continue
    files.extend(directory / name for name in file_names if not name.startswith('.'))
  return sorted(files, key=os.fspath)


@dataclasses.dataclass(eq=False)
class ClassFolderConfig(tfds.core.BuilderConfig):
  """One folder of images.

  Attributes:
    root: the folder holding train/ (and val/, test/); None for a config known by name only,
      which reads a dataset prepared earlier but cannot build.
  """

  root: str | None = None


class ClassFolder(tfds_compat.SourceFileCodePath, tfds.core.GeneratorBasedBuilder):
  """Images sorted into root/<split>/<class>/ directories, stored as JPEG records."""

  name = 'class_folder'
  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {
      '1.0.0': 'Initial release: train/val(idation)/test splits, any Pillow format stored as '
      'RGB JPEG, undecodable files skipped.',
  }

  def __init__(
      self,
      *,
      root: epath.PathLike | None = None,
      config_name: str | None = None,
      config=None,
      **kwargs,
  ):
    """Builder for the folder `root`.

    Args:
      root: the folder holding train/ (and val/ or validation/, test/).
      config_name: the config (and data directory) name; default `default_config_name(root)`.
      config: instead of `root`: a `ClassFolderConfig`, or the name of a prepared config
        (`tfds.builder('class_folder/flowers_1a2b3c4d', data_dir=...)`).
      **kwargs: for `tfds.core.GeneratorBasedBuilder` (data_dir, version, ...).

    Raises:
      ValueError: neither or both of `root` and `config` are given.
    """
    if root is not None:
      if config is not None:
        raise ValueError('Pass either root or config to class_folder, not both')
      root = _root_string(root)
      config = ClassFolderConfig(
          name=config_name or default_config_name(root),
          root=root,
          description=f'Images under {root}.',
      )
    elif isinstance(config, str):
      config = ClassFolderConfig(
          name=config.split(':')[0], description='Known by name only: read-only.'
      )
    elif config is None:
      raise ValueError(
          "class_folder needs the folder of images: tfds.builder('class_folder', "
          "root='/path/to/images', data_dir=...) with root/train/<class>/<image>"
      )
    super().__init__(config=config, **kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=(
            'Images from a folder laid out as root/<split>/<class>/<image>, with split '
            'directories train (required), val or validation, and test. Labels index the '
            'sorted class directory names of train. Images are stored as JPEG; other formats '
            'are re-encoded to RGB JPEG and undecodable files are left out.'
            + (f' Folder: {self.builder_config.root}.' if self.builder_config.root else '')
        ),
        features=tfds.features.FeaturesDict(
            {
                'image': tfds.features.Image(shape=(None, None, 3), encoding_format='jpeg'),
                # Names come from the folder, in `_split_generators`.
                'label': tfds.features.ClassLabel(),
                'file_name': tfds.features.Text(),  # <class>/<path below it>
            }
        ),
        supervised_keys=('image', 'label'),
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    del dl_manager  # The images are already local (or on GCS).
    root = self.builder_config.root
    if root is None:
      raise ValueError(
          f'class_folder/{self.builder_config.name} is not prepared under '
          f'{self.data_dir} and was given no folder; pass root=...'
      )
    splits = find_splits(root)
    names = class_names(splits['train'])
    if not names:
      raise ValueError(
          f'{splits["train"]} has no class directories; expected train/<class>/<image>'
      )
    for split_dir in splits.values():
      other = class_names(split_dir)
      if other != names:
        missing, extra = sorted(set(names) - set(other)), sorted(set(other) - set(names))
        raise ValueError(
            f'{split_dir} must have the class directories of train: missing '
            f'{missing[:5]}, extra {extra[:5]} ({len(missing)} and {len(extra)} '
            'in all); add or remove directories so the class sets agree'
        )
    logging.info('class_folder %s: %d classes, splits %s.', root, len(names), sorted(splits))
    self.info.features['label'].names = names
    return {
        split: self._generate_examples(split, split_dir, names)
        for split, split_dir in splits.items()
    }

  def _generate_examples(self, split: str, split_dir: epath.Path, names: list[str]):
    counts = image_codec.OutcomeCounts()
    for name in names:
      class_dir = split_dir / name
      for path in list_images(class_dir):
        jpeg, outcome = image_codec.to_rgb_jpeg(path.read_bytes())
        counts.add(outcome)
        if jpeg is None:
          logging.warning('Skipping %s: not an image Pillow can decode.', path)
          continue
        file_name = f'{name}/{path.relative_to(class_dir).as_posix()}'
        # The key fixes the (hash-shuffled) record order: the same folder gives the same files.
        yield file_name, {'image': jpeg, 'label': name, 'file_name': file_name}
    if not counts.kept + counts.reencoded:
      raise ValueError(f'{split_dir}: no decodable images in split {split!r}')
    counts.log(f'class_folder {split}')
