"""Training a model with BatchNorm: the running averages ('batch_stats') in the train state.

A tiny roadmap ResNet (the stem and one bottleneck block, 32 px): its statistics groups follow
`model.bn_group_size`, so 8 devices (data and FSDP) train as one device with groups of the
per-device batch, and other groups give other statistics; gradient accumulation carries the
running averages through the micro-batches in turn; the non-finite guard keeps them;
evaluation uses them, so each image's prediction is its own.

End to end, this file is where resuming is proven (with the state that has the most kinds of
arrays): a run stopped by a real SIGTERM saves, and its resume is bit-identical to the
uninterrupted run (params, running averages, EMA, optimizer state, rng, data position); the
same checkpoint resumed on another mesh is restored into the new shardings and ends as the
uninterrupted run does, up to float rounding; no run leaves a thread that would hold the
process's exit.
"""

import os
import re
import shutil
import signal
import threading

from flax import traverse_util
import helpers
import jax
import mp_config
import numpy as np
import pytest

from convnext_jax import checkpoints
from convnext_jax import classification
from convnext_jax import config_lib
from convnext_jax import models
from convnext_jax import run as run_lib
from convnext_jax import sharding
from convnext_jax import train
from convnext_jax import validation
from convnext_jax.data import DatasetFacts
from convnext_jax.data import batch_ops

MODEL = 'roadmap_r50_baseline'
TINY = {'depths': (1,), 'widths': (4,)}  # Compile time dominates on CPU.
STEPS = 3
BATCH = 32
ACCUM = 2  # Micro-batches of 16: 2 examples per device on 8 devices.
PER_DEVICE = BATCH // ACCUM // 8
SIZE = 32
NUM_CLASSES = 5


def _config(mesh, bn_group_size=0):
  c = config_lib.base()
  c.model.name = MODEL
  c.model.overrides = dict(TINY)
  c.model.bn_group_size = bn_group_size
  c.model.dtype = 'float32'
  # No randomness in the forward pass: the running averages can be recomputed by hand. That
  # Random Erasing and drop path masks do not depend on the mesh is test_sharding's.
  c.model.drop_path_rate = 0.0
  c.input.random_erasing = 0.0
  c.input.mixup_alpha = 0.0
  c.input.cutmix_alpha = 0.0
  c.input.image_size = SIZE
  c.global_batch_size = BATCH
  c.grad_accum_steps = ACCUM
  c.num_steps = 10
  c.optim.warmup_steps = 1
  c.optim.min_lr = 0.0
  c.optim.lr = 1e-2
  c.optim.eps = 1e-3  # Gradients at float32 noise level stay small updates (test_sharding).
  c.ema.decay = 0.0  # As the roadmap recipes: the EMA hurts BatchNorm models.
  c.mesh = mesh
  c.sharding_min_size = 256  # Shard this small model's larger kernels over 'fsdp'.
  return c


def _batches():
  """Images of different brightness, so that statistics groups of different examples differ
  (groups of noise images alike would all have about the batch's statistics)."""
  rng = np.random.default_rng(0)
  batches = []
  for _ in range(STEPS):
    low = rng.integers(0, 192, (BATCH, 1, 1, 1))
    images = low + rng.integers(0, 64, (BATCH, SIZE, SIZE, 3))
    batches.append(
        {
            'image': images.astype(np.uint8),
            'label': rng.integers(0, NUM_CLASSES, (BATCH,), dtype=np.int32),
        }
    )
  return batches


class _Run:
  """The run of `config` on `devices`, its initial state and its jitted step."""

  def __init__(self, config, devices):
    self.config = config
    self.run = run_lib.Run.build(
        config, DatasetFacts(1000, NUM_CLASSES), sharding.make_mesh(config.mesh, devices)
    )
    self.model = self.run.model
    self.shardings = self.run.state_shardings
    self.batch_sharding = self.run.batch_sharding
    self.step = self.run.train_step
    self.state = self.run.init_state()
    self.initial = jax.device_get(self.state)

  def train(self):
    """The host states after each of the `STEPS` steps from the initial state."""
    state = self.state
    states = []
    for batch in _batches():
      state, _, health = self.step(state, jax.device_put(batch, self.batch_sharding))
      assert health['finite']
      states.append(jax.device_get(state))
    self.state = state
    return states


def _flat(tree):
  return np.concatenate([np.ravel(x) for x in jax.tree.leaves(tree)])


@pytest.fixture(scope='module')
def single_device():
  """One device whose BatchNorm groups are the per-device batch of the 8-device runs."""
  run = _Run(_config((1, 1, 1), bn_group_size=PER_DEVICE), jax.devices()[:1])
  return run, run.train()


