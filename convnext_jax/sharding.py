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
"""

from collections.abc import Sequence
import math
import re
from typing import Any

import jax
import numpy as np

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
      raise ValueError(f'mesh shape {tuple(shape)} does not divide {len(devices)} devices; '
                       'set config.mesh so that its product is the device count')
    shape[shape.index(-1)] = len(devices) // known
  if math.prod(shape) != len(devices):
    raise ValueError(f'mesh {dict(zip(AXES, shape))} has {math.prod(shape)} devices but '
                     f'{len(devices)} are available; set config.mesh to multiply to '
                     f'{len(devices)}')
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


def path_name(path) -> str:
  """'/'-joined name of a pytree key path (dict keys, attributes or indices)."""
  parts = []
  for key in path:
    for attr in ('key', 'name', 'idx'):
      if hasattr(key, attr):
        parts.append(str(getattr(key, attr)))
        break
    else:
      parts.append(str(key))
  return '/'.join(parts)


def partition_spec(name: str, shape: Sequence[int], mesh: jax.sharding.Mesh,
                   rules=DEFAULT_RULES, min_fsdp_size: int = 2**14) -> P:
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


def tree_shardings(tree, mesh: jax.sharding.Mesh, rules=DEFAULT_RULES,
                   min_fsdp_size: int = 2**14):
  """NamedShardings for every array leaf of `tree` (arrays or ShapeDtypeStructs)."""

  def sharding(path, leaf):
    spec = partition_spec(path_name(path), np.shape(leaf), mesh, rules, min_fsdp_size)
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
      jax.tree_util.tree_flatten_with_path(param_shardings)[0]):
    by_path[path_name(path)] = (np.shape(leaf), leaf_sharding)
  longest = max(len(name.split('/')) for name in by_path)

  def sharding(path, leaf):
    names = path_name(path).split('/')
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
    specs.setdefault(str(s.spec), []).append(path_name(path))
  lines = [f'{spec}: {len(names)} tensors, e.g. {names[0]}' for spec, names in specs.items()]
  return '\n'.join(lines[:max_lines])
