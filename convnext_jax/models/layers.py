"""Building blocks shared by the ConvNeXt and roadmap models: depthwise conv, LayerNorm,
BatchNorm, GRN, drop path and its rates, inits.

Everything here is written NHWC (channels last), the layout XLA prefers on TPU and GPU.
"""

from collections.abc import Callable
import functools

import flax.linen as nn
from flax.typing import Dtype
import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

# The official code initialises weights with timm's `trunc_normal_(w, std=.02)`, whose bounds
# a=-2, b=2 are absolute values, not multiples of std: N(0, 0.02^2) cut at +-100 std, in effect
# an untruncated normal. (Sampling it by inverse CDF in float32, as both torch and
# `jax.random.truncated_normal` do, maps uniforms that round to +-1 onto the +-2 bounds, leaving
# rare spikes at +-2; sampling the normal and clipping gives the intended distribution.)
_INIT_STD = 0.02
_INIT_BOUND = 2.0


def dense_init(key, shape, dtype=jnp.float32):
  """Conv and linear weight init of the official ConvNeXt code: N(0, 0.02^2) within +-2."""
  normal = jax.random.normal(key, shape, jnp.float32) * _INIT_STD
  return jnp.clip(normal, -_INIT_BOUND, _INIT_BOUND).astype(dtype)


def trunc_normal_init(std: float, bound: float = _INIT_BOUND):
  """timm's `trunc_normal_(w, std=std)`: N(0, std^2) cut at +-`bound` (absolute, as timm's a
  and b are). Far bounds (the zoo's std 0.02: +-100 std) are `dense_init`'s clipped normal;
  near ones (FCMAE's std 1.0: +-2 std) a truncated normal."""
  if std == _INIT_STD and bound == _INIT_BOUND:
    return dense_init
  if bound / std > 6:

    def clipped(key, shape, dtype=jnp.float32):
      normal = jax.random.normal(key, shape, jnp.float32) * std
      return jnp.clip(normal, -bound, bound).astype(dtype)

    return clipped

  def truncated(key, shape, dtype=jnp.float32):
    unit = jax.random.truncated_normal(key, -bound / std, bound / std, shape, jnp.float32)
    return (unit * std).astype(dtype)

  return truncated


def torch_default_init(fan_in: int):
  """PyTorch's default init of an `nn.Linear` weight (and bias) with `fan_in` inputs:
  U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (kaiming_uniform with a = sqrt(5))."""
  bound = 1.0 / float(np.sqrt(fan_in))

  def uniform(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, jnp.float32, -bound, bound).astype(dtype)

  return uniform


def scaled_init(init, scale: float):
  """Returns `init` multiplied by `scale` (used for `head_init_scale`)."""
  if scale == 1.0:
    return init

  def scaled(key, shape, dtype=jnp.float32):
    return init(key, shape, dtype) * jnp.asarray(scale, dtype)

  return scaled


def _depthwise_lax_conv(x, kernel, padding, stride=1):
  return lax.conv_general_dilated(
      x,
      kernel,
      window_strides=(stride, stride),
      padding=((padding, padding), (padding, padding)),
      dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
      feature_group_count=x.shape[-1],
  )


def _taps(size: int, k: int, lo: int, hi: int, stride: int) -> tuple[int, int, int, int]:
  """The taps of a `k`-tap kernel (along one axis) that can read the input in a correlation
  of `size` elements padded by `lo` and `hi`, with `stride`: (first, last, lo', hi'), where
  taps first..last read it and `lo'`, `hi'` (negative: a crop) are the padding that the
  correlation with just those taps reads. Every other tap reads padding only, so its terms
  are zeros: on a map smaller than the kernel (a 7x7 kernel on the last stage's 2x2 map at
  64 px, or 1x1 at 32 px) they are most of the work, forward and backward."""
  out = (size + lo + hi - k) // stride + 1
  first = max(0, lo - stride * (out - 1))  # Its last output reads row >= 0.
  last = min(k - 1, size - 1 + lo)  # Its first output reads row <= size - 1.
  if first > last:  # No tap reaches the input: keep them all (the output is zeros anyway).
    first, last = 0, k - 1
  return first, last, lo - first, stride * (out - 1) + last - lo - (size - 1)


def _pad(x, rows: tuple[int, int], cols: tuple[int, int], interior: int = 0):
  """x (N, H, W, C) zero-padded (negative: cropped) by `rows` and `cols`, with `interior`
  zeros between neighbouring rows and columns."""
  return lax.pad(
      x,
      jnp.zeros((), x.dtype),
      ((0, 0, 0), (*rows, interior), (*cols, interior), (0, 0, 0)),
  )


