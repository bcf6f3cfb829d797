"""FCMAE: ConvNeXt-V2's fully convolutional masked autoencoder (Woo et al. 2023), dense.

The official pre-training code runs its encoder with MinkowskiEngine's sparse convolutions
over the visible 32-px cells only. Here the encoder is the ordinary ConvNeXt-V2 backbone
(`convnext.ConvNeXt`, same parameter names and shapes as `convnextv2_<size>`, so a
pre-trained encoder fine-tunes and converts like any V2 model) run on dense maps with the
mask applied where it changes anything: the stem runs dense, and every map is zeroed at the
masked sites after the stem, after each downsampling conv and at the end of each block's
residual branch, and GRN's statistics are taken over the visible sites only (`Block`). A
masked site therefore never influences a visible one: the depthwise convs read zeros there,
as a submanifold sparse conv reads nothing, LayerNorm and the linears act per site, and a
2x2 downsampling window lies wholly inside one cell.

GRN under masking: the official `MinkowskiGRN` takes its L2 norm over the visible sites of
the whole batch (ConvNeXt-V2 issue #86), unlike the dense GRN's per image. Here it is per
image over the visible sites: the statistics the same weights see when fine-tuned, what the
released (JAX-trained) weights were made with by the authors' account, and the only choice
under which an image's result does not depend on the rest of its batch (or on how the batch
is split over devices).

Decoder, as the official code: `proj` (1x1 conv, dims[-1] -> decoder_dim), the mask token
blended in at masked cells, `decoder_depth` dense V2 blocks (`decoder.{k}`), `pred` (1x1 conv
to patch_size^2 * 3 values per cell). Loss: the masked cells' mean squared error against the
image patchified in (row, column, channel) order, each patch normalised by its own mean and
unbiased variance (`norm_pix_loss`).

Parameters: {'encoder': the backbone's tree, 'proj', 'mask_token' (1, 1, 1, decoder_dim),
'decoder.0', ..., 'pred'}, the official checkpoint's names ('encoder.', 'proj.',
'mask_token', 'decoder.0.', 'pred.').
"""

from collections.abc import Sequence
import functools

import flax.linen as nn
from flax.typing import Dtype
import jax
import jax.numpy as jnp
import numpy as np

from convnext_jax.models import layers
from convnext_jax.models.convnext import Block
from convnext_jax.models.convnext import ConvNeXt


def num_kept(num_patches: int, mask_ratio: float) -> int:
  """Cells left visible per image: int(L * (1 - ratio)), as the official code counts them."""
  return int(num_patches * (1 - mask_ratio))


def random_mask(key, batch: int, grid: tuple[int, int], mask_ratio: float) -> jax.Array:
  """(batch, h, w) float32 masks, 1 = removed: per image, the `num_kept` cells of lowest
  Gaussian noise stay visible (the official code's argsort of noise), the rest are removed."""
  h, w = grid
  keep = num_kept(h * w, mask_ratio)
  noise = jax.random.normal(key, (batch, h * w), jnp.float32)
  rank = jnp.argsort(jnp.argsort(noise, axis=1), axis=1)
  return (rank >= keep).astype(jnp.float32).reshape(batch, h, w)


