"""FCMAE (ConvNeXt-V2's masked autoencoder): the masked encoder against independent oracles,
the loss and masks against hand computations, the official code's initialisation.

The oracle of the masked encoder is transformers' PyTorch ConvNextV2 (from PyPI) with the
same (converted) weights: with one visible 32-px cell, the official sparse encoder computes
that cell exactly as a dense backbone computes a 32x32 image of it alone (its zero padding is
the sparse conv's absent neighbours, its per-image GRN the cell's own statistics).
"""

import helpers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch_reference
import transformers

from convnext_jax import convert
from convnext_jax import models
from convnext_jax.models import fcmae

ATOL = 1e-4  # float32 features of order 1, as tests/test_parity.py


@pytest.fixture(scope='module')
def atto():
  """(transformers' ConvNextV2 backbone, our convnextv2_atto params) with the same random
  weights."""
  hf = transformers.ConvNextV2ForImageClassification(
      transformers.ConvNextV2Config(
          hidden_sizes=[40, 80, 160, 320], depths=[2, 2, 6, 2], layer_norm_eps=1e-6
      )
  )
  hf = torch_reference.randomize_(hf, seed=3).eval()
  name, params = convert.torch_to_flax(hf.state_dict())
  assert name == 'convnextv2_atto'
  return hf.convnextv2, params


def _encoder_params(params):
  """The classifier's params less its final norm and head: the FCMAE encoder's."""
  return {k: v for k, v in params.items() if k not in ('norm', 'head')}


def _encoder(depths=(2, 2, 6, 2), dims=(40, 80, 160, 320), scan=False):
  """FCMAE's encoder: the V2 backbone (what `FCMAE` builds as 'encoder')."""
  return models.ConvNeXt(
      num_classes=0, depths=depths, dims=dims, use_grn=True, layer_scale_init_value=None, scan=scan
  )


_FEATURES = {}


def _features(encoder, params, images, mask):
  """The masked encoder's last-stage map, jitted once per encoder."""
  key = repr(encoder)
  if key not in _FEATURES:
    _FEATURES[key] = jax.jit(
        lambda p, x, m: encoder.apply({'params': p}, x, output='stages', mask=m)[-1]
    )
  return np.asarray(_FEATURES[key](params, images, mask))


def test_one_visible_cell_equals_the_backbone_on_that_crop_alone(atto):
  hf, params = atto
  h, w = 2, 3  # 64x96 images: 6 cells of 32x32.
  image = helpers.nhwc(helpers.images(1, 32 * h, 32 * w, seed=5))
  cells = [(r, c) for r in range(h) for c in range(w)]
  masks = np.ones((len(cells), h, w), np.float32)
  for k, (r, c) in enumerate(cells):
    masks[k, r, c] = 0
  ours = _features(
      _encoder(), _encoder_params(params), np.repeat(image, len(cells), axis=0), masks
  )  # (6, 2, 3, 320)
  crops = np.stack([image[0, 32 * r : 32 * r + 32, 32 * c : 32 * c + 32] for r, c in cells])
  with torch.no_grad():
    theirs = hf(torch.from_numpy(crops.transpose(0, 3, 1, 2).copy())).last_hidden_state
  theirs = theirs.numpy()[:, :, 0, 0]  # (6, 320): each crop's one cell.
  assert np.abs(theirs).max() > 0.5
  for k, (r, c) in enumerate(cells):
    np.testing.assert_allclose(ours[k, r, c], theirs[k], atol=ATOL, rtol=0)
    others = np.ones((h, w), bool)
    others[r, c] = False
    assert not ours[k][others].any()  # Masked cells are exactly zero.


