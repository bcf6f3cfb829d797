"""ConvNeXt V1/V2 (hierarchical) and isotropic ConvNeXt as Flax linen modules.

Liu et al., "A ConvNet for the 2020s" (2022); Woo et al., "ConvNeXt V2" (2023).

Submodules are named after the official PyTorch modules (`downsample_layers.0.0`,
`stages.1.2`, `dwconv`, `norm`, `pwconv1`, `gamma`, `grn`, `head`; isotropic: `stem`,
`blocks.7`), so a parameter path joined with '.' is the official state-dict key with
`kernel`/`scale` in place of `weight`. Conversion (`convnext_jax.convert`) relies on this.

Inputs are NHWC images. `output` selects what `__call__` returns:
  'logits'     (N, num_classes) float32 logits (pre-logits features when num_classes == 0);
  'pre_logits' (N, C) pooled, normalised features, what the head sees;
  'stages'     a tuple of the four stage feature maps (NHWC) for dense-prediction backbones;
               isotropic models return a 1-tuple with the final feature map.

Scan (`scan=True`): the blocks of each stage run as one `jax.lax.scan` over their stacked
parameters, so XLA traces and compiles one block per stage instead of every block (a 27-block
stage compiles like a 1-block one). The parameter tree is unchanged (`stages.{i}.{j}`,
`blocks.{k}`): init runs the unscanned blocks, and apply stacks the per-block params inside
the traced function (a transient copy of each stage's params, and of its gradients, which
autodiff slices back into the per-block names). Conversion, sharding rules, layer decay and
checkpoints therefore see the same tree, and a model trained with scan loads without it and
back. The outputs equal the unscanned model's up to float rounding, except drop path: each
stage draws one key from the 'drop_path' stream and folds in the block index, so the masks
differ from the unscanned model's (which folds in each block's module path); their
distribution (per-block rates growing linearly) is the same. Per-block intermediates
(`capture_intermediates`) are not recorded under scan.

Remat (`remat`): '' or False off; True or 'full' recompute everything in the backward pass
(`jax.checkpoint_policies.nothing_saveable`); or the name of any argument-free policy in
`jax.checkpoint_policies` (`REMAT_POLICIES`, e.g. 'dots_saveable': keep the matmul outputs,
recompute the rest; 'dots_with_no_batch_dims_saveable'; 'everything_saveable'). Unscanned,
each Block is wrapped in `nn.remat` with the policy; scanned, the scan body is wrapped in
`jax.checkpoint` with it. `remat_policy` maps a name to its policy.
"""

from collections.abc import Callable
from collections.abc import Sequence
import functools
import inspect
from typing import Any

import flax.linen as nn
from flax.typing import Dtype
import jax
import jax.numpy as jnp

from convnext_jax.models import layers

# What `__call__(..., output=...)` can return; see the module docstring.
OUTPUTS = ('logits', 'pre_logits', 'stages')


def _argument_free_policies() -> tuple[str, ...]:
  """Names in `jax.checkpoint_policies` that are policies, not policy factories.

  A policy is called as policy(primitive, *avals, **params); factories such as
  `save_only_these_names(*names)` take no keyword parameters.
  """
  names = []
  for name, fn in vars(jax.checkpoint_policies).items():
    if name.startswith('_') or not callable(fn):
      continue
    try:
      kinds = {p.kind for p in inspect.signature(fn).parameters.values()}
    except (TypeError, ValueError):
      continue
    if {inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD} <= kinds:
      names.append(name)
  return tuple(sorted(names))


# Accepted string values of `remat` besides '' (off): 'full' and jax's argument-free policies.
REMAT_POLICIES = ('full',) + _argument_free_policies()


