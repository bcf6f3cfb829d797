"""PyTorch state-dict layouts of ConvNeXt (official, timm, Hugging Face) and Flax <-> PyTorch.

Each Flax parameter path maps to one PyTorch key per layout. The official key is the Flax path
joined with '.' (with `kernel`/`scale` -> `weight`), because the Flax modules carry the
official module names; timm and Hugging Face keys are derived from it by the renames below.
One table of (Flax path, PyTorch key, array transform) drives both directions, so they cannot
drift apart. Nothing here needs torch: arrays are numpy (torch tensors are accepted as input).
"""

from collections.abc import Callable
from collections.abc import Mapping
import dataclasses
import functools
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from convnext_jax import models

LAYOUTS = ('official', 'timm', 'hf')

# timm builds these with `conv_mlp=True`: fc1/fc2 are 1x1 convs stored as (out, in, 1, 1).
TIMM_CONV_MLP = frozenset(
    f'{prefix}_{size}' for prefix in ('convnext', 'convnextv2')
    for size in ('atto', 'femto', 'pico', 'nano'))


# transformers hard-codes eps 1e-6 in every LayerNorm but the final one (config.layer_norm_eps).
HF_NORM_EPS = 1e-6


class ConversionError(ValueError):
  """A checkpoint that does not fit the model or layout; the message is one readable line."""


@dataclasses.dataclass(frozen=True)
class _Transform:
  """How one kind of tensor is laid out in PyTorch relative to Flax."""
  to_torch: Callable[[np.ndarray], np.ndarray]
  to_flax: Callable[[np.ndarray], np.ndarray]
  torch_shape: Callable[[tuple[int, ...]], tuple[int, ...]]


_TRANSFORMS = {
    # Conv kernel (kh, kw, in, out) <-> weight (out, in, kh, kw).
    'conv': _Transform(lambda a: np.transpose(a, (3, 2, 0, 1)),
                       lambda a: np.transpose(a, (2, 3, 1, 0)),
                       lambda s: (s[3], s[2], s[0], s[1])),
    # Dense kernel (in, out) <-> Linear weight (out, in).
    'linear': _Transform(lambda a: np.transpose(a, (1, 0)), lambda a: np.transpose(a, (1, 0)),
                         lambda s: (s[1], s[0])),
    # Dense kernel (in, out) <-> 1x1 Conv2d weight (out, in, 1, 1) (timm's conv_mlp).
    'linear_as_conv1x1': _Transform(lambda a: np.transpose(a, (1, 0))[:, :, None, None],
                                    lambda a: np.transpose(a[:, :, 0, 0], (1, 0)),
                                    lambda s: (s[1], s[0], 1, 1)),
    # GRN gamma/beta (C,) <-> (1, 1, 1, C) (official and transformers).
    'grn': _Transform(lambda a: a.reshape(1, 1, 1, -1), lambda a: a.reshape(-1),
                      lambda s: (1, 1, 1) + tuple(s)),
    'vector': _Transform(lambda a: a, lambda a: a, tuple),
}


@dataclasses.dataclass(frozen=True)
class TensorMap:
  """One parameter: where it lives on each side and how its array is laid out."""
  flax_path: tuple[str, ...]
  torch_key: str
  kind: str  # A key of _TRANSFORMS.
  flax_shape: tuple[int, ...]

  @property
  def torch_shape(self) -> tuple[int, ...]:
    return _TRANSFORMS[self.kind].torch_shape(self.flax_shape)


def _official_key(path: tuple[str, ...]) -> str:
  leaf = {'kernel': 'weight', 'scale': 'weight'}.get(path[-1], path[-1])
  return '.'.join(path[:-1] + (leaf,))


def _timm_key(key: str) -> str:
  key = re.sub(r'^downsample_layers\.0\.', 'stem.', key)
  key = re.sub(r'^downsample_layers\.(\d+)\.', r'stages.\1.downsample.', key)
  key = re.sub(r'^stages\.(\d+)\.(\d+)\.', r'stages.\1.blocks.\2.', key)
  key = re.sub(r'\.dwconv\.', '.conv_dw.', key)
  key = re.sub(r'\.pwconv([12])\.', r'.mlp.fc\1.', key)
  key = re.sub(r'\.grn\.gamma$', '.mlp.grn.weight', key)
  key = re.sub(r'\.grn\.beta$', '.mlp.grn.bias', key)
  key = re.sub(r'^head\.', 'head.fc.', key)
  key = re.sub(r'^norm\.', 'head.norm.', key)
  return key


