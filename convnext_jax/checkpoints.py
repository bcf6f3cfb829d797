"""Orbax checkpoints: converted params checkpoints and training workdirs.

A *params checkpoint* (what `convnext-convert import` writes) is one orbax checkpoint
directory with two items:
  params/    the Flax 'params' tree (an orbax PyTree item);
  metadata/  JSON: model_name, num_classes, class_names, source, layout, ema, format.

A *training workdir* holds `checkpoints/<step>/` written by an orbax CheckpointManager, each
with the items:
  state/     the train state {'params', 'opt_state', 'ema_params', 'step', 'rng'};
  metadata/  JSON: model_name, num_classes, class_names, the data positions of each data
             shard and the shard count, the process count, the metrics of that step.
Only steps orbax has finished writing count (`workdir_steps`).

`load_params(path, which, step)` reads Flax weights from either kind onto the host: it is
what conversion (export) and prediction use. `load_params_into` reads them straight into the
shardings of a model's params, on every process at once: what `init_from` uses. Nothing
here imports TensorFlow.
"""

from typing import Any

from absl import logging
from etils import epath
from flax import traverse_util
import jax
import numpy as np
import orbax.checkpoint as ocp

from convnext_jax.fileio import atomic_output
from convnext_jax.sharding import path_name

PARAMS_ITEM = 'params'
METADATA_ITEM = 'metadata'
STATE_ITEM = 'state'
CHECKPOINT_DIR = 'checkpoints'
PARAMS_FORMAT = 'convnext_jax.params'
FORMAT_VERSION = 1
# Where the raw and EMA weights live in the train state.
STATE_KEYS = {'raw': 'params', 'ema': 'ema_params'}


class CheckpointError(ValueError):
  """A checkpoint path that cannot be read as asked; the message is one readable line."""


def _params_checkpointer() -> ocp.Checkpointer:
  # Writing one array at a time (1 GB in flight) and without zstd keeps a large model's save
  # near one copy of the weights in memory; float weights barely compress anyway.
  params_handler = ocp.PyTreeCheckpointHandler(save_concurrent_gb=1, use_compression=False)
  return ocp.Checkpointer(ocp.CompositeCheckpointHandler(
      **{PARAMS_ITEM: params_handler, METADATA_ITEM: ocp.JsonCheckpointHandler()}))


def save_params(path: str, params: Any, metadata: dict[str, Any], overwrite: bool = False):
  """Writes a params checkpoint; a local `path` appears only once it is complete.

  Args:
    path: destination directory (local, or `gs://...`).
    params: the Flax params tree (numpy or jax arrays).
    metadata: JSON-serialisable facts; must include 'model_name' and 'num_classes'.
    overwrite: replace an existing checkpoint at `path`.
  """
  metadata = dict(metadata, format=PARAMS_FORMAT, format_version=FORMAT_VERSION)
  args = ocp.args.Composite(**{
      PARAMS_ITEM: ocp.args.PyTreeSave(params),
      METADATA_ITEM: ocp.args.JsonSave(metadata),
  })
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
  restored = ocp.Checkpointer(ocp.CompositeCheckpointHandler(
      **{METADATA_ITEM: ocp.JsonCheckpointHandler()})).restore(
          directory, args=ocp.args.Composite(**{METADATA_ITEM: ocp.args.JsonRestore()}))
  return dict(restored[METADATA_ITEM])