@pytest.mark.parametrize('mesh_shape', [(4, 2, 1)], ids=['data4_fsdp2'])
def test_meshes_match_a_single_device(single_device, mesh_shape):
  """bn_group_size 0 is the per-device batch: 8 devices train as one device with groups of 2."""
  ref, ref_states = single_device
  run = _Run(_config(mesh_shape), jax.devices())
  assert run.model.bn_group_size == PER_DEVICE
  np.testing.assert_array_equal(
      _flat(run.initial['batch_stats']), _flat(ref.initial['batch_stats'])
  )
  states = run.train()
  for key in ('params', 'batch_stats', 'opt_state'):
    np.testing.assert_allclose(
        _flat(states[-1][key]), _flat(ref_states[-1][key]), rtol=1e-4, atol=2e-5, err_msg=key
    )
  # The running averages are in the state as params are: replicated (too small to shard).
  stats = run.state['batch_stats']['bn1']['var']
  assert stats.sharding.is_fully_replicated and run.shardings['batch_stats']['bn1']['var'] == (
      run.shardings['params']['bn1']['scale']
  )
  if mesh_shape[1] == 2:  # FSDP splits the larger kernels (the 7x7x3x4 stem) in two.
    kernel = run.state['params']['conv1']['kernel']
    assert kernel.addressable_shards[0].data.size == kernel.size // 2


def _running_averages(model, params, stats, images):
  """The running averages after the training forward pass of `model` on each micro-batch
  of `images` in turn (example i is in micro-batch i % ACCUM)."""
  forward = jax.jit(
      lambda s, x: model.apply(
          {'params': params, 'batch_stats': s}, x, train=True, mutable=['batch_stats']
      )[1]
  )
  for k in range(ACCUM):
    stats = forward(stats, batch_ops.normalize(images[k::ACCUM]))['batch_stats']
  return jax.device_get(stats)


def test_micro_batches_update_the_running_averages_in_turn(single_device):
  """With 2 micro-batches, the first step's running averages are those of the model's
  forward pass on micro-batch 0, then (from there) on micro-batch 1, as in PyTorch."""
  ref, ref_states = single_device
  initial, images = ref.initial, _batches()[0]['image']
  stats = _running_averages(ref.model, initial['params'], initial['batch_stats'], images)
  np.testing.assert_allclose(
      _flat(ref_states[0]['batch_stats']), _flat(stats), rtol=1e-5, atol=1e-6
  )
  assert np.abs(_flat(stats) - _flat(initial['batch_stats'])).max() > 1e-2
  # Groups of the whole micro-batch (-1) give other averages, by far more than the meshes'
  # tolerance: the comparison with 8 devices above tells groups apart.
  whole = _Run(_config((1, 1, 1), bn_group_size=-1), jax.devices()[:1]).model
  assert whole.bn_group_size is None  # The whole batch of each call: the micro-batch.
  other = _running_averages(whole, initial['params'], initial['batch_stats'], images)
  assert np.abs(_flat(other) - _flat(stats)).max() > 1e-2


def test_a_skipped_step_keeps_the_running_averages(single_device):
  """A non-finite loss (a NaN in the head, after every BatchNorm) skips the step: the
  running averages, which the forward pass did update, stay as they were too."""
  ref, ref_states = single_device
  state = jax.tree.map(np.copy, ref_states[-1])
  state['params']['fc']['kernel'][0, 0] = np.nan
  new, _, health = ref.step(
      jax.device_put(state, ref.shardings), jax.device_put(_batches()[0], ref.batch_sharding)
  )
  assert not health['finite']
  new = jax.device_get(new)
  assert new['step'] == state['step'] + 1
  jax.tree.map(np.testing.assert_array_equal, new['batch_stats'], state['batch_stats'])
  jax.tree.map(np.testing.assert_array_equal, new['params'], state['params'])


def test_init_from_loads_the_running_averages(single_device, tmp_path):
  """Weights checkpoints hold the running averages beside the params (one tree, as PyTorch's
  state_dict); `init_from` puts both into the state, in the state's shardings."""
  ref, ref_states = single_device
  trained = ref_states[-1]
  path = str(tmp_path / 'weights')
  checkpoints.save_params(
      path,
      models.merge_batch_stats(trained['params'], trained['batch_stats']),
      {'model_name': MODEL, 'num_classes': NUM_CLASSES},
  )
  config = ref.config.copy_and_resolve_references()
  config.init_from.path = path
  r = run_lib.Run.build(config, DatasetFacts(1000, NUM_CLASSES), ref.run.mesh)
  state = r.init_state(train._init_from(r))  # pylint: disable=protected-access
  for key in ('params', 'batch_stats'):
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(state[key]), trained[key])
    assert jax.tree.map(lambda x: x.sharding, state[key]) == ref.shardings[key]


