"""The tfds builders of `convnext_jax.datasets`, built for real into temporary data dirs.

`convnext_shapes` is built once (about 10 s: it has no smaller config); `imagenet22k` and
`class_folder` are built from small archives and folders made here, with the awkward files
ImageNet has: a CMYK JPEG, a grayscale JPEG, a PNG named .JPEG and a corrupt file.
"""

import collections
import io
import itertools
import logging
import os
import re
import struct
import sys
import tarfile
import types
import zlib

import numpy as np
from PIL import Image
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from convnext_jax import datasets
from convnext_jax.datasets import image_codec
from convnext_jax.datasets import imagenet22k
from convnext_jax.datasets import shapes

tfds.disable_progress_bar()

_JPEG_START = b'\xff\xd8\xff'


def _gradient(seed: int, height: int = 32, width: int = 40) -> np.ndarray:
  """A smooth RGB picture (JPEG round trips stay within a few levels), distinct per seed."""
  yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
  image = np.stack([40 + 4 * xx + 3 * seed, 30 + 5 * yy, 200 - 2 * (xx + yy) + 5 * seed], -1)
  return np.clip(image, 0, 255).astype(np.uint8)


def _encode(image: Image.Image, image_format: str = 'JPEG', **kwargs) -> bytes:
  buffer = io.BytesIO()
  image.save(buffer, format=image_format, **kwargs)
  return buffer.getvalue()


def _decode(data: bytes) -> np.ndarray:
  """As the input pipeline decodes: JPEG only, three channels."""
  return tf.io.decode_jpeg(data, channels=3).numpy()


def _records(builder, split: str) -> dict[str, tuple[int, bytes]]:
  """file_name -> (label, stored image bytes) of one split."""
  dataset = builder.as_dataset(split=split, decoders={'image': tfds.decode.SkipDecoding()})
  out = {}
  for example in tfds.as_numpy(dataset):
    out[example['file_name'].decode()] = (int(example['label']), example['image'])
  return out


def _mean_abs_diff(a: np.ndarray, b: np.ndarray) -> float:
  return float(np.abs(a.astype(np.float32) - b.astype(np.float32)).mean())


def _ramp16(height: int = 32, width: int = 40) -> np.ndarray:
  """A uint16 ramp over the full range, 0 at the top left to 65535 at the bottom right."""
  return (np.arange(height * width).reshape(height, width) * 65535 // (height * width - 1)).astype(
      np.uint16
  )


def _png16(samples: np.ndarray) -> bytes:
  """A 16-bit PNG written without Pillow: (H, W) grayscale or (H, W, 3) RGB samples."""
  height, width = samples.shape[:2]
  color_type = 2 if samples.ndim == 3 else 0
  rows = samples.reshape(height, -1).astype('>u2')
  raw = b''.join(b'\0' + row.tobytes() for row in rows)  # Filter type 0 on every row.

  def chunk(kind: bytes, data: bytes) -> bytes:
    return (
        struct.pack('>I', len(data))
        + kind
        + data
        + struct.pack('>I', zlib.crc32(kind + data) & 0xFFFFFFFF)
    )

  header = struct.pack('>IIBBBBB', width, height, 16, color_type, 0, 0, 0)
  return (
      b'\x89PNG\r\n\x1a\n'
      + chunk(b'IHDR', header)
      + chunk(b'IDAT', zlib.compress(raw))
      + chunk(b'IEND', b'')
  )


# --------------------------------------------------------------------------------------------
# convnext_shapes


@pytest.fixture(scope='module')
def shapes_builder(tmp_path_factory):
  return datasets.prepare('convnext_shapes', data_dir=os.fspath(tmp_path_factory.mktemp('tfds')))


@pytest.fixture(scope='module')
def shapes_records(shapes_builder):
  return {split: _records(shapes_builder, split) for split in ('train', 'validation')}


def test_shapes_info_and_balance(shapes_builder, shapes_records):
  info = shapes_builder.info
  assert shapes_builder.is_prepared()
  assert info.splits['train'].num_examples == 5000
  assert info.splits['validation'].num_examples == 1000
  assert info.features['label'].num_classes == 10
  assert info.features['label'].names == list(shapes.CLASS_NAMES)
  assert info.supervised_keys == ('image', 'label')
  for split, per_class in (('train', 500), ('validation', 100)):
    records = shapes_records[split]
    assert len(records) == 10 * per_class
    counts = collections.Counter(label for label, _ in records.values())
    assert counts == dict.fromkeys(range(10), per_class)
    # Labels cycle through the classes with the index in the file name.
    for file_name, (label, _) in itertools.islice(records.items(), 200):
      index = int(re.fullmatch(rf'{split}_(\d{{5}})\.jpg', file_name).group(1))
      assert label == index % 10