def restore_numpy_tree(item_dir, subtree: str | None = None) -> dict[str, Any]:
  """Restores an orbax PyTree item (or one top-level key of it) as host numpy arrays."""
  checkpointer = ocp.PyTreeCheckpointer()
  tree = checkpointer.metadata(item_dir).item_metadata.tree
  if subtree is not None:
    if subtree not in tree:
      raise CheckpointError(f'{item_dir} has no {subtree!r} (it has {sorted(tree)})')
    tree = {subtree: tree[subtree]}
  restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
  restored = checkpointer.restore(
      item_dir, args=ocp.args.PyTreeRestore(item=tree, restore_args=restore_args,
                                            partial_restore=subtree is not None))
  restored = _as_dict(restored)
  return restored[subtree] if subtree is not None else restored


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
  or left half-written by a crash, is never read.
  """
  directory = checkpoint_dir(workdir)
  if not directory.is_dir():
    return []
  return sorted(step for step in ocp.utils.checkpoint_steps(directory)
                if (directory / str(step) / STATE_ITEM).is_dir())


def training_manager(workdir: str, *, save_interval_steps: int, keep: int,
                     best_metric: str | None = None,
                     enable_async: bool = True) -> ocp.CheckpointManager:
  """A CheckpointManager over `workdir/checkpoints` keeping the last `keep` steps and, with
  `best_metric`, the step with the highest value of that metric."""
  policies = [ocp.checkpoint_managers.LatestN(keep)]
  if best_metric:
    policies.append(ocp.checkpoint_managers.BestN(
        get_metric_fn=lambda metrics: metrics[best_metric], n=1,
        keep_checkpoints_without_metrics=False))
  # Explicit save decisions: every `save_interval_steps` steps and on a preemption notice
  # (orbax's default would also save the first step of every run).
  save_policy = ocp.checkpoint_managers.AnySavePolicy([
      ocp.checkpoint_managers.FixedIntervalPolicy(save_interval_steps),
      ocp.checkpoint_managers.PreemptionCheckpointingPolicy(),
  ])
  options = ocp.CheckpointManagerOptions(
      save_decision_policy=save_policy,
      preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(policies),
      enable_async_checkpointing=enable_async, create=True)
  return ocp.CheckpointManager(checkpoint_dir(workdir), options=options,
                               item_names=(STATE_ITEM, METADATA_ITEM))


def save_training(manager: ocp.CheckpointManager, step: int, state, metadata: dict[str, Any],
                  metrics: dict[str, float] | None = None, force: bool = False) -> bool:
  """Saves (asynchronously) if `step` is due or `force`; returns whether a save started."""
  return manager.save(step, args=ocp.args.Composite(**{
      STATE_ITEM: ocp.args.StandardSave(state),
      METADATA_ITEM: ocp.args.JsonSave(metadata),
  }), metrics=metrics, force=force)


def restore_training(manager: ocp.CheckpointManager, step: int, abstract_state):
  """Restores `step` onto the shardings of `abstract_state` (any mesh or device count)."""
  restored = manager.restore(step, args=ocp.args.Composite(**{
      STATE_ITEM: ocp.args.StandardRestore(abstract_state),
      METADATA_ITEM: ocp.args.JsonRestore(),
  }))
  return restored[STATE_ITEM], dict(restored[METADATA_ITEM])


def is_training_workdir(path: str) -> bool:
  return bool(workdir_steps(path))


def _params_location(path: str, which: str, step: int | None):
  """Where the weights asked for are: (orbax PyTree item directory, the top-level key in it
  that holds them or None for the whole item, metadata)."""
  if which not in STATE_KEYS:
    raise CheckpointError(f"params must be 'ema' or 'raw', got {which!r}")
  if not epath.Path(path).exists():
    raise CheckpointError(f'{path} does not exist')
  if is_params_checkpoint(path):
    return epath.Path(path) / PARAMS_ITEM, None, _read_json_item(epath.Path(path))
  steps = workdir_steps(path)
  if not steps:
    raise CheckpointError(
        f'{path} is neither a convnext_jax params checkpoint (params/ and metadata/ inside) '
        f'nor a training workdir with finished {CHECKPOINT_DIR}/<step>/; create one with '
        '`convnext-convert import` or by training')
  if step is None or step < 0:
    step = steps[-1]
  elif step not in steps:
    raise CheckpointError(f'{path} has no finished checkpoint at step {step}; it has steps '
                          f'{steps}')
  step_dir = checkpoint_dir(path) / str(step)
  metadata = _read_json_item(step_dir)
  state_dir = step_dir / STATE_ITEM
  keys = ocp.PyTreeCheckpointer().metadata(state_dir).item_metadata.tree
  key = STATE_KEYS[which]
  if key not in keys or not keys[key]:
    if which == 'ema':
      logging.warning('%s step %d has no EMA weights; using the raw ones', path, step)
    key = STATE_KEYS['raw']
  metadata = dict(metadata, step=step, weights='ema' if key == 'ema_params' else 'raw')
  return state_dir, key, metadata


def load_params(path: str, which: str = 'ema', step: int | None = None):
  """Flax params and metadata from a params checkpoint or a training workdir, on the host.

  Args:
    path: a `convnext-convert import` directory, or a training workdir.
    which: 'ema' or 'raw' weights of a training workdir ('ema' falls back to 'raw', with a
      warning, when the run kept no EMA). A params checkpoint holds one set.
    step: a workdir's step (None: the latest finished one).

  Returns:
    (params as nested numpy dicts, metadata dict).

  Raises:
    CheckpointError: nothing loadable at `path`, or no such step.
  """
  item_dir, key, metadata = _params_location(path, which, step)
  return restore_numpy_tree(item_dir, key), metadata


def load_params_into(path: str, initial, *, which: str = 'ema', step: int | None = None,
                     strict: bool = True, reinit_head: bool = True):
  """Checkpoint weights in place of the matching leaves of `initial`, in their shardings.

  Every process calls this together. Each leaf taken from the checkpoint is read by orbax
  straight into the sharding (and dtype) of its `initial` leaf, so each host reads only what
  its devices hold and no array ever passes whole through one host: `initial` may be
  sharded over many processes (FSDP on a pod). Which leaves are taken is decided on shapes
  alone, by `compare_params`.

  Args:
    path, which, step: as for `load_params`.
    initial: the freshly initialised params, as `jax.Array`s (or ShapeDtypeStructs with a
      sharding, when every leaf comes from the checkpoint).
    strict, reinit_head: as for `compare_params`.

  Returns:
    (the merged tree, report as from `compare_params`, metadata).

  Raises:
    CheckpointError: as `load_params`, or the trees differ (see `compare_params`).
  """
  item_dir, key, metadata = _params_location(path, which, step)
  stored = ocp.PyTreeCheckpointer().metadata(item_dir).item_metadata.tree
  stored = stored[key] if key is not None else stored
  flat_initial = _flat_by_name(initial)
  report = compare_params({n: tuple(v.shape) for n, v in flat_initial.items()},
                          {n: tuple(v.shape) for n, v in _flat_by_name(stored).items()},
                          strict=strict, reinit_head=reinit_head)
  taken = {n: flat_initial[n] for n in report['taken']}
  item = traverse_util.unflatten_dict(
      {n: jax.ShapeDtypeStruct(v.shape, v.dtype) for n, v in taken.items()}, sep='/')
  restore_args = traverse_util.unflatten_dict(
      {n: ocp.ArrayRestoreArgs(sharding=v.sharding, global_shape=v.shape, dtype=v.dtype)
       for n, v in taken.items()}, sep='/')
  if key is not None:
    item, restore_args = {key: item}, {key: restore_args}
  restored = ocp.PyTreeCheckpointer().restore(
      item_dir, args=ocp.args.PyTreeRestore(item=item, restore_args=restore_args,
                                            partial_restore=True))
  restored = _flat_by_name(restored[key] if key is not None else restored)
  leaves = [restored.get(path_name(p), leaf)
            for p, leaf in jax.tree_util.tree_flatten_with_path(initial)[0]]
  return jax.tree.unflatten(jax.tree.structure(initial), leaves), report, metadata


def _flat_by_name(tree) -> dict[str, Any]:
  return traverse_util.flatten_dict(tree, sep='/')


def compare_params(initial: dict[str, tuple[int, ...]], loaded: dict[str, tuple[int, ...]], *,
                   reinit_head: bool = True, strict: bool = True) -> dict[str, list[str]]:
  """Which loaded parameters can replace a fresh model's, by name and shape.

  A head whose shape differs (another class count), or that the checkpoint lacks (a model
  saved without one), keeps its fresh initialisation (made with head_init_scale). Any other
  missing, unexpected or mis-shaped name is an error when `strict`, otherwise it keeps its
  initial value and is logged.

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
  report = {'taken': [], 'missing': [], 'unexpected': [], 'misshaped': [],
            'reinitialized': []}
  for name, shape in initial.items():
    if name not in loaded:
      report['missing'].append(name)
    elif tuple(loaded[name]) != tuple(shape):
      kind = 'reinitialized' if reinit_head and name.startswith('head/') else 'misshaped'
      report[kind].append(f'{name} {tuple(loaded[name])} -> {tuple(shape)}')
    else:
      report['taken'].append(name)
  report['unexpected'] = [n for n in loaded if n not in initial]
  # A checkpoint without a head (num_classes 0) feeding a classifier: a new head.
  if reinit_head and all(n.startswith('head/') for n in report['missing']):
    report['reinitialized'] += report['missing']
    report['missing'] = []
  problems = {k: v for k, v in report.items() if v and k not in ('taken', 'reinitialized')}
  if problems and strict:
    listing = '; '.join(f'{k} {len(v)}: {", ".join(v[:5])}{" ..." if len(v) > 5 else ""}'
                        for k, v in problems.items())
    raise CheckpointError(f'init_from does not match the model: {listing}; set '
                          'config.init_from.strict=False to keep initial values for these')
  for kind, names in report.items():
    if names and kind != 'taken':
      logging.warning('init_from %s: %s', kind, ', '.join(names))
  return report
