"""PyTorch state-dict layouts (official, timm, Hugging Face) and Flax <-> PyTorch.

Each Flax weight path maps to one PyTorch key per layout. The official key is the Flax path
joined with '.' (with `kernel`/`scale` -> `weight`, BatchNorm's `mean`/`var` ->
`running_mean`/`running_var`), because the Flax modules carry the official module names; timm
and Hugging Face keys are derived from it by the renames below. One table of (Flax path,
PyTorch key, array transform) drives both directions, so they cannot drift apart. Nothing here
needs torch: arrays are numpy (torch tensors are accepted as input).

The Flax side is one *weights* tree: the 'params' collection with each BatchNorm's running
statistics beside its scale and bias (`models.merge_batch_stats`), as a PyTorch state dict
keeps them. PyTorch's `num_batches_tracked` counter has no Flax counterpart: it is skipped on
import and written as 0 on export (see `NUM_BATCHES_TRACKED`).

Model families, by the names their parameters carry (FCMAE models have layouts of their own,
`FCMAE_LAYOUTS`, and their encoders export to timm and Hugging Face as the backbone they
pre-train, `encoder_as_backbone`):
  - ConvNeXt (every `convnext*` model, and the roadmap's last step, which is ConvNeXt):
    official (facebookresearch/ConvNeXt), timm and Hugging Face `ConvNext(V2)` keys.
  - ResNet (the roadmap steps that are torchvision's ResNet v1.5: `roadmap_*_baseline` and
    `roadmap_*_stage_ratio`): official keys are torchvision's, which timm's `resnet*` share;
    Hugging Face keys are `ResNetForImageClassification`'s.
  - Other roadmap steps exist only here: official keys (the Flax path joined) only.
"""

from collections.abc import Callable
from collections.abc import Mapping
import dataclasses
import functools
import re
from typing import Any

from flax import traverse_util
import jax.numpy as jnp
import numpy as np

from convnext_jax import models
from convnext_jax import trees
from convnext_jax.models import roadmap_net

LAYOUTS = ('official', 'timm', 'hf')
# FCMAE models (`fcmae_convnextv2_*`): 'fcmae', the released pre-trained encoders
# (`pt_only/convnextv2_<size>_1k_224_fcmae.pt`: the dense backbone's official keys, no final
# norm, head or decoder); 'fcmae_training', the official pre-training code's checkpoints
# (MinkowskiEngine names and kernel shapes under 'encoder.', with the decoder).
FCMAE_LAYOUTS = ('fcmae', 'fcmae_training')
ALL_LAYOUTS = LAYOUTS + FCMAE_LAYOUTS

# timm builds these with `conv_mlp=True`: fc1/fc2 are 1x1 convs stored as (out, in, 1, 1).
TIMM_CONV_MLP = frozenset(
    f'{prefix}_{size}'
    for prefix in ('convnext', 'convnextv2')
    for size in ('atto', 'femto', 'pico', 'nano')
)


# transformers hard-codes eps 1e-6 in every LayerNorm but the final one (config.layer_norm_eps).
HF_NORM_EPS = 1e-6