def test_nothing_masked_equals_the_dense_backbone(atto):
  hf, params = atto
  images = helpers.images(2, 64, 96, seed=6)
  ours = _features(_encoder(), _encoder_params(params), helpers.nhwc(images), np.zeros((2, 2, 3)))
  with torch.no_grad():
    theirs = hf(torch.from_numpy(images)).last_hidden_state.numpy()
  np.testing.assert_allclose(ours, helpers.nhwc(theirs), atol=ATOL, rtol=0)
  _, stages = helpers.forward(
      models.create_model('convnextv2_atto', num_classes=2), params, helpers.nhwc(images)
  )
  np.testing.assert_array_equal(ours, stages[-1])


# The block structure of every V2 size (atto/femto/pico, nano, tiny, small/base/large/huge) at
# reduced width; scanned, so that 27 blocks compile as one.
@pytest.mark.parametrize('depths', [(2, 2, 6, 2), (2, 2, 8, 2), (3, 3, 9, 3), (3, 3, 27, 3)])
def test_masked_inputs_never_reach_visible_outputs(depths):
  encoder = _encoder(depths, (8, 16, 24, 32), scan=True)
  h, w = 3, 3
  images = jnp.asarray(helpers.nhwc(helpers.images(3, 32 * h, 32 * w, seed=7)))
  params = helpers.random_params(encoder)
  masks = fcmae.random_mask(jax.random.key(len(depths) + sum(depths)), 3, (h, w), 0.6)
  cotangent = jax.random.normal(jax.random.key(1), (3, h, w, 32))

  def visible_output(images):
    features = encoder.apply({'params': params}, images, output='stages', mask=masks)[-1]
    return jnp.sum(features * cotangent)

  grad = np.asarray(jax.jit(jax.grad(visible_output))(images))
  removed = np.repeat(np.repeat(np.asarray(masks), 32, axis=1), 32, axis=2).astype(bool)
  assert removed.any() and (~removed).any()
  assert not grad[removed].any()  # Exactly zero at every masked pixel.
  # Every visible cell's pixels influence the output.
  per_cell = np.abs(grad).reshape(3, h, 32, w, 32, 3).sum(axis=(2, 4, 5))
  assert (per_cell[np.asarray(masks) == 0] > 0).all()


def test_patchify_order_and_normalised_targets_by_hand():
  rng = np.random.default_rng(0)
  p, h, w = 4, 2, 3
  images = rng.standard_normal((2, h * p, w * p, 3)).astype(np.float32)
  # The reference's order: NCHW images, 'nchpwq->nhwpqc', done here with torch.
  nchw = torch.from_numpy(images.transpose(0, 3, 1, 2).copy())
  x = nchw.reshape(2, 3, h, p, w, p)
  expected = torch.einsum('nchpwq->nhwpqc', x).reshape(2, h * w, p * p * 3).numpy()
  np.testing.assert_array_equal(np.asarray(fcmae.patchify(jnp.asarray(images), p)), expected)
  # One entry by hand: patch (row 1, column 2), pixel (3, 1), channel 2.
  assert expected[1, 1 * w + 2, (3 * p + 1) * 3 + 2] == images[1, 1 * p + 3, 2 * p + 1, 2]
  np.testing.assert_array_equal(
      np.asarray(fcmae.unpatchify(jnp.asarray(expected), p, (h, w))), images
  )
  mean = expected.mean(axis=-1, keepdims=True)
  var = expected.var(axis=-1, ddof=1, keepdims=True)
  np.testing.assert_allclose(
      np.asarray(fcmae.pixel_targets(jnp.asarray(images), p)),
      (expected - mean) / np.sqrt(var + 1e-6),
      rtol=1e-5,
      atol=1e-6,
  )
  np.testing.assert_array_equal(
      np.asarray(fcmae.pixel_targets(jnp.asarray(images), p, norm_pix_loss=False)), expected
  )


