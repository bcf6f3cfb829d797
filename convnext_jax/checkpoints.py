"""Orbax checkpoints: converted params checkpoints and training workdirs.

A *params checkpoint* (what `convnext-convert import` writes) is one orbax checkpoint
directory with two items:
  params/    the model's weights (an orbax PyTree item): the Flax 'params' tree with, for a
             model with BatchNorm, each BatchNorm's running `mean` and `var` beside its
             `scale` and `bias` (`models.merge_batch_stats`), as a PyTorch state dict has them;
  metadata/  JSON: model_name, num_classes, class_names, source, layout, ema, format.

A *training workdir* holds `checkpoints/<step>/` written by an orbax CheckpointManager, each
with the items:
  state/     the train state {'params', 'opt_state', 'ema_params', 'step', 'rng'}, and
             'batch_stats' for a model with BatchNorm (its running statistics, which the raw
             and the EMA params share);
  metadata/  JSON: model_name, num_classes, class_names, the data positions of each data
             shard and the shard count, the process count, the metrics of that step.
  metrics/   JSON: the step's evaluation metrics (what the best-step policy ranks by);
  checksums.json  size and SHA-256 of every file of the step (`seal_step`).
Only steps orbax has finished writing count (`workdir_steps`), and of those only the ones
that verify (`find_usable_step`: the one decision for resuming, export, predict and
`init_from`).

`load_params(path, which, step)` reads the weights (params and BatchNorm statistics, merged)
from either kind onto the host: it is what conversion (export) and prediction use.
`load_params_into` reads them straight into the shardings of a model's weights, on every
process at once: what `init_from` uses. Nothing here imports TensorFlow.
"""

import hashlib
import json
import math
import os
from typing import Any

from absl import logging
from etils import epath
from flax import traverse_util
import jax
import numpy as np
import orbax.checkpoint as ocp

from convnext_jax import fileio
from convnext_jax import models
from convnext_jax import multihost
from convnext_jax import trees
from convnext_jax.fileio import atomic_output
from convnext_jax.models.utils import BATCH_STATS_LEAVES

PARAMS_ITEM = 'params'
METADATA_ITEM = 'metadata'
STATE_ITEM = 'state'
CHECKPOINT_DIR = 'checkpoints'
DAMAGED_DIR = 'checkpoints_damaged'  # Where the trainer moves damaged steps.
CHECKSUMS_FILE = 'checksums.json'
# Files of a step that orbax writes or rewrites when it commits the step, after it has been
# sealed (the commit time, the commit marker): checked for form instead of by checksum.
_STEP_METADATA_FILE = '_CHECKPOINT_METADATA'
_UNSEALED_FILES = (CHECKSUMS_FILE, _STEP_METADATA_FILE, 'commit_success.txt')
PARAMS_FORMAT = 'convnext_jax.params'
FORMAT_VERSION = 1
# Where the raw and EMA weights live in the train state.
STATE_KEYS = {'raw': 'params', 'ema': 'ema_params'}
# Where BatchNorm's running statistics live in the train state (for raw and EMA params alike).
BATCH_STATS_KEY = 'batch_stats'


class CheckpointError(ValueError):
  """A checkpoint path that cannot be read as asked; the message is one readable line."""


def _params_checkpointer() -> ocp.Checkpointer:
  # Writing one array at a time (1 GB in flight) and without zstd keeps a large model's save
  # near one copy of the weights in memory; float weights barely compress anyway.
  params_handler = ocp.PyTreeCheckpointHandler(save_concurrent_gb=1, use_compression=False)
  return ocp.Checkpointer(
      ocp.CompositeCheckpointHandler(
          **{PARAMS_ITEM: params_handler, METADATA_ITEM: ocp.JsonCheckpointHandler()}
      )
  )


