"""The training loop: `train_and_evaluate(config, workdir)`.

Reads top to bottom: logging and process facts; mesh and the config's checks (every rule,
`validation.check`, before anything heavy); the workdir's lock (one trainer per workdir);
input; the run (`run.Run`: model, optimizer, shardings, abstract state, jitted steps, built
once); the state: resumed from the newest intact checkpoint straight into its shardings, or
created around converted weights (`init_from`), or fresh, decided before any state exists;
evaluators; the loop (log, evaluate, checkpoint, stop on preemption or divergence). The run's
objective decides what a step computes and what evaluation measures: classification (top-1,
top-5), or FCMAE pre-training (the masked loss, with a picture of the reconstructions at every
evaluation).

The train state is `train_step`'s plain pytree {'params', 'opt_state', 'ema_params', 'step',
'rng'} ('ema_params' only with an EMA; 'batch_stats', BatchNorm's running averages, only for
a model with BatchNorm), donated into the run's jitted step once per optimizer update. A step
whose loss, gradients or new params are not finite leaves the state as it was
(`config.nonfinite`), so no checkpoint ever holds non-finite weights.

Errors a user can act on (divergence, a workdir in use, a checkpoint that cannot be written
or read, a dataset that cannot be read) are raised as `RUN_ERRORS`, whose messages are one
line; a config that fails its checks raises `validation.ConfigError` before the workdir is
created.
"""

import contextlib
import functools
import signal
import time
from typing import Any

from absl import logging
from clu import metric_writers
from clu import parameter_overview
from clu import periodic_actions
from etils import epath
from flax import traverse_util
import jax
from jax.experimental import multihost_utils
import ml_collections
import numpy as np
import PIL.Image

from convnext_jax import checkpoints
from convnext_jax import console
from convnext_jax import evaluate
from convnext_jax import host_malloc
from convnext_jax import models
from convnext_jax import multihost
from convnext_jax import run as run_lib
from convnext_jax import sharding
from convnext_jax import train_step
from convnext_jax import validation
from convnext_jax import workdir_lock
from convnext_jax.data import DatasetError
from convnext_jax.data import inputs as inputs_lib
from convnext_jax.data import pipeline
from convnext_jax.models import fcmae


class TrainingError(RuntimeError):
  """A run that cannot go on (divergence, a checkpoint that cannot be written, a workdir in
  use); the message is one line saying what happened, where, and what to do."""


# What `main` reports as one line (exit status 1) instead of a traceback.
RUN_ERRORS = (TrainingError, checkpoints.CheckpointError, DatasetError)


class _Preemption:
  """SIGTERM (e.g. a spot VM's notice) -> stop at the next step boundary, after saving."""

  def __init__(self):
    self.requested = False
    self._previous = None
    if jax.process_count() > 1:
      # jax.distributed's preemption service owns SIGTERM and synchronises the notice
      # across processes (orbax's `reached_preemption`); a Python handler would replace it.
      return
    # Off the main thread signal() raises ValueError: rely on orbax's preemption notice only.
    with contextlib.suppress(ValueError):
      self._previous = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    del signum, frame
    logging.warning('SIGTERM: saving a checkpoint at the next step boundary, then exiting')
    self.requested = True

  def restore(self):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