# The `num_batches_tracked` written for every BatchNorm on export. PyTorch reads the counter
# only with momentum=None (a cumulative average, factor 1 / count); our statistics are
# momentum averages, and 0 is what PyTorch itself fills in for a state dict saved without it.
NUM_BATCHES_TRACKED = 0


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
    'conv': _Transform(
        lambda a: np.transpose(a, (3, 2, 0, 1)),
        lambda a: np.transpose(a, (2, 3, 1, 0)),
        lambda s: (s[3], s[2], s[0], s[1]),
    ),
    # Dense kernel (in, out) <-> Linear weight (out, in).
    'linear': _Transform(
        lambda a: np.transpose(a, (1, 0)), lambda a: np.transpose(a, (1, 0)), lambda s: (s[1], s[0])
    ),
    # Dense kernel (in, out) <-> 1x1 Conv2d weight (out, in, 1, 1) (timm's conv_mlp).
    'linear_as_conv1x1': _Transform(
        lambda a: np.transpose(a, (1, 0))[:, :, None, None],
        lambda a: np.transpose(a[:, :, 0, 0], (1, 0)),
        lambda s: (s[1], s[0], 1, 1),
    ),
    # GRN gamma/beta (C,) <-> (1, 1, 1, C) (official and transformers).
    'grn': _Transform(
        lambda a: a.reshape(1, 1, 1, -1), lambda a: a.reshape(-1), lambda s: (1, 1, 1) + tuple(s)
    ),
    'vector': _Transform(lambda a: a, lambda a: a, tuple),
    # MinkowskiEngine's convolution kernel (k*k, in, out), the tap index column-major
    # (column * k + row), as the official `remap_checkpoint_keys` reads it.
    'me_conv': _Transform(
        lambda a: np.transpose(a, (1, 0, 2, 3)).reshape(-1, a.shape[2], a.shape[3]),
        lambda a: _me_taps_to_hw(a).reshape(_me_side(a), _me_side(a), a.shape[1], a.shape[2]),
        lambda s: (s[0] * s[1], s[2], s[3]),
    ),
    # MinkowskiEngine's depthwise kernel (k*k, C) <-> (kh, kw, 1, C).
    'me_dwconv': _Transform(
        lambda a: np.transpose(a[:, :, 0, :], (1, 0, 2)).reshape(-1, a.shape[3]),
        lambda a: _me_taps_to_hw(a)[:, :, None, :],
        lambda s: (s[0] * s[1], s[3]),
    ),
    # MinkowskiEngine's biases and GRN parameters (1, C) <-> (C,).
    'row': _Transform(
        lambda a: a.reshape(1, -1), lambda a: a.reshape(-1), lambda s: (1,) + tuple(s)
    ),
    # FCMAE's mask token (1, 1, 1, D) <-> (1, D, 1, 1).
    'mask_token': _Transform(
        lambda a: np.transpose(a, (0, 3, 1, 2)),
        lambda a: np.transpose(a, (0, 2, 3, 1)),
        lambda s: (s[0], s[3], s[1], s[2]),
    ),
    # BatchNorm's num_batches_tracked: PyTorch only (int64 scalar), no Flax leaf.
    'count': _Transform(lambda a: np.asarray(NUM_BATCHES_TRACKED, np.int64), None, lambda s: ()),
}


def _me_side(a: np.ndarray) -> int:
  side = round(a.shape[0] ** 0.5)
  if side * side != a.shape[0]:
    raise ConversionError(f'a MinkowskiEngine kernel of {a.shape[0]} taps is not square')
  return side


def _me_taps_to_hw(a: np.ndarray) -> np.ndarray:
  """(k*k, ...) taps, column-major, -> (k, k, ...) indexed [row, column]."""
  side = _me_side(a)
  return np.swapaxes(a.reshape((side, side) + a.shape[1:]), 0, 1)


def family(spec: models.ModelSpec) -> str:
  """'convnext', 'resnet' or 'roadmap': which PyTorch models a registered model's names
  follow (see the module docstring)."""
  if not spec.roadmap:
    return 'convnext'
  design = dict(spec.roadmap)
  if design['separate_downsampling']:
    return 'convnext'  # The roadmap's last step: ConvNeXt's tree.
  # torchvision's ResNet (v1.5) design, whatever its depths and widths.
  if all(design[k] == v for k, v in roadmap_net.RESNET_DESIGN.items()):
    return 'resnet'
  return 'roadmap'


def layouts_of(model_name: str) -> tuple[str, ...]:
  """The layouts that can represent a registered model (an FCMAE model's encoder is also
  exported to `BACKBONE_EXPORT_LAYOUTS`, as its backbone: `encoder_as_backbone`)."""
  spec = models.get_spec(model_name)
  if spec.masked_autoencoder:
    return FCMAE_LAYOUTS
  if family(spec) == 'roadmap' or spec.isotropic:
    return ('official',)
  if family(spec) == 'convnext' and spec.norm_eps != HF_NORM_EPS:
    return ('official', 'timm')
  return LAYOUTS


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

  @property
  def torch_only(self) -> bool:
    """A PyTorch buffer with no Flax leaf (num_batches_tracked): written on export, optional
    and skipped on import."""
    return self.kind == 'count'


