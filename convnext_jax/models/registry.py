"""The ConvNeXt model zoo: names as timm spells them, and `create_model`."""

import dataclasses
import fnmatch
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from convnext_jax.models import fcmae
from convnext_jax.models import roadmap_net
from convnext_jax.models.convnext import ConvNeXt
from convnext_jax.models.convnext import ConvNeXtIsotropic


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  """Architecture of one named variant (what conversion and layer decay need to know)."""

  name: str
  isotropic: bool
  depths: tuple[int, ...]  # Hierarchical: blocks per stage. Isotropic: (depth,).
  dims: tuple[int, ...]  # Hierarchical: channels per stage. Isotropic: (dim,).
  layer_scale_init_value: float | None
  use_grn: bool = False
  norm_eps: float = 1e-6
  # Roadmap steps (`roadmap_net.RoadmapNet`): all its design attributes, sorted (item pairs).
  roadmap: tuple[tuple[str, Any], ...] = ()
  # FCMAE pre-training models (`fcmae.FCMAE`): the masked autoencoder around the V2 backbone
  # of the same depths and dims ('fcmae_convnextv2_atto' pre-trains 'convnextv2_atto').
  masked_autoencoder: bool = False

  @property
  def version(self) -> int:
    return 2 if self.use_grn else 1

  @property
  def backbone(self) -> str:
    """The classifier whose backbone this model's weights are: for an FCMAE model the V2
    model it pre-trains ('convnextv2_atto' for 'fcmae_convnextv2_atto'), else itself."""
    return self.name.removeprefix(FCMAE_PREFIX) if self.masked_autoencoder else self.name

  @property
  def uses_batchnorm(self) -> bool:
    """Whether the model has BatchNorm (and so running averages, 'batch_stats')."""
    return dict(self.roadmap).get('norm') == 'batch'

  @property
  def module_class(self) -> type[nn.Module]:
    if self.roadmap:
      return roadmap_net.RoadmapNet
    if self.masked_autoencoder:
      return fcmae.FCMAE
    return ConvNeXtIsotropic if self.isotropic else ConvNeXt

  def with_overrides(self, **overrides: Any) -> 'ModelSpec':
    """This variant with its architecture changed by module attributes, as `create_model`
    builds it with the same `overrides`.

    The attributes that change a spec: `depths` and `dims` (hierarchical), `depth` and `dim`
    (isotropic), `layer_scale_init_value`, `use_grn`, `norm_eps`, and for a roadmap model
    any of its design attributes (`depths`, `widths`, `block`, `norm`, ...; `dims` follow).
    The others (`remat`, `scan`, `depthwise_impl`, ...) change how the module runs, not what
    it is, and are ignored here; `create_model` checks that they exist. The name is kept.
    """
    changes = {k: overrides[k] for k in _SPEC_ATTRIBUTES if k in overrides}
    if self.roadmap:
      design = dict(self.roadmap)
      design.update((k, _frozen(v)) for k, v in overrides.items() if k in design)
      changes.update(_roadmap_shape(design))
    elif self.isotropic:
      if 'depth' in overrides:
        changes['depths'] = (overrides['depth'],)
      if 'dim' in overrides:
        changes['dims'] = (overrides['dim'],)
    else:
      changes.update((k, tuple(overrides[k])) for k in ('depths', 'dims') if k in overrides)
    return dataclasses.replace(self, **changes)

  def module_kwargs(self) -> dict[str, Any]:
    """Keyword arguments of the Flax module class for this variant."""
    if self.roadmap:
      return dict(self.roadmap, layer_scale_init_value=self.layer_scale_init_value)
    common = dict(
        layer_scale_init_value=self.layer_scale_init_value,
        use_grn=self.use_grn,
        norm_eps=self.norm_eps,
    )
    if self.isotropic:
      return dict(depth=self.depths[0], dim=self.dims[0], **common)
    return dict(depths=self.depths, dims=self.dims, **common)