class _NonfiniteGuard:
  """Stops a run whose steps keep failing the jitted step's finiteness check.

  The step itself refuses a non-finite update (`train_step.make_train_step`); this counts
  the refusals in a row and raises `TrainingError` at `max_consecutive` of them with action
  'skip', at the first with 'stop'. Each step's flags are read one step late, once the next
  step has been dispatched, so the host never waits on the step it has just started.
  """

  def __init__(self, action: str, max_consecutive: int):
    self.limit = 1 if action == 'stop' else max_consecutive
    self.action = action
    self.in_a_row = 0
    self._pending = None

  def push(self, step: int, health) -> None:
    """Records the flags of `step` (just dispatched) and checks those of the step before."""
    previous, self._pending = self._pending, (step, health)
    if previous is not None:
      self._check(*previous)

  def flush(self) -> None:
    """Checks the last step pushed (waiting for it)."""
    if self._pending is not None:
      pending, self._pending = self._pending, None
      self._check(*pending)

  def _check(self, step: int, health) -> None:
    health = jax.device_get(health)
    if health['finite']:
      self.in_a_row = 0
      return
    self.in_a_row += 1
    logging.warning(
        'step %d: loss %s, gradient norm %s: update skipped, weights kept '
        '(%d such steps in a row)',
        step,
        health['loss'],
        health['grad_norm'],
        self.in_a_row,
    )
    if self.in_a_row >= self.limit:
      raise TrainingError(
          f'training diverged: {self.in_a_row} step(s) in a row up to step {step} had a '
          f'non-finite loss or gradient (last: loss {health["loss"]}, gradient norm '
          f'{health["grad_norm"]}; config.nonfinite.action={self.action!r}, '
          f'max_consecutive={self.limit}); no checkpoint holds non-finite weights; lower '
          'config.optim.lr (or lengthen the warmup, set optim.grad_clip_norm) and run again '
          'to resume from the last checkpoint'
      )


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
  """Trains (or resumes) in `workdir`, evaluating and checkpointing; returns the last eval.

  Raises:
    validation.ConfigError: the config fails a check (before the workdir is created).
    RUN_ERRORS: the run cannot go on (the message is one line).
  """
  # ---- Logging and process facts. ----
  inputs_lib.configure_tensorflow()  # Before the metric writer starts TensorFlow.
  logging.info(
      'process %d of %d; %d local / %d global devices (%s)',
      jax.process_index(),
      jax.process_count(),
      jax.local_device_count(),
      jax.device_count(),
      jax.devices()[0].platform,
  )

  # ---- Mesh and checks: every rule, before anything heavy. ----
  mesh = validation.config_mesh(config)
  feed = validation.check(config, mesh)
  logging.info('config: %s', _summary(config))
  logging.info('config:\n%s', config, extra=console.DETAIL)
  logging.info(
      'mesh %s; global batch %d = %d per process (data shard %d of %d) = %d per '
      'data-parallel device, %d micro-batch(es)',
      dict(mesh.shape),
      config.global_batch_size,
      feed.local_batch(config.global_batch_size),
      feed.shard_index,
      feed.shard_count,
      config.global_batch_size // sharding.data_parallel_size(mesh),
      config.grad_accum_steps,
  )

  # ---- The workdir, one trainer at a time. ----
  # Only now is the workdir created, which a config refused above must not leave.
  with _workdir_lock(workdir) as lock:
    return _train_holding(config, workdir, mesh, feed, lock)


@contextlib.contextmanager
def _workdir_lock(workdir: str):
  """Holds `workdir`'s lock (`workdir_lock`): process 0 takes it for every process.

  Raises:
    TrainingError: another trainer holds it (the message names it).
  """
  lock = workdir_lock.WorkdirLock(workdir)

  def acquire() -> str:
    try:
      lock.acquire()
    except workdir_lock.WorkdirLocked as e:
      return str(e)
    return ''

  refusal = multihost.decide_on_process_0('workdir_lock', acquire)
  if refusal:
    raise TrainingError(refusal)
  try:
    yield lock
  finally:
    lock.release()  # A no-op on the processes that did not take it.