def remat_policy(remat: bool | str) -> Callable[..., bool] | None:
  """The `jax.checkpoint` policy of a `remat` setting; None when remat is off.

  Args:
    remat: '' or False (off); True or 'full' (recompute everything: `nothing_saveable`); or
      one of `REMAT_POLICIES`, e.g. 'dots_saveable'.

  Raises:
    ValueError: not one of these.
  """
  if remat is False or remat == '':
    return None
  if remat is True or remat == 'full':
    return jax.checkpoint_policies.nothing_saveable
  if isinstance(remat, str) and remat in REMAT_POLICIES:
    return getattr(jax.checkpoint_policies, remat)
  raise ValueError(
      f"remat must be '' or False (off), True, or one of "
      f'{", ".join(REMAT_POLICIES)}; got {remat!r}'
  )


# How a model's weights are initialised (`init_scheme`): 'zoo', the official ConvNeXt code's
# trunc normal std 0.02 for every conv and linear kernel; 'fcmae', what the official FCMAE
# code's `_init_weights` ends up with for its encoder: std 1.0 (timm's `trunc_normal_`
# without a std, cut at +-2) for the stem conv, the depthwise convs and the pointwise
# linears, std 0.02 for the 2x2 downsampling convs. A `Block` also takes 'fcmae_decoder',
# the FCMAE decoder's block: its depthwise conv std 1.0, its linears PyTorch's default init
# (which that `_init_weights` leaves alone), biases included.
INIT_SCHEMES = ('zoo', 'fcmae')


def _kernel_init(scheme: str, kind: str):
  """The kernel initialiser of a layer `kind` ('stem', 'downsample', 'dwconv', 'pwconv')."""
  if scheme not in INIT_SCHEMES + ('fcmae_decoder',):
    raise ValueError(f'init_scheme must be one of {INIT_SCHEMES}, got {scheme!r}')
  if scheme != 'zoo' and kind != 'downsample':
    return layers.trunc_normal_init(1.0)
  return layers.dense_init


def stage_visibility(mask: jax.Array, scale: int, dtype) -> jax.Array:
  """(N, h * scale, w * scale, 1) `dtype` 1 where visible, 0 where masked: a (N, h, w) mask
  (1 = masked) on the model's coarsest grid repeated `scale` times along each axis."""
  visible = (1 - mask.astype(dtype))[..., None]
  return jnp.repeat(jnp.repeat(visible, scale, axis=1), scale, axis=2)


class Block(nn.Module):
  """dwconv 7x7 -> LayerNorm -> Linear C->4C -> GELU (erf) [-> GRN] -> Linear 4C->C
  [-> * gamma] -> drop path -> + shortcut.

  Masked (`visible` given, FCMAE's sparse encoder on dense maps): the input is zero at the
  masked sites; GRN's statistics are taken over the visible sites only (its input zeroed at
  the masked ones), and the residual branch is zeroed there, so the output is zero at the
  masked sites again and no masked site ever reaches a visible one (the depthwise conv reads
  zeros there, as a sparse submanifold conv reads nothing).
  """

  dim: int
  drop_path_rate: float | jax.Array = 0.0  # A traced scalar when scanned over.
  layer_scale_init_value: float | None = 1e-6
  use_grn: bool = False
  norm_eps: float = 1e-6
  depthwise_impl: str = 'auto'
  init_scheme: str = 'zoo'
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False, visible: jax.Array | None = None):
    def dense(features, fan_in, name):
      inits = dict(kernel_init=_kernel_init(self.init_scheme, 'pwconv'))
      if self.init_scheme == 'fcmae_decoder':
        init = layers.torch_default_init(fan_in)
        inits = dict(kernel_init=init, bias_init=init)
      return nn.Dense(features, dtype=self.dtype, param_dtype=self.param_dtype, name=name, **inits)

    shortcut = x
    x = layers.DepthwiseConv(
        7,
        impl=self.depthwise_impl,
        kernel_init=_kernel_init(self.init_scheme, 'dwconv'),
        dtype=self.dtype,
        param_dtype=self.param_dtype,
        name='dwconv',
    )(x)
    x = layers.layer_norm(self.norm_eps, self.dtype, self.param_dtype, 'norm')(x)
    x = dense(4 * self.dim, self.dim, 'pwconv1')(x)
    x = layers.gelu(x)
    if self.use_grn:
      if visible is not None:
        x = x * visible.astype(x.dtype)
      x = layers.GlobalResponseNorm(dtype=self.dtype, param_dtype=self.param_dtype, name='grn')(x)
    x = dense(self.dim, 4 * self.dim, 'pwconv2')(x)
    if self.layer_scale_init_value:
      gamma = self.param(
          'gamma',
          nn.initializers.constant(self.layer_scale_init_value),
          (self.dim,),
          self.param_dtype,
      )
      x = x * gamma.astype(x.dtype)
    # A traced rate (scan) may be anything; a zero Python rate needs no rng.
    if train and (not isinstance(self.drop_path_rate, (int, float)) or self.drop_path_rate > 0):
      # make_rng folds in this block's path, so every block draws its own mask.
      x = layers.drop_path(x, self.drop_path_rate, self.make_rng('drop_path'))
    if visible is not None:
      x = x * visible.astype(x.dtype)
    return shortcut + x


