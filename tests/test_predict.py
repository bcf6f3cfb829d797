"""`convnext-predict`: top-k output against a direct forward pass, class names, workdirs,
the command line without TensorFlow, one-line errors with exit status 2 (bad images skipped,
the others still predicted), and 16-bit PNGs."""

import json
import os
import pathlib
import subprocess
import sys

import helpers
import jax
import numpy as np
from PIL import Image
import pytest

from convnext_jax import checkpoints
from convnext_jax import models
from convnext_jax import predict

SIZE = 64
NAMES = ['cat', 'dog', 'bird']


def _biased_params(model, favoured: int, seed: int = 0):
  """Random params whose head bias makes `favoured` the clear top-1 on any image, while
  the other classes keep probabilities far from 0 (so the softmax check means something)."""
  params = helpers.random_params(model, seed)
  params['head']['kernel'] = params['head']['kernel'] * 0.1
  bias = np.zeros_like(params['head']['bias'])
  bias[favoured] = 3.0
  params['head']['bias'] = bias
  return params


def _write_image(path, height, width, seed):
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[0:height, 0:width]
  image = np.stack([xx * 255 / width, yy * 255 / height, (xx * yy) % 251], -1)
  image = np.clip(image + rng.normal(0, 20, image.shape), 0, 255).astype(np.uint8)
  Image.fromarray(image).save(path)
  return str(path)


@pytest.fixture(scope='module')
def files(tmp_path_factory):
  root = tmp_path_factory.mktemp('predict')
  model = models.create_model('convnext_atto', num_classes=len(NAMES))
  params = _biased_params(model, favoured=1)
  checkpoint = str(root / 'atto3')
  checkpoints.save_params(
      checkpoint, params, {'model_name': 'convnext_atto', 'num_classes': 3, 'class_names': NAMES}
  )
  images = [
      _write_image(root / 'wide.png', 60, 90, 0),
      _write_image(root / 'tall.jpg', 80, 50, 1),
      _write_image(root / 'square.jpg', 70, 70, 2),
  ]
  return dict(root=root, model=model, params=params, checkpoint=checkpoint, images=images)


# The evaluation resize of the fixture images at SIZE 64, crop_pct 0.875, worked out by hand:
# the shorter side goes to int(64 / 0.875) = 73 and the longer one to int(73 * long / short),
# truncated as torchvision's Resize(int) does. Pillow sizes are (width, height).
RESIZED = {
    'wide.png': (109, 73),  # 90x60: int(73 * 90 / 60) = int(109.5).
    'tall.jpg': (73, 116),  # 50x80: int(73 * 80 / 50) = int(116.8).
    'square.jpg': (73, 73),
}


def _eval_crop(path):
  """timm's evaluation crop written out with Pillow: bicubic resize, centre crop (offsets
  rounded)."""
  image = Image.open(path).convert('RGB').resize(RESIZED[os.path.basename(path)], Image.BICUBIC)
  left = round((image.width - SIZE) / 2)
  top = round((image.height - SIZE) / 2)
  return np.asarray(image.crop((left, top, left + SIZE, top + SIZE)))


def _direct_probabilities(model, params, paths):
  """softmax(logits) of the model on the evaluation crops, normalised with ImageNet's mean and
  std, without the predict module."""
  crops = np.stack([_eval_crop(p) for p in paths]) / 255.0
  images = ((crops - [0.485, 0.456, 0.406]) / [0.229, 0.224, 0.225]).astype(np.float32)
  logits = jax.jit(lambda p, x: model.apply({'params': p}, x, train=False))(params, images)
  return np.asarray(jax.nn.softmax(np.asarray(logits, np.float64), axis=-1))


def test_load_image_is_the_eval_crop(files):
  # The model's outputs above barely depend on the pixels; the crops themselves must be exact.
  for path in files['images']:
    np.testing.assert_array_equal(predict.load_image(path, SIZE, 0.875), _eval_crop(path))
    # 'squash' at crop_pct 1 (the recipe from 384 up): both sides straight to SIZE.
    squashed = Image.open(path).convert('RGB').resize((SIZE, SIZE), Image.BICUBIC)
    np.testing.assert_array_equal(
        predict.load_image(path, SIZE, 1.0, 'squash'), np.asarray(squashed)
    )


