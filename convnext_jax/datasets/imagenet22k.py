"""`imagenet22k`: the full ImageNet (ImageNet-21K/22K) from its per-class tar files.

tfds has no builder for it; this one reads the archive image-net.org distributes (manual
download) and writes the same features as tfds `imagenet2012`, so one input pipeline reads
both.

Labels are indices into a sorted list of WordNet ids: by default the wnids of the class tars
present (fall11 has 21841, the label order of the official ConvNeXt and timm 22K
checkpoints), or a class-list file (one wnid per line, e.g. timm's `imagenet22k_synsets.txt`)
so that a release with fewer classes (winter21 has 19167) lands in the 21841-wide label space.

There is no official validation set; `validation` is a held-out ~1% of the images, picked per
image by a hash of its file name (`is_validation`): stable across builds, machines and
releases, and independent of which other images are present.

The archive is over 1 TB, so besides the plain single-process build this builder supports an
Apache Beam build (one work item per class tar) when a Beam runner or options are given:
`tfds build imagenet22k --imports convnext_jax.datasets --beam_pipeline_options=...`.
See docs/datasets.md for the commands.
"""

import collections
from collections.abc import Callable
from collections.abc import Iterator
import dataclasses
import hashlib
import os
import posixpath
import re
import tarfile

from absl import logging
from etils import epath
import tensorflow_datasets as tfds

from convnext_jax.datasets import image_codec
from convnext_jax.datasets import tfds_compat

DEFAULT_VALIDATION_FRACTION = 0.01
_WNID = re.compile(r'n\d{8}')
_BEAM_COUNTER_NAMESPACE = 'imagenet22k'

_CITATION = """\
@inproceedings{deng2009imagenet,
  title={ImageNet: A large-scale hierarchical image database},
  author={Deng, Jia and Dong, Wei and Socher, Richard and Li, Li-Jia and Li, Kai and
          Fei-Fei, Li},
  booktitle={2009 IEEE Conference on Computer Vision and Pattern Recognition},
  pages={248--255},
  year={2009}
}
"""


def is_validation(file_name: str, fraction: float = DEFAULT_VALIDATION_FRACTION) -> bool:
  """Whether an image belongs to the held-out validation slice.

  The first 8 bytes of SHA-256(file name), read as a big-endian integer, below
  `fraction * 2**64`. A pure function of the name (e.g. `n01440764_10026.JPEG`), so the slice
  is the same on every machine and build, and an image keeps its split in every release that
  has it.

  Args:
    file_name: the image's file name inside its class tar, without directories.
    fraction: expected share of images in the validation slice.

  Returns:
    True for validation, False for train.
  """
  digest = hashlib.sha256(file_name.encode('utf-8')).digest()
  return int.from_bytes(digest[:8], 'big') < fraction * 2.0**64


def read_class_list(path: epath.PathLike) -> list[str]:
  """WordNet ids from a class-list file: one per line, in label order; blank lines ignored.

  Raises:
    ValueError: a line is not a wnid (`n` and 8 digits), or a wnid is listed twice.
  """
  wnids = []
  for line_number, line in enumerate(epath.Path(path).read_text().splitlines(), start=1):
    wnid = line.strip()
    if not wnid:
      continue
    if not _WNID.fullmatch(wnid):
      raise ValueError(
          f'{path}:{line_number}: {wnid!r} is not a WordNet id (n + 8 digits); '
          "a class list has one wnid per line, e.g. timm's "
          'imagenet22k_synsets.txt'
      )
    wnids.append(wnid)
  duplicates = sorted(w for w, n in collections.Counter(wnids).items() if n > 1)
  if duplicates:
    raise ValueError(
        f'{path}: wnids listed more than once: {duplicates[:5]}; each class must '
        'appear once, at the line of its label index'
    )
  if not wnids:
    raise ValueError(f'{path}: the class list is empty')
  return wnids


@dataclasses.dataclass(frozen=True)
class ClassArchive:
  """Where one class's images are: a class tar, or a class tar inside the outer tar.

  Attributes:
    wnid: the class's WordNet id.
    path: the class tar, or the outer tar (`fall11_whole.tar`) holding it.
    offset: byte offset of the class tar's data inside the outer tar.
    size: byte size of the class tar inside the outer tar; -1 when `path` is the class tar.
  """

  wnid: str
  path: str
  offset: int = 0
  size: int = -1


class _Window:
  """A read-only stream over `size` bytes of a file, from its current position."""

  def __init__(self, fileobj, size: int):
    self._fileobj = fileobj
    self._left = size

  def read(self, size: int = -1) -> bytes:
    if size < 0 or size > self._left:
      size = self._left
    data = self._fileobj.read(size)
    self._left -= len(data)
    return data


