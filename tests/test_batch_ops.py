"""Device-side batch augmentation: normalisation, Random Erasing, Mixup/CutMix, smoothing."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from convnext_jax.data import batch_ops


def test_normalize_uses_imagenet_mean_and_std():
  images = np.array([[[[0, 128, 255]]]], np.uint8)
  out = np.asarray(batch_ops.normalize(images))
  expected = [(0 / 255 - 0.485) / 0.229, (128 / 255 - 0.456) / 0.224, (255 / 255 - 0.406) / 0.225]
  np.testing.assert_allclose(out[0, 0, 0], expected, rtol=1e-6)


def test_label_smoothing_values_are_exact():
  targets = np.asarray(batch_ops.smooth_one_hot(jnp.array([2, 0]), 5, 0.1))
  off, on = 0.1 / 5, 1 - 0.1 + 0.1 / 5
  np.testing.assert_allclose(targets, [[off, off, on, off, off], [on, off, off, off, off]],
                             rtol=1e-6)
  np.testing.assert_array_equal(batch_ops.smooth_one_hot(jnp.array([1]), 3), [[0, 1, 0]])


def _mix(seed, mixup_alpha=0.8, cutmix_alpha=1.0, batch=6, size=(16, 12), **kwargs):
  images = jnp.arange(batch * size[0] * size[1] * 3, dtype=jnp.float32).reshape(
      (batch,) + size + (3,))
  labels = jnp.arange(batch) % 4
  out = jax.jit(lambda k: batch_ops.mixup_cutmix(
      k, images, labels, 4, mixup_alpha=mixup_alpha, cutmix_alpha=cutmix_alpha, **kwargs))(
          jax.random.key(seed))
  return np.asarray(images), np.asarray(labels), [np.asarray(o) for o in out]


def test_mixup_mixes_with_the_reversed_batch():
  images, labels, (out, targets, lam) = _mix(0, cutmix_alpha=0.0, label_smoothing=0.0)
  assert 0 < lam < 1
  np.testing.assert_allclose(out, lam * images + (1 - lam) * images[::-1], rtol=1e-6)
  expected = lam * np.eye(4)[labels] + (1 - lam) * np.eye(4)[labels[::-1]]
  np.testing.assert_allclose(targets, expected, rtol=1e-6)


def test_cutmix_pastes_reversed_box_and_corrects_lambda():
  for seed in range(20):
    images, labels, (out, targets, lam) = _mix(seed, mixup_alpha=0.0, label_smoothing=0.1)
    pasted = np.all(out != images, axis=-1)  # Reversed images differ everywhere.
    rows, cols = np.nonzero(pasted[0])
    if rows.size:
      box = (rows.min(), rows.max() + 1, cols.min(), cols.max() + 1)
      area = (box[1] - box[0]) * (box[3] - box[2])
      assert rows.size == area  # A solid rectangle.
      assert lam == pytest.approx(1 - area / (16 * 12), abs=1e-6)
      window = (slice(None), slice(box[0], box[1]), slice(box[2], box[3]))
      np.testing.assert_array_equal(out[window], images[::-1][window])
    else:
      assert lam == 1.0
    # Every image of the batch gets the same box.
    assert np.all(pasted == pasted[0])
    smooth = 0.1 / 4 + (1 - 0.1) * np.eye(4)[labels]
    np.testing.assert_allclose(targets, lam * smooth + (1 - lam) * smooth[::-1], rtol=1e-5)
    np.testing.assert_allclose(targets.sum(axis=1), 1.0, rtol=1e-6)


def test_cutmix_box_follows_rand_bbox():
  # lam = 0.75: the box side is int(side * sqrt(0.25)) = half the side, centred at (cy, cx).
  key = jax.random.key(3)
  y_lo, y_hi, x_lo, x_hi = (int(v) for v in batch_ops.cutmix_box(key, 32, 20, 0.75))
  k_y, k_x = jax.random.split(key)
  cy = int(jax.random.randint(k_y, (), 0, 32))
  cx = int(jax.random.randint(k_x, (), 0, 20))
  assert (y_lo, y_hi) == (max(cy - 8, 0), min(cy + 8, 32))
  assert (x_lo, x_hi) == (max(cx - 5, 0), min(cx + 5, 20))


def test_lambda_distribution_and_switch_probability():
  keys = jax.random.split(jax.random.key(0), 4000)
  images = jnp.zeros((2, 8, 8, 3))
  labels = jnp.array([0, 1])

  def draw(k):
    return batch_ops.mixup_cutmix(k, images, labels, 2, correct_lam=False)[2]

  lams = np.asarray(jax.jit(jax.vmap(draw))(keys))
  # Mixture of Beta(0.8, 0.8) and Beta(1, 1), each with probability 1/2: mean 1/2 and
  # variance 1/2 * (1/(4*2.6)) + 1/2 * (1/12).
  assert lams.mean() == pytest.approx(0.5, abs=0.02)
  assert lams.var() == pytest.approx(0.5 / (4 * 2.6) + 0.5 / 12, rel=0.08)
  # Mixup only: Beta(0.8, 0.8).
  mix_only = np.asarray(jax.jit(jax.vmap(lambda k: batch_ops.mixup_cutmix(
      k, images, labels, 2, cutmix_alpha=0.0)[2]))(keys))
  assert mix_only.var() == pytest.approx(1 / (4 * 2.6), rel=0.08)
  # prob=0 never mixes.
  never = np.asarray(jax.vmap(lambda k: batch_ops.mixup_cutmix(
      k, images, labels, 2, prob=0.0)[2])(keys[:50]))
  np.testing.assert_array_equal(never, 1.0)


def test_per_device_draws_one_lambda_per_shard():
  images = jnp.broadcast_to(jnp.arange(8.0)[:, None, None, None], (8, 4, 4, 3))
  labels = jnp.arange(8) % 3
  fn = batch_ops.per_device(
      lambda k, x, y: batch_ops.mixup_cutmix(k, x, y, 3, cutmix_alpha=0.0,
                                             label_smoothing=0.0), num_shards=4)
  out, targets, lam = jax.jit(fn)(jax.random.key(1), images, labels)
  assert out.shape == (8, 4, 4, 3) and targets.shape == (8, 3) and lam.shape == (4,)
  assert len(set(np.asarray(lam).tolist())) == 4
  for d in range(4):  # Pairs are reversed within each shard of 2: (2d, 2d+1).
    a, b = 2 * d, 2 * d + 1
    np.testing.assert_allclose(out[a, 0, 0, 0], lam[d] * a + (1 - lam[d]) * b, rtol=1e-6)
    np.testing.assert_allclose(out[b, 0, 0, 0], lam[d] * b + (1 - lam[d]) * a, rtol=1e-6)


def test_random_erasing_boxes_and_noise():
  n, h, w = 2000, 32, 24
  images = jnp.full((n, h, w, 3), 7.0)
  out = np.asarray(jax.jit(lambda k: batch_ops.random_erasing(k, images))(jax.random.key(0)))
  erased = np.any(out != 7.0, axis=-1)
  has_box = erased.any(axis=(1, 2))
  assert has_box.mean() == pytest.approx(0.25, abs=0.03)
  areas = []
  for i in np.nonzero(has_box)[0][:200]:
    rows, cols = np.nonzero(erased[i])
    box_h, box_w = rows.max() - rows.min() + 1, cols.max() - cols.min() + 1
    assert rows.size == box_h * box_w  # A solid rectangle (noise is never exactly 7).
    assert box_h < h and box_w < w
    areas.append(box_h * box_w / (h * w))
    aspect = box_h / box_w
    assert 0.3 * 0.7 < aspect < (1 / 0.3) / 0.7  # log-uniform in [0.3, 1/0.3], then rounded.
  assert 0.02 * 0.7 < min(areas) and max(areas) < (1 / 3) * 1.3
  noise = out[erased.nonzero()[0], erased.nonzero()[1], erased.nonzero()[2]]
  assert noise.mean() == pytest.approx(0.0, abs=0.05)
  assert noise.std() == pytest.approx(1.0, abs=0.05)
  # Untouched pixels keep their values.
  assert np.all(out[~erased] == 7.0)


def test_random_erasing_prob_zero_is_identity():
  images = jax.random.normal(jax.random.key(0), (4, 8, 8, 3))
  np.testing.assert_array_equal(batch_ops.random_erasing(jax.random.key(1), images, prob=0.0),
                                images)
  assert math.isclose(batch_ops.IMAGENET_MEAN[0], 0.485)
