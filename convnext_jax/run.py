"""One training run, built once: from the config, the mesh and the dataset's facts to the
jitted train and eval steps. No TensorFlow.

`Run.build(config, data, mesh)` checks the config (`validation.check`, every rule in one
place), resolves every sentinel of it once (-1 class count, epochs into steps, the eval
batch and crop, the BatchNorm statistics group), and builds, in this order: the model, the
objective (what a step computes from a batch: `classification.Classification`, or
`pretraining.MaskedAutoencoding` for an FCMAE model), the learning
rate schedule and the optimizer, the state's shardings and its abstract shapes, and the
jitted steps. It materialises nothing: `Run.init_state` creates the state directly sharded on
the mesh (optionally around weights read from a checkpoint), and a resumed state is restored
straight into `Run.abstract_state`.

The trainer (`train.train_and_evaluate`), `python -m convnext_jax.benchmark train|infer`, the
roadmap study and the tests all build their runs here, so the benchmark times the trainer's
own step by construction. A second training mode plugs in as another objective: its loss,
batch and evaluation, with the same schedule, optimizer, shardings, state and guard.
"""

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax

from convnext_jax import classification
from convnext_jax import config_lib
from convnext_jax import models
from convnext_jax import optim
from convnext_jax import pretraining
from convnext_jax import sharding
from convnext_jax import train_step
from convnext_jax import validation
from convnext_jax.data import DatasetFacts
from convnext_jax.data import EvalInput
from convnext_jax.data import eval_crop


@dataclasses.dataclass(frozen=True)
class Schedule:
  """Every duration of a run in optimizer steps."""

  steps_per_epoch: int
  total_steps: int
  warmup_steps: int
  eval_every: int


@dataclasses.dataclass(frozen=True)
class Batches:
  """The batch sizes of a run, in examples.

  Attributes:
    global_size: per optimizer step, over every device.
    grad_accum_steps: micro-batches per step.
    micro: per micro-batch, over every device.
    data_parallel: devices the batch is split over (`sharding.data_parallel_size`).
    per_device: per micro-batch and device.
    per_process: the rows of each global batch this process feeds.
    eval_global: per evaluation batch, over every device (a multiple of `data_parallel`).
    bn_group: examples per BatchNorm statistics group in training (None: the whole
      micro-batch), what the model's `bn_group_size` is set to.
  """

  global_size: int
  grad_accum_steps: int
  micro: int
  data_parallel: int
  per_device: int
  per_process: int
  eval_global: int
  bn_group: int | None


