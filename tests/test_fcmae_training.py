"""FCMAE pre-training through the run and the trainer: the same steps on 8 devices (data
parallel, FSDP) as on one; new masks every step, the same ones after a resume (bit-identical
to the uninterrupted run); pre-training -> fine-tuning with `init_from`, the encoder carried
over and the decoder left behind."""

import helpers
import jax
import mp_config
import numpy as np
import pytest
from test_batchnorm_training import _sigterm_at  # The trainer's own SIGTERM path.

from convnext_jax import checkpoints
from convnext_jax import config_lib
from convnext_jax import fcmae_study
from convnext_jax import models
from convnext_jax import optim
from convnext_jax import run as run_lib
from convnext_jax import sharding
from convnext_jax import train
from convnext_jax import trees
from convnext_jax import validation
from convnext_jax.data import DatasetFacts

SIZE = 64  # 2x2 cells of 32 px: one kept, three removed per image.
SMALL = {'depths': (1, 1, 2, 1), 'dims': (16, 32, 64, 128), 'depthwise_impl': 'conv'}


def _pretrain_config(data_dir='', num_steps=4):
  c = mp_config.tiny(data_dir, num_steps=num_steps)
  c.model.name = 'fcmae_convnextv2_atto'
  c.model.overrides = dict(SMALL, decoder_dim=32)
  c.model.drop_path_rate = 0.0
  c.input.image_size = SIZE
  c.input.randaugment = ''
  c.input.scale = (0.2, 1.0)
  c.optim.b2 = 0.95
  c.ema.decay = 0.0
  c.keep_best_checkpoint = False
  c.dataset.eval_split = 'validation[:32]'
  c.eval_batch_size = 16
  return c


def _batches(count, batch=16):
  rng = np.random.default_rng(0)
  return [
      {
          'image': rng.integers(0, 256, (batch, SIZE, SIZE, 3), dtype=np.uint8),
          'label': np.zeros((batch,), np.int32),
      }
      for _ in range(count)
  ]


def _steps(mesh_shape, devices, batches, lr=1e-3):
  config = _pretrain_config()
  config.mesh = mesh_shape
  config.sharding_min_size = 256  # Shard even this small model's kernels over 'fsdp'.
  config.optim.lr = lr
  config.optim.eps = 1e-3  # As test_sharding: updates proportional to the gradients.
  config.num_steps = 10
  mesh = sharding.make_mesh(config.mesh, devices)
  validation.check(config, mesh)
  r = run_lib.Run.build(config, DatasetFacts(1000, 10), mesh)
  state = r.init_state()
  losses = []
  for batch in batches:
    state, metrics, _ = r.train_step(state, jax.device_put(batch, r.batch_sharding))
    losses.append(float(metrics.compute()['loss']))
  return losses, jax.device_get(state), state


@pytest.fixture(scope='module')
def one_device():
  return _steps((1, 1, 1), jax.devices()[:1], _batches(3))


def test_fcmae_steps_on_eight_devices_equal_one_device(one_device):
  """2-way data parallel x 4-way FSDP: each axis alone is a special case of the two together
  (test_sharding.py covers every axis, for the classification objective)."""
  ref_losses, ref_state, _ = one_device
  losses, state, device_state = _steps((2, 4, 1), jax.devices(), _batches(3))
  np.testing.assert_allclose(losses, ref_losses, rtol=2e-6)
  flat = lambda tree: np.concatenate([np.ravel(x) for x in jax.tree.leaves(tree)])
  for key in ('params', 'opt_state'):
    np.testing.assert_allclose(
        flat(state[key]), flat(ref_state[key]), rtol=1e-4, atol=2e-5, err_msg=key
    )
  # The batch is split over 'data' and 'fsdp'; the decoder's kernels over 'fsdp' too.
  pred = device_state['params']['pred']['kernel']
  assert 'fsdp' in jax.tree.leaves(tuple(pred.sharding.spec))


def test_every_step_draws_new_masks():
  """lr 0: the weights never change, so the same batch's loss differs only by its masks."""
  batch = _batches(1)[0]
  losses, _, _ = _steps((1, 1, 1), jax.devices()[:1], [batch] * 3, lr=0.0)
  assert len(set(losses)) == 3