def save_params(path: str, params: Any, metadata: dict[str, Any], overwrite: bool = False):
  """Writes a params checkpoint; a local `path` appears only once it is complete.

  Args:
    path: destination directory (local, or `gs://...`).
    params: the model's weights: the Flax params tree, with BatchNorm statistics merged in
      for a model with BatchNorm (`models.merge_batch_stats`); numpy or jax arrays.
    metadata: JSON-serialisable facts; must include 'model_name' and 'num_classes'.
    overwrite: replace an existing checkpoint at `path`.
  """
  metadata = dict(metadata, format=PARAMS_FORMAT, format_version=FORMAT_VERSION)
  args = ocp.args.Composite(
      **{
          PARAMS_ITEM: ocp.args.PyTreeSave(params),
          METADATA_ITEM: ocp.args.JsonSave(metadata),
      }
  )
  if '://' in path:
    # Orbax commits remote checkpoints itself (a success marker is written last).
    if epath.Path(path).exists() and not overwrite:
      raise FileExistsError(f'{path} already exists; pass --overwrite to replace it')
    _params_checkpointer().save(path, args=args, force=overwrite)
    return
  with atomic_output(path, overwrite) as tmp:
    _params_checkpointer().save(tmp, args=args)


def is_params_checkpoint(path: str) -> bool:
  """Whether `path` holds a params checkpoint written by `save_params`."""
  root = epath.Path(path)
  return (root / PARAMS_ITEM).is_dir() and (root / METADATA_ITEM).exists()


def _read_json_item(directory: epath.Path) -> dict[str, Any]:
  restored = ocp.Checkpointer(
      ocp.CompositeCheckpointHandler(**{METADATA_ITEM: ocp.JsonCheckpointHandler()})
  ).restore(directory, args=ocp.args.Composite(**{METADATA_ITEM: ocp.args.JsonRestore()}))
  return dict(restored[METADATA_ITEM])


def _tree_metadata(item_dir) -> dict[str, Any]:
  # The handler's own metadata: the Checkpointer's also looks for step metadata, which an
  # item directory does not have, and warns about it on every read.
  return ocp.PyTreeCheckpointHandler().metadata(epath.Path(item_dir)).tree


def restore_numpy_tree(
    item_dir, subtree: str | None = None, also: tuple[str, ...] = ()
) -> dict[str, Any]:
  """Restores an orbax PyTree item (or one top-level key of it) as host numpy arrays.

  With `also`, the further top-level keys named there are restored too, and the result is
  {key: subtree} for `subtree` and each of them.
  """
  checkpointer = ocp.PyTreeCheckpointer()
  tree = _tree_metadata(item_dir)
  if subtree is not None:
    for key in (subtree,) + also:
      if key not in tree:
        raise CheckpointError(f'{item_dir} has no {key!r} (it has {sorted(tree)})')
    tree = {key: tree[key] for key in (subtree,) + also}
  restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
  restored = checkpointer.restore(
      item_dir,
      args=ocp.args.PyTreeRestore(
          item=tree, restore_args=restore_args, partial_restore=subtree is not None
      ),
  )
  restored = _as_dict(restored)
  if subtree is None or also:
    return restored
  return restored[subtree]


def _as_dict(tree):
  if isinstance(tree, dict):
    return {k: _as_dict(v) for k, v in tree.items()}
  return np.asarray(tree)


# ----------------------------------------------------------------------------------------
# Training workdirs.
# ----------------------------------------------------------------------------------------


def checkpoint_dir(workdir: str) -> epath.Path:
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
  with path.open('rb') as f:
    return hashlib.file_digest(f, 'sha256').hexdigest()


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


def _first_line(error: BaseException) -> str:
  text = str(error).strip().splitlines()
  return f'{type(error).__name__}: {text[0] if text else ""}'.strip()