_OFFICIAL_LEAF = {
    'kernel': 'weight',
    'scale': 'weight',
    'mean': 'running_mean',
    'var': 'running_var',
}


def _official_key(path: tuple[str, ...]) -> str:
  return '.'.join(path[:-1] + (_OFFICIAL_LEAF.get(path[-1], path[-1]),))


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
    return 'classifier.' + key[len('head.') :]
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


def _resnet_hf_key(key: str) -> str:
  """Hugging Face `ResNetForImageClassification` key of a torchvision ResNet key."""
  key = re.sub(r'^conv1\.', 'embedder.embedder.convolution.', key)
  key = re.sub(r'^bn1\.', 'embedder.embedder.normalization.', key)
  if key.startswith('fc.'):
    return 'classifier.1.' + key[len('fc.') :]  # classifier.0 is a Flatten.
  block = re.match(r'^layer(\d+)\.(\d+)\.', key)
  if block:
    rest = key[block.end() :]
    rest = re.sub(r'^conv(\d)\.', lambda m: f'layer.{int(m.group(1)) - 1}.convolution.', rest)
    rest = re.sub(r'^bn(\d)\.', lambda m: f'layer.{int(m.group(1)) - 1}.normalization.', rest)
    rest = re.sub(r'^downsample\.0\.', 'shortcut.convolution.', rest)
    rest = re.sub(r'^downsample\.1\.', 'shortcut.normalization.', rest)
    key = f'encoder.stages.{int(block.group(1)) - 1}.layers.{block.group(2)}.{rest}'
  return 'resnet.' + key


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


def _fcmae_key_and_kind(path: tuple[str, ...], ndim: int, layout: str) -> tuple[str, str]:
  """(PyTorch key, transform) of an FCMAE weight path in an FCMAE layout."""
  if path[0] != 'encoder':  # The decoder: the official module names, dense.
    if path == ('mask_token',):
      return 'mask_token', 'mask_token'
    return _official_key(path), _kind(path, ndim, 'official', '')
  rest = path[1:]
  key = _official_key(rest)
  if layout == 'fcmae':  # The released encoders: the dense backbone's keys.
    return key, _kind(rest, ndim, 'official', '')
  top, leaf = rest[0], rest[-1]
  if top.startswith('downsample_layers.0.'):  # The stem: dense in the sparse encoder too.
    return f'encoder.{key}', _kind(rest, ndim, 'official', '')
  if m := re.fullmatch(r'downsample_layers\.\d+\.(\d)', top):
    # A sparse downsampler: LayerNorm (.0), then the 2x2 conv (.1).
    if m.group(1) == '0':
      return f'encoder.{top}.ln.{_OFFICIAL_LEAF.get(leaf, leaf)}', 'vector'
    return f'encoder.{top}.{leaf}', 'me_conv' if leaf == 'kernel' else 'row'
  layer = rest[1]  # A block's sublayer.
  if layer == 'dwconv':
    return f'encoder.{top}.dwconv.{leaf}', 'me_dwconv' if leaf == 'kernel' else 'row'
  if layer == 'norm':
    return f'encoder.{top}.norm.ln.{_OFFICIAL_LEAF.get(leaf, leaf)}', 'vector'
  if layer in ('pwconv1', 'pwconv2'):
    kind = 'linear' if leaf == 'kernel' else 'vector'
    return f'encoder.{top}.{layer}.linear.{_OFFICIAL_LEAF.get(leaf, leaf)}', kind
  if layer == 'grn':
    return f'encoder.{top}.grn.{leaf}', 'row'
  raise ConversionError(f'no {layout} key for the FCMAE weight {"/".join(path)}')