@pytest.fixture(scope='module')
def pretrained(shapes_dir, tmp_path_factory):
  """A 4-step pre-training run; the same run stopped by SIGTERM after step 2 and resumed."""
  config = _pretrain_config(shapes_dir)
  straight = str(tmp_path_factory.mktemp('fcmae_straight'))
  last_eval = train.train_and_evaluate(config, straight)
  stopped = str(tmp_path_factory.mktemp('fcmae_stopped'))
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(train._NonfiniteGuard, 'push', _sigterm_at(2))  # pylint: disable=protected-access
    train.train_and_evaluate(config, stopped)
  at_sigterm = checkpoints.workdir_steps(stopped)
  train.train_and_evaluate(config, stopped)
  return straight, stopped, at_sigterm, last_eval


def test_pretraining_resumes_with_the_masks_of_the_uninterrupted_run(pretrained):
  straight, stopped, at_sigterm, last_eval = pretrained
  assert at_sigterm == [2]
  resumed, uninterrupted = helpers.saved_state(stopped, 4), helpers.saved_state(straight, 4)
  assert resumed.keys() == uninterrupted.keys()
  assert {n.split('/')[0] for n in resumed} == {'params', 'opt_state', 'rng', 'step'}
  for name in resumed:
    np.testing.assert_array_equal(resumed[name], uninterrupted[name], name)
  assert np.isfinite(last_eval['convnext_shapes/raw/loss'])
  assert set(last_eval) == {'convnext_shapes/raw/loss'}
  # The picture of the reconstructions at the evaluation (step 4).
  pngs = sorted(p.name for p in (helpers.epath.Path(straight) / 'reconstructions').iterdir())
  assert pngs == ['step_00000004.png']


def test_finetuning_starts_from_the_pretrained_encoder(pretrained, shapes_dir, tmp_path):
  straight = pretrained[0]
  config = mp_config.tiny(shapes_dir, num_steps=2)
  config.model.name = 'convnextv2_atto'
  config.model.overrides = dict(SMALL)
  config.model.head_init_scale = 0.001
  config.input.image_size = SIZE
  config.init_from.path = straight
  config.init_from.params = 'raw'
  config.dataset.eval_split = 'validation[:32]'
  config.eval_batch_size = 16
  r = run_lib.Run.build(config, DatasetFacts(5000, 10))
  loaded = train._init_from(r)  # pylint: disable=protected-access
  pretrained_params = helpers.saved_state(straight, 4)
  encoder = {
      name.removeprefix('params/encoder/'): value
      for name, value in pretrained_params.items()
      if name.startswith('params/encoder/')
  }
  # Every backbone weight comes from the encoder; the final norm and the head start fresh.
  assert set(loaded) == set(encoder)
  for name, value in encoder.items():
    np.testing.assert_array_equal(np.asarray(loaded[name]), value, name)
  last_eval = train.train_and_evaluate(config, str(tmp_path / 'finetune'))
  assert 'convnext_shapes/ema/top1' in last_eval


def test_pretraining_and_finetuning_recipes_are_the_references():
  """The values of ../shared/reference/fcmae.md, by hand."""
  pre = config_lib.fcmae_pretrain('model=base')
  assert pre.model.name == 'fcmae_convnextv2_base'
  assert pre.global_batch_size == 4096 and pre.num_epochs == 1600
  assert pre.optim.lr == pytest.approx(2.4e-3)  # blr 1.5e-4 x 4096 / 256.
  assert (pre.optim.b1, pre.optim.b2, pre.optim.weight_decay) == (0.9, 0.95, 0.05)
  assert (pre.optim.warmup_epochs, pre.optim.min_lr, pre.model.dtype) == (40, 0.0, 'float32')
  assert tuple(pre.input.scale) == (0.2, 1.0) and pre.input.hflip == 0.5
  assert not (pre.input.randaugment or pre.input.random_erasing or pre.input.mixup_alpha)
  assert pre.ema.decay == 0 and config_lib.fcmae_pretrain('epochs=800').num_epochs == 800
  # Fine-tuning, TRAINING.md's rows: (epochs, lr at batch 1024, warmup, layer decay, scheme,
  # weight decay, drop path, mixup, cutmix, smoothing).
  rows = {
      'atto': (600, 8e-4, 0, 0.9, 'single', 0.3, 0.1, 0.0, 0.0, 0.2),
      'tiny': (300, 3.2e-3, 40, 0.9, 'single', 0.05, 0.2, 0.8, 1.0, 0.1),
      'base': (100, 2.5e-3, 20, 0.6, 'group', 0.05, 0.1, 0.8, 1.0, 0.1),
  }
  for size, row in rows.items():
    c = config_lib.fcmae_finetune(f'model={size},init=/x')
    got = (
        c.num_epochs,
        pytest.approx(c.optim.lr),
        c.optim.warmup_epochs,
        c.optim.layer_decay,
        c.optim.layer_decay_scheme,
        c.optim.weight_decay,
        c.model.drop_path_rate,
        c.input.mixup_alpha,
        c.input.cutmix_alpha,
        c.input.label_smoothing,
    )
    assert got == row, size
    assert c.model.name == f'convnextv2_{size}' and c.global_batch_size == 1024
    assert c.ema.decay == 0.9999 and c.input.random_erasing == 0.25
    assert c.model.head_init_scale == 0.001  # Head std 0.02 x 0.001 = 2e-5.
    assert c.input.randaugment.startswith('rand-m9-mstd0.5')