class TrainingCheckpoints:
  """The trainer's checkpoints in `workdir/checkpoints`: saved asynchronously by an orbax
  CheckpointManager, sealed with checksums, verified before they are used.

  Keeps the last `keep` steps and, with `best_metric`, the step with its highest value
  (orbax writes the metrics of a step into it, so the best step is still known after a
  restart). Each step is sealed before orbax commits it: `checksums.json` lists the size
  and SHA-256 of every file, written by process 0 in orbax's background thread once every
  process has written its part (`seal_step`). Resuming takes the newest step that verifies
  (`find_usable_step`); newer damaged ones are moved to `workdir/checkpoints_damaged/`,
  with a warning naming each, so that they are neither used nor overwritten nor deleted.
  Errors of a background save surface, with their cause, at the next save or at `close`.
  """

  def __init__(
      self,
      workdir: str,
      *,
      save_interval_steps: int,
      keep: int,
      best_metric: str | None = None,
      enable_async: bool = True,
  ):
    self.workdir = workdir
    self.directory = checkpoint_dir(workdir)
    self._saving = None  # The step being saved, for the sealing callback.
    policies = [ocp.checkpoint_managers.LatestN(keep)]
    self._track_best = bool(best_metric)

    def best_fn(metrics):  # A step saved without evaluation ranks below any evaluated one.
      return metrics.get(best_metric, -math.inf)

    if best_metric:
      policies.append(
          ocp.checkpoint_managers.BestN(
              get_metric_fn=best_fn, n=1, keep_checkpoints_without_metrics=False
          )
      )
    # Explicit save decisions: every `save_interval_steps` steps and on a preemption notice
    # (orbax's default would also save the first step of every run).
    save_policy = ocp.checkpoint_managers.AnySavePolicy(
        [
            ocp.checkpoint_managers.FixedIntervalPolicy(save_interval_steps),
            ocp.checkpoint_managers.PreemptionCheckpointingPolicy(),
        ]
    )
    self._async = enable_async
    options = ocp.CheckpointManagerOptions(
        save_decision_policy=save_policy,
        preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(policies),
        # With a best_fn, orbax writes each step's metrics beside it and reads them back on
        # a restart; the preservation policy above still decides what is kept.
        best_fn=best_fn if best_metric else None,
        best_mode='max',
        async_options=ocp.AsyncOptions(post_finalization_callback=self._seal_saving)
        if enable_async
        else None,
        enable_async_checkpointing=enable_async,
        create=True,
        # What a failed save (a full disk) or a killed run left half-written goes at the
        # next start; the workdir lock makes sure no other trainer is writing it.
        cleanup_tmp_directories=True,
    )
    self.manager = ocp.CheckpointManager(
        self.directory, options=options, item_names=(STATE_ITEM, METADATA_ITEM)
    )

  def _seal_saving(self) -> None:
    # Runs on process 0 only, after every process has written the step and before orbax
    # commits it (renames it locally; writes its commit marker on GCS).
    step_dir = ocp.step.find_step_path(
        self.directory, ocp.step.standard_name_format(), step=self._saving, include_uncommitted=True
    )
    seal_step(step_dir)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def should_save(self, step: int) -> bool:
    return self.manager.should_save(step)

  def reached_preemption(self, step: int) -> bool:
    return self.manager.reached_preemption(step)

  def save(
      self,
      step: int,
      state,
      metadata: dict[str, Any],
      metrics: dict[str, float] | None = None,
      force: bool = False,
  ) -> bool:
    """Saves (asynchronously) if `step` is due or `force`; returns whether a save started.

    Raises:
      CheckpointError: the previous background save failed (the message names its cause).
    """
    self._wait()  # The previous save is sealed and committed, or its error raised here.
    self._saving = step
    if metrics is None and self._track_best:
      metrics = {}  # Not evaluated (orbax warns on every save given no metrics to track).
    started = self.manager.save(
        step,
        args=ocp.args.Composite(
            **{
                STATE_ITEM: ocp.args.StandardSave(state),
                METADATA_ITEM: ocp.args.JsonSave(metadata),
            }
        ),
        metrics=metrics,
        force=force,
    )
    if started and not self._async and jax.process_index() == 0:
      seal_step(self.directory / str(step))
    if started:
      logging.info(
          'checkpoint step %d: %s %s',
          step,
          'writing in the background to' if self._async else 'written to',
          self.directory / str(step),
      )
    return started

  def check(self) -> None:
    """Raises the error of a background save as soon as it has ended, not at the next save.

    Cheap (no wait) while a save is still running. Process 0 decides for every process.

    Raises:
      CheckpointError: as `save`.
    """
    ended = multihost.decide_on_process_0(
        'save_ended', lambda: '' if self.manager.is_saving_in_progress() else 'ended'
    )
    if ended:
      self._wait()

  def _wait(self) -> None:
    try:
      self.manager.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except
      code = fileio.disk_full_errno(e)
      if code is not None:
        raise CheckpointError(
            f'checkpoint step {self._saving} could not be written to {self.directory}: '
            f'{fileio.describe_disk_full(code)}; the steps before it are intact: free space '
            '(or lower config.keep_checkpoints) and run again to resume from the newest'
        ) from e
      raise CheckpointError(
          f'checkpoint step {self._saving} could not be written to {self.directory}: '
          f'{_first_line(e)}; the steps before it are intact and a new run resumes from the '
          'newest'
      ) from e

  def restore(self, step: int, abstract_state):
    """Restores `step` onto the shardings of `abstract_state` (any mesh or device count)."""
    restored = self.manager.restore(
        step,
        args=ocp.args.Composite(
            **{
                STATE_ITEM: ocp.args.StandardRestore(abstract_state),
                METADATA_ITEM: ocp.args.JsonRestore(),
            }
        ),
    )
    return restored[STATE_ITEM], dict(restored[METADATA_ITEM])

  def restore_latest(self, abstract_state):
    """(step, state, metadata) of the newest step that verifies and restores, else None.

    Steps that fail either are set aside (see the class docstring) and the next older one is
    tried. Every process calls this together; process 0 decides which step.

    Raises:
      CheckpointError: the workdir has finished steps but none is intact.
    """
    while True:
      decided = multihost.decide_on_process_0('resume_step', self._newest_usable)
      self.manager.reload()  # Process 0 may have set steps aside.
      if decided.startswith('error:'):
        raise CheckpointError(decided[len('error:') :])
      if not decided:
        return None
      step = int(decided)
      try:
        state, metadata = self.restore(step, abstract_state)
      except Exception as e:  # pylint: disable=broad-except
        # Orbax and tensorstore raise many types for a damaged step (ValueError, OSError,
        # KeyError, JSONDecodeError, XlaRuntimeError...).
        reason = _first_line(e)
        if jax.process_index() == 0:
          self._set_aside(step, f'it cannot be restored: {reason}')
        multihost.barrier('set_aside')
        self.manager.reload()
        continue
      return step, state, metadata

  def _newest_usable(self) -> str:
    steps = workdir_steps(self.workdir)
    if not steps:
      return ''
    try:
      step, damaged = find_usable_step(self.workdir, steps=steps)
    except CheckpointError as e:
      return f'error:{e}'
    for bad, reason in damaged:
      self._set_aside(bad, reason)
    return str(step)

  def _set_aside(self, step: int, reason: str) -> None:
    aside = epath.Path(self.workdir) / DAMAGED_DIR
    aside.mkdir(parents=True, exist_ok=True)
    target = aside / str(step)
    n = 1
    while target.exists():
      target, n = aside / f'{step}.{n}', n + 1
    (self.directory / str(step)).rename(target)
    logging.warning(
        'checkpoint step %d in %s is damaged (%s): moved to %s and not used',
        step,
        self.directory,
        reason,
        target,
    )

  def close(self, raise_errors: bool = True) -> None:
    """Waits for the last save and closes the manager.

    Raises:
      CheckpointError: the last save failed and `raise_errors` (else it is logged).
    """
    try:
      self._wait()
    except CheckpointError as e:
      if raise_errors:
        raise
      logging.error('%s', e)
    finally:
      self.manager.close()


