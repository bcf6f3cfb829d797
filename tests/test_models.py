"""Model zoo: parameter counts, structure, init, stochastic depth, dtypes, remat, FLOPs.

Scan over blocks and remat policies: tests/test_scan.py."""

from helpers import random_params
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from convnext_jax import models
from convnext_jax.models import layers

# Exact parameter counts with 1000 classes, from the reference table (official code and timm).
PUBLISHED_PARAMS = {
    'convnext_atto': 3_695_520,
    'convnext_femto': 5_217_784,
    'convnext_pico': 9_045_672,
    'convnext_nano': 15_593_560,
    'convnext_tiny': 28_589_128,
    'convnext_small': 50_223_688,
    'convnext_base': 88_591_464,
    'convnext_large': 197_767_336,
    'convnext_xlarge': 350_196_968,
    'convnext_xxlarge': 846_471_016,
    'convnextv2_atto': 3_708_400,
    'convnextv2_nano': 15_623_800,
    'convnextv2_tiny': 28_635_496,
    'convnextv2_base': 88_717_800,
    'convnextv2_huge': 660_289_640,
    'convnext_isotropic_small': 22_308_712,
    'convnext_isotropic_base': 87_083_752,
    'convnext_isotropic_large': 305_942_504,
}
# Published GMACs at 224 (paper, official README, timm for atto..nano): multiply-adds of
# every convolution and matrix product, the paper's "FLOPs".
PUBLISHED_GMACS = {
    'convnext_atto': 0.55,
    'convnext_femto': 0.79,
    'convnext_pico': 1.37,
    'convnext_nano': 2.46,
    'convnext_tiny': 4.47,
    'convnext_small': 8.71,
    'convnext_base': 15.38,
    'convnext_large': 34.40,
    'convnext_xlarge': 60.98,
    'convnext_isotropic_small': 4.3,
    'convnext_isotropic_base': 16.9,
    'convnext_isotropic_large': 59.7,
}

ALL_NAMES = [
    *(
        f'convnext_{s}'
        for s in (
            'atto',
            'femto',
            'pico',
            'nano',
            'tiny',
            'small',
            'base',
            'large',
            'xlarge',
            'xxlarge',
        )
    ),
    *(
        f'convnextv2_{s}'
        for s in ('atto', 'femto', 'pico', 'nano', 'tiny', 'small', 'base', 'large', 'huge')
    ),
    'convnext_isotropic_small',
    'convnext_isotropic_base',
    'convnext_isotropic_large',
]


def test_list_models_is_the_zoo():
  assert models.list_models('convnext*') == ALL_NAMES
  assert models.list_models()[: len(ALL_NAMES)] == ALL_NAMES  # Then the roadmap's networks.
  assert models.list_models('convnextv2_*') == [n for n in ALL_NAMES if 'v2' in n]


@pytest.mark.parametrize('name', sorted(PUBLISHED_PARAMS))
def test_published_parameter_count(name):
  assert models.count_params(models.param_shapes(models.create_model(name))) == (
      PUBLISHED_PARAMS[name]
  )


@pytest.mark.parametrize('size', ['femto', 'pico', 'small', 'large'])
def test_v2_count_without_published_figure_follows_v1(size):
  # V2 = V1 - layer scale (C per block) + GRN gamma and beta (2 * 4C per block): +7C a block.
  spec = models.get_spec(f'convnextv2_{size}')
  extra = sum(7 * dim * depth for depth, dim in zip(spec.depths, spec.dims))
  v1 = models.count_params(models.param_shapes(models.create_model(f'convnext_{size}')))
  v2 = models.count_params(models.param_shapes(models.create_model(f'convnextv2_{size}')))
  assert v2 == v1 + extra


def test_param_names_mirror_official_modules():
  shapes = models.param_shapes(models.create_model('convnextv2_atto', num_classes=10), 64)
  assert shapes['downsample_layers.0.0']['kernel'].shape == (4, 4, 3, 40)
  assert shapes['downsample_layers.2.1']['kernel'].shape == (2, 2, 80, 160)
  block = shapes['stages.2.5']
  assert sorted(block) == ['dwconv', 'grn', 'norm', 'pwconv1', 'pwconv2']
  assert block['dwconv']['kernel'].shape == (7, 7, 1, 160)
  assert block['grn']['gamma'].shape == (640,)
  assert shapes['head']['kernel'].shape == (320, 10)
  iso = models.param_shapes(models.create_model('convnext_isotropic_large'))
  assert iso['stem']['kernel'].shape == (16, 16, 3, 1024)
  assert iso['blocks.35']['gamma'].shape == (1024,)
  assert (
      'gamma'
      not in models.param_shapes(models.create_model('convnext_isotropic_small'))['blocks.0']
  )


