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
  np.testing.assert_allclose(
      targets, [[off, off, on, off, off], [on, off, off, off, off]], rtol=1e-6
  )
  np.testing.assert_array_equal(batch_ops.smooth_one_hot(jnp.array([1]), 3), [[0, 1, 0]])


def _mix(seed, mixup_alpha=0.8, cutmix_alpha=1.0, batch=6, size=(16, 12), **kwargs):
  images = jnp.arange(batch * size[0] * size[1] * 3, dtype=jnp.float32).reshape(
      (batch,) + size + (3,)
  )
  labels = jnp.arange(batch) % 4
  out = jax.jit(
      lambda k: batch_ops.mixup_cutmix(
          k, images, labels, 4, mixup_alpha=mixup_alpha, cutmix_alpha=cutmix_alpha, **kwargs
      )
  )(jax.random.key(seed))
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


@pytest.mark.parametrize('lam', [0.75, 0.3])
def test_cutmix_box_follows_rand_bbox(lam):
  """timm's rand_bbox: sides int(side * sqrt(1 - lam)) (truncated: sqrt(0.7) is irrational),
  a centre uniform over every pixel, and +- half the side clipped to the image."""
  height, width = 32, 20
  cut_h, cut_w = int(height * math.sqrt(1 - lam)), int(width * math.sqrt(1 - lam))
  keys = jax.random.split(jax.random.key(3), 3000)
  boxes = np.asarray(
      jax.jit(jax.vmap(lambda k: jnp.stack(batch_ops.cutmix_box(k, height, width, lam))))(keys)
  )
  for (lo, hi), side, cut in (((0, 1), height, cut_h), ((2, 3), width, cut_w)):
    y_lo, y_hi = boxes[:, lo], boxes[:, hi]
    assert np.all((y_lo >= 0) & (y_lo <= y_hi) & (y_hi <= side))
    inside = (y_lo > 0) & (y_hi < side)
    np.testing.assert_array_equal((y_hi - y_lo)[inside], 2 * (cut // 2))
    # The centre, from whichever end was not clipped.
    centre = np.where(y_lo > 0, y_lo + cut // 2, y_hi - cut // 2)
    counts = np.bincount(centre, minlength=side)
    assert len(counts) == side and counts.min() > 0.6 * len(keys) / side
    assert counts.max() < 1.4 * len(keys) / side


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
  mix_only = np.asarray(
      jax.jit(
          jax.vmap(lambda k: batch_ops.mixup_cutmix(k, images, labels, 2, cutmix_alpha=0.0)[2])
      )(keys)
  )
  assert mix_only.var() == pytest.approx(1 / (4 * 2.6), rel=0.08)
  # prob=0 never mixes.
  never = np.asarray(
      jax.vmap(lambda k: batch_ops.mixup_cutmix(k, images, labels, 2, prob=0.0)[2])(keys[:50])
  )
  np.testing.assert_array_equal(never, 1.0)


@pytest.mark.parametrize('switch_prob', [0.5, 0.2])
def test_switch_probability_picks_cutmix_at_its_rate(switch_prob):
  """CutMix is seen in the output (every pixel 0 or 1 when a 0 image and a 1 image are
  cut together; a Mixup blend is neither): chosen with probability switch_prob."""
  keys = jax.random.split(jax.random.key(1), 4000)
  images = jnp.stack([jnp.zeros((8, 8, 3)), jnp.ones((8, 8, 3))])
  out = np.asarray(
      jax.jit(
          jax.vmap(
              lambda k: batch_ops.mixup_cutmix(
                  k, images, jnp.array([0, 1]), 2, switch_prob=switch_prob
              )[0]
          )
      )(keys)
  )
  cutmix = np.all((out == 0) | (out == 1), axis=(1, 2, 3, 4))
  # Binomial(4000, p): standard deviation under 0.008.
  assert cutmix.mean() == pytest.approx(switch_prob, abs=0.03)


def test_per_device_draws_one_lambda_per_shard():
  images = jnp.broadcast_to(jnp.arange(8.0)[:, None, None, None], (8, 4, 4, 3))
  labels = jnp.arange(8) % 3
  fn = batch_ops.per_device(
      lambda k, x, y: batch_ops.mixup_cutmix(k, x, y, 3, cutmix_alpha=0.0, label_smoothing=0.0),
      num_shards=4,
  )
  out, targets, lam = jax.jit(fn)(jax.random.key(1), images, labels)
  assert out.shape == (8, 4, 4, 3) and targets.shape == (8, 3) and lam.shape == (4,)
  assert len(set(np.asarray(lam).tolist())) == 4
  for d in range(4):  # Pairs are reversed within each shard of 2: (2d, 2d+1).
    a, b = 2 * d, 2 * d + 1
    np.testing.assert_allclose(out[a, 0, 0, 0], lam[d] * a + (1 - lam[d]) * b, rtol=1e-6)
    np.testing.assert_allclose(out[b, 0, 0, 0], lam[d] * b + (1 - lam[d]) * a, rtol=1e-6)


def _timm_erasing_boxes(
    rng, n, h, w, prob=0.25, area=(0.02, 1 / 3), aspect=(0.3, 1 / 0.3), attempts=10
):
  """timm's RandomErasing._erase (max_count 1) in numpy, per image: (top, left, h, w) of the
  erased box, or None when the image is skipped (probability) or no attempt fits."""
  boxes = []
  log_aspect = (math.log(aspect[0]), math.log(aspect[1]))
  for _ in range(n):
    box = None
    if rng.random() <= prob:
      for _ in range(attempts):
        target = rng.uniform(*area) * h * w
        ratio = math.exp(rng.uniform(*log_aspect))
        box_h = int(round(math.sqrt(target * ratio)))
        box_w = int(round(math.sqrt(target / ratio)))
        if box_w < w and box_h < h:
          box = (rng.integers(0, h - box_h + 1), rng.integers(0, w - box_w + 1), box_h, box_w)
          break
    boxes.append(box)
  return boxes


def _erased_boxes(out, fill):
  """(top, left, h, w) of each image's erased rectangle (pixels != fill), or None."""
  boxes = []
  for image in np.any(out != fill, axis=-1):
    rows, cols = np.nonzero(image)
    if not rows.size:
      boxes.append(None)
      continue
    box = (rows.min(), cols.min(), rows.max() - rows.min() + 1, cols.max() - cols.min() + 1)
    assert rows.size == box[2] * box[3]  # A solid rectangle (noise is never exactly `fill`).
    boxes.append(box)
  return boxes


def _box_statistics(boxes, h, w):
  found = np.array([b for b in boxes if b is not None], np.float64)
  top, left, box_h, box_w = found.T
  return {
      'applied': len(found) / len(boxes),
      'area q10, q50, q90': np.quantile(box_h * box_w / (h * w), [0.1, 0.5, 0.9]),
      'log aspect mean, std': np.array([np.log(box_h / box_w).mean(), np.log(box_h / box_w).std()]),
      'touches bottom, right': np.array([np.mean(top + box_h == h), np.mean(left + box_w == w)]),
  }


@pytest.mark.parametrize('h,w', [(32, 24), (64, 8)], ids=['32x24', '64x8_few_fit'])
def test_random_erasing_matches_timms_box_distribution(h, w):
  """Boxes, rates and placement as timm's `_erase` gives them; on a 64x8 image most draws do
  not fit, so the application rate depends on the 10 attempts."""
  n = 4000
  images = jnp.full((n, h, w, 3), 7.0)
  out = np.asarray(jax.jit(lambda k: batch_ops.random_erasing(k, images))(jax.random.key(0)))
  ours = _box_statistics(_erased_boxes(out, 7.0), h, w)
  timm = _box_statistics(_timm_erasing_boxes(np.random.default_rng(0), 40_000, h, w), h, w)
  tolerances = {
      'applied': 0.025,
      'area q10, q50, q90': 0.03,
      'log aspect mean, std': 0.08,
      'touches bottom, right': 0.05,
  }
  for name, tolerance in tolerances.items():
    np.testing.assert_allclose(ours[name], timm[name], atol=tolerance, err_msg=name)
  if w == 8:  # One attempt would erase 9% of the images instead of 25%.
    one_try = _timm_erasing_boxes(np.random.default_rng(1), 20_000, h, w, attempts=1)
    assert ours['applied'] - _box_statistics(one_try, h, w)['applied'] > 0.1


def test_random_erasing_fills_each_pixel_with_standard_normal_noise():
  n, h, w = 400, 32, 24
  images = jnp.full((n, h, w, 3), 7.0)
  out = np.asarray(
      jax.jit(lambda k: batch_ops.random_erasing(k, images, prob=1.0))(jax.random.key(2))
  )
  erased = np.any(out != 7.0, axis=-1)
  assert np.all(out[~erased] == 7.0)  # Untouched pixels keep their values.
  noise = out[erased]
  assert noise.mean() == pytest.approx(0.0, abs=0.02)
  assert noise.std() == pytest.approx(1.0, abs=0.02)
  # Per pixel and channel ('pixel' mode), not one colour per box ('rand') or per image.
  for i, box in enumerate(_erased_boxes(out, 7.0)[:50]):
    if box is not None and box[2] * box[3] >= 50:
      top, left, box_h, box_w = box
      values = out[i, top : top + box_h, left : left + box_w]
      assert values.reshape(-1, 3).std(axis=0).min() > 0.6
      assert abs(np.corrcoef(values[..., 0].ravel(), values[..., 1].ravel())[0, 1]) < 0.3


def test_random_erasing_prob_zero_is_identity():
  images = jax.random.normal(jax.random.key(0), (4, 8, 8, 3))
  np.testing.assert_array_equal(
      batch_ops.random_erasing(jax.random.key(1), images, prob=0.0), images
  )