def _run(argv, capsys):
  code = predict.main(argv)
  out, err = capsys.readouterr()
  return code, out, err


def test_text_output_is_sorted_probabilities_with_metadata_names(files, capsys):
  code, out, err = _run(
      ['--checkpoint', files['checkpoint'], '--size', str(SIZE), *files['images'][:2]], capsys
  )
  assert code == 0, err
  lines = out.splitlines()
  # Top 5 of 3 classes: all three, per image.
  assert len(lines) == 2 * (1 + 3)
  for block, path in zip((lines[:4], lines[4:]), files['images'][:2]):
    assert block[0] == path
    probs = [float(line.split()[0]) for line in block[1:]]
    labels = [line.split(maxsplit=1)[1] for line in block[1:]]
    assert all(line.startswith('  ') for line in block[1:])
    assert labels[0] == 'dog' and sorted(labels) == sorted(NAMES)
    assert probs == sorted(probs, reverse=True) and probs[0] > 0.5
    assert sum(probs) <= 1.0 + 2e-4


def test_json_matches_direct_softmax_across_padded_batches(files, capsys):
  # Three images at batch size 2: the second batch is padded.
  code, out, err = _run(
      [
          '--checkpoint',
          files['checkpoint'],
          '--size',
          str(SIZE),
          '--batch_size',
          '2',
          '--json',
          *files['images'],
      ],
      capsys,
  )
  assert code == 0, err
  results = json.loads(out)
  expected = _direct_probabilities(files['model'], files['params'], files['images'])
  assert [r['image'] for r in results] == files['images']
  for result, probs in zip(results, expected):
    predictions = result['predictions']
    order = np.argsort(-probs)
    assert [p['class'] for p in predictions] == list(order)
    assert [p['label'] for p in predictions] == [NAMES[k] for k in order]
    np.testing.assert_allclose([p['probability'] for p in predictions], probs[order], atol=1e-5)
    assert predictions[0]['label'] == 'dog'


def test_training_workdir_ema_and_raw_weights(files, capsys):
  model = files['model']
  state = {
      'params': _biased_params(model, favoured=0),
      'ema_params': files['params'],
      'step': np.int32(7),
  }
  workdir = str(files['root'] / 'workdir')
  ckpts = checkpoints.TrainingCheckpoints(
      workdir, save_interval_steps=1, keep=2, enable_async=False
  )
  ckpts.save(
      7, state, {'model_name': 'convnext_atto', 'num_classes': 3, 'class_names': NAMES}, force=True
  )
  ckpts.close()
  labels = files['root'] / 'labels.txt'
  labels.write_text('Cat\nDog\nBird\n\n')
  top1 = {}
  for which in ('ema', 'raw'):
    code, out, err = _run(
        [
            '--checkpoint',
            workdir,
            '--params',
            which,
            '--step',
            '7',
            '--size',
            str(SIZE),
            '--labels',
            str(labels),
            '--json',
            *files['images'][:2],
        ],
        capsys,
    )
    assert code == 0, err
    top1[which] = json.loads(out)[0]['predictions'][0]['label']
  # --labels overrides the metadata's names.
  assert top1 == {'ema': 'Dog', 'raw': 'Cat'}


def test_class_names_fallbacks(tmp_path):
  imagenet = predict.imagenet_class_names()
  assert len(imagenet) == 1000 and imagenet[0].startswith('tench')
  assert imagenet[1].startswith('goldfish') and imagenet[999].startswith('toilet tissue')
  assert predict.label_names({'class_names': NAMES}, 3) == NAMES
  # Names of the wrong length in metadata are ignored.
  assert predict.label_names({'class_names': NAMES}, 1000) == imagenet
  assert predict.label_names({}, 21841)[:2] == ['class 0', 'class 1']
  wnids = tmp_path / 'wnids.txt'
  wnids.write_text('\n'.join(f'n{i:08d}' for i in range(21841)) + '\n')
  assert predict.label_names({}, 21841, str(wnids))[5] == 'n00000005'