def _train_holding(
    config: ml_collections.ConfigDict,
    workdir: str,
    mesh: jax.sharding.Mesh,
    feed: sharding.BatchFeed,
    lock: workdir_lock.WorkdirLock,
):
  """The rest of `train_and_evaluate`, once the workdir's lock is held."""
  process = jax.process_index()
  writer = metric_writers.create_default_writer(workdir, just_logging=process > 0)

  # ---- Input. ----
  inputs = inputs_lib.Inputs(config)

  # ---- The run: model, optimizer, shardings, abstract state and jitted steps. ----
  r = run_lib.Run.build(config, inputs.facts, mesh, feed=feed)
  sched = r.schedule
  logging.info(
      '%d training examples, %d classes: %d steps per epoch, %d steps, %d warmup',
      r.data.num_train_examples,
      r.num_classes,
      sched.steps_per_epoch,
      sched.total_steps,
      sched.warmup_steps,
  )
  if r.uses_batchnorm:
    logging.info(
        'BatchNorm statistics over groups of %d examples (config.model.bn_group_size=%d)',
        r.batches.bn_group or r.batches.micro,
        config.model.bn_group_size,
    )
  abstract_params = r.abstract_state[train_step.PARAMS]
  logging.info(
      '%s: %s parameters (%.1f MB), %s compute',
      config.model.name,
      f'{models.count_params(abstract_params):,}',
      _nbytes(abstract_params) / 1e6,
      config.model.dtype,
  )
  logging.info(
      'parameter sharding:\n%s',
      sharding.describe(r.state_shardings[train_step.PARAMS]),
      extra=console.DETAIL,
  )
  parameter_overview.log_parameter_overview(
      abstract_params, include_stats=False, jax_logging_process=0
  )  # Shown with --verbose.

  # ---- The state: resumed, or around init_from's weights, or fresh. ----
  ckpts = checkpoints.TrainingCheckpoints(
      workdir,
      save_interval_steps=config.checkpoint_every_steps,
      keep=config.keep_checkpoints,
      best_metric=r.objective.main_metric if config.keep_best_checkpoint else None,
      best_mode='max' if r.objective.higher_is_better else 'min',
  )
  state, start_position = _initial_state(r, ckpts)
  start_step = int(state['step'])

  # ---- Evaluators. ----
  evaluators = inputs.evaluators(feed, r.batches.eval_global, r.eval_input)
  # Pre-training: a picture of what the model reconstructs, at every evaluation.
  preview = _Preview(r, evaluators[0], workdir) if hasattr(r.objective, 'preview') else None

  def run_evals(step):
    params_by_name = {'raw': state[train_step.PARAMS]}
    if r.use_ema:
      params_by_name['ema'] = state[train_step.EMA_PARAMS]
    results = {}
    for ev in evaluators:
      start = time.perf_counter()
      # BatchNorm's running averages serve the raw and the EMA params alike.
      values, skipped = evaluate.evaluate(
          r.eval_step,
          params_by_name,
          ev.dataset,
          ev.num_batches,
          feed,
          ev.shard,
          state.get(train_step.BATCH_STATS),
          name=ev.name,
      )
      results.update({f'{ev.name}/{k}': v for k, v in values.items()})
      if skipped:
        results[f'{ev.name}/skipped_images'] = skipped
      logging.info(
          'step %d, %s (%d images, %.1f s): %s',
          step,
          ev.name,
          ev.num_examples,
          time.perf_counter() - start,
          _metrics_line(values),
      )
    writer.write_scalars(step, results)
    if preview is not None:
      preview.write(step, state[train_step.EMA_PARAMS if r.use_ema else train_step.PARAMS], writer)
    return results

  # ---- The loop. ----
  update = r.train_step
  train_iter = inputs.train_iterator(feed, start_position)
  hooks = []
  if config.profile_start_step >= 0 and process == 0:
    hooks.append(
        periodic_actions.Profile(
            logdir=workdir,
            first_profile=config.profile_start_step,
            num_profile_steps=config.profile_num_steps,
        )
    )
  preemption = _Preemption()
  guard = _NonfiniteGuard(config.nonfinite.action, config.nonfinite.max_consecutive)
  train_metrics = None
  last_eval: dict[str, float] = {}
  logging.info('training from step %d to %d', start_step, sched.total_steps)
  # The first batch, then the step compiled for it, each with a line: on a large model or a
  # cold input pipeline these take minutes.
  if start_step < sched.total_steps:
    first_batch, update = _compile_update(update, state, train_iter, config, mesh)
  # Set up and restored: from here each step's scratch is the last one's, already mapped.
  host_malloc.reuse_large_allocations()
  progress = _Progress(sched, config.global_batch_size)
  try:
    for step in range(start_step, sched.total_steps):
      with jax.profiler.StepTraceAnnotation('train', step_num=step):
        batch = first_batch if step == start_step else next(train_iter)
        state, step_metrics, health = update(state, batch)
      done = step + 1
      guard.push(done, health)  # Checks the step before this one: no wait for this one.
      train_metrics = step_metrics if train_metrics is None else train_metrics.merge(step_metrics)
      progress.steps += 1
      for hook in hooks:
        hook(done)
      final = done == sched.total_steps
      if done % config.log_every_steps == 0 or final:
        scalars = {f'train/{k}': v for k, v in train_metrics.compute().items()}
        scalars.update(progress.report(done, scalars['train/loss']))
        if train_iter.skipped:
          scalars['train/skipped_images'] = train_iter.skipped
        writer.write_scalars(done, scalars)
        train_metrics = None
        ckpts.check()  # A failed background save stops the run here, not at the next save.
      ckpt_metrics = None
      if done % sched.eval_every == 0 or final:
        with progress.paused(evaluating=True):
          last_eval = run_evals(done)
        metric = r.objective.main_metric
        main_eval = f'{evaluators[0].name}/{"ema" if r.use_ema else "raw"}/{metric}'
        ckpt_metrics = {metric: last_eval[main_eval]} if main_eval in last_eval else None
      # A SIGTERM flag is per process; with several processes, orbax's preemption notice
      # (synchronised through jax.distributed) decides, so that all of them stop together.
      preempted = ckpts.reached_preemption(done) or (
          preemption.requested and jax.process_count() == 1
      )
      force = final or preempted or done % sched.eval_every == 0
      if force or ckpts.should_save(done):
        guard.flush()  # Stops here, before saving, if this step ends a run of skipped ones.
        _check_lock_held(lock, workdir, done)
        # The data positions are gathered from every process: only when a save is due.
        with progress.paused():  # Waits for the previous save, if it is still writing.
          metadata = _metadata(r, train_iter.next_position, done, last_eval)
          ckpts.save(done, state, metadata, metrics=ckpt_metrics, force=force)
      if preempted:
        logging.warning('preempted at step %d: checkpoint written, exiting', done)
        break
  except BaseException:
    # The loop's error is the one to report; a failed save behind it is logged by close.
    ckpts.close(raise_errors=False)
    raise
  finally:
    preemption.restore()
    train_iter.close()  # Without waiting for tf.data's threads (`pipeline.release`).
  ckpts.close()  # Waits for the last save; raises if it failed.
  writer.close()
  logging.info(
      'done: step %d%s', int(state['step']), f', {_metrics_line(last_eval)}' if last_eval else ''
  )
  return last_eval


