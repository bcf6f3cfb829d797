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
  checksums.json  size and SHA-256 of every file of the step (`integrity.seal_step`).
Only steps orbax has finished writing count (`workdir_steps`), and of those only the ones
that verify (`find_usable_step`: the one decision for resuming, export, predict and
`init_from`).

`load_params(path, which, step)` reads the weights (params and BatchNorm statistics, merged)
from either kind onto the host: it is what conversion (export) and prediction use.
`load_params_into` reads them straight into the shardings of a model's weights, on every
process at once: what `init_from` uses. Nothing here imports TensorFlow.

One job per module, each importing only those above it in this list:
  base       the item and directory names, `CheckpointError`;
  integrity  finished steps, sealing and verifying them, `find_usable_step`;
  params     the params checkpoint format; `load_params` onto the host;
  manager    `TrainingCheckpoints`, the trainer's save, resume and setting aside;
  init_from  `load_params_into` and `compare_params`: checkpoint weights into a fresh model.
"""

from convnext_jax.checkpoints.base import CHECKPOINT_DIR
from convnext_jax.checkpoints.base import METADATA_ITEM
from convnext_jax.checkpoints.base import STATE_ITEM
from convnext_jax.checkpoints.base import CheckpointError
from convnext_jax.checkpoints.init_from import compare_params
from convnext_jax.checkpoints.init_from import load_params_into
from convnext_jax.checkpoints.integrity import CHECKSUMS_FILE
from convnext_jax.checkpoints.integrity import checkpoint_dir
from convnext_jax.checkpoints.integrity import find_usable_step
from convnext_jax.checkpoints.integrity import seal_step
from convnext_jax.checkpoints.integrity import verify_step
from convnext_jax.checkpoints.integrity import workdir_steps
from convnext_jax.checkpoints.manager import DAMAGED_DIR
from convnext_jax.checkpoints.manager import TrainingCheckpoints
from convnext_jax.checkpoints.params import BATCH_STATS_KEY
from convnext_jax.checkpoints.params import FORMAT_VERSION
from convnext_jax.checkpoints.params import PARAMS_FORMAT
from convnext_jax.checkpoints.params import PARAMS_ITEM
from convnext_jax.checkpoints.params import STATE_KEYS
from convnext_jax.checkpoints.params import is_params_checkpoint
from convnext_jax.checkpoints.params import load_params
from convnext_jax.checkpoints.params import restore_numpy_tree
from convnext_jax.checkpoints.params import save_params

__all__ = [
    'BATCH_STATS_KEY',
    'CHECKPOINT_DIR',
    'CHECKSUMS_FILE',
    'DAMAGED_DIR',
    'FORMAT_VERSION',
    'METADATA_ITEM',
    'PARAMS_FORMAT',
    'PARAMS_ITEM',
    'STATE_ITEM',
    'STATE_KEYS',
    'CheckpointError',
    'TrainingCheckpoints',
    'checkpoint_dir',
    'compare_params',
    'find_usable_step',
    'is_params_checkpoint',
    'load_params',
    'load_params_into',
    'restore_numpy_tree',
    'save_params',
    'seal_step',
    'verify_step',
    'workdir_steps',
]