def test_shapes_images_are_64px_rgb_jpegs(shapes_records):
  for split in ('train', 'validation'):
    for _, data in itertools.islice(shapes_records[split].values(), 100):
      assert data.startswith(_JPEG_START)
      with Image.open(io.BytesIO(data)) as image:
        assert (image.format, image.mode, image.size) == ('JPEG', 'RGB', (64, 64))
      assert _decode(data).shape == (64, 64, 3)
  # Train and validation images come from different random streams: no image is in both.
  train_images = {data for _, data in shapes_records['train'].values()}
  assert not train_images & {data for _, data in shapes_records['validation'].values()}
  assert len(train_images) == 5000


def test_shapes_are_deterministic(shapes_records):
  # The stored bytes are exactly what `encode_example` draws again for the same index.
  for split, index in [
      ('train', 0),
      ('train', 1234),
      ('train', 4999),
      ('validation', 7),
      ('validation', 999),
  ]:
    label, data = shapes_records[split][f'{split}_{index:05d}.jpg']
    assert shapes.encode_example(split, index) == (data, label)
  assert shapes.encode_example('train', 3) != shapes.encode_example('validation', 3)


def test_shape_classes_differ_in_shape_not_in_colour(shapes_records):
  # The random draws do not depend on the label, so one seed gives the same background,
  # colour, position, size and rotation for every class: only the drawn shape differs.
  for seed in (5, 11):
    images = [shapes.draw_example(label, np.random.default_rng(seed)) for label in range(10)]
    for a, b in itertools.combinations(range(10), 2):
      changed = np.any(images[a] != images[b], axis=-1).mean()
      assert 0.02 < changed < 0.5, (shapes.CLASS_NAMES[a], shapes.CLASS_NAMES[b], changed)
  # Hue carries no class information: every class's mean colour is a grey (equal channels).
  # Its brightness may differ, since a light shape covering more area lightens the image.
  sums, counts = np.zeros((10, 3)), np.zeros(10)
  for label, data in shapes_records['train'].values():
    sums[label] += _decode(data).reshape(-1, 3).mean(0)
    counts[label] += 1
  class_means = sums / counts[:, None]
  chromaticity = class_means / class_means.sum(1, keepdims=True)
  assert np.abs(chromaticity - 1 / 3).max() < 0.01, chromaticity.round(3)


def test_shapes_are_lighter_than_their_backgrounds():
  # One polarity (light on dark, any hue) for every image; see the module docstring for why.
  for seed in range(300):
    rng = np.random.default_rng(seed)
    _, background = shapes._background(rng)
    colour = shapes._contrasting_colour(rng, background)
    for b in background:
      assert colour.mean() - b.mean() >= 70 and np.linalg.norm(colour - b) >= 110, seed


# --------------------------------------------------------------------------------------------
# imagenet22k

# Deliberately not created in sorted order: labels must follow the sorted wnids.
_WNIDS = ('n02000000', 'n00100000', 'n01000000')


def _held_out_name(wnid: str) -> str:
  """The first `<wnid>_<i>.JPEG` (i >= 100) that the hash puts into validation."""
  index = 100
  while not imagenet22k.is_validation(f'{wnid}_{index}.JPEG'):
    index += 1
  return f'{wnid}_{index}.JPEG'


