"""Batch augmentation on device, inside the jitted step: normalisation, Random Erasing,
Mixup/CutMix and label smoothing (timm semantics, as the official ConvNeXt recipe uses).

The host sends uint8 images (a quarter of the bytes of float32); everything here is JAX, so
it costs the input hosts nothing. Mixup/CutMix draws one lambda per per-device batch and
mixes each image with the same batch reversed, like timm's `Mixup(mode='batch')` running on
each GPU's own batch.
"""

import math

import jax
import jax.numpy as jnp

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def normalize(images, mean=IMAGENET_MEAN, std=IMAGENET_STD, dtype=jnp.float32):
  """uint8 (..., C) images -> (x / 255 - mean) / std in `dtype` (computed in float32)."""
  x = images.astype(jnp.float32) / 255.0
  x = (x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)
  return x.astype(dtype)


def smooth_one_hot(labels, num_classes: int, smoothing: float = 0.0):
  """One-hot targets with label smoothing folded in: on = 1 - s + s/K, off = s/K."""
  off = smoothing / num_classes
  on = 1.0 - smoothing + off
  return jax.nn.one_hot(labels, num_classes, dtype=jnp.float32) * (on - off) + off


def random_erasing(
    key,
    images,
    prob: float = 0.25,
    min_area: float = 0.02,
    max_area: float = 1 / 3,
    min_aspect: float = 0.3,
    attempts: int = 10,
):
  """timm's RandomErasing(mode='pixel', max_count=1) on a normalised (N, H, W, C) batch.

  Per image, with probability `prob`: up to `attempts` draws of an area fraction in
  [min_area, max_area] and a log-uniform aspect in [min_aspect, 1/min_aspect]; the first box
  strictly smaller than the image is placed uniformly and filled with N(0, 1) noise per pixel
  and channel. No box fits: the image is unchanged.
  """
  n, h, w, _ = images.shape
  k_apply, k_area, k_aspect, k_top, k_left, k_noise = jax.random.split(key, 6)
  area = h * w * jax.random.uniform(k_area, (n, attempts), minval=min_area, maxval=max_area)
  log_aspect = jax.random.uniform(
      k_aspect, (n, attempts), minval=math.log(min_aspect), maxval=-math.log(min_aspect)
  )
  aspect = jnp.exp(log_aspect)
  # Python's round() rounds half to even, as jnp.round does.
  box_h = jnp.round(jnp.sqrt(area * aspect)).astype(jnp.int32)
  box_w = jnp.round(jnp.sqrt(area / aspect)).astype(jnp.int32)
  fits = (box_w < w) & (box_h < h)
  first = jnp.argmax(fits, axis=1)
  box_h = jnp.take_along_axis(box_h, first[:, None], axis=1)[:, 0]
  box_w = jnp.take_along_axis(box_w, first[:, None], axis=1)[:, 0]
  erase = (jax.random.uniform(k_apply, (n,)) < prob) & jnp.any(fits, axis=1)
  # random.randint(0, H - h) is inclusive at both ends.
  top = jax.random.randint(k_top, (n,), 0, h - box_h + 1)
  left = jax.random.randint(k_left, (n,), 0, w - box_w + 1)
  rows = jnp.arange(h)[None, :, None]
  cols = jnp.arange(w)[None, None, :]
  inside = (
      (rows >= top[:, None, None])
      & (rows < (top + box_h)[:, None, None])
      & (cols >= left[:, None, None])
      & (cols < (left + box_w)[:, None, None])
  )
  mask = (inside & erase[:, None, None])[..., None]
  noise = jax.random.normal(k_noise, images.shape, images.dtype)
  return jnp.where(mask, noise, images)