def torch_key(path: tuple[str, ...], layout: str, spec: models.ModelSpec) -> str:
  """The PyTorch state-dict key of a Flax weight path in `layout`.

  Raises:
    ConversionError: `layout` cannot represent the model (isotropic ConvNeXt and roadmap
      steps other than ResNet and ConvNeXt exist in the official layout only).
  """
  if layout not in ALL_LAYOUTS:
    raise ValueError(f'unknown layout {layout!r}; expected one of {ALL_LAYOUTS}')
  if spec.masked_autoencoder != (layout in FCMAE_LAYOUTS):
    raise ConversionError(
        f'{spec.name}: the {layout} layout has no such model; its layouts are '
        f'{", ".join(layouts_of(spec.name))}'
    )
  if spec.masked_autoencoder:
    return _fcmae_key_and_kind(path, 0, layout)[0]
  key = _official_key(path)
  if layout == 'official':
    return key
  kind = family(spec)
  if kind == 'roadmap':
    resnets = [n for n, s in models.MODEL_SPECS.items() if family(s) == 'resnet']
    raise ConversionError(
        f'{spec.name}: the {layout} layout has no such model (of the roadmap, only the '
        f'ResNets {", ".join(resnets)} and the last step, ConvNeXt, have one); use --layout '
        'official'
    )
  if spec.isotropic:
    raise ConversionError(
        f'{spec.name}: the {layout} layout has no isotropic ConvNeXt; use --layout official'
    )
  if kind == 'resnet':
    return key if layout == 'timm' else _resnet_hf_key(key)  # timm's keys are torchvision's.
  if layout == 'timm':
    return _timm_key(key)
  return _hf_key(key, 'convnextv2' if spec.use_grn else 'convnext')


@functools.cache
def _flax_shapes(model_name: str, num_classes: int) -> dict[tuple[str, ...], tuple[int, ...]]:
  if models.get_spec(model_name).masked_autoencoder:  # No head.
    model = models.create_model(model_name)
  else:
    model = models.create_model(model_name, num_classes=num_classes)
  weights = traverse_util.flatten_dict(models.weight_shapes(model))
  return {path: tuple(leaf.shape) for path, leaf in weights.items()}


def tensor_maps(model_name: str, num_classes: int, layout: str) -> list[TensorMap]:
  """Every weight of the registered `model_name` with its key and transform in `layout`
  (and each BatchNorm's PyTorch-only num_batches_tracked)."""
  return maps_from_shapes(_flax_shapes(model_name, num_classes), model_name, layout)


def maps_from_shapes(
    shapes: Mapping[tuple[str, ...], tuple[int, ...]], model_name: str, layout: str
) -> list[TensorMap]:
  """Tensor maps for a Flax weights tree given as {path: shape}, named as `model_name` names
  them (the shapes may be a custom size, e.g. `create_model(name, dims=...)`)."""
  spec = models.get_spec(model_name)
  maps = []
  for path, shape in shapes.items():
    if spec.masked_autoencoder:
      if layout == 'fcmae' and path[0] != 'encoder':
        continue  # The released encoders have no decoder.
      key, kind = _fcmae_key_and_kind(path, len(shape), layout)
      maps.append(TensorMap(path, key, kind, tuple(shape)))
      continue
    maps.append(
        TensorMap(
            path,
            torch_key(path, layout, spec),
            _kind(path, len(shape), layout, model_name),
            tuple(shape),
        )
    )
    if path[-1] == 'var':  # A BatchNorm: PyTorch also counts its batches.
      counter = path[:-1] + ('num_batches_tracked',)
      maps.append(TensorMap(counter, torch_key(counter, layout, spec), 'count', ()))
  return maps


def contiguous(array) -> np.ndarray:
  """A C-contiguous numpy array; unlike np.ascontiguousarray, a scalar stays 0-d (PyTorch's
  num_batches_tracked has shape ())."""
  return np.asarray(array, order='C')


def params_to_state_dict(params: Mapping[str, Any], maps: list[TensorMap]) -> dict[str, np.ndarray]:
  """Applies `maps` to Flax weights (no checks): PyTorch key -> contiguous numpy array."""
  flat = traverse_util.flatten_dict(params)
  return {
      m.torch_key: contiguous(
          _TRANSFORMS[m.kind].to_torch(None if m.torch_only else to_numpy(flat[m.flax_path]))
      )
      for m in maps
  }


