"""Device mesh and parameter sharding by regex rules over '/'-joined parameter names.

Mesh axes: 'data' (pure data parallel), 'fsdp' (data parallel whose devices also split the
parameters, optimizer state and EMA: ZeRO-3 style) and 'model' (tensor parallel over the MLP
hidden dimension). The batch is split over ('data', 'fsdp').

A rule is (regex, kind), first full match wins:
  'replicate'    the whole tensor on every device;
  'fsdp'         its largest dimension divisible by the 'fsdp' size is split over 'fsdp';
  'model_last'   the last dimension is split over 'model' (pwconv1 kernel/bias, GRN), then
                 FSDP as above on the remaining dimensions;
  'model_first'  the first dimension over 'model' (pwconv2 kernel), then FSDP.
Tensors smaller than `min_fsdp_size` elements stay replicated over 'fsdp'.

Feeding the batch (`BatchFeed`): each process hands jax the rows of the global batch that
its own devices hold. Processes whose devices hold the same rows (the model axis, or any
axis outside the batch, spanning processes) must feed identical rows, so they read the same
*data shard*; processes holding different rows read different shards.
"""

from collections.abc import Callable
from collections.abc import Sequence
import dataclasses
import math
import re
from typing import Any

import jax
import numpy as np

from convnext_jax import trees

P = jax.sharding.PartitionSpec
DATA_AXES = ('data', 'fsdp')
AXES = ('data', 'fsdp', 'model')

DEFAULT_RULES = (
    (r'.*/pwconv1/(kernel|bias)', 'model_last'),
    (r'.*/grn/(gamma|beta)', 'model_last'),
    (r'.*/pwconv2/kernel', 'model_first'),
    (r'.*', 'fsdp'),
)
KINDS = ('replicate', 'fsdp', 'model_last', 'model_first')


def make_mesh(shape: Sequence[int], devices=None) -> jax.sharding.Mesh:
  """A mesh over ('data', 'fsdp', 'model'); one -1 entry takes the remaining devices.

  Raises:
    ValueError: the sizes do not multiply to the device count.
  """
  devices = list(jax.devices() if devices is None else devices)
  shape = [int(s) for s in shape]
  if len(shape) != len(AXES):
    raise ValueError(f'mesh shape {tuple(shape)} must give sizes for {AXES}')
  if shape.count(-1) > 1:
    raise ValueError(f'mesh shape {tuple(shape)}: at most one -1')
  if -1 in shape:
    known = math.prod(s for s in shape if s != -1)
    if known <= 0 or len(devices) % known:
      raise ValueError(
          f'mesh shape {tuple(shape)} does not divide {len(devices)} devices; '
          'set config.mesh so that its product is the device count'
      )
    shape[shape.index(-1)] = len(devices) // known
  if math.prod(shape) != len(devices):
    raise ValueError(
        f'mesh {dict(zip(AXES, shape))} has {math.prod(shape)} devices but '
        f'{len(devices)} are available; set config.mesh to multiply to '
        f'{len(devices)}'
    )
  axis_types = (jax.sharding.AxisType.Auto,) * len(AXES)
  if devices == list(jax.devices()):
    return jax.make_mesh(tuple(shape), AXES, axis_types=axis_types)
  return jax.sharding.Mesh(np.asarray(devices).reshape(shape), AXES, axis_types=axis_types)


def data_parallel_size(mesh: jax.sharding.Mesh) -> int:
  """Devices the batch is split over: 'data' x 'fsdp'."""
  return math.prod(mesh.shape[a] for a in DATA_AXES)


def batch_sharding(mesh: jax.sharding.Mesh) -> jax.sharding.NamedSharding:
  """Leading (batch) dimension over the data-parallel axes, the rest replicated."""
  return jax.sharding.NamedSharding(mesh, P(DATA_AXES))


def replicated(mesh: jax.sharding.Mesh) -> jax.sharding.NamedSharding:
  return jax.sharding.NamedSharding(mesh, P())


