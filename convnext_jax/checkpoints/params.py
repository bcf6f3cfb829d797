"""The params checkpoint format (`save_params`; its items are in the package docstring), and
reading weights onto the host from it or from a training workdir's usable step
(`load_params`: what conversion's export and prediction use). `params_location` says where
those weights are, for `init_from` to read them into their shardings instead.
"""

import os
from typing import Any

from absl import logging
from etils import epath
from flax import traverse_util
import jax
import numpy as np
import orbax.checkpoint as ocp

from convnext_jax import models
from convnext_jax.checkpoints import integrity
from convnext_jax.checkpoints.base import CHECKPOINT_DIR
from convnext_jax.checkpoints.base import METADATA_ITEM
from convnext_jax.checkpoints.base import STATE_ITEM
from convnext_jax.checkpoints.base import CheckpointError
from convnext_jax.fileio import atomic_output
from convnext_jax.fileio import is_remote

PARAMS_ITEM = 'params'
PARAMS_FORMAT = 'convnext_jax.params'
FORMAT_VERSION = 1
# Where the raw and EMA weights live in the train state.
STATE_KEYS = {'raw': 'params', 'ema': 'ema_params'}
# Where BatchNorm's running statistics live in the train state (for raw and EMA params alike).
BATCH_STATS_KEY = 'batch_stats'


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
  if is_remote(path):
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


def tree_metadata(item_dir) -> dict[str, Any]:
  """An orbax PyTree item's tree as orbax records it (shapes, dtypes); reads no array data."""
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
  tree = tree_metadata(item_dir)
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


def params_location(path: str, which: str, step: int | None):
  """Where the weights asked for are, in a params checkpoint or a workdir's usable step.

  Args:
    path, which, step: as for `load_params`.

  Returns:
    (orbax PyTree item directory, the top-level key in it that holds the params or None for
    the whole item, the top-level key that holds their BatchNorm statistics or None,
    metadata).

  Raises:
    CheckpointError: as `load_params`, but for non-finite weights (nothing is read here).
  """
  if which not in STATE_KEYS:
    raise CheckpointError(f"params must be 'ema' or 'raw', got {which!r}")
  if not is_remote(path):
    path = os.path.abspath(path)  # Orbax finds no metadata under a relative path.
  if not epath.Path(path).exists():
    raise CheckpointError(f'{path} does not exist')
  if is_params_checkpoint(path):
    return epath.Path(path) / PARAMS_ITEM, None, None, _read_json_item(epath.Path(path))
  steps = integrity.workdir_steps(path)
  if not steps:
    raise CheckpointError(
        f'{path} is neither a convnext_jax params checkpoint (params/ and metadata/ inside) '
        f'nor a training workdir with finished {CHECKPOINT_DIR}/<step>/; create one with '
        '`convnext-convert import` or by training'
    )
  step, _ = integrity.find_usable_step(path, step, steps)
  step_dir = integrity.checkpoint_dir(path) / str(step)
  metadata = _read_json_item(step_dir)
  state_dir = step_dir / STATE_ITEM
  keys = tree_metadata(state_dir)
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
  item_dir, key, stats_key, metadata = params_location(path, which, step)
  if stats_key is None:
    params = restore_numpy_tree(item_dir, key)
  else:
    restored = restore_numpy_tree(item_dir, key, also=(stats_key,))
    params = models.merge_batch_stats(restored[key], restored[stats_key])
  nonfinite = [
      name
      for name, value in traverse_util.flatten_dict(params, sep='/').items()
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
