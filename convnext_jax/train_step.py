"""The train state and the jitted update, without TensorFlow: what the trainer
(`train.train_and_evaluate`) runs, and what `benchmark` can time on a machine without it.

`create_model` builds the configured model; `create_train_state` materialises the state
{'params', 'opt_state', 'ema_params', 'step', 'rng'} directly sharded on a mesh, plus
'batch_stats' (BatchNorm's running averages) for a model with BatchNorm; `make_train_step` is
one optimizer update (normalisation, Random Erasing, Mixup/CutMix, label smoothing, gradient
accumulation, AdamW, EMA, the running averages) with the non-finite guard: a step whose
loss, gradients, new params or new running averages are not finite leaves the state as it was.

BatchNorm statistics are computed over groups of `config.model.bn_group_size` examples
(`bn_group_size`); with gradient accumulation the running averages are carried through the
micro-batches one after the other, as PyTorch updates them on every forward pass. The EMA
holds params only: EMA weights are evaluated with the current running averages.
"""

from typing import Any

from clu import metrics
import flax
import jax
import jax.numpy as jnp
import optax

from convnext_jax import models
from convnext_jax import optim
from convnext_jax import sharding
from convnext_jax.data import batch_ops

DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16, 'float16': jnp.float16}


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


def create_model(config, num_classes: int, data_parallel_size: int = 1):
  """The configured model.

  Args:
    config: the run's config.
    num_classes: classifier outputs.
    data_parallel_size: devices the batch is split over (`sharding.data_parallel_size`);
      what a BatchNorm model's default statistics group (`bn_group_size`) depends on.

  Raises:
    ValueError: `config.model.scan` for a roadmap model (RoadmapNet has no scanned form).
  """
  kwargs = dict(
      num_classes=num_classes,
      drop_path_rate=config.model.drop_path_rate,
      head_init_scale=config.model.head_init_scale,
      dtype=DTYPES[config.model.dtype],
      remat=config.model.remat,
  )
  if models.get_spec(config.model.name).roadmap:
    if config.model.scan:
      raise ValueError(
          f'config.model.scan must be False for {config.model.name} (roadmap '
          'models have no scanned form)'
      )
    kwargs['bn_group_size'] = bn_group_size(config, data_parallel_size)
  else:
    kwargs['scan'] = config.model.scan
  if config.model.layer_scale_init_value >= 0:
    kwargs['layer_scale_init_value'] = config.model.layer_scale_init_value
  kwargs.update(_overrides(config))
  return models.create_model(config.model.name, **kwargs)


def uses_batchnorm(config) -> bool:
  """Whether the configured model has BatchNorm (and so a 'batch_stats' state)."""
  spec = models.get_spec(config.model.name)
  return bool(spec.roadmap) and _roadmap_design(spec, config).get('norm') == 'batch'


def bn_group_size(config, data_parallel_size: int) -> int:
  """The model's `bn_group_size` for `config.model.bn_group_size`: examples per BatchNorm
  statistics group in one call of the training step (0: the whole micro-batch).

  Config 0 is the per-device micro-batch, so that each device normalises its own examples,
  as PyTorch DDP without SyncBN; -1 is the whole micro-batch; N > 0 is N.
  """
  size = config.model.bn_group_size
  if size == -1:
    return 0
  if size == 0:
    micro = config.global_batch_size // max(1, config.grad_accum_steps)
    return micro // max(1, data_parallel_size)
  return size


def _overrides(config) -> dict[str, Any]:
  return {
      k: tuple(v) if isinstance(v, (list, tuple)) else v for k, v in config.model.overrides.items()
  }


def _roadmap_design(spec: models.ModelSpec, config) -> dict[str, Any]:
  """A roadmap model's design attributes with the config's overrides of them."""
  return dict(spec.with_overrides(**_overrides(config)).roadmap)


def model_spec(config) -> models.ModelSpec:
  """The ModelSpec of the configured model with `config.model.overrides` applied
  (`ModelSpec.with_overrides`): the depths and dims layer decay sees."""
  return models.get_spec(config.model.name).with_overrides(**_overrides(config))