def schedule(config: ml_collections.ConfigDict, num_train_examples: int) -> Schedule:
  """The config's durations in steps: an epoch is num_train_examples // global_batch steps;
  a duration in steps (> 0, or >= 0 for warmup) overrides the one in epochs."""
  steps_per_epoch = max(1, num_train_examples // config.global_batch_size)
  total = (
      config.num_steps
      if config.num_steps > 0
      else max(1, round(config.num_epochs * steps_per_epoch))
  )
  warmup = (
      config.optim.warmup_steps
      if config.optim.warmup_steps >= 0
      else round(config.optim.warmup_epochs * steps_per_epoch)
  )
  eval_every = (
      config.eval_every_steps
      if config.eval_every_steps > 0
      else max(1, round(config.eval_every_epochs * steps_per_epoch))
  )
  return Schedule(steps_per_epoch, total, min(warmup, total - 1), eval_every)


def batches(config: ml_collections.ConfigDict, feed: sharding.BatchFeed, dp: int) -> Batches:
  """The config's batch sizes on a mesh of `dp` data-parallel devices fed as `feed`."""
  micro = config.global_batch_size // config.grad_accum_steps
  eval_size = config.eval_batch_size if config.eval_batch_size > 0 else config.global_batch_size
  group = config.model.bn_group_size
  # Config -1: the whole micro-batch; 0: each device's share of it, as PyTorch DDP without
  # SyncBN normalises each GPU's batch; N > 0: N.
  bn_group = None if group == -1 else (micro // dp if group == 0 else group)
  return Batches(
      global_size=config.global_batch_size,
      grad_accum_steps=config.grad_accum_steps,
      micro=micro,
      data_parallel=dp,
      per_device=micro // dp,
      per_process=feed.local_batch(config.global_batch_size),
      eval_global=max(dp, eval_size // dp * dp),
      bn_group=bn_group,
  )


def eval_input(config: ml_collections.ConfigDict) -> EvalInput:
  """The config's evaluation preprocessing, its defaults filled in (`data.eval_crop`)."""
  cin = config.input
  size = cin.eval_image_size if cin.eval_image_size > 0 else cin.image_size
  return EvalInput(size, *eval_crop(size, cin.crop_pct, cin.crop_mode))


def model_spec(config: ml_collections.ConfigDict) -> models.ModelSpec:
  """The configured architecture: the model's spec with `config.model.overrides` applied
  (what layer decay and the parameter count see)."""
  return models.get_spec(config.model.name).with_overrides(**config_lib.model_overrides(config))


def model_from_config(
    config: ml_collections.ConfigDict, num_classes: int, bn_group: int | None = None
) -> nn.Module:
  """The configured model with `num_classes` outputs.

  Args:
    config: the run's config (`config.model`).
    num_classes: classifier outputs (`config.model.num_classes` resolved).
    bn_group: for a model with BatchNorm, examples per statistics group in training (None:
      the whole batch of each call); `Batches.bn_group` is the run's.
  """
  cm = config.model
  spec = models.get_spec(cm.name)
  kwargs = dict(drop_path_rate=cm.drop_path_rate, dtype=jnp.dtype(cm.dtype), remat=cm.remat)
  if not spec.masked_autoencoder:  # FCMAE models have no classifier head.
    kwargs.update(num_classes=num_classes, head_init_scale=cm.head_init_scale)
  if spec.roadmap:
    kwargs['bn_group_size'] = bn_group
  else:
    kwargs['scan'] = cm.scan
  if cm.layer_scale_init_value >= 0:  # -1: the variant's own.
    kwargs['layer_scale_init_value'] = cm.layer_scale_init_value
  kwargs.update(config_lib.model_overrides(config))
  return models.create_model(cm.name, **kwargs)


def _with_shardings(abstract, shardings):
  return jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
  )


@dataclasses.dataclass(frozen=True)
class Run:
  """Everything one training run computes with, built once by `Run.build`.

  Attributes:
    config: the run's config (checked; a frozen copy, so that it cannot drift from what was
      built from it).
    mesh: the device mesh.
    feed: which rows of each global batch this process feeds.
    data: the training data's facts.
    num_classes: classifier outputs (0 for a pre-training run).
    schedule: durations in steps.
    batches: batch sizes.
    eval_input: evaluation preprocessing.
    model: the Flax module (training and evaluation).
    objective: what a step computes from a batch and what evaluation measures:
      `classification.Classification`, or `pretraining.MaskedAutoencoding` for an FCMAE
      model.
    lr_fn: the learning rate by step.
    optimizer: AdamW with the recipe's weight decay, layer decay and clipping.
    use_ema: whether the state holds an EMA of the params.
    state_shardings: the train state's shardings.
    abstract_state: the train state's shapes, dtypes and shardings (no memory).
    train_step: jitted (state, batch) -> (state, TrainMetrics, health); donates the state.
    update: what the train step does after its backward pass, (state, loss, grads,
      batch_stats) -> (state, TrainMetrics, health), unjitted (`benchmark profile` times it).
    eval_step: jitted (params_by_name, batch[, batch_stats]) -> {name: metrics}.
  """

  config: ml_collections.ConfigDict
  mesh: jax.sharding.Mesh
  feed: sharding.BatchFeed
  data: DatasetFacts
  num_classes: int
  schedule: Schedule
  batches: Batches
  eval_input: EvalInput
  model: nn.Module
  objective: classification.Classification | pretraining.MaskedAutoencoding
  lr_fn: optax.Schedule
  optimizer: optax.GradientTransformation
  use_ema: bool
  state_shardings: Any
  abstract_state: Any
  train_step: Any
  update: Any
  eval_step: Any

  @classmethod
  def build(
      cls,
      config: ml_collections.ConfigDict,
      data: DatasetFacts,
      mesh: jax.sharding.Mesh | None = None,
      *,
      feed: sharding.BatchFeed | None = None,
  ) -> 'Run':
    """The run of `config` on `mesh` (default: `sharding.make_mesh(config.mesh)`).

    Args:
      config: the run's config.
      data: the training data's facts.
      mesh: the device mesh.
      feed: what `validation.check(config, mesh)` returned, when the caller has checked the
        config already (the trainer does, before it prepares the dataset); else `build`
        checks it.

    Raises:
      validation.ConfigError: the config (or its mesh) fails a check; one line.
    """
    if mesh is None:
      mesh = validation.config_mesh(config)
    if feed is None:
      feed = validation.check(config, mesh)
    pretraining_run = models.get_spec(config.model.name).masked_autoencoder
    num_classes = config.model.num_classes if config.model.num_classes > 0 else data.num_classes
    if pretraining_run:
      num_classes = 0  # Labels are not used.
    sched = schedule(config, data.num_train_examples)
    dp = sharding.data_parallel_size(mesh)
    sizes = batches(config, feed, dp)
    model = model_from_config(config, num_classes, sizes.bn_group)
    compute_dtype = jnp.dtype(config.model.dtype)
    if pretraining_run:
      objective = pretraining.MaskedAutoencoding(model, compute_dtype)
    else:
      objective = classification.Classification(
          model,
          num_classes,
          compute_dtype,
          classification.Augmentation.from_config(config.input),
          dp,
      )
    co = config.optim
    lr_fn = optim.lr_schedule(co.lr, co.min_lr, sched.warmup_steps, sched.total_steps)
    image_size = config.input.image_size
    optimizer = optim.make_optimizer(
        lr_fn,
        models.param_shapes(model, image_size),
        model_spec(config),
        weight_decay=co.weight_decay,
        b1=co.b1,
        b2=co.b2,
        eps=co.eps,
        layer_decay=co.layer_decay,
        layer_decay_scheme=co.layer_decay_scheme,
        grad_clip_norm=co.grad_clip_norm,
    )
    use_ema = config.ema.decay > 0

    def init(key, loaded=None):
      return train_step.init_state(model, optimizer, key, image_size, use_ema, loaded)

    abstract = jax.eval_shape(init, jax.random.key(config.seed))
    state_shardings = _state_shardings(abstract, mesh, config.sharding_min_size)
    update = train_step.make_update(
        optimizer, lr_fn, ema_decay=config.ema.decay, ema_warmup=config.ema.warmup
    )
    step = jax.jit(
        train_step.make_train_step(
            objective.loss, update, grad_accum_steps=config.grad_accum_steps
        ),
        in_shardings=(state_shardings, feed.sharding),
        out_shardings=(state_shardings, None, None),
        donate_argnums=(0,),
        compiler_options=models.compiler_options(training=True),
    )
    eval_step = jax.jit(objective.eval_step, compiler_options=models.compiler_options())
    return cls(
        config=ml_collections.FrozenConfigDict(config),
        mesh=mesh,
        feed=feed,
        data=data,
        num_classes=num_classes,
        schedule=sched,
        batches=sizes,
        eval_input=eval_input(config),
        model=model,
        objective=objective,
        lr_fn=lr_fn,
        optimizer=optimizer,
        use_ema=use_ema,
        state_shardings=state_shardings,
        abstract_state=_with_shardings(abstract, state_shardings),
        train_step=step,
        update=update,
        eval_step=eval_step,
    )

  @property
  def batch_sharding(self) -> jax.sharding.NamedSharding:
    return self.feed.sharding

  @property
  def uses_batchnorm(self) -> bool:
    return train_step.BATCH_STATS in self.abstract_state

  def abstract_weights(self):
    """The params (with BatchNorm's running averages merged in, as checkpoints hold them)
    as shapes with their shardings: the targets `init_from` reads a checkpoint into."""
    state = self.abstract_state
    return models.merge_batch_stats(state[train_step.PARAMS], state.get(train_step.BATCH_STATS))

  def init_state(self, loaded: dict[str, jax.Array] | None = None):
    """The initial train state, created directly sharded on the mesh.

    `jax.jit(init, out_shardings=...)` materialises every array in place, so no host or
    device ever holds an unsharded copy of a large model.

    Args:
      loaded: weights read from a checkpoint, by '/'-joined name in the weights tree
        (`abstract_weights`), each already in its sharding: they take the place of the
        initialised ones (and start the EMA). Their buffers are donated to the state.
    """
    loaded = loaded or {}

    def init(key, loaded):
      return train_step.init_state(
          self.model, self.optimizer, key, self.config.input.image_size, self.use_ema, loaded
      )

    return jax.jit(
        init,
        out_shardings=self.state_shardings,
        donate_argnums=(1,),
        compiler_options=models.compiler_options(),
    )(jax.random.key(self.config.seed), loaded)


def _state_shardings(abstract, mesh: jax.sharding.Mesh, min_fsdp_size: int):
  """The train state's shardings: params by the regex rules of `sharding`, optimizer state
  like the params it holds copies of, the EMA as the params, the rest replicated."""
  param_shardings = sharding.tree_shardings(
      abstract[train_step.PARAMS], mesh, min_fsdp_size=min_fsdp_size
  )
  out = {
      train_step.PARAMS: param_shardings,
      'opt_state': sharding.like_params_shardings(
          abstract['opt_state'], abstract[train_step.PARAMS], param_shardings, mesh
      ),
      'step': sharding.replicated(mesh),
      'rng': sharding.replicated(mesh),
  }
  if train_step.BATCH_STATS in abstract:
    out[train_step.BATCH_STATS] = sharding.tree_shardings(
        abstract[train_step.BATCH_STATS], mesh, min_fsdp_size=min_fsdp_size
    )
  if train_step.EMA_PARAMS in abstract:
    out[train_step.EMA_PARAMS] = param_shardings
  return out