# Spec fields that are module attributes of the same name, in every family.
_SPEC_ATTRIBUTES = ('layer_scale_init_value', 'use_grn', 'norm_eps')


def _frozen(value: Any) -> Any:
  """`value` with lists made tuples: specs are hashable and compare equal across configs."""
  return tuple(value) if isinstance(value, list) else value


def _roadmap_shape(design: dict[str, Any]) -> dict[str, Any]:
  """The ModelSpec fields of a roadmap design: its depths, its stage output channels as
  `dims` (4x the width in ResNet bottleneck blocks), and the design itself."""
  expansion = 4 if design['block'] == 'bottleneck' else 1
  return dict(
      depths=tuple(design['depths']),
      dims=tuple(w * expansion for w in design['widths']),
      roadmap=tuple(sorted(design.items())),
  )


_HIERARCHICAL = {
    'atto': ((2, 2, 6, 2), (40, 80, 160, 320)),
    'femto': ((2, 2, 6, 2), (48, 96, 192, 384)),
    'pico': ((2, 2, 6, 2), (64, 128, 256, 512)),
    'nano': ((2, 2, 8, 2), (80, 160, 320, 640)),
    'tiny': ((3, 3, 9, 3), (96, 192, 384, 768)),
    'small': ((3, 3, 27, 3), (96, 192, 384, 768)),
    'base': ((3, 3, 27, 3), (128, 256, 512, 1024)),
    'large': ((3, 3, 27, 3), (192, 384, 768, 1536)),
    'xlarge': ((3, 3, 27, 3), (256, 512, 1024, 2048)),
    'xxlarge': ((3, 4, 30, 3), (384, 768, 1536, 3072)),
    'huge': ((3, 3, 27, 3), (352, 704, 1408, 2816)),
}
# FCMAE pre-training models are named after the backbone they pre-train.
FCMAE_PREFIX = 'fcmae_'
_V1_SIZES = ('atto', 'femto', 'pico', 'nano', 'tiny', 'small', 'base', 'large', 'xlarge', 'xxlarge')
_V2_SIZES = ('atto', 'femto', 'pico', 'nano', 'tiny', 'small', 'base', 'large', 'huge')
# Official isotropic models: layer scale off for S and B, 1e-6 for L (as released and trained).
_ISOTROPIC = {'small': (18, 384, 0.0), 'base': (18, 768, 0.0), 'large': (36, 1024, 1e-6)}


def _build_specs() -> dict[str, ModelSpec]:
  specs = {}
  for size in _V1_SIZES:
    depths, dims = _HIERARCHICAL[size]
    name = f'convnext_{size}'
    # timm builds xxlarge with LayerNorm eps 1e-5 (its released weights were trained so).
    specs[name] = ModelSpec(
        name, False, depths, dims, 1e-6, norm_eps=1e-5 if size == 'xxlarge' else 1e-6
    )
  for size in _V2_SIZES:
    depths, dims = _HIERARCHICAL[size]
    name = f'convnextv2_{size}'
    specs[name] = ModelSpec(name, False, depths, dims, None, use_grn=True)
  for size, (depth, dim, ls) in _ISOTROPIC.items():
    name = f'convnext_isotropic_{size}'
    specs[name] = ModelSpec(name, True, (depth,), (dim,), ls)
  for track, steps in roadmap_net.TRACKS.items():
    for step in steps:
      name = roadmap_net.model_name(track, step.name)
      specs[name] = ModelSpec(
          name, isotropic=False, layer_scale_init_value=1e-6, **_roadmap_shape(dict(step.arch))
      )
  for size in _V2_SIZES:
    depths, dims = _HIERARCHICAL[size]
    name = f'{FCMAE_PREFIX}convnextv2_{size}'
    specs[name] = ModelSpec(name, False, depths, dims, None, use_grn=True, masked_autoencoder=True)
  return specs


MODEL_SPECS: dict[str, ModelSpec] = _build_specs()


