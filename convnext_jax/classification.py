"""Supervised image classification: the training loss with its on-device batch augmentation,
and the evaluation step (top-1 / top-5). No TensorFlow.

This is one *objective* of a run (`run.Run`): what a training step computes from a batch and
what evaluation measures. The rest of the step (gradient accumulation, AdamW, the EMA, the
non-finite guard) is `train_step`'s and the same for any objective; a masked-autoencoder
objective would bring its own loss and batch and nothing else.

Training batches are {'image': uint8 (B, H, W, 3), 'label': int32 (B,)}. Inside the step the
images are normalised, Random Erasing, Mixup/CutMix (one lambda per per-device batch) and
label smoothing are applied, and the loss is the mean softmax cross-entropy against the soft
targets. A model with BatchNorm updates its running averages ('batch_stats') in the forward
pass; the loss returns them beside the loss value.

Evaluation batches add 'mask' (0 for padding). A label is an int class or, for ImageNet-ReaL,
a multi-hot vector (correct if the prediction is any of the valid labels). A model with
BatchNorm is evaluated with its running averages (train=False), so each image's prediction is
independent of the rest of its batch; the EMA averages params only, so EMA params are
evaluated with the current running averages (timm's ModelEma averages the running averages
too; the roadmap recipes turn the EMA off for BatchNorm models, where the paper found it
hurts, so the difference does not arise in them).
"""

import dataclasses
from typing import Any

from clu import metrics
import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from convnext_jax.data import batch_ops


@flax.struct.dataclass
class EvalMetrics(metrics.Collection):
  top1: metrics.Average.from_output('top1')
  top5: metrics.Average.from_output('top5')


def topk_correct(logits, labels, k: int):
  """1.0 where a label is among the top-k logits. `labels`: (B,) ints or (B, K) multi-hot.

  With fewer than k classes every class is in the top k (k is capped at the class count,
  as timm's `accuracy` caps it), so top-5 of a 3-class dataset is 1.0.
  """
  top = jax.lax.top_k(logits, min(k, logits.shape[-1]))[1]
  if labels.ndim == 2:  # Multi-hot: any valid label in the top k.
    return jnp.any(jnp.take_along_axis(labels, top, axis=1) > 0, axis=1).astype(jnp.float32)
  return jnp.any(top == labels[:, None], axis=1).astype(jnp.float32)


@dataclasses.dataclass(frozen=True)
class Augmentation:
  """The on-device part of the input recipe (timm's semantics)."""

  random_erasing: float = 0.0
  mixup_alpha: float = 0.0
  cutmix_alpha: float = 0.0
  mixup_prob: float = 1.0
  mixup_switch_prob: float = 0.5
  label_smoothing: float = 0.0

  @classmethod
  def from_config(cls, cin) -> 'Augmentation':
    """From a config's `input` section."""
    return cls(
        random_erasing=cin.random_erasing,
        mixup_alpha=cin.mixup_alpha,
        cutmix_alpha=cin.cutmix_alpha,
        mixup_prob=cin.mixup_prob,
        mixup_switch_prob=cin.mixup_switch_prob,
        label_smoothing=cin.label_smoothing,
    )

  @property
  def mixes(self) -> bool:
    """Whether Mixup or CutMix is on (it pairs examples within each device's batch)."""
    return self.mixup_alpha > 0 or self.cutmix_alpha > 0


@dataclasses.dataclass(frozen=True)
class Classification:
  """The classification objective of one model: its loss and its evaluation step.

  Attributes:
    model: the Flax module (logits out).
    num_classes: classifier outputs.
    compute_dtype: the dtype images enter the model in.
    augmentation: on-device augmentation of training batches.
    data_parallel_size: devices the batch is split over; Mixup/CutMix draws one lambda per
      device's batch.
  """

  model: nn.Module
  num_classes: int
  compute_dtype: Any
  augmentation: Augmentation
  data_parallel_size: int

  # The evaluation metric that ranks checkpoints, and which way is better.
  main_metric = 'top1'
  higher_is_better = True

  def augment(self, key, images, labels):
    """(normalised and augmented images in the compute dtype, soft targets) of a uint8
    training batch: Random Erasing, Mixup/CutMix and label smoothing as configured."""
    with jax.named_scope('augment'):  # Names its ops for `benchmark profile`.
      aug = self.augmentation
      k_erase, k_mix = jax.random.split(key)
      images = batch_ops.normalize(images)
      if aug.random_erasing > 0:
        images = batch_ops.random_erasing(k_erase, images, prob=aug.random_erasing)
      if aug.mixes:

        def mixup_one(key, images, labels):
          out, targets, _ = batch_ops.mixup_cutmix(
              key,
              images,
              labels,
              self.num_classes,
              mixup_alpha=aug.mixup_alpha,
              cutmix_alpha=aug.cutmix_alpha,
              prob=aug.mixup_prob,
              switch_prob=aug.mixup_switch_prob,
              label_smoothing=aug.label_smoothing,
          )
          return out, targets

        images, targets = batch_ops.per_device(mixup_one, self.data_parallel_size)(
            k_mix, images, labels
        )
      else:
        targets = batch_ops.smooth_one_hot(labels, self.num_classes, aug.label_smoothing)
      return images.astype(self.compute_dtype), targets

  def loss(self, params, batch_stats, batch, key):
    """(mean cross-entropy, the new running averages) of one (micro-)batch.

    Args:
      params: the model's params.
      batch_stats: BatchNorm's running averages, or None for a model without them.
      batch: {'image': uint8 images, 'label': int labels}.
      key: this batch's randomness (augmentation and drop path).
    """
    k_aug, k_drop = jax.random.split(key)
    images, targets = self.augment(k_aug, batch['image'], batch['label'])
    rngs = {'drop_path': k_drop}
    if batch_stats is None:
      logits = self.model.apply({'params': params}, images, train=True, rngs=rngs)
      new_stats = None
    else:
      logits, mutated = self.model.apply(
          {'params': params, 'batch_stats': batch_stats},
          images,
          train=True,
          rngs=rngs,
          mutable=['batch_stats'],
      )
      new_stats = mutated['batch_stats']
    loss = optax.softmax_cross_entropy(logits.astype(jnp.float32), targets).mean()
    return loss, new_stats

  def eval_step(self, params_by_name, batch, batch_stats=None):
    """{name: EvalMetrics} of one evaluation batch, for each params of `params_by_name`
    (e.g. {'raw': ..., 'ema': ...}), all with `batch_stats` (None without BatchNorm)."""
    images = batch_ops.normalize(batch['image'], dtype=self.compute_dtype)
    out = {}
    for name, params in params_by_name.items():
      variables = {'params': params}
      if batch_stats is not None:
        variables['batch_stats'] = batch_stats
      logits = self.model.apply(variables, images, train=False)
      out[name] = EvalMetrics.single_from_model_output(
          top1=topk_correct(logits, batch['label'], 1),
          top5=topk_correct(logits, batch['label'], 5),
          mask=batch['mask'],
      )
    return out