def _hf_key(key: str, prefix: str) -> str:
  """Hugging Face `ConvNext(V2)ForImageClassification` key; prefix 'convnext'/'convnextv2'."""
  if key.startswith('head.'):
    return 'classifier.' + key[len('head.'):]
  key = re.sub(r'^downsample_layers\.0\.0\.', 'embeddings.patch_embeddings.', key)
  key = re.sub(r'^downsample_layers\.0\.1\.', 'embeddings.layernorm.', key)
  key = re.sub(r'^downsample_layers\.(\d+)\.', r'encoder.stages.\1.downsampling_layer.', key)
  key = re.sub(r'^stages\.(\d+)\.(\d+)\.', r'encoder.stages.\1.layers.\2.', key)
  key = re.sub(r'^norm\.', 'layernorm.', key)
  key = re.sub(r'(layers\.\d+)\.norm\.', r'\1.layernorm.', key)
  key = re.sub(r'(layers\.\d+)\.gamma$', r'\1.layer_scale_parameter', key)
  key = re.sub(r'\.grn\.gamma$', '.grn.weight', key)
  key = re.sub(r'\.grn\.beta$', '.grn.bias', key)
  return f'{prefix}.{key}'


def _kind(path: tuple[str, ...], ndim: int, layout: str, model_name: str) -> str:
  if path[-2:-1] == ('grn',):
    return 'vector' if layout == 'timm' else 'grn'
  if path[-1] == 'kernel':
    if ndim == 4:
      return 'conv'
    if layout == 'timm' and model_name in TIMM_CONV_MLP and path[-2] in ('pwconv1', 'pwconv2'):
      return 'linear_as_conv1x1'
    return 'linear'
  return 'vector'


def torch_key(path: tuple[str, ...], layout: str, spec: models.ModelSpec) -> str:
  """The PyTorch state-dict key of a Flax parameter path in `layout`."""
  key = _official_key(path)
  if layout == 'official':
    return key
  if spec.isotropic:
    raise ConversionError(f'{spec.name}: the {layout} layout has no isotropic ConvNeXt; '
                          'use --layout official')
  if layout == 'timm':
    return _timm_key(key)
  if layout == 'hf':
    return _hf_key(key, 'convnextv2' if spec.use_grn else 'convnext')
  raise ValueError(f'unknown layout {layout!r}; expected one of {LAYOUTS}')


@functools.lru_cache(maxsize=None)
def _flax_shapes(model_name: str, num_classes: int) -> dict[tuple[str, ...], tuple[int, ...]]:
  model = models.create_model(model_name, num_classes=num_classes)
  flat = jax.tree_util.tree_flatten_with_path(models.param_shapes(model, image_size=32))[0]
  return {tuple(k.key for k in path): tuple(leaf.shape) for path, leaf in flat}


def tensor_maps(model_name: str, num_classes: int, layout: str) -> list[TensorMap]:
  """Every parameter of the registered `model_name` with its key and transform in `layout`."""
  return maps_from_shapes(_flax_shapes(model_name, num_classes), model_name, layout)


def maps_from_shapes(shapes: Mapping[tuple[str, ...], tuple[int, ...]], model_name: str,
                     layout: str) -> list[TensorMap]:
  """Tensor maps for a Flax param tree given as {path: shape}, named as `model_name` names
  them (the shapes may be a custom size, e.g. `create_model(name, dims=...)`)."""
  spec = models.get_spec(model_name)
  return [
      TensorMap(path, torch_key(path, layout, spec), _kind(path, len(shape), layout, model_name),
                tuple(shape)) for path, shape in shapes.items()
  ]


def flatten(params: Mapping[str, Any]) -> dict[tuple[str, ...], Any]:
  """{path tuple: leaf} of a nested params dict."""
  return {
      tuple(k.key for k in path): leaf
      for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]
  }


def params_to_state_dict(params: Mapping[str, Any],
                         maps: list[TensorMap]) -> dict[str, np.ndarray]:
  """Applies `maps` to Flax params (no checks): PyTorch key -> contiguous numpy array."""
  flat = flatten(params)
  return {
      m.torch_key: np.ascontiguousarray(_TRANSFORMS[m.kind].to_torch(to_numpy(flat[m.flax_path])))
      for m in maps
  }


def state_dict_to_params(state_dict: Mapping[str, Any], maps: list[TensorMap],
                         consume: bool = False) -> dict[str, Any]:
  """Applies `maps` to a PyTorch state dict (no checks): nested Flax params of numpy arrays.

  Every output array is a fresh copy, so nothing keeps the source tensors (or a memory-mapped
  file) alive. With `consume`, each tensor is removed from `state_dict` once converted, which
  keeps the peak near one copy of the weights.
  """
  params: dict[str, Any] = {}
  for m in maps:
    node = params
    for part in m.flax_path[:-1]:
      node = node.setdefault(part, {})
    value = state_dict.pop(m.torch_key) if consume else state_dict[m.torch_key]
    node[m.flax_path[-1]] = np.array(_TRANSFORMS[m.kind].to_flax(to_numpy(value)), order='C',
                                     copy=True)
    del value
  return params


