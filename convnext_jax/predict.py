"""`convnext-predict`: the top classes of a ConvNeXt (or roadmap model) checkpoint for images.

  python -m convnext_jax.predict --checkpoint PATH [--params ema|raw] [--step N]
      [--size 224] [--crop_pct F] [--crop_mode center|squash] [--labels FILE] [--top_k 5]
      [--batch_size 32] [--json]
      IMAGE...

PATH is a params checkpoint (`convnext-convert import`) or a training workdir (its EMA or
raw weights, at the latest or a given step). Each image goes through the evaluation
transform of training (shorter side, or with 'squash' both sides, to int(size / crop_pct),
bicubic, centre crop; ImageNet mean and std), on Pillow (`data.pil_preprocess`), so nothing
here imports TensorFlow.

Output: per image its path, then one `  probability  label` line per class, best first; or,
with --json, a JSON list of {"image", "predictions": [{"class", "label", "probability"}]}.
Class names come from --labels (one per line), else the checkpoint's metadata, else, for
1000 classes, the ImageNet-1K names that tensorflow_datasets ships, else `class N`.

Exit status: 0 when every image was predicted; 2 for a usage error (a bad flag, or a flag
value out of range), as argparse has it; 1 for any other error, each reported as one line on
stderr. An image that is missing, not an image, or cannot be decoded in full (a truncated
file) is reported and skipped; the other images are still predicted and printed (and, with
--json, only they are listed), and the status is 1. When no image can be read the model is
not loaded. A checkpoint that is missing, damaged or does not fit its model, or a label file
of the wrong length, stops the run.
"""

import argparse
import ast
from collections.abc import Callable
from collections.abc import Iterable
from collections.abc import Iterator
from collections.abc import Sequence
import functools
import importlib.util
import itertools
import json
import os
import sys
from typing import Any

from etils import epath
import jax
import numpy as np
from PIL import Image

from convnext_jax import checkpoints
from convnext_jax import models
from convnext_jax import trees
from convnext_jax.convert import layouts
from convnext_jax.data import CROP_MODES
from convnext_jax.data import batch_ops
from convnext_jax.data import eval_crop
from convnext_jax.data import pil_preprocess

PROG = 'convnext-predict'
EXIT_ERROR = 1  # A runtime failure; argparse exits 2 for usage errors.
# The ImageNet-1K class names in class-index order ('tench, Tinca tinca' first), as a list
# literal in a module of the tensorflow_datasets package.
_IMAGENET_NAMES_MODULE = ('datasets', 'siscore', 'labels.py')
_IMAGENET_NAMES_VARIABLE = 'IMAGENET_LABELS_LIST'
_IMAGENET_NUM_CLASSES = 1000


class PredictError(ValueError):
  """A problem with the inputs of a prediction; the message is one readable line."""


# ----------------------------------------------------------------------------------------
# Class names.
# ----------------------------------------------------------------------------------------


def imagenet_class_names() -> list[str] | None:
  """The 1000 ImageNet-1K class names in index order, or None if they cannot be found.

  They are read from the installed tensorflow_datasets source without importing it (which
  would import TensorFlow): its SI-Score labels module holds them as a list literal.
  """
  try:
    spec = importlib.util.find_spec('tensorflow_datasets')
  except (ImportError, ValueError):
    spec = None
  if spec is None or not spec.submodule_search_locations:
    return None
  path = os.path.join(next(iter(spec.submodule_search_locations)), *_IMAGENET_NAMES_MODULE)
  try:
    with open(path, encoding='utf-8') as f:
      tree = ast.parse(f.read())
  except (OSError, SyntaxError):
    return None
  for node in tree.body:
    if (
        isinstance(node, ast.Assign)
        and len(node.targets) == 1
        and isinstance(node.targets[0], ast.Name)
        and node.targets[0].id == _IMAGENET_NAMES_VARIABLE
    ):
      try:
        names = ast.literal_eval(node.value)
      except ValueError:
        return None
      if len(names) == _IMAGENET_NUM_CLASSES and all(isinstance(n, str) for n in names):
        return list(names)
  return None