def test_loss_is_the_mean_squared_error_of_the_removed_patches_by_hand():
  rng = np.random.default_rng(1)
  pred = rng.standard_normal((2, 3, 5)).astype(np.float32)
  target = rng.standard_normal((2, 3, 5)).astype(np.float32)
  mask = np.array([[1, 0, 1], [0, 0, 1]], np.float32)
  removed = [(0, 0), (0, 2), (1, 2)]
  expected = sum(np.mean((pred[n, l] - target[n, l]) ** 2) for n, l in removed) / 3
  np.testing.assert_allclose(
      float(fcmae.masked_loss(jnp.asarray(pred), jnp.asarray(target), jnp.asarray(mask))),
      expected,
      rtol=1e-6,
  )


@pytest.mark.parametrize(
    'grid,ratio,kept', [((7, 7), 0.6, 19), ((2, 3), 0.6, 2), ((4, 4), 0.75, 4), ((6, 6), 0.5, 18)]
)
def test_masks_keep_int_l_times_one_minus_ratio_cells_per_image(grid, ratio, kept):
  masks = np.asarray(fcmae.random_mask(jax.random.key(0), 16, grid, ratio))
  assert masks.shape == (16, *grid)
  assert set(np.unique(masks)) <= {0.0, 1.0}
  np.testing.assert_array_equal((masks == 0).sum(axis=(1, 2)), kept)
  assert len({m.tobytes() for m in masks}) > 8  # Different per image.


def test_module_draws_masks_from_its_rng_stream_and_returns_the_loss():
  model = models.FCMAE(depths=(1, 1, 1, 1), dims=(8, 8, 8, 8), decoder_dim=16)
  images = jnp.asarray(helpers.nhwc(helpers.images(2, 64, 64, seed=2)))
  params = helpers.random_params(model)
  apply = jax.jit(lambda key: model.apply({'params': params}, images, rngs={'mask': key}))
  a, b = apply(jax.random.key(0)), apply(jax.random.key(1))
  assert not np.array_equal(a['mask'], b['mask'])
  np.testing.assert_array_equal(a['mask'], apply(jax.random.key(0))['mask'])
  assert a['pred'].shape == (2, 4, 32 * 32 * 3)
  target = fcmae.pixel_targets(images, 32)
  np.testing.assert_allclose(
      float(a['loss']),
      float(fcmae.masked_loss(a['pred'], target, a['mask'])),
      rtol=1e-6,
  )
  # An explicit mask is used as given.
  mask = np.array([[[1, 0], [0, 0]], [[1, 1], [1, 0]]], np.float32)
  out = model.apply({'params': params}, images, mask=mask)
  np.testing.assert_array_equal(out['mask'], mask)
  assert not np.asarray(out['features'])[mask.astype(bool)].any()


def test_image_sizes_must_be_multiples_of_the_cell():
  model = models.FCMAE(depths=(1, 1, 1, 1), dims=(8, 8, 8, 8), decoder_dim=16)
  with pytest.raises(ValueError, match='multiple of 32'):
    model.init({'params': jax.random.key(0), 'mask': jax.random.key(1)}, jnp.zeros((1, 48, 64, 3)))