def _summary(config: ml_collections.ConfigDict) -> str:
  """One line of what a config trains: model, data, schedule, optimizer, mesh."""
  c = config
  duration = f'{c.num_steps} steps' if c.num_steps > 0 else f'{c.num_epochs:g} epochs'
  accum = f' in {c.grad_accum_steps} micro-batches' if c.grad_accum_steps > 1 else ''
  ema = f'EMA {c.ema.decay:g}' if c.ema.decay > 0 else 'no EMA'
  init = f', init from {c.init_from.path}' if c.init_from.path else ''
  return (
      f'{c.model.name} ({c.model.dtype}) on {c.dataset.name} at {c.input.image_size} px, '
      f'batch {c.global_batch_size}{accum}, {duration}, AdamW lr {c.optim.lr:g} '
      f'wd {c.optim.weight_decay:g}, {ema}, mesh {tuple(c.mesh)}{init} '
      '(--verbose prints all of it)'
  )


def _initial_state(r: run_lib.Run, ckpts: checkpoints.TrainingCheckpoints):
  """(train state, data position to resume the input at).

  Decided before any state exists, so that no state is ever held twice: the newest intact
  checkpoint, restored straight into the run's shardings; else, with `config.init_from`, a
  state made around the weights read from it; else a fresh state.
  """
  resumed = ckpts.restore_latest(r.abstract_state)  # The newest intact step, or None.
  if resumed is not None:
    step, state, metadata = resumed
    position = _start_position(metadata, step, r.feed, r.batches.per_process)
    logging.info('resumed from step %d (data position %d)', step, position)
    return state, position
  if r.config.init_from.path:
    return r.init_state(_init_from(r)), 0
  return r.init_state(), 0


def _nbytes(tree) -> int:
  return sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(tree))


