"""The paper's roadmap (section 2): one ConvNet spanning ResNet-50/200 to ConvNeXt-T/B.

`RoadmapNet` is configured by the design choices the roadmap changes one at a time: stage
depths and widths, the stem, the block (ResNet bottleneck, inverted bottleneck, depthwise
conv moved up), depthwise convs, kernel size, activation, fewer activations, fewer norms,
BatchNorm or LayerNorm, and separate downsampling layers. `TRACKS` lists the steps of the
two regimes in order, each with the paper's top-1 and GFLOPs (Appendix C, Tables 10 and 11);
the model registry names them `roadmap_{track}_{step}`.

Widths: `widths[i]` is stage i's bottleneck width in ResNet blocks (the block's input and
output are 4x wider) and the block width in inverted and depthwise-first blocks (the hidden
layer is 4x wider); the stem outputs `widths[0]`. With this reading every step's
multiply-adds at 224 px are within 1% of the paper's (the R200 track widens 64 -> 84 in its
stage-ratio step, as Table 11 does).

Names: parameter paths follow the network each part comes from, so that both ends convert
with the existing machinery and the last step *is* ConvNeXt:
  - in-block downsampling (every step but the last) uses torchvision's macro names: stem
    `conv1`, `bn1`; stages `layer{1..4}.{j}`; projection shortcut `downsample.0` (1x1 conv,
    stride) and `downsample.1` (norm); head `fc`. With separate downsampling layers: ConvNeXt's
    `downsample_layers.{i}.{0,1}`, `stages.{i}.{j}`, `norm`, `head`.
  - blocks with a norm after every conv (up to "fewer activations") use torchvision's block
    names `conv1`/`bn1`, `conv2`/`bn2`, `conv3`/`bn3`, convs without bias (each feeds a
    norm); blocks with one norm ("fewer norms" on) use ConvNeXt's `dwconv`, `norm`, `pwconv1`,
    `pwconv2` (Dense layers) and `gamma` (layer scale), with biases as ConvNeXt has them.
So `roadmap_r50_baseline` is torchvision's ResNet-50 (v1.5: stride on the 3x3 conv) name for
name, and `roadmap_r50_downsample` is `convnext_tiny`'s tree (28,589,128 parameters) and
function.

Choices the paper leaves open, made here (docs/roadmap.md says why):
  - BatchNorm: PyTorch's momentum 0.1 and eps 1e-5 (`layers.BatchNorm`); statistics over
    groups of `bn_group_size` examples (None: the batch given to the call).
  - A block whose residual branch ends in BatchNorm zero-initialises that norm's scale
    (timm's `zero_init_last`, what the modern recipe trains ResNets with; torchvision's
    default is 1): the branch starts as the identity, the job layer scale does in ConvNeXt.
    Blocks without a final norm ("fewer norms" on) have ConvNeXt's layer scale (1e-6).
  - The stem keeps the ResNet stem's norm and activation: BatchNorm until "BN -> LN" (then
    LayerNorm), the activation until "fewer activations" removes it (ConvNeXt's stem has
    none). The stride of a downsampling block is on its spatial (kxk) conv, as in v1.5.
  - Stochastic depth applies to every block's residual branch (rates linear in depth).
"""

from collections.abc import Sequence
import dataclasses
import functools
from typing import Any

import flax.linen as nn
from flax.typing import Dtype
import jax.numpy as jnp

from convnext_jax.models import convnext
from convnext_jax.models import layers

STEMS = ('resnet', 'patchify')
BLOCKS = ('bottleneck', 'inverted', 'dw_first')
ACTIVATIONS = {'relu': nn.relu, 'gelu': layers.gelu}
NORMS = ('batch', 'layer')


@dataclasses.dataclass(frozen=True)
class Step:
  """One roadmap step: the RoadmapNet attributes it sets (cumulative) and the paper's result."""

  name: str
  title: str
  arch: tuple[tuple[str, Any], ...]  # All RoadmapNet attributes of this step, sorted.
  paper_top1: float
  paper_gflops: float  # Multiply-adds at 224 px, as the paper counts FLOPs.