def iter_class_images(archive: ClassArchive) -> Iterator[tuple[str, bytes]]:
  """Yields (member name, bytes) of every file in a class tar, in archive order.

  Reads the tar as a stream: no seeking, nothing held in memory but the current image, which
  suits GCS as well as local disks.

  Raises:
    tarfile.TarError: the class tar is damaged (re-download it: one bad tar is not one bad
      image, and silently dropping a class would change the dataset).
  """
  with epath.Path(archive.path).open('rb') as f:
    stream = f
    if archive.size >= 0:
      f.seek(archive.offset)
      stream = _Window(f, archive.size)
    try:
      with tarfile.open(fileobj=stream, mode='r|') as tar:
        for member in tar:
          if member.isfile():
            yield member.name, tar.extractfile(member).read()
    except tarfile.TarError as e:
      where = f'{archive.path}@{archive.offset}' if archive.size >= 0 else archive.path
      raise tarfile.TarError(
          f'Class tar of {archive.wnid} ({where}) is damaged: {e}. Download or extract it again.'
      ) from e


def class_examples(
    archive: ClassArchive,
    split: str,
    validation_fraction: float,
    on_outcome: Callable[[image_codec.Outcome], None],
):
  """Yields the (key, example) pairs of one class that belong to `split`.

  Args:
    archive: the class's tar.
    split: 'train' or 'validation'.
    validation_fraction: share of images held out for validation (see `is_validation`).
    on_outcome: called with each image's `image_codec.Outcome`, for counting.
  """
  want_validation = split == 'validation'
  for member_name, data in iter_class_images(archive):
    file_name = posixpath.basename(member_name)
    # Decide the split before decoding, so each pass over the archive decodes only its images.
    if is_validation(file_name, validation_fraction) != want_validation:
      continue
    jpeg, outcome = image_codec.to_rgb_jpeg(data)
    on_outcome(outcome)
    if jpeg is None:
      continue
    yield f'{archive.wnid}/{member_name}', {
        'image': jpeg,
        'label': archive.wnid,
        'file_name': file_name,
    }


def _count_with_beam(outcome: image_codec.Outcome) -> None:
  beam = tfds.core.lazy_imports.apache_beam
  beam.metrics.Metrics.counter(_BEAM_COUNTER_NAMESPACE, f'images_{outcome.value}').inc()


def _search_dirs(manual_dir: epath.Path) -> list[epath.Path]:
  """`manual_dir` and its sub-directories: where the tars may be after extraction."""
  return [manual_dir] + sorted(p for p in manual_dir.iterdir() if p.is_dir())


def _list_outer_tar(path: epath.Path) -> list[ClassArchive]:
  """The class tars inside an uncompressed outer tar, found by reading only its headers."""
  archives = []
  with path.open('rb') as f, tarfile.open(fileobj=f, mode='r:') as tar:
    for member in tar:
      stem, ext = posixpath.splitext(posixpath.basename(member.name))
      if member.isfile() and ext == '.tar' and _WNID.fullmatch(stem):
        archives.append(ClassArchive(stem, os.fspath(path), member.offset_data, member.size))
      elif member.isfile():
        logging.warning(
            '%s: ignoring %s, which is not a class tar (n########.tar).', path, member.name
        )
  return archives


def find_class_archives(manual_dir: epath.PathLike) -> list[ClassArchive]:
  """Finds the class tars in `manual_dir`, sorted by wnid.

  Looks in `manual_dir` and its immediate sub-directories, first for class tars
  (`n01440764.tar`, ...), then, if there are none, for one uncompressed outer tar of class
  tars (`fall11_whole.tar`).

  Raises:
    FileNotFoundError: neither layout is there.
    ValueError: a wnid has two class tars, or there are several outer tars.
  """
  manual_dir = epath.Path(manual_dir)
  dirs = _search_dirs(manual_dir)
  class_tars, outer_tars, compressed = {}, [], []
  for directory in dirs:
    for path in sorted(directory.iterdir()):
      stem, ext = os.path.splitext(path.name)
      if ext == '.tar' and _WNID.fullmatch(stem):
        if stem in class_tars:
          raise ValueError(
              f'Two tars for class {stem}: {class_tars[stem]} and {path}; keep '
              'one copy of each class tar under the manual dir'
          )
        class_tars[stem] = path
      elif ext == '.tar':
        outer_tars.append(path)
      elif path.name.endswith(('.tar.gz', '.tgz')):
        compressed.append(path)
  if class_tars:
    if outer_tars:
      logging.info(
          'Reading the %d class tars; ignoring %s.',
          len(class_tars),
          [os.fspath(p) for p in outer_tars],
      )
    return [ClassArchive(w, os.fspath(class_tars[w])) for w in sorted(class_tars)]
  if len(outer_tars) > 1:
    raise ValueError(
        f'Several tars in {manual_dir} and none is a class tar: '
        f'{[os.fspath(p) for p in outer_tars]}; keep only the outer tar '
        '(e.g. fall11_whole.tar) or extract it into class tars'
    )
  if outer_tars:
    logging.info('Listing the class tars inside %s.', outer_tars[0])
    archives = _list_outer_tar(outer_tars[0])
    if archives:
      return sorted(archives, key=lambda a: a.wnid)
    raise FileNotFoundError(f'{outer_tars[0]} holds no class tars (n########.tar)')
  hint = (
      (
          f' A compressed archive cannot be read in place: extract it first, e.g. '
          f'`tar xzf {compressed[0]} -C {manual_dir}`.'
      )
      if compressed
      else ''
  )
  raise FileNotFoundError(
      f'No ImageNet-22K class tars (n01440764.tar, ...) nor outer tar '
      f'(fall11_whole.tar) in {manual_dir} or its sub-directories.{hint}'
  )


