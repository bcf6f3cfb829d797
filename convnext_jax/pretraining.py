"""Masked-autoencoder pre-training (FCMAE, ConvNeXt-V2): the objective of a pre-training run.
No TensorFlow.

An objective of a run (`run.Run`), beside `classification.Classification`: the training
loss of a batch, the evaluation step, and a preview of what the model reconstructs. The rest
of the step (gradient accumulation, AdamW, the non-finite guard; an EMA if configured) is
`train_step`'s, the same as for supervised training; so are the sharding, checkpoints,
resume, preemption and the console.

Training batches are {'image': uint8 (B, H, W, 3), ...} (labels, if the dataset has them,
are not read). Inside the step the images are normalised with the ImageNet mean and std (the
regression targets are these normalised pixels, as in the official code) and each image gets
its own random mask from the step's key: the masks follow from the run's seed and the step
number alone, so a resumed run draws the masks an uninterrupted one would.

Evaluation measures the same loss on the evaluation split, with masks drawn from a fixed key
(the same for every evaluation, so that evaluations compare), for the raw (and EMA) weights.
"""

import dataclasses
from typing import Any

from clu import metrics
import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from convnext_jax.data import batch_ops
from convnext_jax.models import fcmae

# Evaluation masks come from this key, whatever the run's seed.
EVAL_MASK_SEED = 0


@flax.struct.dataclass
class EvalMetrics(metrics.Collection):
  loss: metrics.Average.from_output('loss')


@dataclasses.dataclass(frozen=True)
class MaskedAutoencoding:
  """The FCMAE objective of one `fcmae.FCMAE` model.

  Attributes:
    model: the FCMAE module.
    compute_dtype: the dtype images enter the model in.
  """

  model: nn.Module
  compute_dtype: Any

  # The evaluation metric that ranks checkpoints, and which way is better.
  main_metric = 'loss'
  higher_is_better = False

  def loss(self, params, batch_stats, batch, key):
    """(the masked reconstruction loss, None) of one (micro-)batch.

    Args:
      params: the FCMAE params.
      batch_stats: unused (no BatchNorm); None.
      batch: {'image': uint8 images}.
      key: this batch's randomness (masks and drop path).
    """
    del batch_stats
    k_mask, k_drop = jax.random.split(key)
    images = batch_ops.normalize(batch['image'], dtype=self.compute_dtype)
    out = self.model.apply(
        {'params': params}, images, train=True, rngs={'mask': k_mask, 'drop_path': k_drop}
    )
    return out['loss'], None

  def _eval_masks(self, images):
    n, height, width = images.shape[:3]
    grid = self.model.grid(height, width)
    key = jax.random.key(EVAL_MASK_SEED)
    return fcmae.random_mask(key, n, grid, self.model.mask_ratio)

  def eval_step(self, params_by_name, batch, batch_stats=None):
    """{name: EvalMetrics} (the loss per image, padding excluded) of one evaluation batch for
    each params of `params_by_name`."""
    del batch_stats
    images = batch_ops.normalize(batch['image'], dtype=self.compute_dtype)
    mask = self._eval_masks(images)
    patch = self.model.patch_size
    target = fcmae.pixel_targets(images, patch, self.model.norm_pix_loss)
    flat_mask = mask.reshape(mask.shape[0], -1)
    out = {}
    for name, params in params_by_name.items():
      pred = self.model.apply({'params': params}, images, mask=mask)['pred']
      per_patch = jnp.mean(jnp.square(pred - target), axis=-1)
      # Every image has as many removed cells: the mean of the per-image losses is the
      # training loss's mean over all removed cells.
      per_image = jnp.sum(per_patch * flat_mask, axis=1) / jnp.sum(flat_mask, axis=1)
      out[name] = EvalMetrics.single_from_model_output(loss=per_image, mask=batch['mask'])
    return out

  def preview(self, params, batch, count: int = 4):
    """(normalised images, predictions, masks) of the first `count` images of an evaluation
    batch, for `fcmae.reconstruction_grid` (the evaluation's masks)."""
    images = batch_ops.normalize(batch['image'][:count], dtype=self.compute_dtype)
    mask = self._eval_masks(images)
    pred = self.model.apply({'params': params}, images, mask=mask)['pred']
    return images.astype(jnp.float32), pred, mask
