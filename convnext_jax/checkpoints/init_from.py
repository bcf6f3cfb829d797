"""`init_from`: a checkpoint's weights merged into a freshly initialised model, leaf by leaf
where name and shape agree (`compare_params` decides, and reports every difference), read by
every process straight into the shardings of the fresh weights (`load_params_into`)."""

from typing import Any

from absl import logging
from flax import traverse_util
import jax
import orbax.checkpoint as ocp

from convnext_jax import models
from convnext_jax import trees
from convnext_jax.checkpoints import params
from convnext_jax.checkpoints.base import CheckpointError
from convnext_jax.models.utils import BATCH_STATS_LEAVES


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
  item_dir, key, stats_key, metadata = params.params_location(path, which, step)
  tree = params.tree_metadata(item_dir)
  if key is not None:
    tree = models.merge_batch_stats(tree[key], tree.get(stats_key))
  # An FCMAE model's weights: its encoder is the backbone, its decoder is left behind.
  encoder = FCMAE_ENCODER if is_fcmae_tree(tree) else ''
  fresh = FCMAE_FRESH if encoder else ()
  if encoder:
    tree = tree[encoder.rstrip('/')]

  def stored_name(name: str) -> str:  # Where a weight of `initial` is in the orbax item.
    if key is None:
      return encoder + name
    is_stat = stats_key is not None and _is_batch_stat(name)
    return f'{stats_key if is_stat else key}/{encoder}{name}'

  stored = trees.shapes(tree)
  flat_initial = _flat_by_name(initial)
  if not any(_is_batch_stat(n) for n in flat_initial):
    # Params only: the checkpoint's statistics are not asked for.
    stored = {n: v for n, v in stored.items() if not _is_batch_stat(n)}
  report = compare_params(
      trees.shapes(initial), stored, strict=strict, reinit_head=reinit_head, fresh=fresh
  )
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


# Where an FCMAE model keeps its encoder, and what a classifier built on that encoder has
# that pre-training does not: the final norm (the head is new anyway). The official
# fine-tuning starts both fresh.
FCMAE_ENCODER = 'encoder/'
FCMAE_FRESH = ('norm/',)


def is_fcmae_tree(tree) -> bool:
  """Whether a weights tree is an FCMAE model's (`models.FCMAE`: 'encoder', and the decoder
  unless imported from a released encoder alone); no classifier has an 'encoder'."""
  return isinstance(tree, dict) and 'encoder' in tree


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
    fresh: tuple[str, ...] = (),
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
    fresh: prefixes of names the checkpoint is known to lack, which keep their
      initialisation like a new head (an FCMAE encoder's classifier: its final norm).

  Returns:
    {'taken': names to load, 'missing', 'unexpected', 'misshaped', 'reinitialized': lists
    of names (with shapes for the last two)}.

  Raises:
    CheckpointError: `strict` and the trees differ beyond the head.
  """
  difference = trees.compare(initial, loaded)
  heads = tuple(f'{name}/' for name in models.HEAD_NAMES)
  new_heads = {n for n in difference.missing if fresh and n.startswith(fresh)}
  if reinit_head:
    new_heads.update(n for n, _, _ in difference.misshaped if n.startswith(heads))
    # A checkpoint without a head (num_classes 0) feeding a classifier: a new head.
    if all(n.startswith(heads) for n in difference.missing if n not in new_heads):
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