def state_dict_to_params(
    state_dict: Mapping[str, Any], maps: list[TensorMap], consume: bool = False
) -> dict[str, Any]:
  """Applies `maps` to a PyTorch state dict (no checks): nested Flax params of numpy arrays.

  Every output array is a fresh copy, so nothing keeps the source tensors (or a memory-mapped
  file) alive. With `consume`, each tensor is removed from `state_dict` once converted, which
  keeps the peak near one copy of the weights.
  """
  flat = {}
  for m in maps:
    if m.torch_only:
      if consume:
        state_dict.pop(m.torch_key, None)
      continue
    value = state_dict.pop(m.torch_key) if consume else state_dict[m.torch_key]
    flat[m.flax_path] = np.array(_TRANSFORMS[m.kind].to_flax(to_numpy(value)), order='C', copy=True)
    del value
  return traverse_util.unflatten_dict(flat)


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
# ResNet-named state dicts (torchvision, timm and the roadmap steps before ConvNeXt's
# downsampling layers; Hugging Face ResNet): the stem conv, and each block's first conv.
_RESNET_STEM = {'official': 'conv1.weight', 'hf': 'resnet.embedder.embedder.convolution.weight'}
_RESNET_BLOCK = {
    'official': re.compile(r'^layer(\d+)\.(\d+)\.conv1\.weight$'),
    'hf': re.compile(
        r'^resnet\.encoder\.stages\.(\d+)\.layers\.(\d+)\.layer\.0\.convolution\.weight$'
    ),
}


def detect_layout(keys) -> str:
  """'official', 'timm' or 'hf' from the state-dict keys.

  A torchvision or timm ResNet is 'official': its keys are the model's own names (the ResNet
  layouts of torchvision and timm are one).

  Raises:
    ConversionError: the keys are not a ConvNeXt or ResNet state dict of a known layout.
  """
  keys = set(keys)
  if any(
      k.startswith(('convnext.embeddings.', 'convnextv2.embeddings.', 'resnet.embedder.'))
      for k in keys
  ):
    return 'hf'
  if 'stem.0.weight' in keys:
    return 'timm'
  if 'encoder.downsample_layers.0.0.weight' in keys:
    return 'fcmae_training'
  encoder_only = not keys & {'norm.weight', 'head.weight'}
  if 'downsample_layers.0.0.weight' in keys and encoder_only and any('.grn.' in k for k in keys):
    return 'fcmae'  # A V2 backbone without final norm and head: an FCMAE encoder.
  if {'downsample_layers.0.0.weight', 'stem.weight', _RESNET_STEM['official']} & keys:
    return 'official'
  sample = ', '.join(sorted(keys)[:5])
  raise ConversionError(
      'not a ConvNeXt state dict of a known layout (nor a ResNet one): expected keys like '
      "'downsample_layers.0.0.weight' (official), 'stem.0.weight' (timm), "
      "'convnext.embeddings.patch_embeddings.weight' (Hugging Face), 'conv1.weight' "
      "(torchvision/timm ResNet), 'resnet.embedder.embedder.convolution.weight' (Hugging "
      "Face ResNet) or 'encoder.downsample_layers.0.0.weight' (FCMAE training); found "
      f'{sample}'
  )


def _shape(value) -> tuple[int, ...]:
  return tuple(value.shape)


def _is_resnet(keys, layout: str) -> bool:
  return _RESNET_STEM['hf' if layout == 'hf' else 'official'] in keys