def make_train_step(model, optimizer, schedule_fn, config, num_classes: int, num_shards: int):
  """The jit-able (state, batch) -> (state, TrainMetrics) of one optimizer update."""
  cin = config.input
  accum = config.grad_accum_steps
  compute_dtype = DTYPES[config.model.dtype]
  mix = cin.mixup_alpha > 0 or cin.cutmix_alpha > 0

  def mixup_one(key, images, labels):
    out, targets, _ = batch_ops.mixup_cutmix(
        key,
        images,
        labels,
        num_classes,
        mixup_alpha=cin.mixup_alpha,
        cutmix_alpha=cin.cutmix_alpha,
        prob=cin.mixup_prob,
        switch_prob=cin.mixup_switch_prob,
        label_smoothing=cin.label_smoothing,
    )
    return out, targets

  def augment(key, images, labels):
    k_erase, k_mix = jax.random.split(key)
    images = batch_ops.normalize(images)
    if cin.random_erasing > 0:
      images = batch_ops.random_erasing(k_erase, images, prob=cin.random_erasing)
    if mix:
      images, targets = batch_ops.per_device(mixup_one, num_shards)(k_mix, images, labels)
    else:
      targets = batch_ops.smooth_one_hot(labels, num_classes, cin.label_smoothing)
    return images.astype(compute_dtype), targets

  def loss_fn(params, batch_stats, images, targets, key):
    """(loss, the new running averages); batch_stats is None for a model without them."""
    rngs = {'drop_path': key}
    if batch_stats is None:
      logits = model.apply({'params': params}, images, train=True, rngs=rngs)
      new_stats = None
    else:
      logits, mutated = model.apply(
          {'params': params, 'batch_stats': batch_stats},
          images,
          train=True,
          rngs=rngs,
          mutable=['batch_stats'],
      )
      new_stats = mutated['batch_stats']
    loss = optax.softmax_cross_entropy(logits.astype(jnp.float32), targets).mean()
    return loss, new_stats

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def micro_step(params, batch_stats, images, labels, key):
    """((loss, new batch_stats), grads) of one micro-batch."""
    k_aug, k_drop = jax.random.split(key)
    images, targets = augment(k_aug, images, labels)
    return grad_fn(params, batch_stats, images, targets, k_drop)

  def step(state, batch):
    params = state['params']
    batch_stats = state.get('batch_stats')
    key = jax.random.fold_in(jax.random.wrap_key_data(state['rng']), state['step'])
    if accum == 1:
      (loss, batch_stats), grads = micro_step(
          params, batch_stats, batch['image'], batch['label'], key
      )
    else:
      # Strided micro-batches (example i goes to micro-batch i % accum), so each device
      # holds its share of every micro-batch under the batch sharding.
      def split(x):
        return x.reshape((x.shape[0] // accum, accum) + x.shape[1:]).swapaxes(0, 1)

      # The running averages go from one micro-batch to the next, as PyTorch's forward
      # passes update them: accum updates per optimizer step.
      def body(carry, xs):
        total, stats = carry
        images, labels, k = xs
        (loss, stats), grads = micro_step(params, stats, images, labels, k)
        return (jax.tree.map(jnp.add, total, (loss, grads)), stats), None

      zero = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, params))
      ((loss, grads), batch_stats), _ = jax.lax.scan(
          body,
          (zero, batch_stats),
          (split(batch['image']), split(batch['label']), jax.random.split(key, accum)),
      )
      loss, grads = jax.tree.map(lambda x: x / accum, (loss, grads))
    updates, opt_state = optimizer.update(grads, state['opt_state'], params)
    new_params = optax.apply_updates(params, updates)
    updated = dict(params=new_params, opt_state=opt_state)
    if batch_stats is not None:
      updated['batch_stats'] = batch_stats
    if 'ema_params' in state:
      decay = optim.ema_decay_at(state['step'], config.ema.decay, config.ema.warmup)
      updated['ema_params'] = optim.update_ema(state['ema_params'], new_params, decay)
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
            lambda new, old: jnp.where(finite, new, old), updated, {k: state[k] for k in updated}
        )
    )
    # The norm of the weights the step leaves: the guard's, so a step reads its weights once
    # more only when it was skipped (a cond runs one branch).
    param_norm = jax.lax.cond(
        finite, lambda: new_param_norm, lambda: optax.tree.norm(state['params'])
    )
    step_metrics = TrainMetrics.single_from_model_output(
        loss=loss,
        grad_norm=grad_norm,
        param_norm=param_norm,
        lr=schedule_fn(state['step']),
        finite=finite,
    )
    return new_state, step_metrics, {'finite': finite, 'loss': loss, 'grad_norm': grad_norm}

  return step


def create_train_state(
    config, model, optimizer, mesh: jax.sharding.Mesh, image_size: int, use_ema: bool
):
  """The initial train state, created directly sharded on `mesh`.

  The state's shapes come from `jax.eval_shape`; the sharding rules turn them into
  shardings; `jax.jit(init, out_shardings=...)` then materialises every array in place, so
  no host or device ever holds an unsharded copy of a large model. A model with BatchNorm
  adds 'batch_stats', sharded by the same rules as params (so replicated unless large).

  Returns:
    (state, state_shardings, abstract_state).
  """

  def init_state(key):
    variables = model.init(key, jnp.zeros((1, image_size, image_size, 3), jnp.float32))
    params = variables['params']
    state = {
        'params': params,
        'opt_state': optimizer.init(params),
        'step': jnp.zeros((), jnp.int32),
        # The training randomness (augmentation, drop path), derived from the same key: one
        # seed decides the run. Folded, so the weights stay those `model.init(key)` gives.
        'rng': jax.random.key_data(jax.random.fold_in(key, 1)),
    }
    if 'batch_stats' in variables:  # Only then: other models' checkpoints stay as they were.
      state['batch_stats'] = variables['batch_stats']
    if use_ema:
      state['ema_params'] = params
    return state

  abstract = jax.eval_shape(init_state, jax.random.key(config.seed))
  param_shardings = sharding.tree_shardings(
      abstract['params'], mesh, min_fsdp_size=config.sharding_min_size
  )
  state_shardings = {
      'params': param_shardings,
      'opt_state': sharding.like_params_shardings(
          abstract['opt_state'], abstract['params'], param_shardings, mesh
      ),
      'step': sharding.replicated(mesh),
      'rng': sharding.replicated(mesh),
  }
  if 'batch_stats' in abstract:
    state_shardings['batch_stats'] = sharding.tree_shardings(
        abstract['batch_stats'], mesh, min_fsdp_size=config.sharding_min_size
    )
  if use_ema:
    state_shardings['ema_params'] = param_shardings
  state = jax.jit(
      init_state, out_shardings=state_shardings, compiler_options=models.compiler_options()
  )(jax.random.key(config.seed))
  return state, state_shardings, abstract