def read_label_file(path: str, num_classes: int) -> list[str]:
  """One class name per line (trailing blank lines ignored), exactly `num_classes` of them.

  Raises:
    PredictError: the file is missing or holds another number of names.
  """
  try:
    text = epath.Path(path).read_text()
  except (OSError, UnicodeDecodeError) as e:
    raise PredictError(
        f'cannot read labels file {path} ({e}); pass a text file with one class name per line'
    ) from None
  names = [line.strip() for line in text.splitlines()]
  while names and not names[-1]:
    names.pop()
  if len(names) != num_classes:
    raise PredictError(
        f'labels file {path} has {len(names)} names but the model has '
        f'{num_classes} classes; give one name per line, one per class'
    )
  return names


def label_names(
    metadata: dict[str, Any], num_classes: int, labels_file: str | None = None
) -> list[str]:
  """Names for the model's classes: --labels, else metadata, else ImageNet-1K, else
  'class N'."""
  if labels_file:
    return read_label_file(labels_file, num_classes)
  names = metadata.get('class_names')
  if isinstance(names, (list, tuple)) and len(names) == num_classes:
    return [str(n) for n in names]
  if num_classes == _IMAGENET_NUM_CLASSES:
    names = imagenet_class_names()
    if names is not None:
      return names
  return [f'class {i}' for i in range(num_classes)]


# ----------------------------------------------------------------------------------------
# Images.
# ----------------------------------------------------------------------------------------


def check_images(paths: Sequence[str]) -> tuple[list[str], list[PredictError]]:
  """Splits `paths` into the files Pillow recognises and an error for each other path.

  Reads only headers, so that missing and non-image files are reported at once, before the
  model loads; a file whose data is truncated passes and fails later, in `load_image`.

  Returns:
    (the paths that look like images, in order; one `PredictError` per other path).
  """
  readable, errors = [], []
  for path in paths:
    if not epath.Path(path).is_file():
      errors.append(PredictError(f'image {path} does not exist or is not a file; check the path'))
      continue
    try:
      with epath.Path(path).open('rb') as f, Image.open(f):
        pass
    except Exception as e:  # pylint: disable=broad-except
      errors.append(_unreadable(path, e))
      continue
    readable.append(path)
  return readable, errors


_FORMATS_HINT = 'pass JPEG, PNG, GIF, BMP or WebP files'


def _unreadable(path: str, error: Exception, hint: str = _FORMATS_HINT) -> PredictError:
  if isinstance(error, Image.UnidentifiedImageError):
    # Pillow's own message names a file object, not the path.
    reason, hint = 'not an image format Pillow knows', _FORMATS_HINT
  else:
    reason = f'{type(error).__name__}: {error}'
  return PredictError(f'cannot read image {path} ({reason}); {hint}')


def load_image(path: str, size: int, crop_pct: float, crop_mode: str = 'center') -> np.ndarray:
  """The evaluation crop of an image file: uint8 (size, size, 3).

  Raises:
    PredictError: the file cannot be read or decoded.
  """
  try:
    data = epath.Path(path).read_bytes()
  except OSError as e:
    raise _unreadable(path, e, 'check the path') from None
  try:
    return pil_preprocess.eval_transform(data, size, crop_pct, crop_mode)
  except Exception as e:  # pylint: disable=broad-except
    # Decoders report corrupt files with many exception types (OSError, SyntaxError,
    # struct.error, DecompressionBombError, ...); past the header, the data is cut short
    # or damaged.
    raise _unreadable(path, e, 'the file is truncated or corrupt; replace it') from None


# ----------------------------------------------------------------------------------------
# Model.
# ----------------------------------------------------------------------------------------