# The design of torchvision's ResNet (v1.5), where both tracks start; the steps with it are the
# ResNet family (conversion keys on it).
RESNET_DESIGN = dict(
    stem='resnet',
    block='bottleneck',
    depthwise=False,
    kernel_size=3,
    activation='relu',
    fewer_activations=False,
    fewer_norms=False,
    norm='batch',
    separate_downsampling=False,
)

# (name, title, changes, r50 (top-1, GFLOPs), r200 (top-1, GFLOPs)); changes apply in order,
# except that the kernel steps all start from the depthwise-up step and 'gelu' goes on from
# kernel 7, the size the paper keeps.
_STEPS = (
    ('baseline', 'ResNet (modern recipe)', {}, (78.82, 4.09), (81.14, 15.01)),
    ('stage_ratio', 'stage ratio', {'depths': None}, (79.36, 4.53), (81.33, 14.52)),
    ('patchify', '"patchify" stem', {'stem': 'patchify'}, (79.51, 4.42), (81.59, 14.38)),
    ('depthwise', 'depthwise conv', {'depthwise': True}, (78.28, 2.35), (80.54, 7.23)),
    ('width', 'increase width', {'widths': None}, (80.50, 5.27), (81.85, 16.76)),
    ('inverted', 'inverted bottleneck', {'block': 'inverted'}, (80.64, 4.64), (82.64, 15.68)),
    ('dw_up', 'move up depthwise conv', {'block': 'dw_first'}, (79.92, 4.07), (82.04, 14.63)),
    ('kernel5', 'kernel size 5', {'kernel_size': 5}, (80.35, 4.10), (82.32, 14.70)),
    ('kernel7', 'kernel size 7', {'kernel_size': 7}, (80.57, 4.15), (82.30, 14.81)),
    ('kernel9', 'kernel size 9', {'kernel_size': 9}, (80.57, 4.21), (82.27, 14.95)),
    ('kernel11', 'kernel size 11', {'kernel_size': 11}, (80.47, 4.29), (82.18, 15.13)),
    (
        'gelu',
        'ReLU -> GELU',
        {'kernel_size': 7, 'activation': 'gelu'},
        (80.62, 4.15),
        (82.19, 14.81),
    ),
    ('fewer_act', 'fewer activations', {'fewer_activations': True}, (81.27, 4.15), (82.71, 14.81)),
    ('fewer_norm', 'fewer norms', {'fewer_norms': True}, (81.41, 4.15), (83.17, 14.81)),
    # Table 10 prints 4.46 GFLOPs for this step; changing a norm adds no multiply-adds, and
    # Figure 2's bar says 4.2 (docs/roadmap.md).
    ('ln', 'BN -> LN', {'norm': 'layer'}, (81.47, 4.15), (83.35, 14.81)),
    (
        'downsample',
        'separate downsampling layers',
        {'separate_downsampling': True},
        (81.97, 4.49),
        (83.60, 15.35),
    ),
)

# Per track: the baseline's depths and widths, then the values 'stage_ratio' and 'width' set.
_TRACK_SHAPES = {
    'r50': dict(
        baseline=((3, 4, 6, 3), (64, 128, 256, 512)),
        depths=(3, 3, 9, 3),
        stage_ratio_widths=None,
        widths=(96, 192, 384, 768),
    ),
    'r200': dict(
        baseline=((3, 24, 36, 3), (64, 128, 256, 512)),
        depths=(3, 3, 27, 3),
        stage_ratio_widths=(84, 168, 336, 672),
        widths=(128, 256, 512, 1024),
    ),
}
# Paper results of the original 90-epoch recipe (the step before 'baseline').
ORIGINAL_RECIPE = {'r50': (76.13, 4.09), 'r200': (78.20, 15.01)}


