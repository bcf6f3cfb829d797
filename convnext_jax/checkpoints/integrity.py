"""Which steps of a training workdir count: finished (`workdir_steps`), sealed with checksums
(`seal_step`) and verified against them (`verify_step`); `find_usable_step` is the one
decision of which step to read, for resuming, export, predict and `init_from`.

A step is `<workdir>/checkpoints/<step>/`, with `checksums.json` beside the items orbax
wrote: the size and SHA-256 of every file of the step.
"""

import hashlib
import json

from absl import logging
from etils import epath
import orbax.checkpoint as ocp

from convnext_jax.checkpoints.base import CHECKPOINT_DIR
from convnext_jax.checkpoints.base import METADATA_ITEM
from convnext_jax.checkpoints.base import STATE_ITEM
from convnext_jax.checkpoints.base import CheckpointError

CHECKSUMS_FILE = 'checksums.json'
# Files of a step that orbax writes or rewrites when it commits the step, after it has been
# sealed (the commit time, the commit marker): checked for form instead of by checksum.
_STEP_METADATA_FILE = '_CHECKPOINT_METADATA'
_UNSEALED_FILES = (CHECKSUMS_FILE, _STEP_METADATA_FILE, 'commit_success.txt')
_HASH_BLOCK = 8 << 20


def checkpoint_dir(workdir: str) -> epath.Path:
  """Where a training workdir's steps are: `workdir/checkpoints`."""
  return epath.Path(workdir) / CHECKPOINT_DIR


def workdir_steps(workdir: str) -> list[int]:
  """Finished checkpoint steps of a training workdir, ascending ([] if none).

  A step counts once orbax has committed it, by orbax's own test: locally its directory
  has been renamed from the temporary name it is written under; on GCS, where orbax writes
  in place, its commit marker (`commit_success.txt`) exists. So a step still being written,
  or left half-written by a crash, is never read. Whether a finished step is intact is
  `verify_step`'s question.
  """
  directory = checkpoint_dir(workdir)
  if not directory.is_dir():
    return []
  return sorted(ocp.utils.checkpoint_steps(directory))


def seal_step(step_dir: epath.Path) -> None:
  """Writes `step_dir/checksums.json`: the size and SHA-256 of every file under `step_dir`.

  Orbax and tensorstore keep no checksums of array data (zarr3 shard indices have a CRC,
  the chunks do not), so bytes damaged on disk would otherwise restore as garbage numbers.
  """
  files = {}
  for path in sorted(_files_under(step_dir)):
    name = str(path.relative_to(step_dir))
    if name not in _UNSEALED_FILES:
      files[name] = [path.stat().length, _sha256(path)]
  (step_dir / CHECKSUMS_FILE).write_text(json.dumps({'algorithm': 'sha256', 'files': files}))


def _files_under(directory: epath.Path):
  # Not rglob: epath refuses recursive patterns on GCS (one listing per directory instead).
  for path in directory.iterdir():
    if path.is_dir():
      yield from _files_under(path)
    else:
      yield path


def _sha256(path: epath.Path) -> str:
  # Read in blocks, not hashlib.file_digest: TensorFlow's gs:// files (epath's backend
  # whenever TensorFlow is installed) have no readinto, which file_digest requires.
  digest = hashlib.sha256()
  with path.open('rb') as f:
    while block := f.read(_HASH_BLOCK):
      digest.update(block)
  return digest.hexdigest()


def verify_step(step_dir: epath.Path) -> str | None:
  """Why the checkpoint step in `step_dir` cannot be used, or None if it is intact.

  A sealed step (see `seal_step`) must have every file it was sealed with, at the same size
  and hash. A step without checksums (written before they existed) is checked for the JSON
  files every restore reads; its array data then is checked by restoring it.
  """
  manifest = step_dir / CHECKSUMS_FILE
  required = [_STEP_METADATA_FILE]
  if not manifest.exists():
    required += [f'{STATE_ITEM}/_METADATA', f'{METADATA_ITEM}/{METADATA_ITEM}']
  for name in required:
    if not (step_dir / name).is_file():
      return f'{name} is missing'
    try:
      json.loads((step_dir / name).read_text())
    except ValueError:
      return f'{name} is not valid JSON'
  if not manifest.exists():
    return None
  try:
    files = json.loads(manifest.read_text())['files']
  except (ValueError, KeyError, TypeError):
    return f'{CHECKSUMS_FILE} is unreadable'
  for name, (size, digest) in files.items():
    path = step_dir / name
    if not path.is_file():
      return f'{name} is missing'
    actual = path.stat().length
    if actual != size:
      return f'{name} has {actual} bytes, {size} were written'
    if _sha256(path) != digest:
      return f'{name} does not match the checksum written with it'
  return None


def find_usable_step(
    workdir: str, step: int | None = None, steps: list[int] | None = None
) -> tuple[int, list[tuple[int, str]]]:
  """The step of a training workdir to read: the one asked for, or the newest intact one.

  The one decision of which step is usable, for resuming, export, predict and `init_from`.

  Args:
    workdir: a training workdir.
    step: a step asked for by the user (None or < 0: the newest intact one).
    steps: the workdir's finished steps, if already listed.

  Returns:
    (step, [(newer damaged step, reason), ...]); each damaged step is logged as a warning.

  Raises:
    CheckpointError: no finished step, the step asked for is not finished or is damaged,
      or every step is damaged.
  """
  steps = workdir_steps(workdir) if steps is None else steps
  directory = checkpoint_dir(workdir)
  if not steps:
    raise CheckpointError(f'{workdir} has no finished checkpoint in {directory}')
  if step is not None and step >= 0:
    if step not in steps:
      raise CheckpointError(
          f'{workdir} has no finished checkpoint at step {step}; it has steps {steps}'
      )
    reason = verify_step(directory / str(step))
    if reason:
      raise CheckpointError(
          f'checkpoint step {step} in {directory} is damaged ({reason}); '
          f'choose another step of {steps}'
      )
    return step, []
  damaged = []
  for candidate in reversed(steps):
    reason = verify_step(directory / str(candidate))
    if reason is None:
      return candidate, damaged
    logging.warning(
        'checkpoint step %d in %s is damaged (%s); trying the one before',
        candidate,
        directory,
        reason,
    )
    damaged.append((candidate, reason))
  listing = '; '.join(f'step {s}: {r}' for s, r in damaged)
  raise CheckpointError(
      f'every checkpoint in {directory} is damaged ({listing}); move '
      'them away to start over, or restore them from a copy'
  )