def test_bn_settings_are_refused_in_one_line():
  config = _config((-1, 1, 1))
  validation.check(config)
  config.model.bn_group_size = -2
  with pytest.raises(
      validation.ConfigError,
      match=re.escape(
          'config.model.bn_group_size must be an integer >= 0 (examples per BatchNorm statistics '
          'group; 0: the per-device micro-batch), or -1 for the whole micro-batch, got -2'
      ),
  ):
    validation.check(config)
  config.model.bn_group_size, config.model.scan = 0, True
  with pytest.raises(
      validation.ConfigError,
      match=f'config.model.scan must be False for {MODEL}: roadmap models have no scanned form',
  ):
    validation.check(config)

  mesh = sharding.make_mesh((8, 1, 1))
  config = _config((8, 1, 1), bn_group_size=3)
  validation.check(config)  # Without the mesh: nothing to say.
  with pytest.raises(
      validation.ConfigError,
      match=r'config.model.bn_group_size 3 does not divide the '
      r'micro-batch 16 .*0 for the per-device batch \(2\) or -1',
  ):
    validation.check(config, mesh)
  config.model.bn_group_size = 4  # Groups of 2 devices' examples: allowed.
  validation.check(config, mesh)
  config.model.name = 'roadmap_r50_ln'  # No BatchNorm: the key is not used.
  config.model.bn_group_size = 3
  validation.check(config, mesh)


def test_evaluation_uses_the_running_averages():
  """Each image's prediction is its own (no batch statistics), and it follows the running
  averages given to the eval step."""
  config = _config((1, 1, 1))
  model = run_lib.model_from_config(config, NUM_CLASSES)
  variables = jax.eval_shape(model.init, jax.random.key(0), np.zeros((1, SIZE, SIZE, 3)))
  rng = np.random.default_rng(1)

  def draw(path, leaf):
    name = path[-1].key
    noise = rng.standard_normal(leaf.shape).astype(np.float32)
    if name == 'kernel':
      return noise / np.sqrt(np.prod(leaf.shape[:-1]))
    if name in ('scale', 'var'):
      return 1.0 + 0.3 * np.abs(noise)
    return 0.3 * noise

  variables = jax.tree_util.tree_map_with_path(draw, variables)
  params, stats = variables['params'], variables['batch_stats']
  other_stats = jax.tree.map(lambda x: x * 3.0 + 0.5, stats)
  images = rng.integers(0, 256, (8, SIZE, SIZE, 3), dtype=np.uint8)
  forward = jax.jit(
      lambda s, x: model.apply(
          {'params': params, 'batch_stats': s}, batch_ops.normalize(x), train=False
      )
  )
  logits = np.asarray(forward(stats, images))
  alone = np.concatenate([forward(stats, images[i : i + 1]) for i in range(len(images))])
  np.testing.assert_allclose(logits, alone, rtol=1e-5, atol=1e-5)

  objective = classification.Classification(
      model, NUM_CLASSES, np.float32, classification.Augmentation(), data_parallel_size=1
  )
  eval_step = jax.jit(objective.eval_step)
  batch = {
      'image': images,
      'label': logits.argmax(-1).astype(np.int32),
      'mask': np.ones(len(images), np.float32),
  }

  def top1(batch_stats):
    return float(eval_step({'raw': params}, batch, batch_stats)['raw'].compute()['top1'])

  assert top1(stats) == 1.0
  other = np.asarray(forward(other_stats, images)).argmax(-1)
  expected = float(np.mean(other == batch['label']))
  assert expected < 1.0  # The running averages change predictions...
  assert top1(other_stats) == pytest.approx(expected)  # ...and evaluation follows them.


# ---------------------------------------------------------------------------------------
# End to end: `train.train_and_evaluate`, stopped by SIGTERM and resumed.


def _e2e_config(data_dir, mesh=(-1, 1, 1)):
  # 16 images per step on 8 devices, no Mixup. The EMA stays on, to evaluate EMA params with
  # the running averages too.
  c = mp_config.tiny(data_dir, num_steps=6)
  c.mesh = mesh
  c.sharding_min_size = 256  # Under FSDP, this small model's larger kernels are split.
  c.model.name = MODEL
  c.model.overrides = dict(TINY)
  c.dataset.eval_split = 'validation[:64]'
  c.eval_batch_size = 32
  return c


def _sigterm_at(step):
  """`_NonfiniteGuard.push` (called once per step), sending this process a SIGTERM when step
  `step` is done: the trainer's own handler then stops the run after saving."""
  push = train._NonfiniteGuard.push  # pylint: disable=protected-access

  def push_then_signal(guard, done, health):
    push(guard, done, health)
    if done == step:
      os.kill(os.getpid(), signal.SIGTERM)

  return push_then_signal


def _threads_left(before):
  """Non-daemon threads started since `before` and still alive: they would hold the
  interpreter's exit after the run (threading joins them)."""
  return [t for t in threading.enumerate() if t not in before and t.is_alive() and not t.daemon]