def _detect_resnet(state_dict: Mapping[str, Any], layout: str) -> tuple[str, int]:
  """(model name, num_classes) of a ResNet-named state dict: the depths from the blocks per
  stage, the widths from the convs of each stage's first block."""
  layout = 'hf' if layout == 'hf' else 'official'
  stage_base = 1 if layout == 'hf' else 0  # Hugging Face counts stages from 0, torchvision 1.
  blocks: dict[int, set[int]] = {}
  for k in state_dict:
    if m := _RESNET_BLOCK[layout].match(k):
      blocks.setdefault(int(m.group(1)) + stage_base, set()).add(int(m.group(2)))

  def shape(key):  # A torchvision key's shape in `layout`, or None.
    value = state_dict.get(_resnet_hf_key(key) if layout == 'hf' else key)
    return None if value is None else _shape(value)

  head = shape('fc.weight')
  num_classes = head[0] if head else 0
  stages = sorted(blocks)
  depths = tuple(len(blocks[i]) for i in stages)
  stem = shape('conv1.weight')
  first = [tuple(shape(f'layer{i}.0.conv{n}.weight') for n in (1, 2, 3)) for i in stages]
  resnets = {n: s for n, s in models.MODEL_SPECS.items() if family(s) == 'resnet'}
  known = ', '.join(f'{n} (depths {s.depths}, widths {s.dims})' for n, s in resnets.items())
  what = f'{layout} state dict of a ResNet-named network'
  if any(conv3 is None for _, _, conv3 in first):
    raise ConversionError(
        f'{what} with basic blocks (no conv3: ResNet-18/34); the known '
        f'ResNets have bottleneck blocks: {known}'
    )
  if not (
      stem
      and stem[1:] == (3, 7, 7)
      and all(conv2 == (conv1[0], conv1[0], 3, 3) for conv1, conv2, _ in first)
  ):
    raise ConversionError(
        f'{what} that is no torchvision ResNet (conv1 {stem}, layer1.0.conv2 '
        f'{first[0][1] if first else None}): a roadmap step past stage_ratio? Their weights '
        'do not tell them apart (kernel7, gelu and fewer_act share every shape): name the '
        'model (--model NAME)'
    )
  dims = tuple(conv3[0] for _, _, conv3 in first)
  for name, spec in resnets.items():
    if (spec.depths, spec.dims, dict(spec.roadmap)['widths'][0]) == (depths, dims, stem[0]):
      return name, num_classes
  raise ConversionError(
      f'no known ResNet has depths {depths} and widths {dims} ({layout} '
      f'layout); known ResNets: {known}'
  )


_FCMAE_DWCONV = {
    'fcmae': (re.compile(r'^stages\.(\d+)\.(\d+)\.dwconv\.weight$'), 0),
    'fcmae_training': (re.compile(r'^encoder\.stages\.(\d+)\.(\d+)\.dwconv\.kernel$'), 1),
}


def _detect_fcmae(state_dict: Mapping[str, Any], layout: str) -> str:
  """The FCMAE model of an encoder (or pre-training) state dict: its V2 size, from the
  blocks per stage and each stage's width."""
  pattern, channel_axis = _FCMAE_DWCONV[layout]
  per_stage: dict[int, dict[int, int]] = {}
  for k, v in state_dict.items():
    if m := pattern.match(k):
      per_stage.setdefault(int(m.group(1)), {})[int(m.group(2))] = _shape(v)[channel_axis]
  depths = tuple(len(per_stage[i]) for i in sorted(per_stage))
  dims = tuple(per_stage[i][min(per_stage[i])] for i in sorted(per_stage))
  known = {n: s for n, s in models.MODEL_SPECS.items() if s.masked_autoencoder}
  for name, spec in known.items():
    if (spec.depths, spec.dims) == (depths, dims):
      return name
  raise ConversionError(
      f'no ConvNeXt-V2 size has depths {depths} and dims {dims} ({layout} layout); known '
      f'FCMAE models: {", ".join(known)}'
  )


def detect_model(state_dict: Mapping[str, Any], layout: str) -> tuple[str, int]:
  """(model name, num_classes) of a state dict in a known layout.

  Of the roadmap models, only the ResNets are recognised (ResNet-named state dicts); a
  ConvNeXt state dict is always a `convnext*` model (the roadmap's last step has the same
  weights as convnext_tiny/base).

  Raises:
    ConversionError: the architecture matches no registered model.
  """
  if _is_resnet(state_dict, layout):
    return _detect_resnet(state_dict, layout)
  if layout in FCMAE_LAYOUTS:
    return _detect_fcmae(state_dict, layout), 0
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
  convnexts = [
      name
      for name, spec in models.MODEL_SPECS.items()
      if not spec.roadmap and not spec.masked_autoencoder
  ]
  for name in convnexts:
    spec = models.MODEL_SPECS[name]
    if (spec.isotropic, spec.depths, spec.dims, spec.use_grn) == (
        found['isotropic'],
        found['depths'],
        found['dims'],
        use_grn,
    ):
      return name, num_classes
  version = 'V2 (GRN)' if use_grn else 'V1'
  raise ConversionError(
      f'no known ConvNeXt variant is {wanted} {version} with depths {found["depths"]} and '
      f'dims {found["dims"]} ({layout} layout); known models: {", ".join(convnexts)}'
  )


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