def _block_kwargs(module) -> dict[str, Any]:
  """The Block attributes that `module` sets (all but dim and drop_path_rate)."""
  return dict(
      layer_scale_init_value=module.layer_scale_init_value,
      use_grn=module.use_grn,
      norm_eps=module.norm_eps,
      depthwise_impl=module.depthwise_impl,
      # Only the hierarchical ConvNeXt has a choice (FCMAE's encoder).
      init_scheme=getattr(module, 'init_scheme', 'zoo'),
      dtype=module.dtype,
      param_dtype=module.param_dtype,
  )


def _make_block(module, dim, drop_path_rate, name):
  """A Block configured from `module`'s attributes, created in its (compact) scope."""
  policy = remat_policy(module.remat)
  # `train` (argument 2, counting self) is a Python bool that selects code paths.
  cls = Block if policy is None else nn.remat(Block, static_argnums=(2,), policy=policy)
  return cls(dim, drop_path_rate=drop_path_rate, name=name, **_block_kwargs(module))


def _blocks(
    module,
    x,
    train: bool,
    dim: int,
    names: Sequence[str],
    rates: Sequence[float],
    visible: jax.Array | None = None,
):
  """The blocks `names` (with drop-path `rates`) applied in turn, in `module`'s scope.

  Unscanned, or at init (which creates the params under these names), one submodule each.
  With `module.scan`, one `lax.scan` over the stacked params of the already created blocks,
  with an unbound Block applied in the body: XLA sees one block. `visible`: the blocks'
  visibility map when masked (`Block`).
  """
  if not module.scan or module.is_initializing() or not names:
    for name, rate in zip(names, rates):
      x = _make_block(module, dim, rate, name)(x, train, visible)
    return x
  params = module.variables['params']
  stacked = jax.tree.map(lambda *a: jnp.stack(a), *(params[name] for name in names))
  drop = train and module.drop_path_rate > 0.0
  # One key per stage from the parent's stream; each block folds in its index.
  key = module.make_rng('drop_path') if drop else None
  block_kwargs = _block_kwargs(module)

  def body(x, inputs):
    block_params, rate, index = inputs
    block = Block(dim, drop_path_rate=rate if drop else 0.0, parent=None, **block_kwargs)
    rngs = {'drop_path': jax.random.fold_in(key, index)} if drop else None
    return block.apply({'params': block_params}, x, train, visible, rngs=rngs), None

  policy = remat_policy(module.remat)
  if policy is not None:
    # Scan already keeps iterations apart, so common-subexpression guards are not needed.
    body = jax.checkpoint(body, policy=policy, prevent_cse=False)
  x, _ = jax.lax.scan(
      body, x, (stacked, jnp.asarray(rates, jnp.float32), jnp.arange(len(names), dtype=jnp.uint32))
  )
  return x


def check_output(output: str) -> None:
  """Raises ValueError unless `output` is one of `OUTPUTS`."""
  if output not in OUTPUTS:
    raise ValueError(f'output must be one of {OUTPUTS}, got {output!r}')