# ----------------------------------------------------------------------------------------
# Recognising a state dict: its layout, then the variant from the keys and shapes.
# ----------------------------------------------------------------------------------------

_BLOCK_DWCONV = {
    'official': re.compile(r'^stages\.(\d+)\.(\d+)\.dwconv\.weight$'),
    'timm': re.compile(r'^stages\.(\d+)\.blocks\.(\d+)\.conv_dw\.weight$'),
    'hf': re.compile(r'^convnext(?:v2)?\.encoder\.stages\.(\d+)\.layers\.(\d+)\.dwconv\.weight$'),
}
_ISO_BLOCK_DWCONV = re.compile(r'^blocks\.(\d+)\.dwconv\.weight$')
_HEAD_WEIGHT = {'official': 'head.weight', 'timm': 'head.fc.weight', 'hf': 'classifier.weight'}


def detect_layout(keys) -> str:
  """'official', 'timm' or 'hf' from the state-dict keys.

  Raises:
    ConversionError: the keys are not a ConvNeXt state dict of a known layout.
  """
  keys = set(keys)
  if any(k.startswith(('convnext.embeddings.', 'convnextv2.embeddings.')) for k in keys):
    return 'hf'
  if 'stem.0.weight' in keys:
    return 'timm'
  if 'downsample_layers.0.0.weight' in keys or 'stem.weight' in keys:
    return 'official'
  sample = ', '.join(sorted(keys)[:5])
  raise ConversionError(
      'not a ConvNeXt state dict of a known layout: expected keys like '
      "'downsample_layers.0.0.weight' (official), 'stem.0.weight' (timm) or "
      f"'convnext.embeddings.patch_embeddings.weight' (Hugging Face); found {sample}")


def _shape(value) -> tuple[int, ...]:
  return tuple(value.shape)


def detect_model(state_dict: Mapping[str, Any], layout: str) -> tuple[str, int]:
  """(model name, num_classes) of a state dict in a known layout.

  Raises:
    ConversionError: the architecture matches no registered model.
  """
  keys = list(state_dict)
  use_grn = any('.grn.' in k for k in keys)
  head = state_dict.get(_HEAD_WEIGHT[layout])
  num_classes = _shape(head)[0] if head is not None else 0
  iso = {int(m.group(1)): k for k in keys if (m := _ISO_BLOCK_DWCONV.match(k))}
  if layout == 'official' and iso:
    depth = len(iso)
    dims = (_shape(state_dict[iso[0]])[0],) if 0 in iso else ()
    found, wanted = dict(isotropic=True, depths=(depth,), dims=dims), 'isotropic'
  else:
    per_stage: dict[int, dict[int, tuple[int, ...]]] = {}
    for k in keys:
      if m := _BLOCK_DWCONV[layout].match(k):
        per_stage.setdefault(int(m.group(1)), {})[int(m.group(2))] = _shape(state_dict[k])
    stages = sorted(per_stage)
    depths = tuple(len(per_stage[i]) for i in stages)
    dims = tuple(per_stage[i][min(per_stage[i])][0] for i in stages)
    found, wanted = dict(isotropic=False, depths=depths, dims=dims), 'hierarchical'
  for name, spec in models.MODEL_SPECS.items():
    if (spec.isotropic, spec.depths, spec.dims, spec.use_grn) == (
        found['isotropic'], found['depths'], found['dims'], use_grn):
      return name, num_classes
  version = 'V2 (GRN)' if use_grn else 'V1'
  raise ConversionError(
      f'no known ConvNeXt variant is {wanted} {version} with depths {found["depths"]} and '
      f'dims {found["dims"]} ({layout} layout); known models: {", ".join(models.list_models())}')


# ----------------------------------------------------------------------------------------
# Conversion.
# ----------------------------------------------------------------------------------------


def to_numpy(value) -> np.ndarray:
  """A numpy float32 (or original integer) array from a numpy array or torch tensor."""
  if hasattr(value, 'detach'):  # torch.Tensor, without importing torch.
    value = value.detach().cpu()
    if value.is_floating_point():
      value = value.float()
    value = value.numpy()
  value = np.asarray(value)
  # jnp.issubdtype also knows bfloat16 (an ml_dtypes type numpy does not call floating).
  if jnp.issubdtype(value.dtype, jnp.floating) and value.dtype != np.float32:
    value = value.astype(np.float32)
  return value


def _listing(items, limit=6) -> str:
  items = list(items)
  shown = ', '.join(items[:limit])
  return shown + (f' ... and {len(items) - limit} more' if len(items) > limit else '')