def load_model(checkpoint: str, which: str = 'ema', step: int | None = None):
  """(model, weights on the default device, metadata) of a checkpoint.

  The weights are the params with BatchNorm's running statistics merged in, for a model with
  BatchNorm (`checkpoints.load_params`); `make_predict_fn` applies both.

  Raises:
    PredictError: no checkpoint at `checkpoint`, an unknown model, a model without a
      classifier, or params that do not fit the model.
    checkpoints.CheckpointError: the checkpoint cannot be read as asked.
  """
  if not epath.Path(checkpoint).exists():
    raise PredictError(
        f'checkpoint {checkpoint} does not exist; pass a params checkpoint '
        '(from `convnext-convert import`) or a training workdir'
    )
  params, metadata = checkpoints.load_params(checkpoint, which=which, step=step)
  num_classes = layouts.num_classes_of(params)
  if not num_classes:
    raise PredictError(
        f'checkpoint {checkpoint} has no classifier head; prediction needs '
        'a model trained or fine-tuned for classification'
    )
  model_name = metadata.get('model_name')
  try:
    model = models.create_model(model_name, num_classes=num_classes)
  except ValueError as e:
    raise PredictError(f'checkpoint {checkpoint}: {e}') from None
  difference = trees.compare(trees.shapes(models.weight_shapes(model)), trees.shapes(params))
  if difference:
    raise PredictError(
        f'checkpoint {checkpoint} does not fit {model_name} with {num_classes} classes: '
        f'{difference.describe()}; was it written by convnext_jax?'
    )
  return model, jax.device_put(params), metadata


# Cached so that repeated calls in one process (a notebook, tests) reuse the compiled forward.
@functools.lru_cache(maxsize=8)
def make_predict_fn(model, top_k: int):
  """A jitted (weights, uint8 NHWC images) -> (top-k probabilities, top-k class indices).

  The weights are those of `load_model`: a model with BatchNorm normalises with the running
  statistics in them.
  """

  def predict(weights, images):
    params, batch_stats = models.split_batch_stats(weights)
    variables = {'params': params}
    if batch_stats:
      variables['batch_stats'] = batch_stats
    logits = model.apply(variables, batch_ops.normalize(images), train=False)
    return jax.lax.top_k(jax.nn.softmax(logits.astype(np.float32), axis=-1), top_k)

  return jax.jit(predict, compiler_options=models.compiler_options())


def _raise(error: PredictError):
  raise error


def load_images(
    paths: Iterable[str],
    size: int,
    crop_pct: float,
    crop_mode: str = 'center',
    on_error: Callable[[PredictError], None] = _raise,
) -> Iterator[tuple[str, np.ndarray]]:
  """Yields (path, evaluation crop) per image that decodes, in order.

  Args:
    paths: image files.
    size: side of the square crop.
    crop_pct: fraction of the resized shorter side (or sides) that the crop keeps.
    crop_mode: 'center' or 'squash' (`data.CROP_MODES`).
    on_error: called with the `PredictError` of each image that cannot be read, which is
      then left out; by default the error is raised.
  """
  for path in paths:
    try:
      image = load_image(path, size, crop_pct, crop_mode)
    except PredictError as e:
      on_error(e)
      continue
    yield path, image


def predict_images(
    predict_fn, params, images: Iterable[tuple[str, np.ndarray]], batch_size: int
) -> Iterator[tuple[str, np.ndarray, np.ndarray]]:
  """Yields (path, top-k probabilities, top-k indices) per (path, image), in order.

  Every batch has the same shape (the last one padded by repeating an image), so the
  forward compiles once. Batches fill from the images as they come, so images left out by
  `load_images` leave no gaps.
  """
  images = iter(images)
  while batch := list(itertools.islice(images, batch_size)):
    arrays = [image for _, image in batch]
    arrays += [arrays[-1]] * (batch_size - len(arrays))
    probs, indices = jax.device_get(predict_fn(params, np.stack(arrays)))
    for i, (path, _) in enumerate(batch):
      yield path, probs[i], indices[i]


