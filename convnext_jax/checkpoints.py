"""Orbax checkpoints of ConvNeXt parameters.

A *params checkpoint* (what `convnext-convert import` writes) is one orbax checkpoint
directory with two items:
  params/    the Flax 'params' tree (an orbax PyTree item);
  metadata/  JSON: model_name, num_classes, class_names, source, layout, ema, format.

Loading is by directory; `load_params` is the one entry point conversion uses to read Flax
weights back. Nothing here imports TensorFlow.
"""

import os
from typing import Any

from etils import epath
import jax
import numpy as np
import orbax.checkpoint as ocp

from convnext_jax.fileio import atomic_output

PARAMS_ITEM = 'params'
METADATA_ITEM = 'metadata'
PARAMS_FORMAT = 'convnext_jax.params'
FORMAT_VERSION = 1


class CheckpointError(ValueError):
  """A checkpoint path that cannot be read as asked; the message is one readable line."""


def _checkpointer() -> ocp.Checkpointer:
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
    _checkpointer().save(path, args=args, force=overwrite)
    return
  with atomic_output(path, overwrite) as tmp:
    _checkpointer().save(tmp, args=args)


def is_params_checkpoint(path: str) -> bool:
  """Whether `path` holds a params checkpoint written by `save_params`."""
  root = epath.Path(path)
  return (root / PARAMS_ITEM).is_dir() and (root / METADATA_ITEM).exists()


def load_metadata(path: str) -> dict[str, Any]:
  """The metadata JSON of a params checkpoint."""
  restored = _checkpointer().restore(
      path, args=ocp.args.Composite(**{METADATA_ITEM: ocp.args.JsonRestore()}))
  return dict(restored[METADATA_ITEM])


def load_params(path: str) -> tuple[dict[str, Any], dict[str, Any]]:
  """Reads a params checkpoint into host memory.

  Args:
    path: a directory written by `save_params`.

  Returns:
    (params, metadata): params as a nested dict of numpy arrays.

  Raises:
    CheckpointError: `path` is missing or is not a params checkpoint.
  """
  if not epath.Path(path).exists():
    raise CheckpointError(f'{path} does not exist')
  if not is_params_checkpoint(path):
    raise CheckpointError(
        f'{path} is not a convnext_jax params checkpoint (no {PARAMS_ITEM}/ and '
        f'{METADATA_ITEM}/ inside); create one with `convnext-convert import`')
  metadata = load_metadata(path)
  return restore_numpy_tree(os.path.join(path, PARAMS_ITEM)), metadata


def restore_numpy_tree(item_dir: str) -> dict[str, Any]:
  """Restores an orbax PyTree item as host numpy arrays, whatever it was saved from."""
  checkpointer = ocp.PyTreeCheckpointer()
  tree = checkpointer.metadata(item_dir).item_metadata.tree
  restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
  restored = checkpointer.restore(item_dir, args=ocp.args.PyTreeRestore(restore_args=restore_args))
  return _as_dict(restored)


def _as_dict(tree):
  if isinstance(tree, dict):
    return {k: _as_dict(v) for k, v in tree.items()}
  return np.asarray(tree)