def check_state_dict(state_dict: Mapping[str, Any], maps: list[TensorMap], what: str):
  """Raises one ConversionError naming missing, unexpected and mis-shaped keys, if any."""
  expected = {m.torch_key: m for m in maps}
  missing = [k for k in expected if k not in state_dict]
  unexpected = [k for k in state_dict if k not in expected]
  misshaped = [
      f'{k} {_shape(state_dict[k])} != expected {expected[k].torch_shape}' for k in expected
      if k in state_dict and _shape(state_dict[k]) != expected[k].torch_shape
  ]
  problems = []
  if missing:
    problems.append(f'missing {len(missing)} key(s): {_listing(missing)}')
  if unexpected:
    problems.append(f'unexpected {len(unexpected)} key(s): {_listing(unexpected)}')
  if misshaped:
    problems.append(f'mis-shaped {len(misshaped)}: {_listing(misshaped)}')
  if problems:
    raise ConversionError(f'{what}: ' + '; '.join(problems))


def strip_wrapper_prefix(state_dict: Mapping[str, Any]) -> Mapping[str, Any]:
  """Drops a 'module.' (DistributedDataParallel) or '_orig_mod.' (torch.compile) key prefix.

  Returns `state_dict` itself when no key has such a prefix, else a new dict."""
  out = state_dict
  for prefix in ('module.', '_orig_mod.'):
    if out and all(k.startswith(prefix) for k in out):
      out = {k[len(prefix):]: v for k, v in out.items()}
  return out


def torch_to_flax(state_dict: Mapping[str, Any],
                  model_name: str | None = None,
                  consume: bool = False) -> tuple[str, dict[str, Any]]:
  """Converts a PyTorch ConvNeXt state dict (official, timm or Hugging Face) to Flax params.

  The layout is recognised from the keys, the variant from the block count and widths, the
  class count from the head (no head: num_classes 0).

  Args:
    state_dict: key -> torch tensor or numpy array.
    model_name: the expected variant; by default it is detected.
    consume: empty `state_dict` (a dict) while converting, freeing each tensor once it is
      converted, so a large checkpoint is not held twice in memory.

  Returns:
    (model_name, params): params is a nested dict of float32 numpy arrays for
    `create_model(model_name, num_classes=...).apply({'params': params}, ...)`.

  Raises:
    ConversionError: unknown layout or variant, or missing/unexpected/mis-shaped keys.
  """
  if not consume:
    state_dict = strip_wrapper_prefix(state_dict)
  elif (rekeyed := strip_wrapper_prefix(state_dict)) is not state_dict:
    state_dict.clear()  # Re-key the caller's dict in place, so that converting empties it.
    state_dict.update(rekeyed)
    del rekeyed
  layout = detect_layout(state_dict)
  detected, num_classes = detect_model(state_dict, layout)
  model_name = model_name or detected
  maps = tensor_maps(model_name, num_classes, layout)
  looks_like = f' (it looks like {detected})' if detected != model_name else ''
  check_state_dict(state_dict, maps,
                   f'{layout} state dict does not match {model_name}{looks_like}')
  return model_name, state_dict_to_params(state_dict, maps, consume=consume)


def num_classes_of(params: Mapping[str, Any]) -> int:
  """Head outputs of a params tree (0 when it has no head)."""
  return int(params['head']['kernel'].shape[-1]) if 'head' in params else 0


def flax_to_torch(params: Mapping[str, Any], model_name: str,
                  layout: str = 'official') -> dict[str, np.ndarray]:
  """Converts Flax params of `model_name` to a PyTorch state dict of numpy arrays.

  Args:
    params: the model's 'params' collection (numpy or jax arrays).
    model_name: registered name the params belong to.
    layout: 'official' (facebookresearch/ConvNeXt), 'timm' or 'hf' (transformers).

  Returns:
    key -> contiguous float32 numpy array, in the model's parameter order; wrap with
    `torch.from_numpy` to load into PyTorch.

  Raises:
    ConversionError: the params do not match `model_name`, or the layout cannot represent it.
  """
  if layout not in LAYOUTS:
    raise ValueError(f'unknown layout {layout!r}; expected one of {LAYOUTS}')
  spec = models.get_spec(model_name)
  if layout == 'hf' and spec.norm_eps != HF_NORM_EPS:
    raise ConversionError(
        f'{model_name} uses LayerNorm eps {spec.norm_eps}, but transformers fixes the block and '
        f'downsample LayerNorm eps at {HF_NORM_EPS}; export it as official or timm instead')
  maps = tensor_maps(model_name, num_classes_of(params), layout)
  as_flax_keys = [dataclasses.replace(m, torch_key='/'.join(m.flax_path), kind='vector')
                  for m in maps]
  check_state_dict({'/'.join(p): v for p, v in flatten(params).items()}, as_flax_keys,
                   f'params do not match {model_name}')
  return params_to_state_dict(params, maps)