def test_pretraining_config_mistakes_are_one_line():
  c = _pretrain_config()
  c.input.image_size = 80
  with pytest.raises(validation.ConfigError, match='must be a multiple of 32'):
    validation.check(c)
  c = _pretrain_config()
  c.model.overrides['mask_ratio'] = 0.9  # 4 cells at 64 px: int(4 x 0.1) = 0 kept.
  with pytest.raises(validation.ConfigError, match='keeps 0 of the 4 cells'):
    validation.check(c)
  c = _pretrain_config()
  c.input.mixup_alpha = 0.8
  with pytest.raises(validation.ConfigError, match='no labels to mix'):
    validation.check(c)
  # The masking and decoder arguments are checked before the model is built from them.
  for key, value, message in (
      ('mask_ratio', '0.6', 'must be a number in (0, 1) (the recipe: 0.6), got '),
      ('mask_ratio', 1.0, 'must be a number in (0, 1) (the recipe: 0.6), got '),
      ('decoder_depth', -1, 'must be an integer >= 0, got '),
      ('decoder_dim', 0, 'must be a positive integer, got '),
  ):
    c = _pretrain_config()
    c.model.overrides[key] = value
    with pytest.raises(validation.ConfigError) as e:
      validation.check(c)
    assert str(e.value) == f'config.model.overrides.{key} {message}{value!r}'


def test_pretraining_decays_kernels_grn_and_the_mask_token_only():
  """fcmae.md: timm's `add_weight_decay` over the official model skips 1-D tensors and
  biases; GRN's gamma and beta ((1, C) there) and the mask token are decayed."""
  shapes = models.param_shapes(models.create_model('fcmae_convnextv2_atto'), 64)
  mask = {
      trees.name(p): m
      for p, m in jax.tree_util.tree_flatten_with_path(optim.pretraining_weight_decay_mask(shapes))[
          0
      ]
  }
  decayed = {n for n, m in mask.items() if m}
  assert 'mask_token' in decayed
  assert {'encoder/stages.0.0/grn/gamma', 'decoder.0/grn/beta', 'pred/kernel'} <= decayed
  assert {n.rsplit('/', 1)[-1] for n in decayed} == {'kernel', 'gamma', 'beta', 'mask_token'}
  assert {n.rsplit('/', 1)[-1] for n in set(mask) - decayed} == {'bias', 'scale'}


def test_mini_study_needs_mini_and_reports_its_runs(pretrained, tmp_path, capsys):
  with pytest.raises(SystemExit) as e:
    fcmae_study.main(['--workdir', str(tmp_path)])
  assert e.value.code == 2
  assert 'only the --mini CPU track is defined' in capsys.readouterr().err
  results = [
      {
          'name': 'pretrain',
          'model': 'fcmae_convnextv2_atto',
          'image_size': 96,
          'epochs': 6.0,
          'eval': {'convnext_shapes/raw/loss': 0.51234},
          'seconds': 600.0,
      },
      {
          'name': 'scratch',
          'model': 'convnextv2_atto',
          'image_size': 64,
          'epochs': 10.0,
          'eval': {'convnext_shapes/ema/top1': 0.9, 'convnext_shapes/raw/top1': 0.875},
          'seconds': 330.0,
      },
  ]
  rows = fcmae_study.table(results).splitlines()
  assert rows[2] == (
      '| pretrain | fcmae_convnextv2_atto | 96 | 6 | raw loss 0.5123 | 10 min 00 s |'
  )
  assert rows[3] == (
      '| scratch | convnextv2_atto | 64 | 10 | ema top-1 90.0%, raw top-1 87.5% | 5 min 30 s |'
  )
  # The loss curve from a pre-training run's TensorBoard events (its 4 steps, logged every 2).
  (tmp_path / 'study').mkdir()
  (tmp_path / 'study' / 'pretrain').symlink_to(pretrained[0])
  assert [step for step, _ in fcmae_study._losses(str(tmp_path / 'study' / 'pretrain'))] == [2, 4]
  assert fcmae_study.chart(str(tmp_path / 'study')).startswith(b'\x89PNG')