# ----------------------------------------------------------------------------------------
# Command line.
# ----------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog=PROG, description='Top classes of a ConvNeXt checkpoint for image files.'
  )
  parser.add_argument('images', nargs='+', metavar='IMAGE', help='image files')
  parser.add_argument(
      '--checkpoint', required=True, help='orbax params checkpoint, or training workdir'
  )
  parser.add_argument(
      '--params',
      choices=tuple(checkpoints.STATE_KEYS),
      default='ema',
      help='weights of a training workdir (default: ema, else raw); '
      'ignored for a params checkpoint',
  )
  parser.add_argument(
      '--step',
      type=int,
      default=None,
      help='checkpoint step of a training workdir (default: the latest)',
  )
  parser.add_argument('--size', type=int, default=224, help='input size (default: 224)')
  parser.add_argument(
      '--crop_pct',
      type=float,
      default=None,
      help='centre-crop fraction (default: 0.875 below size 384, else 1.0)',
  )
  parser.add_argument(
      '--crop_mode',
      choices=CROP_MODES,
      default=None,
      help='resize the shorter side (center) or both (squash) to '
      'int(size / crop_pct) before the crop (default: center below size '
      '384, else squash)',
  )
  parser.add_argument(
      '--labels',
      metavar='FILE',
      help="class names, one per line (default: the checkpoint's, else "
      'ImageNet-1K names for 1000 classes, else "class N")',
  )
  parser.add_argument('--top_k', type=int, default=5, help='classes shown per image (default: 5)')
  parser.add_argument(
      '--batch_size', type=int, default=32, help='images per forward pass (default: 32)'
  )
  parser.add_argument('--json', action='store_true', help='print a JSON list instead')
  return parser


def _check_args(args) -> None:
  for flag in ('size', 'top_k', 'batch_size'):
    if getattr(args, flag) < 1:
      raise PredictError(f'--{flag} must be at least 1, got {getattr(args, flag)}')
  if args.crop_pct is not None and not 0.0 < args.crop_pct <= 1.0:
    raise PredictError(f'--crop_pct must be in (0, 1], got {args.crop_pct}')


def predict_files(
    args, on_error: Callable[[PredictError], None] = _raise
) -> Iterator[dict[str, Any]]:
  """Yields {'image', 'predictions': [{'class', 'label', 'probability'}]} per image.

  Args:
    args: the parsed command line (`build_parser`).
    on_error: called with the `PredictError` of each image that cannot be read, which is
      then skipped; by default the error is raised.
  """
  _check_args(args)
  paths, errors = check_images(args.images)
  for error in errors:
    on_error(error)
  crop_pct, crop_mode = eval_crop(args.size, args.crop_pct, args.crop_mode)
  images = load_images(paths, args.size, crop_pct, crop_mode, on_error)
  # The model loads only once an image has decoded: with none, there is nothing to predict.
  first = next(images, None)
  if first is None:
    return
  model, params, metadata = load_model(args.checkpoint, args.params, args.step)
  num_classes = model.num_classes
  names = label_names(metadata, num_classes, args.labels)
  predict_fn = make_predict_fn(model, min(args.top_k, num_classes))
  batch_size = min(args.batch_size, len(paths))
  for path, probs, indices in predict_images(
      predict_fn, params, itertools.chain([first], images), batch_size
  ):
    yield {
        'image': path,
        'predictions': [
            {'class': int(k), 'label': names[k], 'probability': float(p)}
            for p, k in zip(probs, indices)
        ],
    }


def format_text(result: dict[str, Any]) -> str:
  """The image path, then `  0.8123  label` per prediction."""
  lines = [result['image']]
  lines += [f"  {p['probability']:.4f}  {p['label']}" for p in result['predictions']]
  return '\n'.join(lines)


def main(argv=None) -> int:
  parser = build_parser()
  args = parser.parse_args(argv)
  try:
    _check_args(args)
  except PredictError as e:
    parser.error(str(e))  # Exits with argparse's usage status, 2.
  image_errors = []

  def report(error: PredictError) -> None:
    image_errors.append(error)
    print(f'{PROG}: error: {error}', file=sys.stderr, flush=True)

  results = []
  try:
    for result in predict_files(args, on_error=report):
      if args.json:
        results.append(result)
      else:
        print(format_text(result), flush=True)
  except (PredictError, checkpoints.CheckpointError, OSError) as e:
    print(f'{PROG}: error: {e}', file=sys.stderr)
    return EXIT_ERROR
  if args.json:
    print(json.dumps(results, indent=2))
  return EXIT_ERROR if image_errors else 0


if __name__ == '__main__':
  sys.exit(main())