def _metrics_line(results: dict[str, float]) -> str:
  """{'raw/top1': 0.5, 'ema/top1': ...} -> 'raw top-1 50.0% top-5 ..., ema top-1 ...';
  {'raw/loss': 0.61} -> 'raw loss 0.6100' (pre-training)."""
  parts = {}
  for key, value in results.items():
    *prefix, weights, metric = key.split('/')
    name = ' '.join(prefix + [weights])
    if metric.startswith('top'):
      parts.setdefault(name, []).append(f'top-{metric[3:]} {100 * value:.1f}%')
    elif metric == 'loss':
      parts.setdefault(name, []).append(f'loss {value:.4f}')
  return ', '.join(f'{name} {" ".join(values)}' for name, values in parts.items())


def _compile_update(update, state, train_iter, config, mesh):
  """(the first batch, the train step compiled ahead of time for it), saying what it does."""
  start = time.perf_counter()
  logging.info('reading the first batch (input pipeline start-up) ...')
  batch = next(train_iter)
  logging.info(
      'first batch in %s; compiling the train step (%s, batch %d at %d px, mesh %s) ...',
      console.duration(time.perf_counter() - start),
      config.model.name,
      config.global_batch_size,
      config.input.image_size,
      dict(mesh.shape),
  )
  start = time.perf_counter()
  compiled = update.lower(state, batch).compile()
  logging.info('compiled the train step in %s', console.duration(time.perf_counter() - start))
  return batch, compiled


class _Progress:
  """Throughput and ETA of the training steps, not counting evaluation and checkpoint waits;
  one progress line per log step."""

  def __init__(self, sched: run_lib.Schedule, global_batch: int):
    self.steps = 0  # Steps since the last report.
    self._sched = sched
    self._batch = global_batch
    self._window_start = time.perf_counter()
    self._excluded = 0.0  # Seconds of the window spent outside training steps.
    self._run_steps, self._run_seconds = 0, 0.0
    self._evals, self._eval_seconds = 0, 0.0

  @contextlib.contextmanager
  def paused(self, evaluating: bool = False):
    """Time in this block does not count as training time."""
    start = time.perf_counter()
    try:
      yield
    finally:
      seconds = time.perf_counter() - start
      self._excluded += seconds
      if evaluating:
        self._evals += 1
        self._eval_seconds += seconds

  def report(self, step: int, loss) -> dict[str, float]:
    """Logs the progress line; returns the throughput scalars of the window since the last."""
    now = time.perf_counter()
    seconds = max(now - self._window_start - self._excluded, 1e-9)
    steps_per_sec = self.steps / seconds
    self._run_steps += self.steps
    self._run_seconds += seconds
    total, every = self._sched.total_steps, self._sched.eval_every
    remaining = total - step
    eta = remaining * self._run_seconds / self._run_steps
    if self._evals:  # Evaluations left: every `every` steps, and at the end.
      evals_left = total // every - step // every + (1 if total % every else 0)
      eta += evals_left * self._eval_seconds / self._evals
    logging.info(
        'step %d/%d (%.1f%%): loss %.4f, %.1f img/s, %.2f steps/s, ETA %s',
        step,
        self._sched.total_steps,
        100 * step / self._sched.total_steps,
        float(loss),
        steps_per_sec * self._batch,
        steps_per_sec,
        console.duration(eta) if remaining else '-',
    )
    self.steps, self._window_start, self._excluded = 0, now, 0.0
    return {
        'train/images_per_sec': steps_per_sec * self._batch,
        'steps_per_sec': steps_per_sec,
        'train/epoch': step / self._sched.steps_per_epoch,
    }