def classifier_head(module: 'ConvNeXtBase', x, output: str):
  """ConvNeXt's head, created in `module`'s (compact) scope: global average pool ->
  LayerNorm `norm` -> Dense `head` (none when `module.num_classes` is 0).

  Args:
    module: the calling model; its `num_classes`, `norm_eps`, `head_init_scale`, `dtype`
      and `param_dtype` configure the head.
    x: the last stage's (N, H, W, C) feature map.
    output: 'logits', or 'pre_logits' for the pooled, normalised features.

  Returns:
    (N, num_classes) float32 logits, or the (N, C) features for 'pre_logits' or a headless
    model.
  """
  # The mean over H*W positions runs in float32.
  x = jnp.mean(x.astype(jnp.float32), axis=(1, 2)).astype(x.dtype)
  x = layers.layer_norm(module.norm_eps, module.dtype, module.param_dtype, 'norm')(x)
  if output == 'pre_logits' or not module.num_classes:
    return x
  init = layers.scaled_init(layers.dense_init, module.head_init_scale)
  # The bias is zero-initialised, so scaling it by head_init_scale is a no-op.
  x = nn.Dense(
      module.num_classes,
      kernel_init=init,
      dtype=module.dtype,
      param_dtype=module.param_dtype,
      name='head',
  )(x)
  return x.astype(jnp.float32)


class ConvNeXtBase(nn.Module):
  """Attributes and output shortcuts shared by the hierarchical, isotropic and roadmap
  (`roadmap.RoadmapNet`) models.

  Attributes:
    num_classes: head outputs; 0 drops the head (pooled features are returned).
    drop_path_rate: stochastic depth of the last block; rates grow linearly from 0.
    layer_scale_init_value: init of the per-channel layer scale; 0/None disables it.
    head_init_scale: multiplies the initial head weights and bias.
    use_grn: ConvNeXt-V2 Global Response Norm in each block.
    norm_eps: epsilon of every LayerNorm (1e-6; timm's xxlarge uses 1e-5).
    remat: rematerialise each block in the backward pass (saves activation memory): '' or
      False off, True or 'full' recompute everything, or a `jax.checkpoint_policies` name
      from `REMAT_POLICIES` such as 'dots_saveable' (see the module docstring).
    scan: run each stage's blocks as one `lax.scan` (compiles one block per stage; same
      parameter tree; drop-path masks drawn differently, see the module docstring).
    depthwise_impl: 'auto', 'conv' or 'shift'; see `layers.depthwise_conv2d`.
    dtype: compute dtype (e.g. jnp.bfloat16); None follows the inputs and params.
    param_dtype: parameter dtype.
  """

  num_classes: int = 1000
  drop_path_rate: float = 0.0
  layer_scale_init_value: float | None = 1e-6
  head_init_scale: float = 1.0
  use_grn: bool = False
  norm_eps: float = 1e-6
  remat: bool | str = False
  scan: bool = False
  depthwise_impl: str = 'auto'
  dtype: Dtype | None = jnp.float32
  param_dtype: Dtype = jnp.float32

  def forward_features(self, x, train: bool = False):
    """Pooled, normalised features (N, C), what the classifier head sees."""
    return self(x, train, output='pre_logits')

  def forward_stages(self, x, train: bool = False):
    """The stage feature maps (NHWC), for detection and segmentation backbones."""
    return self(x, train, output='stages')


