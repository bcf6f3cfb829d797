"""The roadmap networks (paper section 2): FLOPs and parameters against the paper, ConvNeXt at
the end, BatchNorm against PyTorch's. Conversion and logit parity with transformers' ResNet:
tests/test_resnet_convert.py; training with BatchNorm: tests/test_batchnorm_training.py."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from convnext_jax import models
from convnext_jax.models import layers

STEPS = (
    'baseline',
    'stage_ratio',
    'patchify',
    'depthwise',
    'width',
    'inverted',
    'dw_up',
    'kernel5',
    'kernel7',
    'kernel9',
    'kernel11',
    'gelu',
    'fewer_act',
    'fewer_norm',
    'ln',
    'downsample',
)
# GFLOPs (multiply-adds) at 224 px, Tables 10 and 11 of the paper (arXiv:2201.03545v2). For
# 'ln' Table 10 prints 4.46, which no norm swap can add; Figure 2's bar reads 4.2, and the
# step before and the R200 track's same step are both 4.15 / 14.81.
PAPER_GFLOPS = {
    'r50': (
        4.09,
        4.53,
        4.42,
        2.35,
        5.27,
        4.64,
        4.07,
        4.10,
        4.15,
        4.21,
        4.29,
        4.15,
        4.15,
        4.15,
        4.2,
        4.49,
    ),
    'r200': (
        15.01,
        14.52,
        14.38,
        7.23,
        16.76,
        15.68,
        14.63,
        14.70,
        14.81,
        14.95,
        15.13,
        14.81,
        14.81,
        14.81,
        14.81,
        15.35,
    ),
}
# Published parameter counts: torchvision's resnet50 and the ConvNeXt releases.
PUBLISHED_PARAMS = {
    'roadmap_r50_baseline': 25_557_032,
    'roadmap_r50_downsample': 28_589_128,
    'roadmap_r200_downsample': 88_591_464,
}


def test_list_models_gives_each_track_in_roadmap_order():
  assert models.list_models('roadmap_r50_*') == [f'roadmap_r50_{s}' for s in STEPS]
  assert models.list_models('roadmap*') == (
      [f'roadmap_r50_{s}' for s in STEPS] + [f'roadmap_r200_{s}' for s in STEPS]
  )


@pytest.mark.parametrize('track', ['r50', 'r200'])
def test_multiply_adds_of_every_step_are_the_papers(track):
  for step, paper in zip(STEPS, PAPER_GFLOPS[track]):
    model = models.create_model(f'roadmap_{track}_{step}', depthwise_impl='conv')
    gmacs = models.count_macs(model, 224) / 1e9
    assert gmacs == pytest.approx(paper, rel=0.02), step


def _hand_count(depths, widths, block, stem, kernel=3, depthwise=False, separate=False):
  """Multiply-adds at 224 px, counted by hand from the architecture (padded taps included,
  as fvcore counts them): convolutions and the classifier only."""

  def conv(size, cin, cout, k, stride=1, groups=1):
    out = size // stride
    return out * out * cout * (cin // groups) * k * k, out

  total, size = 0, 224
  cin = widths[0]
  if stem == 'resnet':
    macs, size = conv(size, 3, cin, 7, 2)
    size //= 2  # Max pool.
  else:
    macs, size = conv(size, 3, cin, 4, 4)
  total += macs
  for i, (depth, width) in enumerate(zip(depths, widths)):
    for j in range(depth):
      stride = 2 if i > 0 and j == 0 else 1
      if separate and stride == 2:
        macs, size = conv(size, cin, width, 2, 2)
        total, stride = total + macs, 1
        cin = width
      if block == 'bottleneck':
        cout = 4 * width
        layers_ = [
            (cin, width, 1, 1, 1),
            (width, width, kernel, stride, width if depthwise else 1),
            (width, cout, 1, 1, 1),
        ]
      else:  # Depthwise conv first.
        cout = width
        layers_ = [
            (cin, cin, kernel, stride, cin),
            (cin, 4 * width, 1, 1, 1),
            (4 * width, cout, 1, 1, 1),
        ]
      in_size = size
      for a, b, k, s, g in layers_:
        macs, size = conv(size, a, b, k, s, g)
        total += macs
      if cin != cout or stride != 1:
        total += conv(in_size, cin, cout, 1, stride)[0]
      cin = cout
  return total + cin * 1000


@pytest.mark.parametrize(
    'name,arch',
    [
        (
            'roadmap_r50_baseline',
            dict(
                depths=(3, 4, 6, 3), widths=(64, 128, 256, 512), block='bottleneck', stem='resnet'
            ),
        ),
        (
            'roadmap_r50_depthwise',
            dict(
                depths=(3, 3, 9, 3),
                widths=(64, 128, 256, 512),
                block='bottleneck',
                stem='patchify',
                depthwise=True,
            ),
        ),
        (
            'roadmap_r50_kernel11',
            dict(
                depths=(3, 3, 9, 3),
                widths=(96, 192, 384, 768),
                block='dw_first',
                stem='patchify',
                kernel=11,
            ),
        ),
        (
            'roadmap_r50_downsample',
            dict(
                depths=(3, 3, 9, 3),
                widths=(96, 192, 384, 768),
                block='dw_first',
                stem='patchify',
                kernel=7,
                separate=True,
            ),
        ),
    ],
)
def test_traced_count_equals_a_count_by_hand(name, arch):
  model = models.create_model(name, depthwise_impl='conv')
  assert models.count_macs(model, 224) == _hand_count(**arch)


@pytest.mark.parametrize('name', sorted(PUBLISHED_PARAMS))
def test_published_parameter_counts(name):
  assert models.count_params(models.param_shapes(models.create_model(name))) == (
      PUBLISHED_PARAMS[name]
  )


def test_baseline_has_torchvision_names_and_batch_statistics():
  model = models.create_model('roadmap_r50_baseline')
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3))))
  params, stats = variables['params'], variables['batch_stats']
  assert sorted(params) == sorted(
      ['conv1', 'bn1', 'fc']
      + [f'layer{i + 1}.{j}' for i, depth in enumerate((3, 4, 6, 3)) for j in range(depth)]
  )
  assert sorted(params['layer1.0']) == [
      'bn1',
      'bn2',
      'bn3',
      'conv1',
      'conv2',
      'conv3',
      'downsample.0',
      'downsample.1',
  ]
  assert 'downsample.0' not in params['layer1.1']
  assert params['layer2.0']['conv2']['kernel'].shape == (3, 3, 128, 128)  # v1.5: stride here.
  assert params['fc']['kernel'].shape == (2048, 1000)
  assert sorted(stats['layer3.5']['bn3']) == ['mean', 'var']


def test_spec_overrides_of_the_design_follow_into_dims_and_the_module():
  base = models.get_spec('roadmap_r50_baseline')
  assert base.dims == (256, 512, 1024, 2048)  # torchvision ResNet-50's stage outputs.
  assert base.with_overrides(block='inverted').dims == (64, 128, 256, 512)
  overrides = dict(depths=[1, 1, 1, 1], widths=[8, 16, 24, 32], norm='layer', bn_group_size=4)
  spec = base.with_overrides(**overrides)
  design = dict(spec.roadmap)
  assert (spec.depths, spec.dims) == ((1, 1, 1, 1), (32, 64, 96, 128))
  assert (design['widths'], design['norm'], design['block']) == (
      (8, 16, 24, 32),
      'layer',
      'bottleneck',
  )
  assert 'bn_group_size' not in design  # How BatchNorm runs, not part of the design.
  model = models.create_model('roadmap_r50_baseline', **overrides)
  assert model.bn_group_size == 4
  stages, _ = jax.eval_shape(
      lambda: model.init_with_output(jax.random.key(0), jnp.zeros((1, 64, 64, 3)), output='stages')
  )
  assert [s.shape[-1] for s in stages] == [32, 64, 96, 128]


@pytest.mark.parametrize('track,convnext', [('r50', 'convnext_tiny'), ('r200', 'convnext_base')])
def test_last_step_is_convnext(track, convnext):
  images = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
  ours = models.create_model(f'roadmap_{track}_downsample')
  reference = models.create_model(convnext)
  shapes = [jax.tree.map(lambda x: x.shape, models.param_shapes(m, 32)) for m in (ours, reference)]
  assert shapes[0] == shapes[1]
  # The function, on the same weights, at reduced depth and width (the same code per block).
  depths, dims = (1, 1, 2, 1), tuple(d // 8 for d in models.get_spec(convnext).dims)
  ours = models.create_model(
      f'roadmap_{track}_downsample', num_classes=7, depths=depths, widths=dims
  )
  reference = models.create_model(convnext, num_classes=7, depths=depths, dims=dims)
  variables = reference.init(jax.random.key(0), images)
  # Move every weight off its init (layer scale, biases) so that all of them matter.
  leaves, tree = jax.tree.flatten(variables)
  keys = jax.random.split(jax.random.key(2), len(leaves))
  variables = tree.unflatten(
      [x + 0.05 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]
  )
  np.testing.assert_allclose(
      ours.apply(variables, images), reference.apply(variables, images), rtol=1e-5, atol=1e-5
  )


def _torch_batchnorm(x_nhwc, scale, bias, mean, var):
  bn = torch.nn.BatchNorm2d(x_nhwc.shape[-1])  # eps 1e-5, momentum 0.1.
  with torch.no_grad():
    bn.weight.copy_(torch.from_numpy(scale))
    bn.bias.copy_(torch.from_numpy(bias))
    bn.running_mean.copy_(torch.from_numpy(mean))
    bn.running_var.copy_(torch.from_numpy(var))
  bn.train()
  y = bn(torch.from_numpy(x_nhwc).permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
  return y.detach().numpy(), bn.running_mean.numpy(), bn.running_var.numpy()


@pytest.mark.parametrize('group_size', [None, 3])
def test_batchnorm_training_update_is_pytorchs(group_size):
  """Train mode: the output and the running statistics PyTorch's BatchNorm2d gives for the
  same batch; with groups, each group as its own PyTorch replica (DDP without SyncBN), the
  running statistics averaged over them."""
  rng = np.random.default_rng(0)
  x = (rng.normal(size=(6, 5, 4, 8)) * 3 + 2).astype(np.float32)
  scale, bias = rng.normal(size=(2, 8)).astype(np.float32)
  mean, var = rng.normal(size=8).astype(np.float32), rng.uniform(0.5, 2, 8).astype(np.float32)
  bn = layers.BatchNorm(group_size=group_size)
  y, updated = bn.apply(
      {'params': {'scale': scale, 'bias': bias}, 'batch_stats': {'mean': mean, 'var': var}},
      x,
      train=True,
      mutable=['batch_stats'],
  )
  groups = [x] if not group_size else [x[i : i + group_size] for i in range(0, 6, group_size)]
  outs = [_torch_batchnorm(g, scale, bias, mean, var) for g in groups]
  np.testing.assert_allclose(y, np.concatenate([o[0] for o in outs]), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(
      updated['batch_stats']['mean'], np.mean([o[1] for o in outs], 0), rtol=1e-6, atol=1e-6
  )
  np.testing.assert_allclose(
      updated['batch_stats']['var'], np.mean([o[2] for o in outs], 0), rtol=1e-5, atol=1e-6
  )
  # Evaluation normalises with the running statistics.
  y_eval = bn.apply(
      {'params': {'scale': scale, 'bias': bias}, 'batch_stats': {'mean': mean, 'var': var}}, x
  )
  np.testing.assert_allclose(
      y_eval, (x - mean) / np.sqrt(var + 1e-5) * scale + bias, rtol=1e-5, atol=1e-5
  )


@pytest.mark.parametrize('impl', ['conv', 'shift'])
@pytest.mark.parametrize('size', [9, 8])
def test_strided_depthwise_conv_is_pytorchs_grouped_conv(impl, size):
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, size, size, 6)).astype(np.float32)
  conv = layers.DepthwiseConv(5, stride=2, use_bias=False, impl=impl)
  params = conv.init(jax.random.key(0), x)
  kernel = np.asarray(params['params']['kernel'])  # (5, 5, 1, 6)
  expected = torch.nn.functional.conv2d(
      torch.from_numpy(x).permute(0, 3, 1, 2),
      torch.from_numpy(kernel.copy()).permute(3, 2, 0, 1),
      stride=2,
      padding=2,
      groups=6,
  )
  np.testing.assert_allclose(
      conv.apply(params, x), expected.permute(0, 2, 3, 1).numpy(), rtol=1e-5, atol=1e-5
  )
  # And its gradient.
  grad = jax.grad(lambda p: conv.apply(p, x).sum())(params)['params']['kernel']
  reference = jax.grad(
      lambda p: layers.DepthwiseConv(5, stride=2, use_bias=False, impl='conv').apply(p, x).sum()
  )(params)
  np.testing.assert_allclose(grad, reference['params']['kernel'], rtol=1e-4, atol=1e-4)


def test_every_step_runs_and_trains_its_batch_statistics():
  images = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
  for name in models.list_models('roadmap_r50_*'):
    # Run op by op, where the grouped conv is one op and the CPU's shifted sum a hundred.
    model = models.create_model(
        name,
        num_classes=3,
        depths=(1, 1, 1, 1),
        widths=(8, 8, 8, 8),
        drop_path_rate=0.1,
        depthwise_impl='conv',
    )
    variables = model.init(jax.random.key(0), images)
    logits, updated = model.apply(
        variables,
        images,
        train=True,
        mutable=['batch_stats'],
        rngs={'drop_path': jax.random.key(3)},
    )
    assert logits.shape == (2, 3) and np.isfinite(logits).all(), name
    uses_bn = not name.endswith(('_ln', '_downsample'))
    assert ('batch_stats' in variables) == uses_bn, name
    if uses_bn:
      before, after = variables['batch_stats'], updated['batch_stats']
      assert not all(
          np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after))
      ), name


def test_weights_merge_and_split_round_trip():
  model = models.create_model('roadmap_r50_gelu', num_classes=3, depths=(1, 1, 1, 1))
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3))))
  weights = models.merge_batch_stats(variables['params'], variables['batch_stats'])
  assert sorted(weights['layer1.0']['bn2']) == ['bias', 'mean', 'scale', 'var']
  params, stats = models.split_batch_stats(weights)
  assert jax.tree.structure(params) == jax.tree.structure(variables['params'])
  assert jax.tree.structure(stats) == jax.tree.structure(variables['batch_stats'])


def test_invalid_designs_are_refused_in_one_line():
  images = jnp.zeros((1, 32, 32, 3))
  small = dict(depths=(1, 1, 1, 1), widths=(4, 4, 4, 4))
  with pytest.raises(ValueError, match='block must be one of'):
    models.create_model('roadmap_r50_baseline', block='mbconv', **small).init(
        jax.random.key(0), images
    )
  with pytest.raises(ValueError, match='scan'):
    models.create_model('roadmap_r50_baseline', scan=True, **small).init(jax.random.key(0), images)
  with pytest.raises(
      ValueError, match='statistics groups of 4 examples do not divide the batch of 6'
  ):
    model = models.create_model('roadmap_r50_baseline', bn_group_size=4, **small)
    variables = model.init(jax.random.key(0), images)
    model.apply(variables, jnp.zeros((6, 32, 32, 3)), train=True, mutable=['batch_stats'])