def list_models(pattern: str = '*') -> list[str]:
  """Names of the registered models matching a shell-style `pattern`, in registry order."""
  return [name for name in MODEL_SPECS if fnmatch.fnmatch(name, pattern)]


def get_spec(name: str) -> ModelSpec:
  """The `ModelSpec` of a registered model name.

  Raises:
    ValueError: unknown name.
  """
  try:
    return MODEL_SPECS[name]
  except KeyError:
    raise ValueError(f'unknown model {name!r}; known models: {", ".join(MODEL_SPECS)}') from None


def module_arguments(name: str) -> tuple[str, ...]:
  """The arguments `create_model(name, ...)` passes to the model's Flax module, sorted.

  Raises:
    ValueError: unknown name.
  """
  cls = get_spec(name).module_class
  return tuple(sorted({f.name for f in dataclasses.fields(cls)} - {'parent', 'name'}))


_DEFAULT = object()


def create_model(
    name: str,
    *,
    num_classes: Any = _DEFAULT,
    drop_path_rate: float = 0.0,
    layer_scale_init_value: Any = _DEFAULT,
    head_init_scale: Any = _DEFAULT,
    dtype: Any = jnp.float32,
    param_dtype: Any = jnp.float32,
    **overrides,
) -> nn.Module:
  """Builds a ConvNeXt Flax module by name.

  Args:
    name: one of `list_models()`, e.g. 'convnext_tiny', 'convnextv2_base',
      'convnext_isotropic_small', 'fcmae_convnextv2_atto'.
    num_classes: classifier outputs (default 1000); 0 builds no head (pooled features are
      returned). FCMAE models have no head and take neither this nor head_init_scale.
    drop_path_rate: stochastic depth rate of the last block (linear from 0).
    layer_scale_init_value: layer-scale init; default is the variant's own (1e-6 for V1,
      none for V2 and isotropic S/B, 1e-6 for isotropic L). 0 or None disables it.
    head_init_scale: scales the initial head weights (default 1; 0.001 when fine-tuning a
      new head).
    dtype: compute dtype, e.g. `jnp.bfloat16` for mixed precision.
    param_dtype: parameter dtype.
    **overrides: any other module attribute (`remat='full'` or a policy name such as
      'dots_saveable', `scan=True`, `depthwise_impl='conv'`, `norm_eps`, or `depths`/`dims`
      for custom sizes; `ModelSpec.with_overrides` says which change the architecture).

  Returns:
    An unbound `ConvNeXt` or `ConvNeXtIsotropic` module. Call it on NHWC images with
    `model.apply({'params': params}, images, train=False)`; `train=True` needs an rng stream
    named 'drop_path' when drop_path_rate > 0.

  Raises:
    ValueError: unknown name or attribute.
  """
  if layer_scale_init_value is not _DEFAULT:
    overrides['layer_scale_init_value'] = layer_scale_init_value
  spec = get_spec(name).with_overrides(**overrides)
  kwargs = dict(
      spec.module_kwargs(), drop_path_rate=drop_path_rate, dtype=dtype, param_dtype=param_dtype
  )
  head = {'num_classes': num_classes, 'head_init_scale': head_init_scale}
  if spec.masked_autoencoder:
    given = sorted(k for k, v in head.items() if v is not _DEFAULT)
    if given:
      raise ValueError(f'{name} is a pre-training model without a classifier head: no {given}')
  else:
    kwargs['num_classes'] = 1000 if num_classes is _DEFAULT else num_classes
    kwargs['head_init_scale'] = 1.0 if head_init_scale is _DEFAULT else head_init_scale
  # What the spec does not hold passes through as is (and is checked below).
  kwargs.update((k, v) for k, v in overrides.items() if k not in kwargs)
  fields = module_arguments(name)
  unknown = sorted(set(kwargs) - set(fields))
  if unknown:
    raise ValueError(f'{name}: unknown model argument(s) {unknown}; valid: {list(fields)}')
  return spec.module_class(**kwargs)