class ConvNeXt(ConvNeXtBase):
  """Hierarchical ConvNeXt (V1 with layer scale, V2 with GRN).

  Attributes (besides those of `ConvNeXtBase`):
    depths: blocks per stage.
    dims: channels per stage.
    init_scheme: 'zoo' or 'fcmae' (`INIT_SCHEMES`): how the weights are initialised.
  """

  depths: Sequence[int] = (3, 3, 9, 3)
  dims: Sequence[int] = (96, 192, 384, 768)
  init_scheme: str = 'zoo'

  @property
  def total_stride(self) -> int:
    """Input pixels per cell of the last stage's map along each axis (32 with four stages)."""
    return 4 * 2 ** (len(self.depths) - 1)

  @nn.compact
  def __call__(self, x, train: bool = False, output: str = 'logits', mask: jax.Array | None = None):
    """The model on NHWC images `x`.

    Args:
      x: (N, H, W, 3) images.
      train: training mode (drop path).
      output: see the module docstring.
      mask: FCMAE's masked encoding: (N, H / s, W / s), s = `total_stride`, 1 where a cell of
        the image is removed. The network then computes on dense maps exactly what the
        official sparse encoder computes on the visible cells (stem dense, then every map
        zeroed at the masked sites; `Block`), and the stage maps are zero at masked sites.
        Needs output='stages'.
    """
    check_output(output)
    if len(self.depths) != len(self.dims):
      raise ValueError(f'depths {tuple(self.depths)} and dims {tuple(self.dims)} differ in length')
    if mask is not None and output != 'stages':
      raise ValueError(f"a masked encoding returns output='stages', got output={output!r}")
    norm = functools.partial(layers.layer_norm, self.norm_eps, self.dtype, self.param_dtype)

    def conv(features, size, name, kind):
      return nn.Conv(
          features,
          (size, size),
          strides=(size, size),
          padding='VALID',
          kernel_init=_kernel_init(self.init_scheme, kind),
          dtype=self.dtype,
          param_dtype=self.param_dtype,
          name=name,
      )

    rates = layers.drop_path_rates(self.drop_path_rate, sum(self.depths))

    x = jnp.asarray(x, self.dtype)
    stage_maps = []
    visible = None
    for i, (depth, dim) in enumerate(zip(self.depths, self.dims)):
      if i == 0:
        x = conv(dim, 4, 'downsample_layers.0.0', 'stem')(x)
        x = norm('downsample_layers.0.1')(x)
      else:
        x = norm(f'downsample_layers.{i}.0')(x)
        x = conv(dim, 2, f'downsample_layers.{i}.1', 'downsample')(x)
      if mask is not None:
        # A cell is visible or masked as a whole at every scale; zeroing the masked sites
        # after the stem and each downsampling conv (their biases) keeps every map zero there.
        visible = stage_visibility(mask, 2 ** (len(self.depths) - 1 - i), x.dtype)
        x = x * visible
      start = sum(self.depths[:i])
      x = _blocks(
          self,
          x,
          train,
          dim,
          [f'stages.{i}.{j}' for j in range(depth)],
          rates[start : start + depth],
          visible,
      )
      stage_maps.append(x)
    if output == 'stages':
      return tuple(stage_maps)
    return classifier_head(self, x, output)


class ConvNeXtIsotropic(ConvNeXtBase):
  """Isotropic ConvNeXt (paper section 3.3): a ViT-like stack of ConvNeXt blocks.

  Stem conv `patch_size` x `patch_size` stride `patch_size` (no norm) -> `depth` blocks of
  width `dim` (`blocks.{k}`) -> mean -> LayerNorm -> head. Layer scale is off by default
  (the released S and B models have none).
  """

  depth: int = 18
  dim: int = 384
  patch_size: int = 16
  layer_scale_init_value: float | None = 0.0

  @nn.compact
  def __call__(self, x, train: bool = False, output: str = 'logits'):
    check_output(output)
    rates = layers.drop_path_rates(self.drop_path_rate, self.depth)
    x = jnp.asarray(x, self.dtype)
    x = nn.Conv(
        self.dim,
        (self.patch_size, self.patch_size),
        strides=(self.patch_size, self.patch_size),
        padding='VALID',
        kernel_init=layers.dense_init,
        dtype=self.dtype,
        param_dtype=self.param_dtype,
        name='stem',
    )(x)
    x = _blocks(self, x, train, self.dim, [f'blocks.{k}' for k in range(self.depth)], rates)
    if output == 'stages':
      return (x,)
    return classifier_head(self, x, output)