@pytest.fixture(scope='module')
def e2e_runs(shapes_dir, tmp_path_factory):
  """An uninterrupted 6-step run; a run stopped by SIGTERM at step 3, then resumed, with the
  state each resume restored; and the checkpoint of step 3 resumed on a data x FSDP mesh."""
  config = _e2e_config(shapes_dir)
  before = threading.enumerate()
  straight = str(tmp_path_factory.mktemp('straight'))
  train.train_and_evaluate(config, straight)
  assert not _threads_left(before)  # The process can exit as soon as the run returns.

  stopped = str(tmp_path_factory.mktemp('stopped'))
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(train._NonfiniteGuard, 'push', _sigterm_at(3))  # pylint: disable=protected-access
    train.train_and_evaluate(config, stopped)
  at_sigterm = checkpoints.workdir_steps(stopped)
  other_mesh = str(tmp_path_factory.mktemp('other_mesh'))
  shutil.copytree(stopped, other_mesh, dirs_exist_ok=True)
  restore_latest = checkpoints.TrainingCheckpoints.restore_latest
  restored = []

  def recording(self, abstract_state):
    result = restore_latest(self, abstract_state)
    restored.append(None if result is None else jax.device_get(result[1]))
    return result

  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(checkpoints.TrainingCheckpoints, 'restore_latest', recording)
    last_eval = train.train_and_evaluate(config, stopped)
  assert not _threads_left(before)
  train.train_and_evaluate(_e2e_config(shapes_dir, mesh=(4, 2, 1)), other_mesh)
  return straight, stopped, at_sigterm, restored, last_eval, other_mesh


def _part(state: dict[str, np.ndarray], key: str) -> dict[str, np.ndarray]:
  """The leaves of a flat state (`helpers.saved_state`) under its top-level `key`."""
  return {name: value for name, value in state.items() if name.split('/')[0] == key}


def test_resume_is_bit_identical(e2e_runs):
  straight, stopped, _, _, last_eval, _ = e2e_runs
  assert checkpoints.workdir_steps(stopped) == [3, 6]
  resumed, uninterrupted = helpers.saved_state(stopped, 6), helpers.saved_state(straight, 6)
  assert sorted({name.split('/')[0] for name in resumed}) == [
      'batch_stats',
      'ema_params',
      'opt_state',
      'params',
      'rng',
      'step',
  ]
  assert resumed.keys() == uninterrupted.keys()
  for name in resumed:  # Every array, the optimizer's moments and count and the rng included.
    np.testing.assert_array_equal(resumed[name], uninterrupted[name], name)
  _, metadata = checkpoints.load_params(stopped, which='raw')
  assert metadata['data_positions'] == [6 * 16]  # Where the input stream goes on.
  # Evaluated with the running averages, raw and EMA (a BatchNorm model without them fails).
  assert {'convnext_shapes/raw/top1', 'convnext_shapes/ema/top1'} <= set(last_eval)


def test_resume_on_another_mesh_restores_into_its_shardings(e2e_runs):
  """The checkpoint of step 3 (8-way data parallel) resumed 4-way data x 2-way FSDP: the same
  batches (one process: one data shard either way) and the same statistics groups (2 examples
  per device), so the run ends as the uninterrupted one, up to reductions in another order."""
  straight, _, _, _, _, other_mesh = e2e_runs
  assert checkpoints.workdir_steps(other_mesh) == [3, 6]
  resumed, uninterrupted = helpers.saved_state(other_mesh, 6), helpers.saved_state(straight, 6)
  assert resumed.keys() == uninterrupted.keys()
  for key in ('params', 'batch_stats', 'ema_params', 'opt_state'):
    for name in _part(uninterrupted, key):
      np.testing.assert_allclose(
          resumed[name], uninterrupted[name], rtol=1e-5, atol=1e-6, err_msg=name
      )


def test_sigterm_saves_the_running_averages_and_resume_restores_them(e2e_runs):
  _, stopped, at_sigterm, restored, _, _ = e2e_runs
  assert at_sigterm == [3]  # Saved at the notice, then stopped.
  saved = helpers.saved_state(stopped, 3)
  assert int(saved['step']) == 3
  # Trained running averages, not the initial zeros and ones.
  assert np.abs(saved['batch_stats/bn1/mean']).max() > 1e-3
  assert np.abs(saved['batch_stats/bn1/var'] - 1).max() > 1e-3
  assert len(restored) == 1 and restored[0] is not None
  stats = traverse_util.flatten_dict(restored[0]['batch_stats'], sep='/')
  assert {f'batch_stats/{name}' for name in stats} == set(_part(saved, 'batch_stats'))
  for name, value in stats.items():
    np.testing.assert_array_equal(value, saved[f'batch_stats/{name}'], name)