def _build_tracks() -> dict[str, tuple[Step, ...]]:
  tracks = {}
  for track, shapes in _TRACK_SHAPES.items():
    depths, widths = shapes['baseline']
    arch = dict(RESNET_DESIGN, depths=depths, widths=widths)
    steps = []
    for name, title, changes, r50, r200 in _STEPS:
      changes = dict(changes)
      if 'depths' in changes:
        changes['depths'] = shapes['depths']
        if shapes['stage_ratio_widths']:
          changes['widths'] = shapes['stage_ratio_widths']
      if 'widths' in changes and name == 'width':
        changes['widths'] = shapes['widths']
      base = arch if not name.startswith('kernel') else dict(arch, kernel_size=3)
      arch = dict(base, **changes)
      top1, gflops = r50 if track == 'r50' else r200
      steps.append(Step(name, title, tuple(sorted(arch.items())), top1, gflops))
    tracks[track] = tuple(steps)
  return tracks


TRACKS: dict[str, tuple[Step, ...]] = _build_tracks()


def model_name(track: str, step: str) -> str:
  """The registry name of a roadmap step, e.g. ('r50', 'gelu') -> 'roadmap_r50_gelu'."""
  return f'roadmap_{track}_{step}'


# RoadmapNet shares ConvNeXt's attributes, LayerNorm, drop-path rates and head: its last step
# is ConvNeXt.
class RoadmapNet(convnext.ConvNeXtBase):
  """A ResNet-to-ConvNeXt network; attributes are the roadmap's design choices.

  Attributes (besides those of `convnext.ConvNeXtBase`; `use_grn` and `scan` are not
  supported):
    depths: blocks per stage.
    widths: per stage, the bottleneck width (ResNet blocks) or block width (the others).
    stem: 'resnet' (7x7 stride-2 conv, norm, activation, 3x3 stride-2 max pool) or
      'patchify' (4x4 stride-4 conv, norm).
    block: 'bottleneck' (1x1 reduce, kxk, 1x1 expand 4x), 'inverted' (1x1 expand 4x,
      depthwise kxk, 1x1 reduce) or 'dw_first' (depthwise kxk, 1x1 expand 4x, 1x1 reduce).
    depthwise: the bottleneck's kxk conv is depthwise (inverted/dw_first blocks always are).
    kernel_size: k.
    activation: 'relu' or 'gelu' (erf).
    fewer_activations: one activation per block, between the two 1x1 layers; none in the
      stem or after the residual addition.
    fewer_norms: one norm per block, after its first (depthwise) conv.
    norm: 'batch' or 'layer' (LayerNorm over channels, eps `norm_eps`).
    separate_downsampling: ConvNeXt's macro design: LayerNorm + 2x2 stride-2 conv between
      stages, LayerNorm after the stem and after global pooling.
    bn_group_size: examples per BatchNorm statistics group in training (None: the whole
      batch of the call); see `layers.BatchNorm`. A run sets it from
      `config.model.bn_group_size` (`run.Run`).
    bn_eps, bn_momentum: BatchNorm's, in PyTorch's convention.
  """

  depths: Sequence[int] = (3, 4, 6, 3)
  widths: Sequence[int] = (64, 128, 256, 512)
  stem: str = 'resnet'
  block: str = 'bottleneck'
  depthwise: bool = False
  kernel_size: int = 3
  activation: str = 'relu'
  fewer_activations: bool = False
  fewer_norms: bool = False
  norm: str = 'batch'
  separate_downsampling: bool = False
  bn_group_size: int | None = None
  bn_eps: float = 1e-5
  bn_momentum: float = 0.1

  def _check(self):
    for name, value, allowed in (
        ('stem', self.stem, STEMS),
        ('block', self.block, BLOCKS),
        ('activation', self.activation, tuple(ACTIVATIONS)),
        ('norm', self.norm, NORMS),
    ):
      if value not in allowed:
        raise ValueError(f'RoadmapNet {name} must be one of {allowed}, got {value!r}')
    if len(self.depths) != len(self.widths):
      raise ValueError(
          f'depths {tuple(self.depths)} and widths {tuple(self.widths)} differ in length'
      )
    if self.scan or self.use_grn:
      raise ValueError('RoadmapNet supports neither scan nor use_grn')
    if self.fewer_norms and self.block != 'dw_first':
      raise ValueError(
          "fewer_norms needs block='dw_first' (its one norm follows the depthwise conv)"
      )
    if self.separate_downsampling and not (self.stem == 'patchify' and self.fewer_norms):
      raise ValueError("separate_downsampling needs stem='patchify' and fewer_norms")

  @nn.compact
  def __call__(self, x, train: bool = False, output: str = 'logits'):
    convnext.check_output(output)
    self._check()
    d = _Design.of(self)
    act = ACTIVATIONS[self.activation]
    x = jnp.asarray(x, self.dtype)
    rates = layers.drop_path_rates(self.drop_path_rate, sum(self.depths))
    block_cls = _Block
    if self.remat:
      block_cls = nn.remat(_Block, static_argnums=(2,), policy=convnext.remat_policy(self.remat))
    sep = self.separate_downsampling
    # ---- Stem. ----
    if self.stem == 'resnet':
      x = _conv(d, self.widths[0], 7, 2, 'conv1')(x)
      x = _norm(d, 'bn1')(x, train)
      x = act(x)
      x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    elif sep:
      x = _conv(d, self.widths[0], 4, 4, 'downsample_layers.0.0', padding=0, bias=True)(x)
      x = _norm(d, 'downsample_layers.0.1', 'layer')(x, train)
    else:
      x = _conv(d, self.widths[0], 4, 4, 'conv1', padding=0)(x)
      x = _norm(d, 'bn1')(x, train)
      if not self.fewer_activations:
        x = act(x)
    # ---- Stages. ----
    stage_maps = []
    channels = self.widths[0]
    for i, (depth, width) in enumerate(zip(self.depths, self.widths)):
      if sep and i > 0:
        x = _norm(d, f'downsample_layers.{i}.0', 'layer')(x, train)
        x = _conv(d, width, 2, 2, f'downsample_layers.{i}.1', padding=0, bias=True)(x)
        channels = width
      start = sum(self.depths[:i])
      for j in range(depth):
        stride = 2 if (i > 0 and j == 0 and not sep) else 1
        out = width * 4 if self.block == 'bottleneck' else width
        x = block_cls(
            d,
            width,
            out,
            stride,
            channels != out or stride != 1,
            rates[start + j],
            name=f'stages.{i}.{j}' if sep else f'layer{i + 1}.{j}',
        )(x, train)
        channels = out
      stage_maps.append(x)
    if output == 'stages':
      return tuple(stage_maps)
    # ---- Head. ----
    if sep:
      return convnext.classifier_head(self, x, output)
    x = jnp.mean(x.astype(jnp.float32), axis=(1, 2)).astype(x.dtype)
    if output == 'pre_logits' or not self.num_classes:
      return x
    x = nn.Dense(
        self.num_classes,
        dtype=self.dtype,
        param_dtype=self.param_dtype,
        kernel_init=layers.scaled_init(layers.dense_init, self.head_init_scale),
        name='fc',
    )(x)
    return x.astype(jnp.float32)