def test_default_eval_crop():
  # The official rule: crop 0.875 of the shorter side's resize below 384 px, squash from 384
  # (pinned at the same sizes in test_pipeline.py, which imports TensorFlow).
  assert [predict.eval_crop(s) for s in (64, 224, 383, 384, 512)] == [
      (0.875, 'center'),
      (0.875, 'center'),
      (0.875, 'center'),
      (1.0, 'squash'),
      (1.0, 'squash'),
  ]
  assert predict.eval_crop(224, 1.0) == (1.0, 'center')
  assert predict.eval_crop(384, 0.95, 'center') == (0.95, 'center')
  with pytest.raises(ValueError, match=r'crop_pct must be in \(0, 1\]'):
    predict.eval_crop(224, 0.0)
  with pytest.raises(ValueError, match='crop_mode must be one of'):
    predict.eval_crop(224, None, 'border')


def test_command_line_imagenet_names_without_tensorflow(files):
  model = models.create_model('convnext_atto', num_classes=1000)
  checkpoint = str(files['root'] / 'atto1000')
  checkpoints.save_params(
      checkpoint,
      _biased_params(model, favoured=0),
      {'model_name': 'convnext_atto', 'num_classes': 1000},
  )
  env = dict(os.environ, XLA_FLAGS='', JAX_PLATFORMS='cpu')
  result = subprocess.run(
      [
          sys.executable,
          '-X',
          'importtime',
          '-m',
          'convnext_jax.predict',
          '--checkpoint',
          checkpoint,
          '--size',
          str(SIZE),
          '--top_k',
          '3',
          files['images'][2],
      ],
      capture_output=True,
      text=True,
      check=False,
      env=env,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  lines = result.stdout.splitlines()
  assert lines[0] == files['images'][2] and len(lines) == 4
  assert lines[1].split(maxsplit=1)[1] == 'tench, Tinca tinca'
  imported = {
      line.rsplit('|', 1)[-1].strip().split('.')[0]
      for line in result.stderr.splitlines()
      if line.startswith('import time:')
  }
  assert 'jax' in imported
  assert not imported & {'tensorflow', 'tensorflow_datasets', 'keras', 'tf_keras'}


def test_missing_image(files, capsys):
  missing = str(files['root'] / 'nope.jpg')
  code, out, err = _run(['--checkpoint', files['checkpoint'], missing], capsys)
  assert code == 1 and not out
  assert err.strip() == (
      f'convnext-predict: error: image {missing} does not exist or is not a file; check the path'
  )


def _truncated(path, source):
  """`source`'s first 60 %: the header still reads, the pixel data ends early."""
  data = pathlib.Path(source).read_bytes()
  path.write_bytes(data[: len(data) * 6 // 10])
  return str(path)


def _bad_files(root):
  """A missing path, a text file named .jpg, a truncated JPEG and a truncated PNG, with the
  one stderr line expected for each."""
  missing = str(root / 'gone.jpg')
  notes = root / 'readme.jpg'
  notes.write_bytes(b'this is not a picture')
  short_jpeg = _truncated(root / 'short.jpg', _write_image(root / 'full.jpg', 70, 70, 5))
  short_png = _truncated(root / 'short.png', _write_image(root / 'full.png', 70, 70, 6))
  prefix = 'convnext-predict: error: '
  truncated = (
      '(OSError: image file is truncated',
      '); the file is truncated or corrupt; replace it',
  )
  expected = {
      missing: (f'{prefix}image {missing} does not exist or is not a file; check the path',),
      str(notes): (
          f'{prefix}cannot read image {notes} (not an image format Pillow knows); '
          'pass JPEG, PNG, GIF, BMP or WebP files',
      ),
      short_jpeg: (f'{prefix}cannot read image {short_jpeg} {truncated[0]}', truncated[1]),
      short_png: (f'{prefix}cannot read image {short_png} {truncated[0]}', truncated[1]),
  }
  return [missing, str(notes), short_jpeg, short_png], expected


def _assert_one_line_each(err, expected):
  lines = err.splitlines()
  assert len(lines) == len(expected), err
  for path, parts in expected.items():
    (line,) = [candidate for candidate in lines if f' {path} ' in candidate]
    assert line.startswith(parts[0]) and line.endswith(parts[-1]), line


@pytest.mark.parametrize('as_json', [False, True])
def test_bad_images_are_reported_and_the_others_predicted(files, capsys, as_json):
  bad, expected = _bad_files(files['root'])
  missing, notes, short_jpeg, short_png = bad
  good = files['images']
  # At batch size 2 the truncated files fail while their batches fill: the good images
  # around them must still be predicted, in order.
  argv = [good[0], short_jpeg, missing, good[1], notes, short_png, good[2]]
  code, out, err = _run(
      [
          '--checkpoint',
          files['checkpoint'],
          '--size',
          str(SIZE),
          '--batch_size',
          '2',
          *(['--json'] if as_json else []),
          *argv,
      ],
      capsys,
  )
  assert code == 1
  _assert_one_line_each(err, expected)
  probs = _direct_probabilities(files['model'], files['params'], good)
  if as_json:
    results = json.loads(out)
    assert [r['image'] for r in results] == good
    for result, p in zip(results, probs):
      order = np.argsort(-p)
      assert [q['class'] for q in result['predictions']] == list(order)
      np.testing.assert_allclose(
          [q['probability'] for q in result['predictions']], p[order], atol=1e-5
      )
  else:
    lines = out.splitlines()
    assert lines[::4] == good and len(lines) == 3 * 4
    for i, p in enumerate(probs):
      order = np.argsort(-p)
      block = lines[4 * i + 1 : 4 * i + 4]
      assert [line.split(maxsplit=1)[1] for line in block] == [NAMES[k] for k in order]
      np.testing.assert_allclose([float(line.split()[0]) for line in block], p[order], atol=1e-4)


def test_no_readable_image_loads_no_model(files, capsys):
  bad, expected = _bad_files(files['root'])
  # A checkpoint that does not exist: loading it would add its own error line.
  code, out, err = _run(['--checkpoint', str(files['root'] / 'no_such_checkpoint'), *bad], capsys)
  assert code == 1 and not out
  _assert_one_line_each(err, expected)


def _ramp16(height, width):
  """A uint16 ramp over the full range, 0 at the top left to 65535 at the bottom right."""
  return (np.arange(height * width).reshape(height, width) * 65535 // (height * width - 1)).astype(
      np.uint16
  )


def test_16bit_grayscale_png_keeps_its_high_bytes(files):
  ramp = _ramp16(SIZE, SIZE)
  path = files['root'] / 'deep.png'
  Image.fromarray(ramp).save(path)
  with Image.open(path) as image:
    assert image.mode == 'I;16'  # What Image.convert('RGB') clips to white above 255.
  # At crop 1.0 and the image's own size, the crop is the image: exact pixels.
  crop = predict.load_image(str(path), SIZE, 1.0, 'squash')
  expected = np.repeat((ramp >> 8).astype(np.uint8)[..., None], 3, axis=-1)
  np.testing.assert_array_equal(crop, expected)
  assert (crop == 255).mean() < 0.01  # Only the ramp's last 1/256 is white.


def test_unreadable_image(files, capsys):
  bad = files['root'] / 'notes.jpg'
  bad.write_bytes(b'this is not a picture')
  code, out, err = _run(['--checkpoint', files['checkpoint'], str(bad)], capsys)
  assert code == 1 and not out and len(err.splitlines()) == 1
  assert err.strip() == (
      f'convnext-predict: error: cannot read image {bad} (not an image '
      'format Pillow knows); pass JPEG, PNG, GIF, BMP or WebP files'
  )


def test_missing_checkpoint(files, capsys):
  missing = str(files['root'] / 'no_checkpoint')
  code, out, err = _run(['--checkpoint', missing, files['images'][0]], capsys)
  assert code == 1 and not out and len(err.splitlines()) == 1
  assert f'checkpoint {missing} does not exist' in err and 'convnext-convert import' in err


def test_label_file_with_wrong_count(files, capsys):
  labels = files['root'] / 'four.txt'
  labels.write_text('a\nb\nc\nd\n')
  code, out, err = _run(
      ['--checkpoint', files['checkpoint'], '--labels', str(labels), files['images'][0]], capsys
  )
  assert code == 1 and not out
  assert err.strip() == (
      f'convnext-predict: error: labels file {labels} has 4 names but the '
      'model has 3 classes; give one name per line, one per class'
  )