def test_xxlarge_uses_layernorm_eps_1e5():
  assert models.create_model('convnext_xxlarge').norm_eps == 1e-5
  assert {models.create_model(n).norm_eps for n in ALL_NAMES if 'xxlarge' not in n} == {1e-6}


def test_create_model_rejects_unknown_names_and_arguments():
  with pytest.raises(ValueError, match="unknown model 'convnext_medium'"):
    models.create_model('convnext_medium')
  with pytest.raises(ValueError, match=r"unknown model argument\(s\) \['widths'\]"):
    models.create_model('convnext_tiny', widths=(1, 2))


def test_spec_overrides_change_the_architecture_as_create_model_builds_it():
  overrides = dict(depths=[1, 1, 2, 1], dims=[8, 16, 24, 32], norm_eps=1e-5, remat='full')
  spec = models.get_spec('convnext_tiny').with_overrides(**overrides)
  assert (spec.name, spec.depths, spec.dims, spec.norm_eps) == (
      'convnext_tiny',
      (1, 1, 2, 1),
      (8, 16, 24, 32),
      1e-5,
  )
  model = models.create_model('convnext_tiny', **overrides)
  assert (model.depths, model.dims, model.norm_eps, model.remat) == (
      (1, 1, 2, 1),
      (8, 16, 24, 32),
      1e-5,
      'full',
  )
  shapes = models.param_shapes(model, 32)
  assert sorted(k for k in shapes if k.startswith('stages.')) == [
      'stages.0.0',
      'stages.1.0',
      'stages.2.0',
      'stages.2.1',
      'stages.3.0',
  ]
  assert shapes['stages.2.1']['dwconv']['kernel'].shape == (7, 7, 1, 24)
  iso = models.get_spec('convnext_isotropic_large').with_overrides(depth=4, dim=64)
  assert (iso.depths, iso.dims, iso.layer_scale_init_value) == ((4,), (64,), 1e-6)
  v2 = models.get_spec('convnext_atto').with_overrides(use_grn=True, layer_scale_init_value=0)
  assert (v2.version, v2.layer_scale_init_value) == (2, 0)
  assert models.get_spec('convnext_tiny').with_overrides(scan=True, dim=8) == models.get_spec(
      'convnext_tiny'
  )


def _small(name='convnext_atto', **kwargs):
  return models.create_model(name, depths=(1, 1, 2, 1), dims=(16, 32, 48, 64), **kwargs)


def _init(model, size=64, seed=0):
  return jax.jit(model.init)(jax.random.key(seed), jnp.zeros((1, size, size, 3)))['params']


def _apply(model, params, x, **kwargs):
  """Jitted apply (eager op-by-op dispatch is far slower on CPU)."""
  fn = jax.jit(lambda p, x: model.apply({'params': p}, x, **kwargs))
  return fn(params, x)


def test_init_matches_official_recipe():
  params = _init(_small(head_init_scale=0.001))
  kernels = np.concatenate(
      [
          np.ravel(params[f'stages.{i}.{j}'][k]['kernel'])
          for i, d in enumerate((1, 1, 2, 1))
          for j in range(d)
          for k in ('pwconv1', 'pwconv2')
      ]
  )
  assert kernels.std() == pytest.approx(0.02, rel=0.01)
  assert np.abs(kernels).max() < 0.2
  assert np.all(params['stages.2.1']['gamma'] == np.float32(1e-6))
  assert np.all(params['stages.2.1']['pwconv1']['bias'] == 0)
  assert np.all(params['downsample_layers.2.0']['scale'] == 1)
  assert np.all(params['head']['bias'] == 0)
  assert np.asarray(params['head']['kernel']).std() == pytest.approx(0.02 * 0.001, rel=0.05)
  v2 = _init(_small('convnextv2_atto'))
  assert np.all(v2['stages.2.1']['grn']['gamma'] == 0)
  assert 'gamma' not in v2['stages.2.1']


def test_layer_scale_can_be_disabled():
  assert 'gamma' in models.param_shapes(_small())['stages.0.0']
  assert 'gamma' not in models.param_shapes(_small(layer_scale_init_value=0.0))['stages.0.0']


