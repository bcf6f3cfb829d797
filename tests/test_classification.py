"""The classification objective's evaluation: top-1 / top-5 with hand-computed answers, down to
3-class datasets."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from convnext_jax import classification

# Four examples of a 3-class problem. Ranking per row (best first): [1, 2, 0], [0, 1, 2],
# [2, 0, 1], [2, 1, 0].
LOGITS = np.array(
    [[0.1, 2.0, 0.5], [3.0, 1.0, -1.0], [0.0, -2.0, 4.0], [-1.0, 0.0, 1.0]], np.float32
)
LABELS = np.array([1, 2, 0, 2], np.int32)
# By hand: row 0 label 1 is ranked first (hit); row 1 label 2 is last (miss); row 2 label 0
# is second (miss at top-1); row 3 label 2 is first (hit). Every label is in the top 3.
TOP1 = [1.0, 0.0, 0.0, 1.0]


def test_topk_correct_with_fewer_classes_than_k():
  np.testing.assert_array_equal(classification.topk_correct(LOGITS, LABELS, 1), TOP1)
  np.testing.assert_array_equal(classification.topk_correct(LOGITS, LABELS, 2), [1, 0, 1, 1])
  # timm's `accuracy` caps k at the class count: with 3 classes every label is in the top 5.
  np.testing.assert_array_equal(classification.topk_correct(LOGITS, LABELS, 5), [1, 1, 1, 1])
  # Multi-hot labels (ImageNet-ReaL style): row 1 accepts class 0 or 2, row 3 no class.
  multi_hot = np.array([[0, 1, 0], [1, 0, 1], [1, 0, 0], [0, 0, 0]], np.int32)
  np.testing.assert_array_equal(classification.topk_correct(LOGITS, multi_hot, 1), [1, 1, 0, 0])
  np.testing.assert_array_equal(classification.topk_correct(LOGITS, multi_hot, 5), [1, 1, 1, 0])


class _FixedLogits(nn.Module):
  """Returns LOGITS whatever the images: the metric is what is under test."""

  @nn.compact
  def __call__(self, images, train: bool = False):
    del train
    return jnp.broadcast_to(jnp.asarray(LOGITS), (images.shape[0], LOGITS.shape[1]))


def _objective(model):
  return classification.Classification(
      model, 3, jnp.float32, classification.Augmentation(), data_parallel_size=1
  )


def test_eval_step_on_three_classes_with_a_padded_example():
  model = _FixedLogits()
  step = jax.jit(_objective(model).eval_step)
  batch = {
      'image': np.zeros((4, 8, 8, 3), np.uint8),
      'label': LABELS,
      # The last example is padding: it must not count.
      'mask': np.array([1, 1, 1, 0], np.float32),
  }
  metrics = step({'raw': {}}, batch)['raw'].compute()
  # Top-1 over the 3 real examples: hits on rows 0 only -> 1/3; top-5 of 3 classes: all.
  np.testing.assert_allclose(float(metrics['top1']), 1 / 3, rtol=1e-6)
  np.testing.assert_allclose(float(metrics['top5']), 1.0, rtol=1e-6)