def patchify(images: jax.Array, patch_size: int) -> jax.Array:
  """(N, H, W, C) -> (N, L, p * p * C): patches in row-major order, each a vector in
  (row, column, channel) order (the official `'nchpwq->nhwpqc'`)."""
  n, height, width, channels = images.shape
  p = patch_size
  x = images.reshape(n, height // p, p, width // p, p, channels)
  x = x.transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(n, (height // p) * (width // p), p * p * channels)


def unpatchify(patches: jax.Array, patch_size: int, grid: tuple[int, int]) -> jax.Array:
  """The inverse of `patchify`: (N, h * w, p * p * C) -> (N, h * p, w * p, C)."""
  n = patches.shape[0]
  h, w = grid
  p = patch_size
  channels = patches.shape[-1] // (p * p)
  x = patches.reshape(n, h, w, p, p, channels).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(n, h * p, w * p, channels)


def pixel_targets(images: jax.Array, patch_size: int, norm_pix_loss: bool = True) -> jax.Array:
  """(N, L, p * p * C) float32 regression targets: the patches, normalised per patch by
  their mean and unbiased variance (+ 1e-6) when `norm_pix_loss`."""
  target = patchify(images.astype(jnp.float32), patch_size)
  if norm_pix_loss:
    mean = target.mean(axis=-1, keepdims=True)
    var = target.var(axis=-1, keepdims=True, ddof=1)
    target = (target - mean) / jnp.sqrt(var + 1e-6)
  return target


def masked_loss(pred: jax.Array, target: jax.Array, mask: jax.Array) -> jax.Array:
  """Mean over the removed patches (mask 1) of each patch's mean squared error."""
  per_patch = jnp.mean(jnp.square(pred - target), axis=-1)
  mask = mask.reshape(per_patch.shape)
  return jnp.sum(per_patch * mask) / jnp.sum(mask)


class FCMAE(nn.Module):
  """ConvNeXt-V2 masked autoencoder: masked encoder, one-block decoder, pixel prediction.

  Attributes:
    depths, dims: the encoder's stages (a `convnextv2_<size>` backbone's).
    decoder_dim: channels of the decoder (512).
    decoder_depth: decoder blocks (1).
    mask_ratio: share of each image's cells removed (0.6: 30 of 49 at 224 px).
    norm_pix_loss: regress per-patch normalised pixels.
    drop_path_rate: the encoder's stochastic depth (the decoder has none).
    layer_scale_init_value, use_grn, norm_eps: the encoder's blocks (V2: none, True, 1e-6).
    init_scheme: 'fcmae' (what the official pre-training code initialises, see
      `convnext.INIT_SCHEMES`; the default) or 'zoo' (trunc normal std 0.02 throughout, as
      the V2 classifiers).
    remat, scan, depthwise_impl, dtype, param_dtype: as `convnext.ConvNeXtBase`'s.
  """

  depths: Sequence[int] = (3, 3, 9, 3)
  dims: Sequence[int] = (96, 192, 384, 768)
  decoder_dim: int = 512
  decoder_depth: int = 1
  mask_ratio: float = 0.6
  norm_pix_loss: bool = True
  drop_path_rate: float = 0.0
  layer_scale_init_value: float | None = None
  use_grn: bool = True
  norm_eps: float = 1e-6
  init_scheme: str = 'fcmae'
  remat: bool | str = False
  scan: bool = False
  depthwise_impl: str = 'auto'
  dtype: Dtype | None = jnp.float32
  param_dtype: Dtype = jnp.float32

  @property
  def patch_size(self) -> int:
    """Pixels per mask cell along each axis: the encoder's total stride (32)."""
    return 4 * 2 ** (len(self.depths) - 1)

  def grid(self, height: int, width: int) -> tuple[int, int]:
    """The mask grid of (height, width) images.

    Raises:
      ValueError: a side is not a multiple of `patch_size`.
    """
    p = self.patch_size
    if height % p or width % p:
      raise ValueError(
          f'FCMAE masks {p}x{p}-pixel cells: image size {height}x{width} must be a multiple '
          f'of {p} on both sides (e.g. {max(p, height // p * p)})'
      )
    return height // p, width // p

  @nn.compact
  def __call__(self, images, train: bool = False, mask: jax.Array | None = None):
    """The masked autoencoder on (N, H, W, 3) normalised images.

    Args:
      images: the (normalised) images, H and W multiples of `patch_size`.
      train: training mode (the encoder's drop path).
      mask: (N, H / p, W / p), 1 = removed; None draws one per image from the 'mask' rng
        stream (`random_mask`, `mask_ratio`).

    Returns:
      {'loss': the scalar float32 loss, 'pred': (N, L, p * p * 3) float32 predictions,
      'mask': (N, h, w) float32 mask used, 'features': the encoder's last stage map
      (N, h, w, dims[-1]), zero at masked cells}.
    """
    n, height, width = images.shape[:3]
    grid = self.grid(height, width)
    if mask is None:
      mask = random_mask(self.make_rng('mask'), n, grid, self.mask_ratio)
    elif mask.shape != (n, *grid):
      raise ValueError(f'mask of shape {mask.shape}; expected {(n, *grid)} for {images.shape}')
    mask = jnp.asarray(mask, jnp.float32)
    encoder = ConvNeXt(
        num_classes=0,
        depths=self.depths,
        dims=self.dims,
        drop_path_rate=self.drop_path_rate,
        layer_scale_init_value=self.layer_scale_init_value,
        use_grn=self.use_grn,
        norm_eps=self.norm_eps,
        init_scheme=self.init_scheme,
        remat=self.remat,
        scan=self.scan,
        depthwise_impl=self.depthwise_impl,
        dtype=self.dtype,
        param_dtype=self.param_dtype,
        name='encoder',
    )
    features = encoder(images, train, output='stages', mask=mask)[-1]

    conv = functools.partial(
        nn.Conv,
        kernel_size=(1, 1),
        kernel_init=(
            layers.trunc_normal_init(1.0) if self.init_scheme == 'fcmae' else layers.dense_init
        ),
        dtype=self.dtype,
        param_dtype=self.param_dtype,
    )
    x = conv(self.decoder_dim, name='proj')(features)
    token = self.param(
        'mask_token',
        nn.initializers.normal(0.02),
        (1, 1, 1, self.decoder_dim),
        self.param_dtype,
    )
    m = mask[..., None].astype(x.dtype)
    x = x * (1 - m) + token.astype(x.dtype) * m
    for k in range(self.decoder_depth):
      x = Block(
          self.decoder_dim,
          layer_scale_init_value=None,
          use_grn=True,
          norm_eps=1e-6,
          depthwise_impl=self.depthwise_impl,
          init_scheme='fcmae_decoder' if self.init_scheme == 'fcmae' else 'zoo',
          dtype=self.dtype,
          param_dtype=self.param_dtype,
          name=f'decoder.{k}',
      )(x, train)
    pred = conv(self.patch_size**2 * images.shape[-1], name='pred')(x)
    pred = pred.reshape(n, grid[0] * grid[1], -1).astype(jnp.float32)
    target = pixel_targets(images, self.patch_size, self.norm_pix_loss)
    return {
        'loss': masked_loss(pred, target, mask),
        'pred': pred,
        'mask': mask,
        'features': features,
    }


def reconstruction_grid(
    images: np.ndarray,
    pred: np.ndarray,
    mask: np.ndarray,
    patch_size: int,
    norm_pix_loss: bool = True,
    count: int = 4,
) -> np.ndarray:
  """A uint8 picture of `count` examples, one row each: the image, the image with its removed
  cells grey, the reconstruction (visible cells from the image, removed ones predicted) and
  the prediction alone, as MAE users look at progress.

  Args:
    images: (N, H, W, 3) the images as the model saw them (normalised).
    pred: (N, L, p * p * 3) the model's predictions.
    mask: (N, h, w), 1 = removed.
    patch_size: p.
    norm_pix_loss: whether `pred` is per-patch normalised pixels; each predicted patch is
      then mapped back with the mean and standard deviation of the image's own patch, as the
      MAE visualisations do.
    count: examples shown (at most N).

  Returns:
    (count * H, 4 * W, 3) uint8.
  """
  images = np.asarray(images, np.float32)[:count]
  pred = np.asarray(pred, np.float32)[:count]
  mask = np.asarray(mask, np.float32)[:count]
  n, height, width, _ = images.shape
  grid = (height // patch_size, width // patch_size)
  if norm_pix_loss:
    patches = np.asarray(patchify(jnp.asarray(images), patch_size))
    mean = patches.mean(axis=-1, keepdims=True)
    std = np.sqrt(patches.var(axis=-1, keepdims=True, ddof=1) + 1e-6)
    pred = pred * std + mean
  predicted = np.asarray(unpatchify(jnp.asarray(pred), patch_size, grid))
  removed = np.repeat(np.repeat(mask, patch_size, axis=1), patch_size, axis=2)[..., None]
  low, high = images.min(), images.max()

  def to_uint8(x: np.ndarray) -> np.ndarray:
    return (np.clip((x - low) / max(high - low, 1e-6), 0, 1) * 255).round().astype(np.uint8)

  grey = np.full_like(images, (low + high) / 2)
  columns = [
      images,
      images * (1 - removed) + grey * removed,
      images * (1 - removed) + predicted * removed,
      predicted,
  ]
  rows = np.concatenate([to_uint8(c) for c in columns], axis=2)  # (n, H, 4W, 3)
  return rows.reshape(n * height, 4 * width, 3)