def test_outputs_logits_pre_logits_and_stages():
  model = _small(num_classes=7)
  params = random_params(model)
  x = jax.random.normal(jax.random.key(1), (2, 96, 128, 3))
  logits = _apply(model, params, x)
  assert logits.shape == (2, 7) and logits.dtype == jnp.float32
  feats = _apply(model, params, x, method='forward_features')
  assert feats.shape == (2, 64)
  head = params['head']
  np.testing.assert_allclose(feats @ head['kernel'] + head['bias'], logits, atol=1e-5)
  stages = _apply(model, params, x, method='forward_stages')
  assert [s.shape for s in stages] == [
      (2, 24, 32, 16),
      (2, 12, 16, 32),
      (2, 6, 8, 48),
      (2, 3, 4, 64),
  ]
  with pytest.raises(ValueError, match='output must be one of'):
    model.apply({'params': params}, x, output='features')


def test_headless_model_returns_pooled_features():
  model = _small(num_classes=0)
  params = random_params(model)
  assert 'head' not in params
  assert _apply(model, params, jnp.ones((2, 64, 64, 3))).shape == (2, 64)


def test_isotropic_outputs():
  model = models.create_model('convnext_isotropic_small', depth=2, num_classes=5)
  params = random_params(model)
  x = jnp.ones((2, 64, 48, 3))
  assert _apply(model, params, x).shape == (2, 5)
  (stage,) = _apply(model, params, x, method='forward_stages')
  assert stage.shape == (2, 4, 3, 384)


def test_drop_path_rates_are_linear_over_blocks():
  rates = layers.drop_path_rates(0.1, 18)
  assert rates[0] == 0.0 and rates[-1] == pytest.approx(0.1)
  np.testing.assert_allclose(np.diff(rates), 0.1 / 17, rtol=1e-9)


def test_drop_path_drops_whole_samples_and_rescales_survivors():
  block = models.Block(dim=8, drop_path_rate=0.5, layer_scale_init_value=0.5)
  x = jax.random.normal(jax.random.key(0), (4000, 4, 4, 8))
  variables = jax.jit(block.init)(jax.random.key(1), x)
  residual_eval = jax.jit(block.apply)(variables, x) - x
  residual_train = (
      jax.jit(lambda v, x: block.apply(v, x, train=True, rngs={'drop_path': jax.random.key(2)}))(
          variables, x
      )
      - x
  )
  dropped = np.all(np.asarray(residual_train) == 0, axis=(1, 2, 3))
  kept = ~dropped
  assert 0.45 < dropped.mean() < 0.55
  np.testing.assert_allclose(residual_train[kept], 2.0 * residual_eval[kept], rtol=1e-5, atol=1e-6)


def test_drop_path_mask_differs_per_block():
  model = _small(drop_path_rate=0.9)
  params = random_params(model)
  x = jax.random.normal(jax.random.key(0), (64, 64, 64, 3))
  _, state = jax.jit(
      lambda p, x: model.apply(
          {'params': p},
          x,
          train=True,
          rngs={'drop_path': jax.random.key(3)},
          capture_intermediates=True,
          mutable=['intermediates'],
      )
  )(params, x)
  out = {
      k: np.asarray(v['__call__'][0])
      for k, v in state['intermediates'].items()
      if k.startswith(('stages.2.', 'downsample_layers.2.1'))
  }
  # A block's output equals its input exactly for the samples whose branch was dropped.
  drop_0 = np.all(out['stages.2.0'] == out['downsample_layers.2.1'], axis=(1, 2, 3))
  drop_1 = np.all(out['stages.2.1'] == out['stages.2.0'], axis=(1, 2, 3))
  assert 0 < drop_0.sum() < 64 and 0 < drop_1.sum() < 64
  assert (drop_0 != drop_1).any()  # The two blocks drew different masks from one key.


def test_train_without_drop_path_equals_eval():
  model = _small(drop_path_rate=0.0)
  params = random_params(model)
  x = jnp.ones((2, 64, 64, 3))
  np.testing.assert_array_equal(
      _apply(model, params, x, train=True), _apply(model, params, x, train=False)
  )