def _shifted_sum(x, kernel, rows: tuple[int, int], cols: tuple[int, int], stride: int = 1):
  """sum over the taps (i, j) of x padded by `rows` and `cols` and shifted by (i, j), times
  kernel[i, j, 0] per channel: the depthwise correlation, every `stride`-th output row and
  column. Only the taps that can read x are summed (`_taps`); the others add zeros."""
  kh, kw = kernel.shape[:2]
  i0, i1, top, bottom = _taps(x.shape[1], kh, *rows, stride)
  j0, j1, left, right = _taps(x.shape[2], kw, *cols, stride)
  h = (x.shape[1] + top + bottom - (i1 - i0 + 1)) // stride + 1
  w = (x.shape[2] + left + right - (j1 - j0 + 1)) // stride + 1
  xp = _pad(x, (top, bottom), (left, right))
  out = None
  for i in range(i0, i1 + 1):
    row = xp[:, i - i0 : i - i0 + stride * (h - 1) + 1 : stride]
    for j in range(j0, j1 + 1):
      term = row[:, :, j - j0 : j - j0 + stride * (w - 1) + 1 : stride] * kernel[i, j, 0]
      out = term if out is None else out + term
  return out


def _fusion_boundary(x):
  """`x` unchanged, as a boundary XLA:CPU's YNNPACK library fusions stop at.

  Such a fusion grows from a reduction (the following LayerNorm's, or a sum over the batch)
  through the elementwise ops that produce its input, and it takes the kh*kw shifted slices
  feeding a depthwise sum as separate materialised inputs: several times the work of XLA's
  own single fused loop over them. `reduce_precision` to the dtype's own precision is an exact
  identity (NaN and inf included) that those fusions do not accept and that XLA keeps, so
  XLA fuses the shifted sum into one loop on its side of it. (`lax.optimization_barrier` does
  not do this: XLA:CPU removes barriers before fusion.)
  """
  info = jnp.finfo(x.dtype)
  return lax.reduce_precision(x, info.nexp, info.nmant)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _depthwise_shifted_sum(x, kernel, padding, stride):
  """Depthwise conv as a sum of kh*kw shifted copies of x, each scaled per channel.

  The arithmetic is that of the grouped convolution (up to the order of the additions). The
  hand-written backward pass keeps both gradients in fused elementwise form
  (`_depthwise_backward`); autodiff of the kh*kw slices instead builds a much larger backward
  program, slower both to compile and to run.
  """
  return _depthwise_forward(x, kernel, padding, stride)[0]


def _depthwise_forward(x, kernel, padding, stride):
  pads = (padding, padding)
  return _fusion_boundary(_shifted_sum(x, kernel, pads, pads, stride)), (x, kernel)