def check_state_dict(
    state_dict: Mapping[str, Any], maps: list[TensorMap], what: str, hint: str = ''
):
  """Raises one ConversionError naming missing, unexpected and mis-shaped keys, if any
  (PyTorch-only buffers may be missing), followed by `hint`."""
  difference = trees.compare(
      {m.torch_key: m.torch_shape for m in maps}, {k: _shape(v) for k, v in state_dict.items()}
  )
  absent_buffers = [m.torch_key for m in maps if m.torch_only and m.torch_key not in state_dict]
  difference = difference.without(absent_buffers)
  if difference:
    raise ConversionError(f'{what}: {difference.describe(unit="key(s)")}{hint}')


def strip_wrapper_prefix(state_dict: Mapping[str, Any]) -> Mapping[str, Any]:
  """Drops a 'module.' (DistributedDataParallel) or '_orig_mod.' (torch.compile) key prefix.

  Returns `state_dict` itself when no key has such a prefix, else a new dict."""
  out = state_dict
  for prefix in ('module.', '_orig_mod.'):
    if out and all(k.startswith(prefix) for k in out):
      out = {k[len(prefix) :]: v for k, v in out.items()}
  return out


def _head_path(spec: models.ModelSpec) -> tuple[str, ...]:
  return ('head' if family(spec) == 'convnext' else 'fc', 'kernel')