@pytest.mark.parametrize('name', ['convnext_atto', 'convnextv2_atto'])
def test_bfloat16_compute_with_float32_params(name):
  model32 = _small(name)
  model16 = _small(name, dtype=jnp.bfloat16)
  shapes = models.param_shapes(model16)
  assert {p.dtype for p in jax.tree.leaves(shapes)} == {jnp.dtype(jnp.float32)}
  params = random_params(model16)
  x = jax.random.normal(jax.random.key(5), (2, 64, 64, 3))
  logits32 = _apply(model32, params, x)
  logits16 = _apply(model16, params, x)
  assert logits16.dtype == jnp.float32
  stages = jax.eval_shape(lambda p, x: model16.apply({'params': p}, x, output='stages'), params, x)
  assert stages[-1].dtype == jnp.bfloat16
  scale = float(jnp.abs(logits32).max())
  assert float(jnp.abs(logits16 - logits32).max()) < 0.05 * scale


def test_remat_gives_identical_values_and_gradients():
  x = jax.random.normal(jax.random.key(0), (2, 64, 64, 3))
  # The grouped-conv depthwise form compiles its gradient fastest on CPU; remat is orthogonal.
  plain, remat = (_small(drop_path_rate=0.3, remat=r, depthwise_impl='conv') for r in (False, True))
  params = random_params(plain)
  assert jax.tree.structure(params) == jax.tree.structure(models.param_shapes(remat))

  def loss(model):
    return lambda p: model.apply(
        {'params': p}, x, train=True, rngs={'drop_path': jax.random.key(1)}
    ).sum()

  (l1, g1), (l2, g2) = (jax.jit(jax.value_and_grad(loss(m)))(params) for m in (plain, remat))
  np.testing.assert_allclose(l1, l2, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), g1, g2)


def test_depthwise_implementations_agree():
  x = jax.random.normal(jax.random.key(0), (2, 13, 17, 24))
  k = jax.random.normal(jax.random.key(1), (7, 7, 1, 24))
  conv = layers.depthwise_conv2d(x, k, 3, 'conv')
  shift = layers.depthwise_conv2d(x, k, 3, 'shift')
  auto = jax.jit(lambda x, k: layers.depthwise_conv2d(x, k, 3, 'auto'))(x, k)
  assert conv.shape == x.shape
  np.testing.assert_allclose(shift, conv, atol=2e-5)
  np.testing.assert_allclose(auto, conv, atol=2e-5)
  with pytest.raises(ValueError, match='depthwise_impl'):
    layers.depthwise_conv2d(x, k, 3, 'fft')


def test_shifted_depthwise_gradients_equal_the_convolution_ones():
  # The shifted sum has its own backward pass (a custom VJP); it must be the convolution's.
  x = jax.random.normal(jax.random.key(0), (2, 9, 11, 8))
  k = jax.random.normal(jax.random.key(1), (7, 7, 1, 8))
  w = jax.random.normal(jax.random.key(2), x.shape)  # A non-uniform cotangent.

  def loss(impl):
    return lambda x, k: (layers.depthwise_conv2d(x, k, 3, impl) * w).sum()

  conv = jax.grad(loss('conv'), argnums=(0, 1))(x, k)
  shift = jax.jit(jax.grad(loss('shift'), argnums=(0, 1)))(x, k)
  for got, want in zip(shift, conv):
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=5e-5)


def test_auto_depthwise_lowers_to_shifted_sum_on_cpu():
  x = jnp.zeros((1, 8, 8, 4))
  k = jnp.zeros((7, 7, 1, 4))
  hlo = jax.jit(lambda x, k: layers.depthwise_conv2d(x, k, 3, 'auto')).lower(x, k).compile()
  assert 'feature_group_count' not in hlo.as_text()


@pytest.mark.parametrize('name', sorted(PUBLISHED_GMACS))
def test_multiply_adds_match_published_gmacs(name):
  # Traced, not compiled. 2% is below any one block's share (at least about 2.7%, a block of
  # a 27-block stage or of isotropic large's 36), so a missing block fails. The counter sees
  # only the grouped-conv depthwise form as a convolution; the CPU's shifted sum is
  # elementwise arithmetic.
  model = models.create_model(name, depthwise_impl='conv')
  gmacs = models.count_macs(model, 224) / 1e9
  assert gmacs == pytest.approx(PUBLISHED_GMACS[name], rel=0.02)


def test_multiply_adds_of_a_scanned_model_count_every_block():
  """A scanned stage is one `scan` over its blocks; its multiply-adds are still every
  block's (counting the scan's body once gave 0.21 GMACs here)."""
  model = models.create_model('convnext_atto', depthwise_impl='conv', scan=True)
  assert models.count_macs(model, 224) / 1e9 == pytest.approx(
      PUBLISHED_GMACS['convnext_atto'], rel=0.02
  )
