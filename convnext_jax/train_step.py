"""One optimizer update of any objective, and the train state it updates. No TensorFlow.

The train state is a plain pytree {'params', 'opt_state', 'step', 'rng'}, plus 'ema_params'
(an EMA of the params) when the run keeps one and 'batch_stats' (BatchNorm's running
averages) for a model with BatchNorm. `init_state` creates it; `make_train_step` returns the
jit-able (state, batch) -> (state, TrainMetrics, health) of one update: the gradient of the
objective's loss averaged over `grad_accum_steps` micro-batches (the running averages carried
through them in turn, as PyTorch's forward passes update them), then `make_update`'s AdamW,
EMA and non-finite guard: a step whose loss, gradients, new params or new running averages
are not finite leaves the state as it was. `run.Run` jits both with the run's shardings.

An objective is anything with `loss(params, batch_stats, batch, key) -> (loss, batch_stats)`
(`classification.Classification`, `pretraining.MaskedAutoencoding`); the batch is a dict of
arrays with the batch leading. The trainer also reads its `eval_step`, `main_metric` and
`higher_is_better` (which evaluation ranks checkpoints), and `preview` where it has one.
"""

from collections.abc import Callable
from typing import Any

from clu import metrics
import flax
import jax
import jax.numpy as jnp
import optax

from convnext_jax import models
from convnext_jax import optim

# The state's keys for the raw and the EMA weights (checkpoint readers share them).
PARAMS = 'params'
EMA_PARAMS = 'ema_params'
BATCH_STATS = 'batch_stats'


@flax.struct.dataclass
class _Sum(metrics.Metric):
  total: jnp.ndarray

  @classmethod
  def from_model_output(cls, values: jnp.ndarray, **_) -> '_Sum':
    return cls(total=jnp.sum(values))

  def merge(self, other: '_Sum') -> '_Sum':
    return type(self)(total=self.total + other.total)

  def compute(self) -> jnp.ndarray:
    return self.total


def _over_finite_steps(name: str):
  """An Average of the output `name` over the steps the non-finite guard let through."""
  return metrics.Average.from_fun(
      lambda finite, **outputs: {'values': outputs[name][None], 'mask': finite[None]}
  )


@flax.struct.dataclass
class TrainMetrics(metrics.Collection):
  """Over the steps since the last log: mean loss and gradient norm of the finite steps,
  the last finite parameter norm and the lr, and how many steps the guard skipped."""

  loss: _over_finite_steps('loss')
  grad_norm: _over_finite_steps('grad_norm')
  param_norm: metrics.LastValue.from_output('param_norm')
  lr: metrics.LastValue.from_output('lr')
  skipped_steps: _Sum.from_fun(lambda finite, **_: 1 - finite.astype(jnp.int32))


def init_state(
    model, optimizer: optax.GradientTransformation, key, image_size: int, use_ema: bool, loaded=None
):
  """The initial train state (jit it with the state's out_shardings).

  Args:
    model: the Flax module.
    optimizer: the run's optimizer.
    key: the run's seed key: the weights are `model.init(key)`'s, and the training randomness
      (augmentation, drop path) comes from the same key, folded.
    image_size: the side of the example image the model is initialised on.
    use_ema: keep an EMA of the params (starting at the params).
    loaded: weights that replace the initialised ones, by '/'-joined name in the weights
      tree (params with BatchNorm's running averages merged in, `models.merge_batch_stats`):
      what `init_from` read from a checkpoint. The initialisation of every replaced leaf is
      dead code that XLA drops, so no leaf exists twice.
  """
  variables = model.init(key, jnp.zeros((1, image_size, image_size, 3), jnp.float32))
  params = variables['params']
  batch_stats = variables.get('batch_stats')
  if loaded:
    weights = models.merge_batch_stats(params, batch_stats)
    weights = flax.traverse_util.flatten_dict(weights, sep='/')
    weights.update(loaded)
    weights = flax.traverse_util.unflatten_dict(weights, sep='/')
    params, batch_stats = models.split_batch_stats(weights)
    batch_stats = batch_stats or None
  state = {
      PARAMS: params,
      'opt_state': optimizer.init(params),
      'step': jnp.zeros((), jnp.int32),
      # The training randomness (augmentation, drop path), derived from the same key: one
      # seed decides the run. Folded, so the weights stay those `model.init(key)` gives.
      'rng': jax.random.key_data(jax.random.fold_in(key, 1)),
  }
  if batch_stats is not None:  # Only then: other models' checkpoints stay as they were.
    state[BATCH_STATS] = batch_stats
  if use_ema:
    state[EMA_PARAMS] = params
  return state