@dataclasses.dataclass(eq=False)
class Imagenet22kConfig(tfds.core.BuilderConfig):
  """How labels and the validation slice are made.

  Attributes:
    class_list: file with one wnid per line, in label order; None: the sorted wnids of the
      class tars present.
    validation_fraction: expected share of each class held out as `validation`.
    prepared_only: a config known only by name, for reading a dataset already prepared with a
      class list; it cannot build.
  """

  class_list: str | None = None
  validation_fraction: float = DEFAULT_VALIDATION_FRACTION
  prepared_only: bool = False


def config_for_class_list(class_list: epath.PathLike, **kwargs) -> Imagenet22kConfig:
  """A config for labels in `class_list`'s order, named after its length and content.

  The name (e.g. `classes21841_1a2b3c4d`) depends only on the list, so the same list finds the
  same prepared data and different lists never share a directory.
  """
  wnids = read_class_list(class_list)
  digest = hashlib.sha256('\n'.join(wnids).encode()).hexdigest()[:8]
  return Imagenet22kConfig(
      name=f'classes{len(wnids)}_{digest}',
      class_list=os.fspath(class_list),
      description=f'Labels: the {len(wnids)} wnids of {class_list}, in its order.',
      **kwargs,
  )


class Imagenet22k(tfds_compat.SourceFileCodePath, tfds.core.GeneratorBasedBuilder):
  """ImageNet-22K (the full ImageNet, fall11 or winter21) from its class tars."""

  name = 'imagenet22k'
  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {
      '1.0.0': 'Initial release: train and a hashed ~1% validation slice; CMYK, PNG and other '
      'non-JPEG images re-encoded to RGB JPEG, undecodable files skipped.',
  }
  BUILDER_CONFIGS = [
      Imagenet22kConfig(
          name='default',
          description='Labels: the sorted wnids of the class tars present (21841 for fall11).',
      ),
  ]
  MANUAL_DOWNLOAD_INSTRUCTIONS = """\
  Register at https://image-net.org/download-images and download the full ImageNet ("fall
  2011", fall11_whole.tar, 21841 classes, ~1.3 TB; or "winter 2021", winter21_whole.tar.gz,
  19167 classes). Put in manual_dir (directly or in one sub-directory) either
    * the per-class tars n01440764.tar, n01443537.tar, ... (`tar xf fall11_whole.tar` or
      `tar xzf winter21_whole.tar.gz` gives them), or
    * fall11_whole.tar itself, uncompressed (its class tars are read in place).
  To map winter21 (or any subset) into the 21841-class label space of the official 22K
  checkpoints, pass a class list: class_list=/path/to/imagenet22k_synsets.txt.
  """

  def __init__(self, *, class_list: epath.PathLike | None = None, config=None, **kwargs):
    """Builder; `class_list` makes a config named after the list (see `config_for_class_list`).

    Args:
      class_list: file of wnids in label order, or None for the sorted wnids present.
      config: a config, its name, or None for 'default'. An unknown name reads a dataset
        prepared earlier with a class list (`tfds.builder('imagenet22k/classes21841_...')`).
      **kwargs: for `tfds.core.GeneratorBasedBuilder` (data_dir, version, ...).
    """
    if class_list is not None:
      if config is not None:
        raise ValueError('Pass either class_list or config to imagenet22k, not both')
      config = config_for_class_list(class_list)
    elif isinstance(config, str):
      name = config.split(':')[0]
      if name not in self.builder_configs:
        config = Imagenet22kConfig(
            name=name, prepared_only=True, description='Known by name only: read-only.'
        )
    self._use_beam = False
    super().__init__(config=config, **kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=(
            'ImageNet-22K (ImageNet-21K): the full ImageNet, about 14.2 million images in '
            '21841 WordNet synsets in its fall 2011 release (19167 in winter 2021), as used '
            'to pre-train ConvNeXt and other "22K" models. Labels index the sorted wnids '
            '(or a given class list). There is no official validation set: `validation` '
            'holds about 1% of the images, chosen by a hash of the file name. Images are '
            'JPEG; the few CMYK JPEGs and non-JPEG files are re-encoded to RGB JPEG and '
            'undecodable files are left out.'
        ),
        features=tfds.features.FeaturesDict(
            {
                'image': tfds.features.Image(shape=(None, None, 3), encoding_format='jpeg'),
                # Names come from the archive or the class list, in `_split_generators`.
                'label': tfds.features.ClassLabel(),
                'file_name': tfds.features.Text(),  # e.g. n01440764_10026.JPEG
            }
        ),
        supervised_keys=('image', 'label'),
        homepage='https://image-net.org/',
        citation=_CITATION,
    )

  def _download_and_prepare(self, dl_manager, download_config):
    # tfds starts a Beam pipeline only for splits given as Beam transforms; build them when the
    # caller asked for Beam (a runner, or --beam_pipeline_options), generators otherwise.
    self._use_beam = bool(download_config.beam_runner or download_config.beam_options)
    if self._use_beam:
      tfds.core.lazy_imports.apache_beam  # noqa: B018 (imports Beam, or says how to install it)
      logging.info('imagenet22k: building with Apache Beam, one work item per class tar.')
    return super()._download_and_prepare(dl_manager, download_config)

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    config = self.builder_config
    if config.prepared_only:
      raise ValueError(
          f'imagenet22k/{config.name} is not prepared under {self.data_dir} and '
          'cannot be built by name; pass class_list=... (or a config) to build it'
      )
    archives = find_class_archives(dl_manager.manual_dir)
    present = [a.wnid for a in archives]
    if config.class_list:
      names = read_class_list(config.class_list)
      unknown = sorted(set(present) - set(names))
      if unknown:
        raise ValueError(
            f'{len(unknown)} class tars are not in the class list {config.class_list}: '
            f'{unknown[:5]}{"..." if len(unknown) > 5 else ""}; use a list that has them or '
            'remove those tars from the manual dir'
        )
      logging.info(
          'imagenet22k: %d class tars, labels from %s (%d classes, %d without tar).',
          len(present),
          config.class_list,
          len(names),
          len(names) - len(present),
      )
    else:
      names = present
      logging.info(
          'imagenet22k: %d class tars (fall11 has 21841); labels are their sorted wnids.',
          len(names),
      )
    self.info.features['label'].names = names
    return {
        split: self._generate_examples(archives, split, config.validation_fraction)
        for split in ('train', 'validation')
    }

  def _generate_examples(
      self, archives: list[ClassArchive], split: str, validation_fraction: float
  ):
    if self._use_beam:
      beam = tfds.core.lazy_imports.apache_beam
      # Reshuffle spreads the class tars over the workers instead of fusing them with the
      # (single) source; each tar is then read and checked by one worker.
      return (
          beam.Create(archives)
          | 'SpreadClassTars' >> beam.Reshuffle()
          | 'ReadClassTars'
          >> beam.FlatMap(
              class_examples,
              split=split,
              validation_fraction=validation_fraction,
              on_outcome=_count_with_beam,
          )
      )
    return self._iter_examples(archives, split, validation_fraction)

  def _iter_examples(self, archives, split, validation_fraction):
    counts = image_codec.OutcomeCounts()
    for archive in archives:
      yield from class_examples(archive, split, validation_fraction, counts.add)
    counts.log(f'imagenet22k {split}')

  def _process_pipeline_result(self, pipeline_result) -> None:
    """Logs the Beam counters of kept, re-encoded and skipped images."""
    if pipeline_result is None:
      return
    beam = tfds.core.lazy_imports.apache_beam
    query = pipeline_result.metrics().query(
        beam.metrics.MetricsFilter().with_namespace(_BEAM_COUNTER_NAMESPACE)
    )
    # Each split's step has its own counter of a name: add them up. `result` is the committed
    # value, or the attempted one on runners that do not commit metrics.
    totals = collections.Counter()
    for counter in query['counters']:
      totals[counter.key.metric.name] += counter.result or 0
    for name, total in sorted(totals.items()):
      level = logging.WARNING if name.endswith('skipped') and total else logging.INFO
      logging.log(level, 'imagenet22k (all splits): %s = %d', name, total)
