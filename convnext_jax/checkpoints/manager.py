"""The trainer's checkpoints: `TrainingCheckpoints`, an orbax CheckpointManager over
`workdir/checkpoints` whose steps are sealed as they are written and verified before they are
resumed from (`integrity`); damaged steps are set aside in `workdir/checkpoints_damaged`."""

import math
from typing import Any

from absl import logging
from etils import epath
import jax
import orbax.checkpoint as ocp

from convnext_jax import fileio
from convnext_jax import multihost
from convnext_jax.checkpoints import integrity
from convnext_jax.checkpoints.base import METADATA_ITEM
from convnext_jax.checkpoints.base import STATE_ITEM
from convnext_jax.checkpoints.base import CheckpointError

DAMAGED_DIR = 'checkpoints_damaged'  # Where the trainer moves damaged steps.


def _first_line(error: BaseException) -> str:
  text = str(error).strip().splitlines()
  return f'{type(error).__name__}: {text[0] if text else ""}'.strip()


class TrainingCheckpoints:
  """The trainer's checkpoints in `workdir/checkpoints`: saved asynchronously by an orbax
  CheckpointManager, sealed with checksums, verified before they are used.

  Keeps the last `keep` steps and, with `best_metric`, the step with its highest value (its
  lowest with best_mode 'min', e.g. a loss; orbax writes the metrics of a step into it, so
  the best step is still known after a restart). Each step is sealed before orbax commits
  it: `checksums.json` lists the size and SHA-256 of every file, written by process 0 in
  orbax's background thread once every process has written its part (`seal_step`).
  Resuming takes the newest step that verifies (`find_usable_step`); newer damaged ones are
  moved to `workdir/checkpoints_damaged/`, with a warning naming each, so that they are
  neither used nor overwritten nor deleted.
  Errors of a background save surface, with their cause, at the next save or at `close`.
  """

  def __init__(
      self,
      workdir: str,
      *,
      save_interval_steps: int,
      keep: int,
      best_metric: str | None = None,
      best_mode: str = 'max',
      enable_async: bool = True,
  ):
    self.workdir = workdir
    self.directory = integrity.checkpoint_dir(workdir)
    self._saving = None  # The step being saved, for the sealing callback.
    policies = [ocp.checkpoint_managers.LatestN(keep)]
    self._track_best = bool(best_metric)

    if best_mode not in ('max', 'min'):
      raise ValueError(f"best_mode must be 'max' or 'min', got {best_mode!r}")
    sign = 1.0 if best_mode == 'max' else -1.0

    def best_fn(metrics):  # A step saved without evaluation ranks below any evaluated one.
      value = metrics.get(best_metric)
      return -math.inf if value is None else sign * value

    if best_metric:
      policies.append(
          ocp.checkpoint_managers.BestN(
              get_metric_fn=best_fn, n=1, keep_checkpoints_without_metrics=False
          )
      )
    # Explicit save decisions: every `save_interval_steps` steps and on a preemption notice
    # (orbax's default would also save the first step of every run).
    save_policy = ocp.checkpoint_managers.AnySavePolicy(
        [
            ocp.checkpoint_managers.FixedIntervalPolicy(save_interval_steps),
            ocp.checkpoint_managers.PreemptionCheckpointingPolicy(),
        ]
    )
    self._async = enable_async
    options = ocp.CheckpointManagerOptions(
        save_decision_policy=save_policy,
        preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(policies),
        # With a best_fn, orbax writes each step's metrics beside it and reads them back on
        # a restart; the preservation policy above still decides what is kept.
        best_fn=best_fn if best_metric else None,
        best_mode='max',
        async_options=ocp.AsyncOptions(post_finalization_callback=self._seal_saving)
        if enable_async
        else None,
        enable_async_checkpointing=enable_async,
        create=True,
        # What a failed save (a full disk) or a killed run left half-written goes at the
        # next start; the workdir lock makes sure no other trainer is writing it.
        cleanup_tmp_directories=True,
    )
    # A restore reads at most 1 GB at a time (orbax's default is 96): each array passes
    # through host memory on its way into its sharding, and a resume must not hold the
    # whole state twice (docs/benchmarks.md, "Resume memory").
    handlers = {
        STATE_ITEM: ocp.StandardCheckpointHandler(restore_concurrent_gb=1),
        METADATA_ITEM: ocp.JsonCheckpointHandler(),
    }
    self.manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)

  def _seal_saving(self) -> None:
    # Runs on process 0 only, after every process has written the step and before orbax
    # commits it (renames it locally; writes its commit marker on GCS).
    step_dir = ocp.step.find_step_path(
        self.directory, ocp.step.standard_name_format(), step=self._saving, include_uncommitted=True
    )
    integrity.seal_step(step_dir)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def should_save(self, step: int) -> bool:
    return self.manager.should_save(step)

  def reached_preemption(self, step: int) -> bool:
    return self.manager.reached_preemption(step)

  def save(
      self,
      step: int,
      state,
      metadata: dict[str, Any],
      metrics: dict[str, float] | None = None,
      force: bool = False,
  ) -> bool:
    """Saves (asynchronously) if `step` is due or `force`; returns whether a save started.

    Raises:
      CheckpointError: the previous background save failed (the message names its cause).
    """
    self._wait()  # The previous save is sealed and committed, or its error raised here.
    self._saving = step
    if metrics is None and self._track_best:
      metrics = {}  # Not evaluated (orbax warns on every save given no metrics to track).
    started = self.manager.save(
        step,
        args=ocp.args.Composite(
            **{
                STATE_ITEM: ocp.args.StandardSave(state),
                METADATA_ITEM: ocp.args.JsonSave(metadata),
            }
        ),
        metrics=metrics,
        force=force,
    )
    if started and not self._async and jax.process_index() == 0:
      integrity.seal_step(self.directory / str(step))
    if started:
      logging.info(
          'checkpoint step %d: %s %s',
          step,
          'writing in the background to' if self._async else 'written to',
          self.directory / str(step),
      )
    return started

  def check(self) -> None:
    """Raises the error of a background save as soon as it has ended, not at the next save.

    Cheap (no wait) while a save is still running. Process 0 decides for every process.

    Raises:
      CheckpointError: as `save`.
    """
    ended = multihost.decide_on_process_0(
        'save_ended', lambda: '' if self.manager.is_saving_in_progress() else 'ended'
    )
    if ended:
      self._wait()

  def _wait(self) -> None:
    try:
      self.manager.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except
      code = fileio.disk_full_errno(e)
      if code is not None:
        raise CheckpointError(
            f'checkpoint step {self._saving} could not be written to {self.directory}: '
            f'{fileio.describe_disk_full(code)}; the steps before it are intact: free space '
            '(or lower config.keep_checkpoints) and run again to resume from the newest'
        ) from e
      reason = fileio.describe_storage_error(e) or _first_line(e)
      raise CheckpointError(
          f'checkpoint step {self._saving} could not be written to {self.directory}: '
          f'{reason}; the steps before it are intact and a new run resumes from the newest'
      ) from e

  def restore(self, step: int, abstract_state):
    """Restores `step` onto the shardings of `abstract_state` (any mesh or device count)."""
    restored = self.manager.restore(
        step,
        args=ocp.args.Composite(
            **{
                STATE_ITEM: ocp.args.StandardRestore(abstract_state),
                METADATA_ITEM: ocp.args.JsonRestore(),
            }
        ),
    )
    return restored[STATE_ITEM], dict(restored[METADATA_ITEM])

  def restore_latest(self, abstract_state):
    """(step, state, metadata) of the newest step that verifies and restores, else None.

    Steps that fail either are set aside (see the class docstring) and the next older one is
    tried. Every process calls this together; process 0 decides which step.

    Raises:
      CheckpointError: the workdir has finished steps but none is intact.
    """
    while True:
      decided = multihost.decide_on_process_0('resume_step', self._newest_usable)
      self.manager.reload()  # Process 0 may have set steps aside.
      if decided.startswith('error:'):
        raise CheckpointError(decided[len('error:') :])
      if not decided:
        return None
      step = int(decided)
      try:
        state, metadata = self.restore(step, abstract_state)
      except Exception as e:  # pylint: disable=broad-except
        # Orbax and tensorstore raise many types for a damaged step (ValueError, OSError,
        # KeyError, JSONDecodeError, XlaRuntimeError...).
        reason = _first_line(e)
        if jax.process_index() == 0:
          self._set_aside(step, f'it cannot be restored: {reason}')
        multihost.barrier('set_aside')
        self.manager.reload()
        continue
      return step, state, metadata

  def _newest_usable(self) -> str:
    steps = integrity.workdir_steps(self.workdir)
    if not steps:
      return ''
    try:
      step, damaged = integrity.find_usable_step(self.workdir, steps=steps)
    except CheckpointError as e:
      return f'error:{e}'
    for bad, reason in damaged:
      self._set_aside(bad, reason)
    return str(step)

  def _set_aside(self, step: int, reason: str) -> None:
    aside = epath.Path(self.workdir) / DAMAGED_DIR
    aside.mkdir(parents=True, exist_ok=True)
    target = aside / str(step)
    n = 1
    while target.exists():
      target, n = aside / f'{step}.{n}', n + 1
    (self.directory / str(step)).rename(target)
    logging.warning(
        'checkpoint step %d in %s is damaged (%s): moved to %s and not used',
        step,
        self.directory,
        reason,
        target,
    )

  def close(self, raise_errors: bool = True) -> None:
    """Waits for the last save and closes the manager.

    Raises:
      CheckpointError: the last save failed and `raise_errors` (else it is logged).
    """
    try:
      self._wait()
    except CheckpointError as e:
      if raise_errors:
        raise
      logging.error('%s', e)
    finally:
      self.manager.close()