def cutmix_box(key, height: int, width: int, lam):
  """timm's `rand_bbox`: a box of side sqrt(1 - lam) times the image's, centred at a
  uniform pixel, clipped to the image. Returns (y_lo, y_hi, x_lo, x_hi)."""
  ratio = jnp.sqrt(1.0 - lam)
  cut_h = jnp.floor(height * ratio).astype(jnp.int32)
  cut_w = jnp.floor(width * ratio).astype(jnp.int32)
  k_y, k_x = jax.random.split(key)
  cy = jax.random.randint(k_y, (), 0, height)
  cx = jax.random.randint(k_x, (), 0, width)
  y_lo = jnp.clip(cy - cut_h // 2, 0, height)
  y_hi = jnp.clip(cy + cut_h // 2, 0, height)
  x_lo = jnp.clip(cx - cut_w // 2, 0, width)
  x_hi = jnp.clip(cx + cut_w // 2, 0, width)
  return y_lo, y_hi, x_lo, x_hi


def mixup_cutmix(
    key,
    images,
    labels,
    num_classes: int,
    mixup_alpha: float = 0.8,
    cutmix_alpha: float = 1.0,
    prob: float = 1.0,
    switch_prob: float = 0.5,
    label_smoothing: float = 0.1,
    correct_lam: bool = True,
):
  """Mixup or CutMix of one per-device batch with itself reversed, and its soft targets.

  With probability `prob` the batch is mixed: CutMix with probability `switch_prob` (when
  both alphas are positive) with lambda ~ Beta(cutmix_alpha, cutmix_alpha) and the box's
  clipped area correcting lambda, else Mixup with lambda ~ Beta(mixup_alpha, mixup_alpha).
  Targets are lam * smooth(y) + (1 - lam) * smooth(reversed y).

  Args:
    key: PRNG key for this batch.
    images: (B, H, W, C) float images of one device.
    labels: (B,) int labels.
    num_classes: K.
    mixup_alpha, cutmix_alpha: Beta parameters; 0 disables that kind of mixing.
    prob: probability of mixing this batch at all.
    switch_prob: probability of CutMix rather than Mixup when both are enabled.
    label_smoothing: folded into the targets.
    correct_lam: use the clipped box area for CutMix's lambda (timm's default).

  Returns:
    (mixed images, (B, K) float32 targets summing to 1, lam).
  """
  _, h, w, _ = images.shape
  k_apply, k_switch, k_cut, k_mix, k_box = jax.random.split(key, 5)
  apply = jax.random.uniform(k_apply) < prob
  if mixup_alpha > 0 and cutmix_alpha > 0:
    use_cutmix = jax.random.uniform(k_switch) < switch_prob
  else:
    use_cutmix = jnp.asarray(cutmix_alpha > 0)
  lam_cut = (
      jax.random.beta(k_cut, cutmix_alpha, cutmix_alpha) if cutmix_alpha > 0 else jnp.float32(1.0)
  )
  lam_mix = (
      jax.random.beta(k_mix, mixup_alpha, mixup_alpha) if mixup_alpha > 0 else jnp.float32(1.0)
  )
  lam = jnp.where(apply, jnp.where(use_cutmix, lam_cut, lam_mix), 1.0).astype(jnp.float32)

  flipped = images[::-1]
  y_lo, y_hi, x_lo, x_hi = cutmix_box(k_box, h, w, lam)
  rows = jnp.arange(h)[:, None]
  cols = jnp.arange(w)[None, :]
  box = (rows >= y_lo) & (rows < y_hi) & (cols >= x_lo) & (cols < x_hi)
  cut = jnp.where(box[None, :, :, None], flipped, images)
  mixed = lam.astype(images.dtype) * images + (1 - lam).astype(images.dtype) * flipped
  out = jnp.where(use_cutmix, cut, mixed)
  if correct_lam:
    box_area = (y_hi - y_lo) * (x_hi - x_lo)
    lam = jnp.where(use_cutmix, 1.0 - box_area / (h * w), lam).astype(jnp.float32)
  targets = smooth_one_hot(labels, num_classes, label_smoothing)
  targets = lam * targets + (1.0 - lam) * targets[::-1]
  return out, targets, lam


def per_device(fn, num_shards: int):
  """Applies `fn(key, *arrays)` to each of `num_shards` contiguous slices of the batch.

  The global batch is laid out with device d's examples at [d*B/D, (d+1)*B/D), so reshaping
  to (D, B/D, ...) and vmapping keeps every slice on its device and gives each device its
  own draw (one lambda per per-device batch), whatever the sharding.
  """

  def apply(key, *arrays):
    keys = jax.random.split(key, num_shards)
    split = [a.reshape((num_shards, a.shape[0] // num_shards) + a.shape[1:]) for a in arrays]
    outs = jax.vmap(fn)(keys, *split)
    return jax.tree.map(lambda o: o.reshape((-1,) + o.shape[2:]) if o.ndim >= 2 else o, outs)

  return apply