@dataclasses.dataclass(frozen=True)
class BatchFeed:
  """Which rows of every global batch this process feeds, and how.

  The batch's rows are split into `shard_count` equal data shards; process p feeds shard
  `process_shards[p]`, its devices' rows. Input pipelines read one stream per data shard
  (`shard_index` of `shard_count`), so processes that share a shard read identical data.

  Attributes:
    sharding: the batch sharding (leading axis over the data-parallel mesh axes).
    shard_index: this process's data shard.
    shard_count: the number of distinct data shards (1 when every process holds the
      whole batch, the process count under plain data parallelism).
    process_shards: the data shard of every process, by process index.
  """

  sharding: jax.sharding.NamedSharding
  shard_index: int
  shard_count: int
  process_shards: tuple[int, ...]

  def local_batch(self, global_batch: int) -> int:
    """Rows this process feeds per global batch of `global_batch` rows."""
    return global_batch // self.shard_count

  def global_arrays(self, local: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    """This process's rows -> global `jax.Array`s (every process calls this together)."""
    return {
        k: jax.make_array_from_process_local_data(
            self.sharding, v, (v.shape[0] * self.shard_count,) + v.shape[1:]
        )
        for k, v in local.items()
    }


def batch_feed(
    mesh: jax.sharding.Mesh, process_of: Callable[[Any], int] = lambda d: d.process_index
) -> BatchFeed:
  """The `BatchFeed` of `batch_sharding(mesh)` for this process.

  Args:
    mesh: the device mesh.
    process_of: a device's process index (tests pass other layouts).

  Raises:
    ValueError: the processes' rows overlap without being equal (some process would need rows
      that another feeds as part of a different shard), so no per-process feeding is right.
  """
  batch = batch_sharding(mesh)
  rows = data_parallel_size(mesh)  # One row per batch shard: the pattern of any batch size.
  held: dict[int, set[int]] = {}  # Process -> the rows its devices hold.
  for device, index in batch.devices_indices_map((rows,)).items():
    held.setdefault(process_of(device), set()).update(range(*index[0].indices(rows)))
  processes = sorted(held)
  shards = sorted({frozenset(r) for r in held.values()}, key=min)
  covered = [row for shard in shards for row in shard]
  if len(covered) != rows or len({len(s) for s in shards}) != 1:
    layout = '; '.join(f'process {p}: rows {sorted(held[p])}' for p in processes)
    raise ValueError(
        f'mesh {dict(mesh.shape)} cannot be fed by {len(processes)} processes: the batch '
        f'axes {DATA_AXES} split a batch of {rows} rows as {layout}, and processes must hold '
        'either the same rows or disjoint, equal parts; choose config.mesh so that the '
        'processes divide the data and fsdp axes, or hold all of them'
    )
  process_shards = tuple(shards.index(frozenset(held[p])) for p in processes)
  index = process_shards[processes.index(jax.process_index())]
  return BatchFeed(batch, index, len(shards), process_shards)


def partition_spec(
    name: str,
    shape: Sequence[int],
    mesh: jax.sharding.Mesh,
    rules=DEFAULT_RULES,
    min_fsdp_size: int = 2**14,
) -> P:
  """The PartitionSpec of one parameter under `rules` (see the module docstring)."""
  kind = next((k for pattern, k in rules if re.fullmatch(pattern, name)), 'replicate')
  if kind not in KINDS:
    raise ValueError(f'sharding rule kind {kind!r} for {name}; expected one of {KINDS}')
  spec: list[Any] = [None] * len(shape)
  if kind == 'replicate' or not shape:
    return P(*spec)
  model = mesh.shape.get('model', 1)
  if model > 1 and kind in ('model_last', 'model_first'):
    dim = len(shape) - 1 if kind == 'model_last' else 0
    if shape[dim] % model == 0:
      spec[dim] = 'model'
  fsdp = mesh.shape.get('fsdp', 1)
  if fsdp > 1 and math.prod(shape) >= min_fsdp_size:
    free = [d for d in range(len(shape)) if spec[d] is None and shape[d] % fsdp == 0]
    if free:
      spec[max(free, key=lambda d: shape[d])] = 'fsdp'
  return P(*spec)


def tree_shardings(tree, mesh: jax.sharding.Mesh, rules=DEFAULT_RULES, min_fsdp_size: int = 2**14):
  """NamedShardings for every array leaf of `tree` (arrays or ShapeDtypeStructs)."""

  def sharding(path, leaf):
    spec = partition_spec(trees.name(path), np.shape(leaf), mesh, rules, min_fsdp_size)
    return jax.sharding.NamedSharding(mesh, spec)

  return jax.tree_util.tree_map_with_path(sharding, tree)


def like_params_shardings(tree, params, param_shardings, mesh: jax.sharding.Mesh):
  """Shardings for a tree holding copies of parameters, such as an optimizer state.

  A leaf whose key path ends with a parameter's path and has that parameter's shape (Adam's
  mu and nu, inside whatever chain, mask or partition wraps them) gets the parameter's
  sharding; any other leaf (counts, scalars) is replicated.

  Args:
    tree: the tree to shard (arrays or ShapeDtypeStructs), e.g. an abstract optimizer state.
    params: the parameter tree (arrays or ShapeDtypeStructs).
    param_shardings: shardings matching `params`.
    mesh: the mesh, for the replicated leaves.
  """
  by_path = {}
  for (path, leaf), (_, leaf_sharding) in zip(
      jax.tree_util.tree_flatten_with_path(params)[0],
      jax.tree_util.tree_flatten_with_path(param_shardings)[0],
  ):
    by_path[trees.name(path)] = (np.shape(leaf), leaf_sharding)
  longest = max(len(name.split('/')) for name in by_path)

  def sharding(path, leaf):
    names = trees.name(path).split('/')
    for start in range(max(0, len(names) - longest), len(names)):
      match = by_path.get('/'.join(names[start:]))
      if match is not None and match[0] == np.shape(leaf):
        return match[1]
    return replicated(mesh)

  return jax.tree_util.tree_map_with_path(sharding, tree)


def describe(tree_of_shardings, max_lines: int = 12) -> str:
  """A few lines 'name: spec' for the log (the distinct specs, with a count each)."""
  specs: dict[str, list[str]] = {}
  for path, s in jax.tree_util.tree_flatten_with_path(tree_of_shardings)[0]:
    specs.setdefault(str(s.spec), []).append(trees.name(path))
  lines = [f'{spec}: {len(names)} tensors, e.g. {names[0]}' for spec, names in specs.items()]
  return '\n'.join(lines[:max_lines])