def _params_location(path: str, which: str, step: int | None):
  """Where the weights asked for are: (orbax PyTree item directory, the top-level key in it
  that holds the params or None for the whole item, the top-level key that holds their
  BatchNorm statistics or None, metadata)."""
  if which not in STATE_KEYS:
    raise CheckpointError(f"params must be 'ema' or 'raw', got {which!r}")
  if '://' not in path:
    path = os.path.abspath(path)  # Orbax finds no metadata under a relative path.
  if not epath.Path(path).exists():
    raise CheckpointError(f'{path} does not exist')
  if is_params_checkpoint(path):
    return epath.Path(path) / PARAMS_ITEM, None, None, _read_json_item(epath.Path(path))
  steps = workdir_steps(path)
  if not steps:
    raise CheckpointError(
        f'{path} is neither a convnext_jax params checkpoint (params/ and metadata/ inside) '
        f'nor a training workdir with finished {CHECKPOINT_DIR}/<step>/; create one with '
        '`convnext-convert import` or by training'
    )
  step, _ = find_usable_step(path, step, steps)
  step_dir = checkpoint_dir(path) / str(step)
  metadata = _read_json_item(step_dir)
  state_dir = step_dir / STATE_ITEM
  keys = _tree_metadata(state_dir)
  key = STATE_KEYS[which]
  if key not in keys or not keys[key]:
    if which == 'ema':
      logging.warning('%s step %d has no EMA weights; using the raw ones', path, step)
    key = STATE_KEYS['raw']
  metadata = dict(metadata, step=step, weights='ema' if key == 'ema_params' else 'raw')
  stats_key = BATCH_STATS_KEY if keys.get(BATCH_STATS_KEY) else None
  return state_dir, key, stats_key, metadata


