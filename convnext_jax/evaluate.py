"""Evaluation: top-1 / top-5 of raw and EMA parameters over a whole split, exactly once.

Batches come from `data.pipeline.eval_dataset`, padded with masked examples so every process
runs the same number of steps; clu `Average` metrics weigh each example by its mask. A label
is an int class or, for ImageNet-ReaL, a multi-hot vector (correct if the prediction is any
of the valid labels).

A model with BatchNorm is evaluated with its running averages (train=False), so each image's
prediction is independent of the rest of its batch. The EMA averages params only, so EMA
params are evaluated with the current running averages (timm's ModelEma averages the running
averages too; the roadmap recipes turn the EMA off for BatchNorm models, where the paper
found it hurts, so the difference does not arise in them).
"""

from collections.abc import Iterable
import time

from absl import logging
from clu import metrics
import flax
import jax
import jax.numpy as jnp

from convnext_jax import console
from convnext_jax import sharding
from convnext_jax.data import batch_ops
from convnext_jax.data import pipeline


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


def make_eval_step(model, dtype):
  """jit-able (params_by_name, batch, batch_stats=None) -> {name: EvalMetrics}.

  `batch_stats`: the model's BatchNorm running averages (None for a model without
  BatchNorm), used with every entry of `params_by_name`.
  """

  def step(params_by_name, batch, batch_stats=None):
    images = batch_ops.normalize(batch['image'], dtype=dtype)
    out = {}
    for name, params in params_by_name.items():
      variables = {'params': params}
      if batch_stats is not None:
        variables['batch_stats'] = batch_stats
      logits = model.apply(variables, images, train=False)
      out[name] = EvalMetrics.single_from_model_output(
          top1=topk_correct(logits, batch['label'], 1),
          top5=topk_correct(logits, batch['label'], 5),
          mask=batch['mask'],
      )
    return out

  return step


def evaluate(
    eval_step,
    params_by_name,
    dataset,
    num_batches: int,
    feed: sharding.BatchFeed,
    num_examples: int,
    batch_stats=None,
) -> tuple[dict[str, float], int]:
  """Runs one pass; returns ({'<name>/top1': ..., '<name>/top5': ...}, skipped records).

  Args:
    eval_step: jitted `make_eval_step(...)`, or any (params_by_name, batch[, batch_stats])
      -> {name: EvalMetrics}.
    params_by_name: e.g. {'raw': params, 'ema': ema_params}.
    dataset: this process's padded batches (of its data shard).
    num_batches: batches each process yields.
    feed: the `sharding.BatchFeed` that assembles them into global arrays.
    num_examples: the data shard's records, to count undecodable ones at the end.
    batch_stats: BatchNorm running averages for every entry of `params_by_name`, or None.
  """
  start = time.perf_counter()
  totals = None
  tracker = pipeline.StreamTracker()
  batches: Iterable = dataset.as_numpy_iterator()
  for batch in batches:
    tracker.update(batch['position'])
    batch = pipeline.to_global_arrays(batch, feed)
    # No running averages: the two-argument call, which other eval steps also accept.
    step_metrics = (
        eval_step(params_by_name, batch)
        if batch_stats is None
        else eval_step(params_by_name, batch, batch_stats)
    )
    totals = (
        step_metrics
        if totals is None
        else {name: totals[name].merge(m) for name, m in step_metrics.items()}
    )
  pipeline.release(batches)  # Not waiting for tf.data's autotuning thread (up to a minute).
  del batches
  tracker.close(num_examples)
  results = {}
  for name, collection in (totals or {}).items():
    for metric, value in collection.compute().items():
      results[f'{name}/{metric}'] = float(value)
  logging.info(
      'evaluated %d batches in %.1f s: %s',
      num_batches,
      time.perf_counter() - start,
      results,
      extra=console.DETAIL,
  )
  return results, tracker.skipped