def _kernel_gradient(x, dy, kernel_shape, padding: int, stride: int):
  """dkernel[i, j, c] = sum over n, h, w of xp[n, s*h + i, s*w + j, c] * dy[n, h, w, c].

  Written as kh*kw separate reductions (one per kernel tap, each reading x and dy whole), this
  costs about 20x the forward pass on XLA:CPU. Here the sum along each output row (and over
  `rows` consecutive rows, so that every output sums about kh*kw products, as the forward's
  do) is a sum of shifted slices: one elementwise fusion per kernel row i whose output
  partial[n, block, j, c] holds every column tap j at once, computed while those rows of x and
  dy are in cache. Only the partial sums, about the size of x or less, are then reduced over
  the batch and the row blocks. Products and sums run in float32 whatever the compute dtype.
  Taps that read padding only (`_taps`) have a zero gradient and are not computed.
  """
  kh, kw = kernel_shape[:2]
  ho, wo = dy.shape[1:3]
  i0, i1, top, bottom = _taps(x.shape[1], kh, padding, padding, stride)
  j0, j1, left, right = _taps(x.shape[2], kw, padding, padding, stride)
  rows = max(1, min(ho, -(-(kh * kw) // wo)))
  blocks = -(-ho // rows)
  # Zero rows of dy up to whole blocks, and as many rows of x as those read.
  dy = jnp.pad(dy.astype(jnp.float32), ((0, 0), (0, blocks * rows - ho), (0, 0), (0, 0)))
  short = max(0, stride * (blocks * rows - 1) + i1 - i0 + 1 - (x.shape[1] + top + bottom))
  xp = _pad(x.astype(jnp.float32), (top, bottom + short), (left, right))
  step = stride * rows  # Between the first x rows of consecutive blocks.
  partials = []
  for i in range(i1 - i0 + 1):
    partial = None
    for r in range(rows):
      start = stride * r + i
      x_rows = xp[:, start : start + step * (blocks - 1) + 1 : step]
      dy_rows = dy[:, r : r + rows * (blocks - 1) + 1 : rows]
      for t in range(wo):
        term = x_rows[:, :, stride * t : stride * t + j1 - j0 + 1] * dy_rows[:, :, t : t + 1]
        partial = term if partial is None else partial + term
    partials.append(_fusion_boundary(partial))  # (n, blocks, taps j0..j1, channels)
  taps = jnp.stack(partials, axis=2).sum(axis=(0, 1))  # (taps i0..i1, taps j0..j1, channels)
  return jnp.pad(taps, ((i0, kh - 1 - i1), (j0, kw - 1 - j1), (0, 0))).reshape(kernel_shape)


def _depthwise_backward(padding, stride, residuals, dy):
  x, kernel = residuals
  kh, kw = kernel.shape[:2]
  ho, wo = dy.shape[1:3]
  with jax.named_scope('depthwise_backward'):  # Custom VJPs run under the forward's names.
    # dx is the correlation of dy, dilated by the stride, with the flipped kernel: dy padded
    # so that row a of dx reads dy rows (a + padding - i) / stride.
    dilated = dy if stride == 1 else _pad(dy, (0, 0), (0, 0), interior=stride - 1)
    rows = (kh - 1 - padding, x.shape[1] + padding - 1 - stride * (ho - 1))
    cols = (kw - 1 - padding, x.shape[2] + padding - 1 - stride * (wo - 1))
    dx = _fusion_boundary(_shifted_sum(dilated, kernel[::-1, ::-1], rows, cols))
    dkernel = _kernel_gradient(x, dy, kernel.shape, padding, stride)
  return dx, dkernel.astype(kernel.dtype)


_depthwise_shifted_sum.defvjp(_depthwise_forward, _depthwise_backward)


def depthwise_conv2d(x, kernel, padding: int, impl: str = 'auto', stride: int = 1):
  """Depthwise 2-D convolution of NHWC `x` with an HWIO kernel of shape (kh, kw, 1, C).

  Why two implementations: XLA:CPU lowers a grouped convolution (`feature_group_count=C`)
  to a slow generic loop, many times slower than the kh*kw fused shifted multiply-adds
  (docs/benchmarks.md has the figures). On GPU (cuDNN) and TPU the grouped convolution is the
  fast, native path.
  `impl='auto'` picks per backend at lowering time (`lax.platform_dependent`), so one jitted
  function is right wherever it is compiled. Both are exact to float32 rounding, strided or
  not, with both gradients.

  Args:
    x: (N, H, W, C) input.
    kernel: (kh, kw, 1, C) depthwise kernel.
    padding: symmetric spatial zero padding.
    impl: 'auto', 'conv' (grouped lax convolution) or 'shift' (shifted multiply-adds).
    stride: spatial stride.

  Returns:
    The (N, (H + 2 * padding - kh) // stride + 1, (W + ...) // stride + 1, C) output.
  """

  def conv(x, k):
    return _depthwise_lax_conv(x, k, padding, stride)

  def shift(x, k):
    return _depthwise_shifted_sum(x, k, padding, stride)

  if impl == 'conv':
    return conv(x, kernel)
  if impl == 'shift':
    return shift(x, kernel)
  if impl != 'auto':
    raise ValueError(f"depthwise_impl must be 'auto', 'conv' or 'shift', got {impl!r}")
  return lax.platform_dependent(x, kernel, cpu=shift, default=conv)


class DepthwiseConv(nn.Module):
  """Depthwise conv (`depthwise_conv2d`), 'same' padding for odd kernels; params `kernel`
  (kh, kw, 1, C) and `bias` (C,) like `nn.Conv`."""

  kernel_size: int = 7
  impl: str = 'auto'
  stride: int = 1
  use_bias: bool = True
  kernel_init: Callable[..., jax.Array] = dense_init
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    channels = x.shape[-1]
    kernel = self.param(
        'kernel',
        self.kernel_init,
        (self.kernel_size, self.kernel_size, 1, channels),
        self.param_dtype,
    )
    x, kernel = nn.dtypes.promote_dtype(x, kernel, dtype=self.dtype)
    y = depthwise_conv2d(x, kernel, self.kernel_size // 2, self.impl, self.stride)
    if self.use_bias:
      bias = self.param('bias', nn.initializers.zeros, (channels,), self.param_dtype)
      y = y + jnp.asarray(bias, y.dtype)
    return y


_SQRT_HALF = 0.7071067811865476  # 1 / sqrt(2)
_INV_SQRT_2PI = 0.3989422804014327  # 1 / sqrt(2 pi)


def gelu(x):
  """Exact (erf) GELU, x * Phi(x), written as PyTorch's `F.gelu` computes it:
  0.5 * x * (1 + erf(x / sqrt(2))).

  `nn.gelu(approximate=False)` writes the same function with erfc, which XLA expands into two
  polynomial branches and a select: about twice the forward cost on XLA:CPU, and autodiff then
  differentiates that expansion. The backward pass here is the closed form
  dy * (Phi(x) + x * phi(x)) from the saved input (`jax.custom_vjp`), one fused elementwise
  pass, and the forward pass computes nothing for it. Both agree with PyTorch to float
  rounding.
  """
  with jax.named_scope('gelu'):
    return _gelu(x)


@jax.custom_vjp
def _gelu(x):
  return 0.5 * x * (1 + lax.erf(x * jnp.asarray(_SQRT_HALF, x.dtype)))


def _gelu_forward(x):
  return _gelu(x), x


def _gelu_backward(x, dy):
  cdf = 0.5 * (1 + lax.erf(x * jnp.asarray(_SQRT_HALF, x.dtype)))
  pdf = jnp.exp(-0.5 * x * x) * jnp.asarray(_INV_SQRT_2PI, x.dtype)
  return ((cdf + x * pdf) * dy,)


_gelu.defvjp(_gelu_forward, _gelu_backward)


class GlobalResponseNorm(nn.Module):
  """ConvNeXt-V2 Global Response Normalization over NHWC maps.

  gx = L2 norm over (H, W) per channel; nx = gx / (mean_c gx + eps);
  out = gamma * (x * nx) + beta + x, with gamma and beta zero-initialised (identity at init).
  """

  eps: float = 1e-6
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    channels = x.shape[-1]
    gamma = self.param('gamma', nn.initializers.zeros, (channels,), self.param_dtype)
    beta = self.param('beta', nn.initializers.zeros, (channels,), self.param_dtype)
    x, gamma, beta = nn.dtypes.promote_dtype(x, gamma, beta, dtype=self.dtype)
    # The spatial sum of squares runs in float32 even under bfloat16 compute: it sums H*W terms.
    x32 = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    squares = jnp.sum(jnp.square(x32), axis=(1, 2), keepdims=True)
    # A channel that is zero everywhere (exact zeros from GELU, or FCMAE's masked maps with
    # few visible sites) has norm 0, where sqrt's derivative is infinite: its gradient is
    # taken as 0 there, as PyTorch's `vector_norm` takes it, instead of NaN.
    nonzero = squares > 0
    gx = jnp.where(nonzero, jnp.sqrt(jnp.where(nonzero, squares, 1.0)), 0.0)
    nx = gx / (jnp.mean(gx, axis=-1, keepdims=True) + self.eps)
    return gamma * (x * nx.astype(x.dtype)) + beta + x


class BatchNorm(nn.Module):
  """BatchNorm over NHWC maps as PyTorch's `BatchNorm2d` computes it, with statistics groups.

  Training normalises each group of `group_size` consecutive examples with its own mean and
  biased variance (over the group's examples and positions), as every replica of PyTorch
  DDP without SyncBN does with its per-GPU batch; None takes the whole batch as one group. The
  running averages follow PyTorch's convention: running = (1 - momentum) * running +
  momentum * batch statistic, with the *unbiased* variance (n / (n - 1)), each group's
  statistics averaged over the groups (DDP keeps rank 0's; the average is what every
  replica would agree on). Evaluation normalises with the running averages.

  Variables: params `scale` (init 1, or 0 with `zero_init`), `bias`; batch_stats `mean`,
  `var` (the names flax's own BatchNorm uses; conversion maps them to running_mean/var).
  """

  momentum: float = 0.1
  epsilon: float = 1e-5
  group_size: int | None = None
  zero_init: bool = False
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    channels = x.shape[-1]
    scale = self.param(
        'scale',
        nn.initializers.zeros if self.zero_init else nn.initializers.ones,
        (channels,),
        self.param_dtype,
    )
    bias = self.param('bias', nn.initializers.zeros, (channels,), self.param_dtype)
    running_mean = self.variable('batch_stats', 'mean', jnp.zeros, (channels,), jnp.float32)
    running_var = self.variable('batch_stats', 'var', jnp.ones, (channels,), jnp.float32)
    dtype = self.dtype or jnp.result_type(x, scale)
    x32 = x.astype(jnp.float32)
    if not train:
      mean, var = running_mean.value, running_var.value
    else:
      n = x.shape[0]
      group = n if self.group_size is None else self.group_size
      if group < 1 or n % group:
        raise ValueError(
            f'BatchNorm: statistics groups of {group} examples do not divide the batch of '
            f'{n}; give a positive divisor, or None for the whole batch'
        )
      grouped = x32.reshape((n // group, group) + x.shape[1:])
      axes = tuple(range(1, grouped.ndim - 1))
      # Two passes (E[(x - mean)^2]), as PyTorch computes it.
      mean = jnp.mean(grouped, axis=axes, keepdims=True)
      var = jnp.mean(jnp.square(grouped - mean), axis=axes, keepdims=True)
      if not self.is_initializing():
        count = grouped.size // (grouped.shape[0] * channels)
        unbiased = var * (count / max(count - 1, 1))
        m = self.momentum
        running_mean.value = (1 - m) * running_mean.value + m * jnp.mean(
            mean, axis=tuple(range(mean.ndim - 1))
        )
        running_var.value = (1 - m) * running_var.value + m * jnp.mean(
            unbiased, axis=tuple(range(var.ndim - 1))
        )
      y = (grouped - mean) * jax.lax.rsqrt(var + self.epsilon)
      y = y.reshape(x.shape)
      return (y * scale + bias).astype(dtype)
    y = (x32 - mean) * jax.lax.rsqrt(var + self.epsilon)
    return (y * scale + bias).astype(dtype)


def layer_norm(eps: float, dtype: Dtype | None, param_dtype: Dtype, name: str) -> nn.LayerNorm:
  """ConvNeXt's LayerNorm over the channels (last axis), with a two-pass variance.

  The variance is E[(x - mean)^2], as PyTorch computes it: the fast E[x^2] - mean^2 form
  loses precision when |mean| >> std, which ConvNeXt's stem activations do reach.

  Args:
    eps: added to the variance.
    dtype: compute dtype; None follows the inputs and params.
    param_dtype: dtype of `scale` and `bias`.
    name: the submodule's name (e.g. 'norm', 'downsample_layers.1.0').
  """
  return nn.LayerNorm(
      epsilon=eps, use_fast_variance=False, dtype=dtype, param_dtype=param_dtype, name=name
  )


def drop_path_rates(drop_path_rate: float, num_blocks: int) -> list[float]:
  """Stochastic-depth rates of `num_blocks` blocks in order: linear from 0 (first block) to
  `drop_path_rate` (last block), as the official ConvNeXt code spaces them."""
  return [float(r) for r in np.linspace(0.0, drop_path_rate, num_blocks)]


def drop_path(x, rate, rng) -> jax.Array:
  """Stochastic depth: zeroes whole samples with probability `rate`, rescales survivors.

  `rate` is a Python float, or a traced scalar (a per-block rate scanned over by the
  `scan=True` models); either way a rate of 1 gives zeros, without 0/0 in the rescaling or
  its gradient.
  """
  shape = (x.shape[0],) + (1,) * (x.ndim - 1)
  if isinstance(rate, (int, float)):
    keep_prob = 1.0 - rate
    if keep_prob <= 0.0:  # Every sample dropped; avoids 0/0 in the rescaling.
      return jnp.zeros_like(x)
    mask = jax.random.bernoulli(rng, keep_prob, shape)
    return jnp.where(mask, x / jnp.asarray(keep_prob, x.dtype), jnp.zeros((), x.dtype))
  keep_prob = 1.0 - jnp.asarray(rate, jnp.float32)
  mask = jax.random.bernoulli(rng, keep_prob, shape)
  # At keep_prob 0 the mask is all False; dividing by 1 there keeps the unselected branch,
  # and so the gradient through `where`, finite.
  divisor = jnp.where(keep_prob > 0.0, keep_prob, 1.0).astype(x.dtype)
  return jnp.where(mask, x / divisor, jnp.zeros((), x.dtype))