def load_params(path: str, which: str = 'ema', step: int | None = None):
  """Flax weights and metadata from a params checkpoint or a training workdir, on the host.

  The weights are the params with BatchNorm's running statistics merged in, for a model with
  BatchNorm (`models.split_batch_stats` gives the two collections); else the params.

  Args:
    path: a `convnext-convert import` directory, or a training workdir.
    which: 'ema' or 'raw' weights of a training workdir ('ema' falls back to 'raw', with a
      warning, when the run kept no EMA). A params checkpoint holds one set.
    step: a workdir's step (None: the latest finished one).

  Returns:
    (weights as nested numpy dicts, metadata dict).

  Raises:
    CheckpointError: nothing loadable at `path`, no such step, a damaged step, or weights
      that are not finite (a diverged run).
  """
  item_dir, key, stats_key, metadata = _params_location(path, which, step)
  if stats_key is None:
    params = restore_numpy_tree(item_dir, key)
  else:
    restored = restore_numpy_tree(item_dir, key, also=(stats_key,))
    params = models.merge_batch_stats(restored[key], restored[stats_key])
  nonfinite = [
      name
      for name, value in _flat_by_name(params).items()
      if np.issubdtype(value.dtype, np.floating) and not np.isfinite(value).all()
  ]
  if nonfinite:
    where = f'step {metadata["step"]} of {path}' if 'step' in metadata else path
    raise CheckpointError(
        f'{where} holds non-finite weights ({len(nonfinite)} arrays, e.g. '
        f'{nonfinite[0]}): the run diverged before it was saved; use an '
        'earlier step'
    )
  return params, metadata