def test_initialisation_is_the_official_pretraining_codes():
  """fcmae.md: std 1.0 cut at +-2 for the stem, depthwise and pointwise layers, proj and pred,
  std 0.02 for the downsampling convs, PyTorch's default uniform for the decoder's linears,
  N(0, 0.02) for the mask token, zero biases elsewhere."""
  model = models.create_model('fcmae_convnextv2_atto')
  variables = jax.jit(model.init)(
      {'params': jax.random.key(0), 'mask': jax.random.key(1)}, jnp.zeros((1, 64, 64, 3))
  )
  p = jax.tree.map(np.asarray, variables['params'])
  enc = p['encoder']

  def check_trunc_normal_1(x):
    assert np.abs(x).max() <= 2.0 and np.abs(x).max() > 1.9
    assert 0.85 < x.std() < 0.9  # The std of N(0, 1) cut at +-2: 0.8796.

  for x in (
      enc['downsample_layers.0.0']['kernel'],
      enc['stages.2.3']['dwconv']['kernel'],
      enc['stages.2.3']['pwconv1']['kernel'],
      enc['stages.3.1']['pwconv2']['kernel'],
      p['proj']['kernel'],
      p['pred']['kernel'],
      p['decoder.0']['dwconv']['kernel'],
  ):
    check_trunc_normal_1(x)
  assert 0.018 < enc['downsample_layers.2.1']['kernel'].std() < 0.022
  for name, fan_in in (('pwconv1', 512), ('pwconv2', 2048)):
    layer = p['decoder.0'][name]
    bound = 1 / np.sqrt(fan_in)
    for x in (layer['kernel'], layer['bias']):
      assert np.abs(x).max() <= bound and np.abs(x).max() > 0.95 * bound
  assert 0.018 < p['mask_token'].std() < 0.022
  assert not enc['stages.0.0']['pwconv1']['bias'].any() and not p['pred']['bias'].any()
  assert not enc['stages.0.0']['grn']['gamma'].any()
  np.testing.assert_array_equal(enc['stages.0.0']['norm']['scale'], 1.0)
  # The zoo's scheme on request: std 0.02 throughout.
  zoo = models.create_model('fcmae_convnextv2_atto', init_scheme='zoo')
  kernel = jax.jit(zoo.init)(
      {'params': jax.random.key(0), 'mask': jax.random.key(1)}, jnp.zeros((1, 64, 64, 3))
  )['params']['encoder']['stages.2.3']['pwconv1']['kernel']
  assert 0.018 < np.asarray(kernel).std() < 0.022


def test_encoder_params_are_the_v2_backbones():
  fc = models.param_shapes(models.create_model('fcmae_convnextv2_tiny'), 64)
  v2 = models.param_shapes(models.create_model('convnextv2_tiny', num_classes=0), 64)
  del v2['norm']
  assert jax.tree.map(lambda a: a.shape, fc['encoder']) == jax.tree.map(lambda a: a.shape, v2)
  assert set(fc) == {'encoder', 'proj', 'mask_token', 'decoder.0', 'pred'}
  # Published: convnextv2_tiny 28.6M with its 1000-class head and final norm.
  assert models.count_params(fc['encoder']) == 28_635_496 - 768 * 1000 - 1000 - 2 * 768
  with pytest.raises(ValueError, match='without a classifier head'):
    models.create_model('fcmae_convnextv2_tiny', num_classes=10)


def test_grn_gradient_of_an_all_zero_channel_is_pytorchs():
  """A channel zero at every (visible) site, as FCMAE's masked maps with one visible cell and
  GELU's exact zeros make common: PyTorch's `vector_norm` backward gives it gradient 0, a
  naive sqrt NaN."""
  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, 3, 3, 4)).astype(np.float32)
  x[0, :, :, 1] = 0
  dy = rng.standard_normal(x.shape).astype(np.float32)
  gamma, beta = rng.standard_normal(4).astype(np.float32), rng.standard_normal(4).astype(np.float32)
  grn = models.convnext.layers.GlobalResponseNorm()
  variables = {'params': {'gamma': gamma, 'beta': beta}}
  ours = jax.grad(lambda x: jnp.sum(grn.apply(variables, x) * dy))(x)
  t = torch.tensor(x, requires_grad=True)
  theirs = torch_reference.OfficialGRN(4)
  with torch.no_grad():
    theirs.gamma.copy_(torch.from_numpy(gamma).reshape(1, 1, 1, 4))
    theirs.beta.copy_(torch.from_numpy(beta).reshape(1, 1, 1, 4))
  (theirs(t) * torch.from_numpy(dy)).sum().backward()
  assert np.isfinite(np.asarray(ours)).all()
  np.testing.assert_allclose(np.asarray(ours), t.grad.numpy(), atol=1e-5, rtol=0)
