"""Sharding: the same training steps under different meshes give the same results."""

import jax
import numpy as np
import pytest

from convnext_jax import config_lib
from convnext_jax import run
from convnext_jax import sharding
from convnext_jax import validation
from convnext_jax.data import DatasetFacts

P = jax.sharding.PartitionSpec

STEPS = 3
BATCH = 16
SIZE = 32
NUM_CLASSES = 10


def _config(mesh):
  c = config_lib.base()
  c.model.name = 'convnext_atto'
  c.model.overrides.depths = (1, 1, 2, 1)  # Small: compile time dominates on CPU.
  c.model.overrides.dims = (16, 32, 64, 128)
  # XLA's grouped convolution: a far smaller program to compile than the CPU default (the
  # shifted sum, tested equal to it in test_models); the sharding logic is the same.
  c.model.overrides.depthwise_impl = 'conv'
  c.model.dtype = 'float32'
  # Drop-path and Random Erasing masks (`_run`'s defaults) must not depend on the sharding.
  c.input.mixup_alpha = 0.0  # Mixup pairs within each data-parallel shard: mesh-dependent.
  c.input.cutmix_alpha = 0.0
  c.global_batch_size = BATCH
  c.input.image_size = SIZE
  c.num_steps = 10
  c.optim.lr = 1e-3
  c.optim.min_lr = 0.0
  c.optim.warmup_steps = 1
  # Adam divides by sqrt(v) + eps: with the default 1e-8, gradients at float32 noise level
  # (different reduction orders under different meshes) become O(lr) updates. A large eps
  # keeps the update proportional to the gradient, so the comparison tests the sharding.
  c.optim.eps = 1e-3
  c.optim.layer_decay = 0.9
  c.ema.decay = 0.9
  c.mesh = mesh
  c.sharding_min_size = 256  # Shard even this small model's tensors over 'fsdp'.
  return c


def _batches(batch=BATCH):
  rng = np.random.default_rng(0)
  return [
      {
          'image': rng.integers(0, 256, (batch, SIZE, SIZE, 3), dtype=np.uint8),
          'label': rng.integers(0, NUM_CLASSES, (batch,), dtype=np.int32),
      }
      for _ in range(STEPS)
  ]


def _run(
    mesh_shape,
    devices,
    drop_path_rate=0.1,
    random_erasing=0.5,
    grad_accum_steps=1,
    global_batch_size=BATCH,
):
  config = _config(mesh_shape)
  config.global_batch_size = global_batch_size
  config.model.drop_path_rate = drop_path_rate
  config.input.random_erasing = random_erasing
  config.grad_accum_steps = grad_accum_steps
  mesh = sharding.make_mesh(config.mesh, devices)
  r = run.Run.build(config, DatasetFacts(1000, NUM_CLASSES), mesh)
  state = r.init_state()
  step = r.train_step
  batch_sharding = r.batch_sharding
  initial = jax.device_get(state['params'])
  losses = []
  for batch in _batches(global_batch_size):
    state, metrics, _ = step(state, jax.device_put(batch, batch_sharding))
    logged = metrics.compute()
    losses.append(float(logged['loss']))
    # The logged norm is the one of the weights the step left (in float64 here).
    leaves = [np.asarray(x, np.float64) for x in jax.tree.leaves(jax.device_get(state['params']))]
    norm = np.sqrt(sum(np.sum(x * x) for x in leaves))
    np.testing.assert_allclose(float(logged['param_norm']), norm, rtol=1e-5)
  return losses, jax.device_get(state), state, initial


@pytest.fixture(scope='module')
def single_device():
  return _run((1, 1, 1), jax.devices()[:1])


# Every axis at once; data x FSDP alone is the gradient accumulation test's mesh below.
@pytest.mark.parametrize('mesh_shape', [(2, 2, 2)], ids=['data2_fsdp2_model2'])
def test_meshes_match_a_single_device(single_device, mesh_shape):
  ref_losses, ref_state, _, initial = single_device
  losses, state, device_state, _ = _run(mesh_shape, jax.devices())
  np.testing.assert_allclose(losses, ref_losses, rtol=2e-6)
  flat = lambda tree: np.concatenate([np.ravel(x) for x in jax.tree.leaves(tree)])
  # The steps moved the parameters by far more than the tolerance below: a mis-sharded
  # reduction would show as differences of this order.
  moved = np.abs(flat(ref_state['params']) - flat(initial)).max()
  assert moved > 1e-3
  for key in ('params', 'ema_params', 'opt_state'):
    np.testing.assert_allclose(
        flat(state[key]), flat(ref_state[key]), rtol=1e-4, atol=2e-5, err_msg=key
    )
  # The state really is laid out as the mesh says.
  params = device_state['params']
  pw1 = params['stages.1.0']['pwconv1']['kernel']
  if mesh_shape[2] == 2:  # MLP hidden dim split over 'model'.
    assert pw1.sharding.spec[-1] == 'model'
    assert pw1.addressable_shards[0].data.shape[-1] == pw1.shape[-1] // 2
  if mesh_shape[1] == 2:  # FSDP: this 32x128 kernel is split in two (and over 'model').
    assert 'fsdp' in jax.tree.leaves(tuple(pw1.sharding.spec))
    assert pw1.addressable_shards[0].data.size == pw1.size // 2 // mesh_shape[2]
    mu = device_state['opt_state']
    assert any('fsdp' in str(getattr(x, 'sharding', '')) for x in jax.tree.leaves(mu))