def load_params_into(
    path: str,
    initial,
    *,
    which: str = 'ema',
    step: int | None = None,
    strict: bool = True,
    reinit_head: bool = True,
):
  """Checkpoint weights in place of the matching leaves of `initial`, in their shardings.

  Every process calls this together. Each leaf taken from the checkpoint is read by orbax
  straight into the sharding (and dtype) of its `initial` leaf, so each host reads only what
  its devices hold and no array ever passes whole through one host: `initial` may be
  sharded over many processes (FSDP on a pod). Which leaves are taken is decided on shapes
  alone, by `compare_params`.

  Args:
    path, which, step: as for `load_params`.
    initial: the freshly initialised weights, as `jax.Array`s (or ShapeDtypeStructs with a
      sharding, when every leaf comes from the checkpoint): for a model with BatchNorm its
      params with the statistics merged in (`models.merge_batch_stats`) to load both; a tree
      without statistics takes only the params.
    strict, reinit_head: as for `compare_params`.

  Returns:
    (the merged tree, report as from `compare_params`, metadata).

  Raises:
    CheckpointError: as `load_params`, or the trees differ (see `compare_params`).
  """
  item_dir, key, stats_key, metadata = _params_location(path, which, step)

  def stored_name(name: str) -> str:  # Where a weight of `initial` is in the orbax item.
    if key is None:
      return name
    is_stat = stats_key is not None and _is_batch_stat(name)
    return f'{stats_key if is_stat else key}/{name}'

  tree = _tree_metadata(item_dir)
  if key is not None:
    tree = models.merge_batch_stats(tree[key], tree.get(stats_key))
  stored = trees.shapes(tree)
  flat_initial = _flat_by_name(initial)
  if not any(_is_batch_stat(n) for n in flat_initial):
    # Params only: the checkpoint's statistics are not asked for.
    stored = {n: v for n, v in stored.items() if not _is_batch_stat(n)}
  report = compare_params(trees.shapes(initial), stored, strict=strict, reinit_head=reinit_head)
  taken = {stored_name(n): flat_initial[n] for n in report['taken']}
  item = traverse_util.unflatten_dict(
      {n: jax.ShapeDtypeStruct(v.shape, v.dtype) for n, v in taken.items()}, sep='/'
  )
  restore_args = traverse_util.unflatten_dict(
      {
          n: ocp.ArrayRestoreArgs(sharding=v.sharding, global_shape=v.shape, dtype=v.dtype)
          for n, v in taken.items()
      },
      sep='/',
  )
  restored = ocp.PyTreeCheckpointer().restore(
      item_dir,
      args=ocp.args.PyTreeRestore(item=item, restore_args=restore_args, partial_restore=True),
  )
  restored = _flat_by_name(restored)
  merged = jax.tree_util.tree_map_with_path(
      lambda p, leaf: restored.get(stored_name(trees.name(p)), leaf), initial
  )
  return merged, report, metadata


def _is_batch_stat(name: str) -> bool:
  return name.rsplit('/', 1)[-1] in BATCH_STATS_LEAVES


def _flat_by_name(tree) -> dict[str, Any]:
  return traverse_util.flatten_dict(tree, sep='/')


def compare_params(
    initial: dict[str, tuple[int, ...]],
    loaded: dict[str, tuple[int, ...]],
    *,
    reinit_head: bool = True,
    strict: bool = True,
) -> dict[str, list[str]]:
  """Which loaded parameters can replace a fresh model's, by name and shape.

  A head (`head/...`, or a ResNet's `fc/...`) whose shape differs (another class count), or
  that the checkpoint lacks (a model saved without one), keeps its fresh initialisation (made
  with head_init_scale). Any other missing, unexpected or mis-shaped name is an error when
  `strict`, otherwise it keeps its initial value and is logged.

  Args:
    initial: '/'-joined name -> shape of the model's parameters.
    loaded: the same for the checkpoint's.
    reinit_head: re-initialise a head that does not fit instead of failing.
    strict: raise on any other difference.

  Returns:
    {'taken': names to load, 'missing', 'unexpected', 'misshaped', 'reinitialized': lists
    of names (with shapes for the last two)}.

  Raises:
    CheckpointError: `strict` and the trees differ beyond the head.
  """
  difference = trees.compare(initial, loaded)
  heads = tuple(f'{name}/' for name in models.HEAD_NAMES)
  new_heads = set()
  if reinit_head:
    new_heads = {n for n, _, _ in difference.misshaped if n.startswith(heads)}
    # A checkpoint without a head (num_classes 0) feeding a classifier: a new head.
    if all(n.startswith(heads) for n in difference.missing):
      new_heads.update(difference.missing)
  problems = difference.without(new_heads)
  if problems and strict:
    raise CheckpointError(
        f'init_from does not match the model: {problems.describe()}; set '
        'config.init_from.strict=False to keep initial values for these'
    )
  arrows = {n: f'{n} {found} -> {want}' for n, found, want in difference.misshaped}
  report = {
      'taken': [n for n in initial if n not in arrows and n not in difference.missing],
      'missing': list(problems.missing),
      'unexpected': list(problems.unexpected),
      'misshaped': [arrows[n] for n, _, _ in problems.misshaped],
      'reinitialized': [arrows.get(n, n) for n in (*arrows, *difference.missing) if n in new_heads],
  }
  for kind, names in report.items():
    if names and kind != 'taken':
      logging.warning('init_from %s: %s', kind, ', '.join(names))
  return report