@dataclasses.dataclass(frozen=True)
class _Design:
  """The RoadmapNet attributes its blocks and layers follow (hashable, for submodules)."""

  block: str
  depthwise: bool
  kernel_size: int
  activation: str
  fewer_activations: bool
  fewer_norms: bool
  norm: str
  layer_scale_init_value: float | None
  norm_eps: float
  bn_group_size: int | None
  bn_eps: float
  bn_momentum: float
  depthwise_impl: str
  dtype: Dtype | None
  param_dtype: Dtype

  @classmethod
  def of(cls, net: RoadmapNet) -> '_Design':
    return cls(**{f.name: getattr(net, f.name) for f in dataclasses.fields(cls)})


def _norm(d: _Design, name: str, kind: str | None = None, zero_init: bool = False):
  """A norm layer called as f(x, train): BatchNorm, or LayerNorm over channels."""
  if (kind or d.norm) == 'batch':
    return layers.BatchNorm(
        momentum=d.bn_momentum,
        epsilon=d.bn_eps,
        group_size=d.bn_group_size,
        zero_init=zero_init,
        dtype=d.dtype,
        param_dtype=d.param_dtype,
        name=name,
    )
  ln = layers.layer_norm(d.norm_eps, d.dtype, d.param_dtype, name)
  return lambda x, train=False: ln(x)