def make_update(
    optimizer: optax.GradientTransformation,
    schedule_fn: optax.Schedule,
    *,
    ema_decay: float = 0.0,
    ema_warmup: bool = False,
):
  """The jit-able (state, loss, grads, batch_stats) -> (state, TrainMetrics, health) that
  applies one step's gradients: AdamW, the EMA and the non-finite guard (everything of a
  training step after the backward pass; `make_train_step` ends with it).

  Args:
    optimizer: updates the params from the gradients.
    schedule_fn: the learning rate by step (logged).
    ema_decay, ema_warmup: the EMA's decay and whether it warms up (`optim.ema_decay_at`);
      used when the state has 'ema_params'.
  """

  def update(state, loss, grads, batch_stats):
    params = state[PARAMS]
    with jax.named_scope('optimizer'):
      updates, opt_state = optimizer.update(grads, state['opt_state'], params)
      new_params = optax.apply_updates(params, updates)
    updated = {PARAMS: new_params, 'opt_state': opt_state}
    if batch_stats is not None:
      updated[BATCH_STATS] = batch_stats
    if EMA_PARAMS in state:
      with jax.named_scope('ema'):
        decay = optim.ema_decay_at(state['step'], ema_decay, ema_warmup)
        updated[EMA_PARAMS] = optim.update_ema(state[EMA_PARAMS], new_params, decay)
    with jax.named_scope('guard'):
      grad_norm = optax.tree.norm(grads)
      new_param_norm = optax.tree.norm(new_params)
      # The non-finite guard: a step whose loss, gradients or new weights are not all finite
      # changes nothing but the step count (the selects fuse into the update's elementwise
      # work), so the state never holds a NaN or inf to be saved. The optimizer's own count
      # (bias correction, its schedule) stays too: a skipped step is as if not taken. The
      # running averages count as weights: an infinite variance can leave the loss finite.
      finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.isfinite(new_param_norm)
      if batch_stats is not None:
        finite &= jnp.isfinite(optax.tree.norm(batch_stats))
      new_state = dict(state, step=state['step'] + 1)
      new_state.update(
          jax.tree.map(
              lambda new, old: jnp.where(finite, new, old),
              updated,
              {k: state[k] for k in updated},
          )
      )
      # The norm of the weights the step leaves: the guard's, so a step reads its weights
      # once more only when it was skipped (a cond runs one branch). Read from the state it
      # leaves (the same weights then): a read of the old ones after the selects have
      # overwritten their donated buffers would make XLA copy every weight first.
      param_norm = jax.lax.cond(
          finite, lambda: new_param_norm, lambda: optax.tree.norm(new_state[PARAMS])
      )
    step_metrics = TrainMetrics.single_from_model_output(
        loss=loss,
        grad_norm=grad_norm,
        param_norm=param_norm,
        lr=schedule_fn(state['step']),
        finite=finite,
    )
    return new_state, step_metrics, {'finite': finite, 'loss': loss, 'grad_norm': grad_norm}

  return update


def make_train_step(
    loss_fn: Callable[..., tuple[Any, Any]],
    update: Callable[..., Any],
    *,
    grad_accum_steps: int = 1,
):
  """The jit-able (state, batch) -> (state, TrainMetrics, health) of one optimizer update.

  Args:
    loss_fn: the objective's (params, batch_stats, batch, key) -> (loss, new batch_stats).
    update: applies the gradients (`make_update`).
    grad_accum_steps: micro-batches per update; example i goes to micro-batch i % accum.

  Returns:
    The step. `health` holds the guard's verdict and the loss and gradient norm it judged.
  """
  accum = grad_accum_steps
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def step(state, batch):
    params = state[PARAMS]
    batch_stats = state.get(BATCH_STATS)
    key = jax.random.fold_in(jax.random.wrap_key_data(state['rng']), state['step'])
    if accum == 1:
      (loss, batch_stats), grads = grad_fn(params, batch_stats, batch, key)
    else:
      # Strided micro-batches (example i goes to micro-batch i % accum), so each device
      # holds its share of every micro-batch under the batch sharding.
      def split(x):
        return x.reshape((x.shape[0] // accum, accum) + x.shape[1:]).swapaxes(0, 1)

      # The running averages go from one micro-batch to the next, as PyTorch's forward
      # passes update them: accum updates per optimizer step.
      def body(carry, xs):
        total, stats = carry
        micro, k = xs
        (loss, stats), grads = grad_fn(params, stats, micro, k)
        return (jax.tree.map(jnp.add, total, (loss, grads)), stats), None

      zero = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, params))
      ((loss, grads), batch_stats), _ = jax.lax.scan(
          body,
          (zero, batch_stats),
          (jax.tree.map(split, batch), jax.random.split(key, accum)),
      )
      loss, grads = jax.tree.map(lambda x: x / accum, (loss, grads))
    return update(state, loss, grads, batch_stats)

  return step