def torch_to_flax(
    state_dict: Mapping[str, Any], model_name: str | None = None, consume: bool = False
) -> tuple[str, dict[str, Any]]:
  """Converts a PyTorch ConvNeXt or ResNet state dict to Flax weights.

  The layout (official, timm or Hugging Face) is recognised from the keys, the variant from
  the block count and widths, the class count from the head (no head: num_classes 0). Roadmap
  steps other than the ResNets and ConvNeXt cannot be told apart by their weights: name them.

  Args:
    state_dict: key -> torch tensor or numpy array.
    model_name: the expected variant; by default it is detected.
    consume: empty `state_dict` (a dict) while converting, freeing each tensor once it is
      converted, so a large checkpoint is not held twice in memory.

  Returns:
    (model_name, weights): a nested dict of float32 numpy arrays, the params with BatchNorm
    statistics merged in (`models.split_batch_stats` gives the two collections of
    `create_model(model_name, num_classes=...).apply`; without BatchNorm it is the params).

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
  try:
    detected, num_classes = detect_model(state_dict, layout)
  except ConversionError:
    if not model_name:
      raise
    detected = None  # Named by the caller: the keys below say whether it fits.
  if model_name:  # Its head's key may differ from the detected model's.
    spec = models.get_spec(model_name)
    if layout in FCMAE_LAYOUTS and not spec.masked_autoencoder:
      raise ConversionError(
          f'this is an FCMAE state dict ({layout} layout), not {model_name}: import it as an '
          'fcmae_convnextv2_* model (drop --model), then fine-tune from it with '
          'config.init_from'
      )
    if spec.masked_autoencoder and layout not in FCMAE_LAYOUTS:
      raise ConversionError(
          f'a {layout} state dict cannot hold {model_name}, whose layouts are '
          f'{", ".join(layouts_of(model_name))}'
      )
    head = (
        None
        if spec.masked_autoencoder
        else state_dict.get(torch_key(_head_path(spec), layout, spec))
    )
    num_classes = _shape(head)[0] if head is not None else 0
  model_name = model_name or detected
  maps = tensor_maps(model_name, num_classes, layout)
  looks_like = f' (it looks like {detected})' if detected not in (model_name, None) else ''
  check_state_dict(state_dict, maps, f'{layout} state dict does not match {model_name}{looks_like}')
  return model_name, state_dict_to_params(state_dict, maps, consume=consume)


def num_classes_of(params: Mapping[str, Any]) -> int:
  """Head outputs of a params (or weights) tree (0 when it has no head)."""
  for name in models.HEAD_NAMES:
    if name in params and 'kernel' in params[name]:
      return int(params[name]['kernel'].shape[-1])
  return 0


# The layouts an FCMAE model's encoder is exported to as its backbone (`encoder_as_backbone`).
BACKBONE_EXPORT_LAYOUTS = ('timm', 'hf')


def encoder_as_backbone(params: Mapping[str, Any], model_name: str) -> tuple[str, dict[str, Any]]:
  """An FCMAE model's encoder as the weights of the V2 model it pre-trains, without a head:
  (that model's name, weights). The encoder has no final LayerNorm; it is added at the
  initialisation timm's and transformers' models (and fine-tuning) give it: scale 1, bias 0.
  So the file loads strictly into timm's `convnextv2_<size>` with `num_classes=0` and into
  transformers' `ConvNextV2Model`, whose features (before that norm) are the encoder's."""
  spec = models.get_spec(model_name)
  width = models.get_spec(spec.backbone).dims[-1]
  weights = dict(params['encoder'])
  weights['norm'] = {'scale': np.ones(width, np.float32), 'bias': np.zeros(width, np.float32)}
  return spec.backbone, weights


def flax_to_torch(
    params: Mapping[str, Any], model_name: str, layout: str = 'official'
) -> dict[str, np.ndarray]:
  """Converts Flax weights of `model_name` to a PyTorch state dict of numpy arrays.

  Args:
    params: the model's weights: its 'params' collection, with BatchNorm statistics merged
      in for a model with BatchNorm (`models.merge_batch_stats`); numpy or jax arrays.
    model_name: registered name the weights belong to.
    layout: 'official' (facebookresearch/ConvNeXt; torchvision for ResNets), 'timm' or 'hf'
      (transformers); for FCMAE models 'fcmae' (the released encoder: the weights' decoder
      is left out) or 'fcmae_training' (the official pre-training checkpoint's), or 'timm'
      or 'hf' (the encoder as its backbone, `encoder_as_backbone`); `layouts_of(model_name)`
      says which can represent the model.

  Returns:
    key -> contiguous numpy array (float32; int64 for BatchNorm's num_batches_tracked), in
    the model's parameter order; wrap with `torch.from_numpy` to load into PyTorch.

  Raises:
    ConversionError: the weights do not match `model_name`, or the layout cannot represent
      it.
  """
  if layout not in ALL_LAYOUTS:
    raise ValueError(f'unknown layout {layout!r}; expected one of {ALL_LAYOUTS}')
  spec = models.get_spec(model_name)
  if spec.masked_autoencoder and layout in BACKBONE_EXPORT_LAYOUTS:
    backbone, weights = encoder_as_backbone(params, model_name)
    return flax_to_torch(weights, backbone, layout)
  if spec.masked_autoencoder != (layout in FCMAE_LAYOUTS):
    encoder = (
        f' (its encoder: also {", ".join(BACKBONE_EXPORT_LAYOUTS)})'
        if spec.masked_autoencoder
        else ''
    )
    raise ConversionError(
        f'{model_name} cannot be written in the {layout} layout; its layouts are '
        f'{", ".join(layouts_of(model_name))}{encoder}'
    )
  if layout == 'fcmae':  # The released form: the encoder alone.
    params = {'encoder': params['encoder']} if 'encoder' in params else params
  if layout == 'hf' and family(spec) == 'convnext' and spec.norm_eps != HF_NORM_EPS:
    raise ConversionError(
        f'{model_name} uses LayerNorm eps {spec.norm_eps}, but transformers fixes the block and '
        f'downsample LayerNorm eps at {HF_NORM_EPS}; export it as official or timm instead'
    )
  maps = tensor_maps(model_name, num_classes_of(params), layout)
  expected = {'/'.join(m.flax_path): m.flax_shape for m in maps if not m.torch_only}
  difference = trees.compare(expected, trees.shapes(params))
  if difference:
    no_stats = any(n.endswith(('/mean', '/var')) for n in difference.missing)
    hint = (
        '; merge the BatchNorm statistics in with models.merge_batch_stats(params, batch_stats)'
        if no_stats
        else ''
    )
    raise ConversionError(
        f'params do not match {model_name}: {difference.describe(unit="key(s)")}{hint}'
    )
  return params_to_state_dict(params, maps)