def _class_files(wnid: str, odd_files: bool) -> dict[str, tuple[bytes, str, np.ndarray | None]]:
  """file name -> (bytes, kind, expected RGB pixels) of one class tar."""
  seed = _WNIDS.index(wnid) * 10
  files = {}
  for i, name in enumerate([f'{wnid}_1.JPEG', f'{wnid}_2.JPEG', _held_out_name(wnid)]):
    pixels = _gradient(seed + i)
    files[name] = (_encode(Image.fromarray(pixels), quality=92), 'rgb', pixels)
  if odd_files:
    pixels = _gradient(seed + 5)
    files[f'{wnid}_cmyk.JPEG'] = (
        _encode(Image.fromarray(pixels).convert('CMYK'), quality=95),
        'cmyk',
        pixels,
    )
    gray = np.asarray(Image.fromarray(_gradient(seed + 6)).convert('L'))
    files[f'{wnid}_gray.JPEG'] = (
        _encode(Image.fromarray(gray), quality=95),
        'gray',
        np.stack([gray] * 3, -1),
    )
    pixels = _gradient(seed + 7)
    files[f'{wnid}_png.JPEG'] = (_encode(Image.fromarray(pixels), 'PNG'), 'png', pixels)
    # Cut short inside the entropy-coded data (after the start-of-scan marker), as a broken
    # download would be.
    whole = _encode(Image.fromarray(_gradient(seed + 8)), quality=92)
    start_of_scan = whole.index(b'\xff\xda')
    truncated = whole[: (start_of_scan + len(whole)) // 2]
    files[f'{wnid}_corrupt.JPEG'] = (truncated, 'corrupt', None)
  return files


def _tar_bytes(members: dict[str, bytes]) -> bytes:
  buffer = io.BytesIO()
  with tarfile.open(fileobj=buffer, mode='w') as tar:
    for name, data in members.items():
      info = tarfile.TarInfo(name)
      info.size = len(data)
      tar.addfile(info, io.BytesIO(data))
  return buffer.getvalue()


@pytest.fixture(scope='module')
def fake_imagenet22k(tmp_path_factory):
  """Class tars in a manual dir; returns (manual_dir, {file name: (wnid, bytes, kind, pixels)})."""
  manual_dir = tmp_path_factory.mktemp('manual22k')
  expected = {}
  for wnid in _WNIDS:
    files = _class_files(wnid, odd_files=wnid == 'n01000000')
    (manual_dir / f'{wnid}.tar').write_bytes(
        _tar_bytes({name: data for name, (data, _, _) in files.items()})
    )
    for name, (data, kind, pixels) in files.items():
      expected[name] = (wnid, data, kind, pixels)
  return manual_dir, expected


def _prepare_logged(caplog, name, **kwargs):
  """`datasets.prepare(...)` and the absl log lines it wrote."""
  caplog.clear()
  with caplog.at_level(logging.INFO, logger='absl'):
    builder = datasets.prepare(name, **kwargs)
  return builder, [record.getMessage() for record in caplog.records]


def _outcome_totals(messages: list[str], what: str) -> collections.Counter:
  """Adds up the `OutcomeCounts.log` lines of all splits."""
  pattern = re.compile(
      rf'{what} \w+: (\d+) images kept as they were, (\d+) re-encoded to RGB '
      r'JPEG, (\d+) skipped as undecodable\.'
  )
  totals = collections.Counter()
  for message in messages:
    match = pattern.fullmatch(message)
    if match:
      totals.update(
          dict(
              zip(
                  ('kept', 'reencoded', 'skipped', 'splits'), [int(n) for n in match.groups()] + [1]
              )
          )
      )
  return totals


@pytest.fixture(scope='module')
def imagenet22k_records(fake_imagenet22k, tmp_path_factory):
  manual_dir, _ = fake_imagenet22k
  builder = datasets.prepare(
      'imagenet22k',
      data_dir=os.fspath(tmp_path_factory.mktemp('tfds')),
      manual_dir=os.fspath(manual_dir),
  )
  return builder, {split: _records(builder, split) for split in ('train', 'validation')}


def test_is_validation_is_a_stable_one_percent():
  names = [f'n01440764_{i}.JPEG' for i in range(20_000)]
  held_out = [name for name in names if imagenet22k.is_validation(name)]
  assert 160 <= len(held_out) <= 240  # 1% of 20000 = 200, binomial sd 14.
  assert held_out == [name for name in names if imagenet22k.is_validation(name)]
  half = sum(imagenet22k.is_validation(name, fraction=0.5) for name in names)
  assert 9700 <= half <= 10300  # sd 71.


def test_imagenet22k_from_class_tars(fake_imagenet22k, imagenet22k_records):
  _, expected = fake_imagenet22k
  builder, records = imagenet22k_records
  wnids = sorted(_WNIDS)
  assert builder.builder_config.name == 'default'
  assert builder.info.features['label'].names == wnids
  train, validation = records['train'], records['validation']
  # 12 decodable images: the 3 picked for validation, and n02000000_2.JPEG, which the hash
  # happens to hold out too.
  assert builder.info.splits['train'].num_examples == len(train) == 8
  assert builder.info.splits['validation'].num_examples == len(validation) == 4
  # The split is a partition of the decodable images, decided by the file-name hash.
  decodable = {name for name, (*_, kind, _) in expected.items() if kind != 'corrupt'}
  assert not set(train) & set(validation)
  assert set(train) | set(validation) == decodable
  assert set(validation) == {name for name in decodable if imagenet22k.is_validation(name)}
  assert set(validation) == {_held_out_name(wnid) for wnid in _WNIDS} | {'n02000000_2.JPEG'}
  for name, (label, data) in {**train, **validation}.items():
    wnid, source, kind, pixels = expected[name]
    assert label == wnids.index(wnid), name
    assert data.startswith(_JPEG_START), name
    decoded = _decode(data)
    assert decoded.shape == pixels.shape, name
    if kind in ('rgb', 'gray'):
      assert data == source, name  # Plain JPEGs are stored byte for byte.
      assert _mean_abs_diff(decoded, pixels) < 2.0, name
    else:  # CMYK and PNG: re-encoded at quality 95 to RGB pixels close to the originals.
      with Image.open(io.BytesIO(data)) as image:
        assert (image.format, image.mode) == ('JPEG', 'RGB'), name
      assert _mean_abs_diff(decoded, pixels) < 3.0, (name, _mean_abs_diff(decoded, pixels))


def test_imagenet22k_counts_skipped_images(fake_imagenet22k, tmp_path, caplog):
  manual_dir, expected = fake_imagenet22k
  _, messages = _prepare_logged(
      caplog, 'imagenet22k', data_dir=os.fspath(tmp_path), manual_dir=os.fspath(manual_dir)
  )
  kinds = collections.Counter(kind for *_, kind, _ in expected.values())
  assert kinds == {'rgb': 9, 'cmyk': 1, 'gray': 1, 'png': 1, 'corrupt': 1}
  # Summed over the train and validation log lines: RGB and gray JPEGs kept, CMYK and PNG
  # re-encoded, the truncated file skipped (and so in neither split).
  assert _outcome_totals(messages, 'imagenet22k') == {
      'kept': 10,
      'reencoded': 2,
      'skipped': 1,
      'splits': 2,
  }


def test_image_codec_outcomes():
  rgb = _encode(Image.fromarray(_gradient(0)), quality=90)
  gray = _encode(Image.fromarray(_gradient(0)).convert('L'), quality=90)
  assert image_codec.to_rgb_jpeg(rgb) == (rgb, image_codec.Outcome.KEPT)
  assert image_codec.to_rgb_jpeg(gray) == (gray, image_codec.Outcome.KEPT)
  for data in (
      _encode(Image.fromarray(_gradient(0)).convert('CMYK')),
      _encode(Image.fromarray(_gradient(0)), 'PNG'),
      _encode(Image.fromarray(_gradient(0)).convert('RGBA'), 'WEBP', lossless=True),
  ):
    jpeg, outcome = image_codec.to_rgb_jpeg(data)
    assert outcome == image_codec.Outcome.REENCODED
    assert Image.open(io.BytesIO(jpeg)).mode == 'RGB'
    assert _mean_abs_diff(_decode(jpeg), _gradient(0)) < 3.0
  for data in (rgb[:300], b'not an image', b''):
    assert image_codec.to_rgb_jpeg(data) == (None, image_codec.Outcome.SKIPPED)


def test_image_codec_16bit_grayscale_keeps_the_high_byte():
  ramp = _ramp16()
  expected = np.repeat((ramp >> 8).astype(np.uint8)[..., None], 3, axis=-1)
  png = _encode(Image.fromarray(ramp), 'PNG')
  # 16-bit PGM with a 10-bit maximum: Pillow scales it to 0..65535 and opens it as 'I'.
  pgm = b'P5\n40 32\n1023\n' + (ramp >> 6).astype('>u2').tobytes()
  with Image.open(io.BytesIO(png)) as image:
    assert image.mode == 'I;16'  # What Image.convert('RGB') clips to white above 255.
  with Image.open(io.BytesIO(pgm)) as image:
    assert image.mode == 'I'
  for data in (png, pgm, _png16(ramp)):
    jpeg, outcome = image_codec.to_rgb_jpeg(data)
    assert outcome == image_codec.Outcome.REENCODED
    decoded = _decode(jpeg)
    assert (decoded < 250).mean() > 0.9  # Not white: the ramp's top byte is >= 250 for 2%.
    assert _mean_abs_diff(decoded, expected) < 2.0
  # Pillow itself reduces 16-bit RGB PNGs to their high bytes; grayscale now agrees.
  rgb16 = np.stack([ramp, ramp, ramp], -1)
  with Image.open(io.BytesIO(_png16(rgb16))) as image:
    assert image.mode == 'RGB'
    np.testing.assert_array_equal(np.asarray(image), expected)


def test_imagenet22k_from_outer_tar(fake_imagenet22k, imagenet22k_records, tmp_path):
  # fall11_whole.tar holds the class tars; they are read in place, giving the same dataset.
  class_tars_dir, _ = fake_imagenet22k
  manual_dir = tmp_path / 'manual'
  manual_dir.mkdir()
  with tarfile.open(manual_dir / 'fall11_whole.tar', 'w') as outer:
    for wnid in _WNIDS:
      outer.add(class_tars_dir / f'{wnid}.tar', arcname=f'{wnid}.tar')
  archives = imagenet22k.find_class_archives(manual_dir)
  assert [archive.wnid for archive in archives] == sorted(_WNIDS)
  assert all(archive.size > 0 for archive in archives)
  builder = datasets.prepare(
      'imagenet22k', data_dir=os.fspath(tmp_path / 'tfds'), manual_dir=os.fspath(manual_dir)
  )
  _, from_class_tars = imagenet22k_records
  assert builder.info.features['label'].names == sorted(_WNIDS)
  for split in ('train', 'validation'):
    assert _records(builder, split) == from_class_tars[split]


def test_imagenet22k_with_class_list(fake_imagenet22k, tmp_path):
  manual_dir, expected = fake_imagenet22k
  # Not sorted, and n00000042 has no tar: labels index this list, gaps are fine.
  class_list = ['n01000000', 'n00000042', 'n02000000', 'n00100000']
  list_file = tmp_path / 'synsets.txt'
  list_file.write_text('\n'.join(class_list) + '\n\n')
  data_dir = os.fspath(tmp_path / 'tfds')
  builder = datasets.prepare(
      'imagenet22k',
      data_dir=data_dir,
      manual_dir=os.fspath(manual_dir),
      class_list=os.fspath(list_file),
  )
  assert re.fullmatch(r'classes4_[0-9a-f]{8}', builder.builder_config.name)
  assert builder.info.features['label'].names == class_list
  train = _records(builder, 'train')
  assert len(train) == 8
  for name, (label, _) in train.items():
    assert label == class_list.index(expected[name][0]), name
  # Read back later by config name alone, without the list or the tars.
  reread = datasets.builder(f'imagenet22k/{builder.builder_config.name}', data_dir=data_dir)
  assert reread.is_prepared()
  assert reread.info.features['label'].names == class_list
  assert reread.info.splits['validation'].num_examples == 4


def test_imagenet22k_class_list_errors(fake_imagenet22k, tmp_path):
  manual_dir, _ = fake_imagenet22k
  short_list = tmp_path / 'short.txt'
  short_list.write_text('n02000000\nn00100000\n')  # n01000000.tar is not in it.
  with pytest.raises(ValueError, match=r'1 class tars are not in the class list .*n01000000'):
    datasets.prepare(
        'imagenet22k',
        data_dir=os.fspath(tmp_path / 'tfds'),
        manual_dir=os.fspath(manual_dir),
        class_list=os.fspath(short_list),
    )
  bad_list = tmp_path / 'bad.txt'
  bad_list.write_text('n02000000\ntench\n')
  with pytest.raises(ValueError, match=r'bad.txt:2: .tench. is not a WordNet id'):
    imagenet22k.read_class_list(bad_list)
  bad_list.write_text('n02000000\nn02000000\n')
  with pytest.raises(ValueError, match=r'listed more than once'):
    imagenet22k.read_class_list(bad_list)


def test_imagenet22k_manual_dir_errors(tmp_path):
  (tmp_path / 'winter21_whole.tar.gz').write_bytes(b'')
  with pytest.raises(
      FileNotFoundError,
      match=r'No ImageNet-22K class tars .* extract it '
      r'first, e\.g\. `tar xzf .*/winter21_whole\.tar\.gz -C ',
  ):
    imagenet22k.find_class_archives(tmp_path)
  # A damaged class tar stops the build with the class named, instead of losing the class.
  (tmp_path / 'n00000001.tar').write_bytes(_tar_bytes({'n00000001_1.JPEG': b'x' * 5000})[:1000])
  (archive,) = imagenet22k.find_class_archives(tmp_path)
  with pytest.raises(tarfile.TarError, match=r'Class tar of n00000001 .* is damaged'):
    list(imagenet22k.iter_class_images(archive))


class _InMemoryBeam:
  """The part of Apache Beam's API the imagenet22k Beam build uses, run in memory.

  apache-beam cannot be installed beside the test environment (its releases pin pillow < 13
  and protobuf < 7), so this stands in for it: `Create`, `Reshuffle` (which reverses, so the
  build cannot depend on order), `FlatMap`, `label >> transform`, `pcollection | transform`,
  and counters kept per split, as a runner keeps them per pipeline step (`run`).
  `test_imagenet22k_real_beam_build` runs a real Beam runner where Beam is installed
  (`.ci/beam`).
  """

  class _Transform:

    def __init__(self, apply):
      self.apply = apply

    def __rrshift__(self, label):
      return self

  class PCollection:

    def __init__(self, compute):
      self.compute = compute

    def __or__(self, transform):
      return type(self)(lambda: transform.apply(self.compute()))

  def __init__(self):
    self.step = None
    self.counts = collections.Counter()
    self.metrics = types.SimpleNamespace(
        Metrics=types.SimpleNamespace(counter=self._counter),
        MetricsFilter=lambda: types.SimpleNamespace(
            with_namespace=lambda namespace: {'namespace': namespace}
        ),
    )

  def Create(self, items):
    items = list(items)
    return self.PCollection(lambda: items)

  def run(self, pcollection, step):
    """The elements of `pcollection`, its counters kept under `step`."""
    self.step = step
    return pcollection.compute()

  def Reshuffle(self):
    return self._Transform(lambda items: items[::-1])

  def FlatMap(self, fn, **kwargs):
    return self._Transform(lambda items: [out for item in items for out in fn(item, **kwargs)])

  def _counter(self, namespace, name):
    def inc(n=1):
      self.counts[(namespace, name, self.step)] += n

    return types.SimpleNamespace(inc=inc)

  def pipeline_result(self):
    def query(metrics_filter):
      return {
          'counters': [
              types.SimpleNamespace(
                  key=types.SimpleNamespace(metric=types.SimpleNamespace(name=name)), result=total
              )
              for (namespace, name, _), total in sorted(self.counts.items())
              if namespace == metrics_filter['namespace']
          ]
      }

    return types.SimpleNamespace(metrics=lambda: types.SimpleNamespace(query=query))


def test_imagenet22k_beam_build_matches(
    fake_imagenet22k, imagenet22k_records, tmp_path, monkeypatch, caplog
):
  """The Beam build's transforms give the generator build's examples, and its counters."""
  manual_dir, _ = fake_imagenet22k
  _, generator_records = imagenet22k_records
  beam = _InMemoryBeam()
  # `tfds.core.lazy_imports.apache_beam`, which the builder calls, imports the module anew.
  monkeypatch.setitem(sys.modules, 'apache_beam', beam)
  builder = datasets.builder('imagenet22k', data_dir=os.fspath(tmp_path))
  builder._use_beam = True  # What a Beam runner or Beam options in the download config set.
  splits = builder._split_generators(types.SimpleNamespace(manual_dir=manual_dir))
  names = builder.info.features['label'].names
  for split in ('train', 'validation'):
    assert isinstance(splits[split], _InMemoryBeam.PCollection), split
    examples = beam.run(splits[split], step=split)
    assert len({key for key, _ in examples}) == len(examples), split
    records = {e['file_name']: (names.index(e['label']), e['image']) for _, e in examples}
    assert records == generator_records[split], split
  caplog.clear()
  with caplog.at_level(logging.INFO, logger='absl'):
    builder._process_pipeline_result(beam.pipeline_result())
  messages = {(r.levelno, r.getMessage()) for r in caplog.records}
  # Summed over both splits' counters: 13 images, one of them undecodable.
  assert messages == {
      (logging.INFO, 'imagenet22k (all splits): images_kept = 10'),
      (logging.INFO, 'imagenet22k (all splits): images_reencoded = 2'),
      (logging.WARNING, 'imagenet22k (all splits): images_skipped = 1'),
  }


def test_imagenet22k_real_beam_build(fake_imagenet22k, imagenet22k_records, tmp_path, caplog):
  """Prepared end to end by Apache Beam's local runner: the generator build's records.

  Runs where apache-beam is installed (`.ci/beam` makes such an environment; the main one
  cannot have it). The runner is the FnApiRunner, which Beam's DirectRunner runs batch
  pipelines on: DirectRunner itself first tries PrismRunner, whose binary it downloads.
  """
  beam = pytest.importorskip('apache_beam')
  from apache_beam.runners.portability import fn_api_runner  # pylint: disable=g-import-not-at-top

  manual_dir, expected = fake_imagenet22k
  _, generator_records = imagenet22k_records
  # What the builder must store, from the files the test wrote: labels index the sorted wnids,
  # RGB and gray JPEGs are kept byte for byte, CMYK and PNG are converted to RGB and saved as
  # JPEG at the codec's quality, and the truncated file is left out.
  wnids = sorted(_WNIDS)
  held_out = {_held_out_name(wnid) for wnid in _WNIDS} | {'n02000000_2.JPEG'}
  want = {'train': {}, 'validation': {}}
  for name, (wnid, data, kind, _) in expected.items():
    if kind == 'corrupt':
      continue
    if kind in ('cmyk', 'png'):
      with Image.open(io.BytesIO(data)) as image:
        data = _encode(image.convert('RGB'), quality=image_codec.JPEG_QUALITY)
    want['validation' if name in held_out else 'train'][name] = (wnids.index(wnid), data)
  assert (len(want['train']), len(want['validation'])) == (8, 4)

  caplog.clear()
  with caplog.at_level(logging.INFO, logger='absl'):
    builder = datasets.prepare(
        'imagenet22k',
        data_dir=os.fspath(tmp_path),
        manual_dir=os.fspath(manual_dir),
        beam_runner=fn_api_runner.FnApiRunner(),
        # Empty flags: by default Beam would parse pytest's command line as pipeline options.
        beam_options=beam.options.pipeline_options.PipelineOptions(flags=[]),
    )
  assert builder.is_prepared()
  assert builder.info.features['label'].names == wnids
  for split in ('train', 'validation'):
    assert builder.info.splits[split].num_examples == len(want[split]), split
    records = _records(builder, split)
    assert records == want[split], split
    assert records == generator_records[split], split
  # The builder's own lines: Beam chosen, the classes found, then the pipeline's counters summed
  # over both splits (and no per-split lines of the generator build).
  logged = [
      (record.levelno, record.getMessage())
      for record in caplog.records
      if record.getMessage().startswith('imagenet22k')
  ]
  assert logged == [
      (logging.INFO, 'imagenet22k: building with Apache Beam, one work item per class tar.'),
      (
          logging.INFO,
          'imagenet22k: 3 class tars (fall11 has 21841); labels are their sorted wnids.',
      ),
      (logging.INFO, 'imagenet22k (all splits): images_kept = 10'),
      (logging.INFO, 'imagenet22k (all splits): images_reencoded = 2'),
      (logging.WARNING, 'imagenet22k (all splits): images_skipped = 1'),
  ]


def test_imagenet2012_prepares_from_default_manual_dir(tmp_path):
  # The documented layout: the two ImageNet-1K tars in <data_dir>/downloads/manual/. (This also
  # pins `tfds_compat.alias_importlib_resources`: without it tfds's own builders cannot
  # prepare on Python >= 3.9 unless the importlib_resources backport is installed.)
  manual_dir = tmp_path / 'downloads' / 'manual'
  manual_dir.mkdir(parents=True)
  image = lambda seed: _encode(Image.fromarray(_gradient(seed)), quality=90)
  (manual_dir / 'ILSVRC2012_img_train.tar').write_bytes(
      _tar_bytes(
          {
              'n01440764.tar': _tar_bytes(
                  {'n01440764_1.JPEG': image(1), 'n01440764_2.JPEG': image(2)}
              ),
              'n01443537.tar': _tar_bytes({'n01443537_7.JPEG': image(3)}),
          }
      )
  )
  (manual_dir / 'ILSVRC2012_img_val.tar').write_bytes(
      _tar_bytes({f'ILSVRC2012_val_0000000{i}.JPEG': image(i) for i in (1, 2, 3)})
  )
  builder = datasets.prepare('imagenet2012', data_dir=os.fspath(tmp_path))
  labels = builder.info.features['label']
  assert labels.num_classes == 1000
  assert {
      name: labels.int2str(label) for name, (label, _) in _records(builder, 'train').items()
  } == {
      'n01440764_1.JPEG': 'n01440764',
      'n01440764_2.JPEG': 'n01440764',
      'n01443537_7.JPEG': 'n01443537',
  }
  # Validation labels come from tfds's list of the 50000 official ones.
  assert {
      name: labels.int2str(label) for name, (label, _) in _records(builder, 'validation').items()
  } == {
      'ILSVRC2012_val_00000001.JPEG': 'n01751748',
      'ILSVRC2012_val_00000002.JPEG': 'n09193705',
      'ILSVRC2012_val_00000003.JPEG': 'n02105855',
  }


# --------------------------------------------------------------------------------------------
# class_folder

_FOLDER_CLASSES = ('daisy', 'rose', 'tulip')


def _make_class_folder(root, val_classes=_FOLDER_CLASSES):
  """train/ (3 images a class, in several formats) and val/ (2 a class); returns the counts."""
  for c, name in enumerate(_FOLDER_CLASSES):
    class_dir = root / 'train' / name
    (class_dir / 'more').mkdir(parents=True)
    (class_dir / 'a.jpg').write_bytes(_encode(Image.fromarray(_gradient(c)), quality=92))
    (class_dir / 'b.png').write_bytes(_encode(Image.fromarray(_gradient(c + 3)), 'PNG'))
    (class_dir / 'more' / 'c.JPEG').write_bytes(
        _encode(Image.fromarray(_gradient(c + 6)).convert('CMYK'))
    )
    (class_dir / '.DS_Store').write_bytes(b'\0\0\0\1Bud1')  # Hidden: not an image.
  (root / 'train' / 'rose' / 'broken.jpg').write_bytes(b'\xff\xd8\xff\xe0 not really')
  (root / 'train' / '.ipynb_checkpoints').mkdir()  # Hidden: not a class.
  for c, name in enumerate(val_classes):
    class_dir = root / 'val' / name
    class_dir.mkdir(parents=True)
    for i in range(2):
      (class_dir / f'{i}.jpg').write_bytes(_encode(Image.fromarray(_gradient(c + 10 * i))))
  return {'train': 9, 'validation': 2 * len(val_classes)}


def test_class_folder_builds(tmp_path, caplog):
  root = tmp_path / 'flowers'
  counts = _make_class_folder(root)
  # A 16-bit grayscale PNG (a scanner's or microscope's): 8 bits from its high bytes.
  Image.fromarray(_ramp16()).save(root / 'val' / 'daisy' / 'deep.png')
  counts['validation'] += 1
  data_dir = os.fspath(tmp_path / 'tfds')
  builder, messages = _prepare_logged(caplog, 'class_folder', data_dir=data_dir, root=root)
  assert re.fullmatch(r'flowers_[0-9a-f]{8}', builder.builder_config.name)
  assert builder.info.features['label'].names == list(_FOLDER_CLASSES)
  assert set(builder.info.splits) == {'train', 'validation'}
  for split in ('train', 'validation'):
    assert builder.info.splits[split].num_examples == counts[split]
    for file_name, (label, data) in _records(builder, split).items():
      assert label == _FOLDER_CLASSES.index(file_name.split('/')[0]), file_name
      assert data.startswith(_JPEG_START) and _decode(data).shape == (32, 40, 3), file_name
  assert sorted(_records(builder, 'train')) == [
      f'{name}/{path}' for name in _FOLDER_CLASSES for path in ('a.jpg', 'b.png', 'more/c.JPEG')
  ]
  assert _outcome_totals(messages, 'class_folder') == {
      'kept': 3 + 6,
      'reencoded': 6 + 1,
      'skipped': 1,
      'splits': 2,
  }
  deep = _decode(_records(builder, 'validation')['daisy/deep.png'][1])
  assert _mean_abs_diff(deep, (_ramp16() >> 8)[..., None]) < 2.0
  assert any(
      re.fullmatch(r'Skipping .*rose/broken\.jpg: not an image Pillow can decode\.', m)
      for m in messages
  )
  # Read back by config name, without the folder.
  reread = datasets.builder(f'class_folder/{builder.builder_config.name}', data_dir=data_dir)
  assert reread.is_prepared() and reread.info.splits['train'].num_examples == 9


def test_class_folder_mismatched_classes(tmp_path):
  _make_class_folder(tmp_path, val_classes=('daisy', 'lily'))
  with pytest.raises(
      ValueError,
      match=r'val must have the class directories of train: missing '
      r"\['rose', 'tulip'\], extra \['lily'\] \(2 and 1 in all\)",
  ):
    datasets.prepare('class_folder', data_dir=os.fspath(tmp_path / 'tfds'), root=tmp_path)


def test_class_folder_needs_train(tmp_path):
  (tmp_path / 'val' / 'daisy').mkdir(parents=True)
  with pytest.raises(
      FileNotFoundError,
      match=r'No .*/train directory: a class folder is laid out as root/train/<class>/<image>',
  ):
    datasets.prepare('class_folder', data_dir=os.fspath(tmp_path / 'tfds'), root=tmp_path)
  with pytest.raises(ValueError, match=r'class_folder needs the folder of images'):
    datasets.builder('class_folder', data_dir=os.fspath(tmp_path / 'tfds'))