def _conv(
    d: _Design,
    features: int,
    kernel: int,
    stride: int,
    name: str,
    *,
    padding: int | None = None,
    depthwise: bool = False,
    bias: bool = False,
):
  """A kxk conv with ConvNeXt's init ('same' padding unless given); depthwise ones (groups =
  channels = features) go through `layers.DepthwiseConv`, fast on CPU."""
  if depthwise:
    return layers.DepthwiseConv(
        kernel,
        impl=d.depthwise_impl,
        stride=stride,
        use_bias=bias,
        dtype=d.dtype,
        param_dtype=d.param_dtype,
        name=name,
    )
  padding = kernel // 2 if padding is None else padding
  return nn.Conv(
      features,
      (kernel, kernel),
      strides=(stride, stride),
      padding=((padding, padding), (padding, padding)),
      use_bias=bias,
      kernel_init=layers.dense_init,
      dtype=d.dtype,
      param_dtype=d.param_dtype,
      name=name,
  )


class _Block(nn.Module):
  """One residual block, designed as `design` says."""

  design: _Design
  width: int
  out: int
  stride: int
  project: bool  # A projection shortcut (the channels or the resolution change).
  drop_path_rate: float

  @nn.compact
  def __call__(self, x, train: bool = False):
    d = self.design
    act = ACTIVATIONS[d.activation]
    k = d.kernel_size
    shortcut = x
    cin = x.shape[-1]
    if d.fewer_norms:  # ConvNeXt's block, with BatchNorm or LayerNorm; ConvNeXt's names.
      x = _conv(d, cin, k, self.stride, 'dwconv', depthwise=True, bias=True)(x)
      x = _norm(d, 'norm')(x, train)
      dense = functools.partial(
          nn.Dense, kernel_init=layers.dense_init, dtype=d.dtype, param_dtype=d.param_dtype
      )
      x = dense(4 * self.width, name='pwconv1')(x)
      x = act(x)
      x = dense(self.out, name='pwconv2')(x)
      if d.layer_scale_init_value:
        gamma = self.param(
            'gamma', nn.initializers.constant(d.layer_scale_init_value), (self.out,), d.param_dtype
        )
        x = x * gamma.astype(x.dtype)
    else:
      # Three convs, each followed by a norm; torchvision's names. (features, kernel,
      # stride, depthwise) per conv.
      if d.block == 'bottleneck':
        convs = (
            (self.width, 1, 1, False),
            (self.width, k, self.stride, d.depthwise),
            (self.out, 1, 1, False),
        )
      elif d.block == 'inverted':
        hidden = 4 * self.width
        convs = ((hidden, 1, 1, False), (hidden, k, self.stride, True), (self.out, 1, 1, False))
      else:  # dw_first
        convs = (
            (cin, k, self.stride, True),
            (4 * self.width, 1, 1, False),
            (self.out, 1, 1, False),
        )
      # With fewer activations, the one left follows the layer between the two 1x1 convs.
      kept = 2 if d.block == 'dw_first' else 1
      for n, (features, kernel, stride, depthwise) in enumerate(convs, start=1):
        x = _conv(d, features, kernel, stride, f'conv{n}', depthwise=depthwise)(x)
        x = _norm(d, f'bn{n}', zero_init=n == 3)(x, train)
        if n < 3 and (not d.fewer_activations or n == kept):
          x = act(x)
    if train and self.drop_path_rate > 0:
      x = layers.drop_path(x, self.drop_path_rate, self.make_rng('drop_path'))
    if self.project:
      shortcut = _conv(d, self.out, 1, self.stride, 'downsample.0')(shortcut)
      shortcut = _norm(d, 'downsample.1')(shortcut, train)
    x = shortcut + x
    if not d.fewer_activations:
      x = act(x)
    return x