class _Preview:
  """Pre-training's picture of its progress, at every evaluation: the first images of the
  evaluation split, masked as the evaluation masks them, with the model's reconstruction
  (`fcmae.reconstruction_grid`), to TensorBoard ('reconstruction') and as
  `workdir/reconstructions/step_<step>.png` (process 0)."""

  COUNT = 4  # Images shown.

  def __init__(self, r: run_lib.Run, evaluator, workdir: str):
    batches = pipeline.Batches(evaluator.dataset)
    try:
      batch = next(batches)
    finally:
      batches.close()
    self._batch = pipeline.to_global_arrays(batch, r.feed)  # Every process holds its rows.
    self._program = jax.jit(
        functools.partial(r.objective.preview, count=self.COUNT),
        out_shardings=sharding.replicated(r.mesh),
    )
    self._model = r.model
    self._directory = epath.Path(workdir) / 'reconstructions'

  def write(self, step: int, params, writer) -> None:
    images, pred, mask = (np.asarray(x) for x in self._program(params, self._batch))
    grid = fcmae.reconstruction_grid(
        images, pred, mask, self._model.patch_size, self._model.norm_pix_loss, self.COUNT
    )
    writer.write_images(step, {'reconstruction': grid[None]})
    if jax.process_index() == 0:
      self._directory.mkdir(parents=True, exist_ok=True)
      path = self._directory / f'step_{step:08d}.png'
      with path.open('wb') as f:
        PIL.Image.fromarray(grid).save(f, format='PNG')
      logging.info('reconstructions of step %d: %s', step, path)


def _check_lock_held(lock: workdir_lock.WorkdirLock, workdir: str, step: int) -> None:
  """Raises `TrainingError` on every process if process 0 has lost the workdir's lock."""
  if multihost.decide_on_process_0('lock_lost', lambda: 'lost' if lock.lost else ''):
    raise TrainingError(
        f'another trainer took over the lock of {workdir} (see the log for '
        f'who): stopped at step {step} without saving, so as not to write '
        'over its checkpoints; make sure one trainer uses this workdir'
    )


def _metadata(r: run_lib.Run, next_position, step, last_eval) -> dict[str, Any]:
  feed = r.feed
  by_process = np.atleast_1d(
      multihost_utils.process_allgather(np.asarray(next_position, np.int64))
  ).tolist()
  # One stream per data shard; the processes that share a shard are at the same position.
  positions = [by_process[feed.process_shards.index(k)] for k in range(feed.shard_count)]
  class_names = list(r.data.class_names)
  return {
      'model_name': r.config.model.name,
      'num_classes': r.num_classes,
      'class_names': class_names if len(class_names) == r.num_classes else None,
      'dataset': r.config.dataset.name,
      'step': step,
      'data_positions': positions,
      'data_shard_count': feed.shard_count,
      'process_count': jax.process_count(),
      'metrics': last_eval,
      'config': r.config.to_json_best_effort(),
  }


def _start_position(metadata, step: int, feed: sharding.BatchFeed, per_host_batch: int) -> int:
  positions = metadata.get('data_positions') or []
  # Checkpoints written before data shards were recorded had one per process.
  shard_count = metadata.get('data_shard_count', metadata.get('process_count'))
  if shard_count == feed.shard_count and len(positions) == feed.shard_count:
    return int(positions[feed.shard_index])
  # Another shard count splits the data differently: continue at the same epoch fraction.
  logging.warning(
      'resuming with %d data shards from a run with %s: data position estimated',
      feed.shard_count,
      shard_count,
  )
  return step * per_host_batch


def _init_from(r: run_lib.Run) -> dict[str, jax.Array]:
  """The weights of `config.init_from` that fit the run's model, by '/'-joined name, each
  read by every process straight into its sharding (`checkpoints.load_params_into`): what
  `Run.init_state` builds the state around (a new head, and whatever a non-strict load
  leaves out, keep their initialisation)."""
  init = r.config.init_from
  # Checkpoints hold BatchNorm's running averages beside its params (one weights tree, as
  # PyTorch's state_dict): loaded into that tree, split again by `init_state`.
  weights, _, metadata = checkpoints.load_params_into(
      init.path,
      r.abstract_weights(),
      which=init.params,
      step=init.step if init.step >= 0 else None,
      strict=init.strict,
  )
  logging.info(
      'init_from %s: %s (%s)',
      init.path,
      metadata.get('model_name'),
      metadata.get('weights', 'params'),
  )
  return {
      name: value
      for name, value in traverse_util.flatten_dict(weights, sep='/').items()
      if isinstance(value, jax.Array)
  }
