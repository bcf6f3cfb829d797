"""Evaluation: one pass over a whole split, exactly once, with a run's eval step
(`classification.Classification.eval_step`: top-1 / top-5 of raw and EMA parameters).

Batches come from `data.pipeline.eval_dataset`, padded with masked examples so every process
runs the same number of steps; clu `Average` metrics weigh each example by its mask.
"""

import time

from absl import logging

from convnext_jax import console
from convnext_jax import sharding
from convnext_jax.data import pipeline


def evaluate(
    eval_step,
    params_by_name,
    dataset,
    num_batches: int,
    feed: sharding.BatchFeed,
    shard: pipeline.HostShard,
    batch_stats=None,
    name: str = '',
) -> tuple[dict[str, float], int]:
  """Runs one pass; returns ({'<name>/top1': ..., '<name>/top5': ...}, skipped records).

  Args:
    eval_step: a run's jitted eval step, or any (params_by_name, batch[, batch_stats]) ->
      {name: clu metrics Collection}.
    params_by_name: e.g. {'raw': params, 'ema': ema_params}.
    dataset: this process's padded batches (of its data shard).
    num_batches: batches each process yields.
    feed: the `sharding.BatchFeed` that assembles them into global arrays.
    shard: the data shard `dataset` reads (`pipeline.host_shard`), to count the records that
      could not be read or decoded and name their files.
    batch_stats: BatchNorm running averages for every entry of `params_by_name`, or None.
    name: the evaluation's name, for the warning line of each file that lost records.
  """
  start = time.perf_counter()
  totals = None
  tracker = pipeline.StreamTracker(name=name, shard=shard)
  batches = pipeline.Batches(dataset)
  try:
    for batch in batches:
      tracker.update(batch['position'], batch['file'])
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
  finally:
    batches.close()  # Not waiting for tf.data's autotuning thread (up to a minute).
  tracker.close(shard.num_examples)
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