def test_validation_rejects_batches_the_mesh_cannot_split():
  config = _config((8, 1, 1))
  config.global_batch_size = 12
  mesh = sharding.make_mesh(config.mesh)
  with pytest.raises(
      validation.ConfigError, match=r'micro-batch 12 .* not divisible by the data-parallel size 8'
  ):
    validation.check(config, mesh)
  config.global_batch_size = 32
  config.grad_accum_steps = 3
  with pytest.raises(validation.ConfigError, match='not divisible by config.grad_accum_steps 3'):
    validation.check(config, mesh)
  # Mixup pairs image i with image B - 1 - i of each device's batch: B must be even.
  config.global_batch_size, config.grad_accum_steps = 48, 2  # 3 per device and micro-batch.
  validation.check(config, mesh)  # Without Mixup/CutMix (as _config sets them), 3 is fine.
  config.input.cutmix_alpha = 1.0
  with pytest.raises(
      validation.ConfigError,
      match=r'even per-device batch, got 3 \(micro-batch 24 over data-parallel size 8\)',
  ):
    validation.check(config, mesh)
  config.grad_accum_steps = 1
  validation.check(config, mesh)
  config.mesh = (3, 2, 1)
  with pytest.raises(validation.ConfigError, match='has 6 devices but 8 are available'):
    validation.config_mesh(config)
  config.mesh = (-1, 3, 1)
  with pytest.raises(validation.ConfigError, match='does not divide 8 devices'):
    validation.config_mesh(config)


# Process layouts simulated on the 8 devices here: device d belongs to process d // k.
@pytest.mark.parametrize(
    'mesh_shape,per_process,shard_count,process_shards',
    [
        ((8, 1, 1), 4, 2, (0, 1)),  # 2 processes x 4 devices: each feeds its half.
        ((1, 8, 1), 4, 2, (0, 1)),
        ((2, 4, 1), 4, 2, (0, 1)),
        ((2, 2, 2), 4, 2, (0, 1)),
        ((1, 1, 8), 4, 1, (0, 0)),  # Tensor parallel only: both hold (and feed) the batch.
        ((2, 1, 4), 2, 2, (0, 0, 1, 1)),  # 4 x 2: pairs of processes share a data row.
        ((4, 2, 1), 2, 4, (0, 1, 2, 3)),
    ],
)
def test_batch_feed_gives_each_process_the_rows_its_devices_hold(
    mesh_shape, per_process, shard_count, process_shards
):
  feed = sharding.batch_feed(
      sharding.make_mesh(mesh_shape), process_of=lambda d: d.id // per_process
  )
  assert (feed.shard_count, feed.process_shards) == (shard_count, process_shards)
  assert feed.local_batch(16) == 16 // shard_count


def test_batch_feed_refuses_processes_that_would_feed_overlapping_rows():
  # 3 processes x 2 devices, data 2 x model 3: process 1 holds a device of each data row.
  mesh = sharding.make_mesh((2, 1, 3), jax.devices()[:6])
  with pytest.raises(
      ValueError,
      match=(
          r"mesh \{'data': 2, 'fsdp': 1, 'model': 3\} cannot be fed by 3 processes: .* process 0: "
          r'rows \[0\]; process 1: rows \[0, 1\]; process 2: rows \[1\]'
      ),
  ):
    sharding.batch_feed(mesh, process_of=lambda d: d.id // 2)


def test_a_single_process_feeds_the_whole_batch():
  feed = sharding.batch_feed(sharding.make_mesh((4, 2, 1)))
  assert (feed.shard_index, feed.shard_count, feed.process_shards) == (0, 1, (0,))
  batch = feed.global_arrays({'x': np.arange(16)})
  assert batch['x'].shape == (16,) and batch['x'].sharding.spec == P(('data', 'fsdp'))
  np.testing.assert_array_equal(batch['x'], np.arange(16))


@pytest.fixture(scope='module')
def single_device_no_randomness():
  """One device, the whole batch in one step, nothing random in the step: the reference for
  gradient accumulation, whose micro-batches would draw other drop-path and erasing masks."""
  return _run(
      (1, 1, 1), jax.devices()[:1], drop_path_rate=0.0, random_erasing=0.0, global_batch_size=32
  )


@pytest.mark.parametrize('accum', [4])
def test_gradient_accumulation_on_a_sharded_mesh_matches_one_full_batch(
    single_device_no_randomness, accum
):
  """grad_accum_steps micro-batches under 4-way data x 2-way FSDP sum to the gradient of the
  full batch on one device: the same losses, weights, EMA and optimizer state. Batch 32, so
  that 4 micro-batches still give each of the 8 data-parallel devices one example."""
  ref_losses, ref_state, _, initial = single_device_no_randomness
  losses, state, _, _ = _run(
      (4, 2, 1),
      jax.devices(),
      drop_path_rate=0.0,
      random_erasing=0.0,
      grad_accum_steps=accum,
      global_batch_size=32,
  )
  np.testing.assert_allclose(losses, ref_losses, rtol=2e-6)
  flat = lambda tree: np.concatenate([np.ravel(x) for x in jax.tree.leaves(tree)])
  assert np.abs(flat(ref_state['params']) - flat(initial)).max() > 1e-3
  for key in ('params', 'ema_params', 'opt_state'):
    np.testing.assert_allclose(
        flat(state[key]), flat(ref_state[key]), rtol=1e-4, atol=2e-5, err_msg=key
    )
