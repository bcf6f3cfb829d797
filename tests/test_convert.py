"""Conversion API: exact round trips, key layouts, and recognising checkpoints."""

import helpers
import jax
import numpy as np
import pytest
import torch
import torch_reference
import transformers

from convnext_jax import convert
from convnext_jax import models
from convnext_jax.convert import files
from convnext_jax.convert import layouts


def _assert_trees_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert x.dtype == y.dtype and x.shape == y.shape
    np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize(
    'model_name,layout',
    [
        ('convnext_atto', 'official'),
        ('convnext_atto', 'timm'),
        ('convnext_atto', 'hf'),
        ('convnextv2_atto', 'official'),
        ('convnextv2_atto', 'timm'),
        ('convnextv2_atto', 'hf'),
        ('convnext_tiny', 'timm'),
        ('convnext_isotropic_small', 'official'),
    ],
)
def test_round_trip_is_bit_exact(model_name, layout):
  params = helpers.random_params(models.create_model(model_name, num_classes=17))
  state_dict = convert.flax_to_torch(params, model_name, layout)
  assert all(v.dtype == np.float32 and v.flags.c_contiguous for v in state_dict.values())
  name, back = convert.torch_to_flax({k: torch.from_numpy(v) for k, v in state_dict.items()})
  assert name == model_name
  _assert_trees_equal(back, params)


def _shapes(module):
  return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def _export_shapes(model_name, layout, num_classes):
  maps = layouts.tensor_maps(model_name, num_classes, layout)
  return {m.torch_key: m.torch_shape for m in maps}


def test_official_keys_are_the_official_modules():
  expected = _shapes(torch_reference.OfficialConvNeXt((2, 2, 6, 2), (40, 80, 160, 320)))
  assert _export_shapes('convnext_atto', 'official', 1000) == expected
  v2 = _shapes(
      torch_reference.OfficialConvNeXt(
          (2, 2, 6, 2), (40, 80, 160, 320), layer_scale=None, use_grn=True
      )
  )
  assert _export_shapes('convnextv2_atto', 'official', 1000) == v2
  assert v2['stages.3.1.grn.gamma'] == (1, 1, 1, 1280)
  iso = _shapes(torch_reference.OfficialIsotropic(18, 384))
  assert _export_shapes('convnext_isotropic_small', 'official', 1000) == iso


def test_timm_keys_are_timm_modules():
  atto = _shapes(torch_reference.TimmConvNeXt((2, 2, 6, 2), (40, 80, 160, 320), conv_mlp=True))
  assert _export_shapes('convnext_atto', 'timm', 1000) == atto
  assert atto['stages.1.blocks.0.mlp.fc1.weight'] == (320, 80, 1, 1)
  tiny = _shapes(torch_reference.TimmConvNeXt((3, 3, 9, 3), (96, 192, 384, 768)))
  assert _export_shapes('convnext_tiny', 'timm', 1000) == tiny
  assert tiny['head.norm.weight'] == (768,) and tiny['head.fc.weight'] == (1000, 768)


@pytest.mark.parametrize('model_name', ['convnext_tiny', 'convnextv2_atto'])
def test_hf_keys_are_transformers_modules(model_name):
  spec = models.get_spec(model_name)
  config_cls = transformers.ConvNextV2Config if spec.use_grn else transformers.ConvNextConfig
  model_cls = (
      transformers.ConvNextV2ForImageClassification
      if spec.use_grn
      else transformers.ConvNextForImageClassification
  )
  hf = model_cls(
      config_cls(hidden_sizes=list(spec.dims), depths=list(spec.depths), num_labels=21841)
  )
  assert _export_shapes(model_name, 'hf', 21841) == _shapes(hf)


def test_hf_export_directory_loads_in_transformers_with_same_logits(tmp_path):
  for model_name in ('convnext_atto', 'convnextv2_atto'):
    model = models.create_model(model_name, num_classes=3)
    params = helpers.random_params(model, seed=7)
    state_dict = convert.flax_to_torch(params, model_name, 'hf')
    out = tmp_path / model_name
    files.save_hf_directory(state_dict, str(out), model_name, 3, ['cat', 'dog', 'emu'])
    hf = transformers.AutoModelForImageClassification.from_pretrained(str(out)).eval()
    assert hf.config.id2label == {0: 'cat', 1: 'dog', 2: 'emu'}
    assert hf.config.layer_norm_eps == 1e-6
    x = helpers.images(2, 64, 96)
    with torch.no_grad():
      expected = hf(torch.from_numpy(x)).logits.numpy()
    logits, _ = helpers.forward(model, params, helpers.nhwc(x))
    np.testing.assert_allclose(logits, expected, atol=1e-4, rtol=0)


def test_hf_export_refuses_xxlarge_eps():
  with pytest.raises(convert.ConversionError, match='eps 1e-05.*transformers'):
    convert.flax_to_torch({}, 'convnext_xxlarge', 'hf')


@pytest.mark.parametrize('layout', ['timm', 'hf'])
def test_isotropic_exists_only_in_the_official_layout(layout):
  params = helpers.random_params(models.create_model('convnext_isotropic_small'))
  with pytest.raises(convert.ConversionError, match=f'the {layout} layout has no isotropic'):
    convert.flax_to_torch(params, 'convnext_isotropic_small', layout)


def _fake_state_dict(model_name, layout, num_classes=1000):
  """Shapes only: detection reads nothing else (xxlarge would not fit in test memory)."""
  return {
      m.torch_key: jax.ShapeDtypeStruct(m.torch_shape, np.float32)
      for m in layouts.tensor_maps(model_name, num_classes, layout)
  }


# Roadmap networks: tests/test_resnet_convert.py.
@pytest.mark.parametrize('model_name', models.list_models('convnext*'))
def test_every_model_is_recognised_in_every_layout(model_name):
  supported = ['official'] if 'isotropic' in model_name else list(layouts.LAYOUTS)
  if model_name == 'convnext_xxlarge':
    supported.remove('hf')
  for layout in supported:
    state_dict = _fake_state_dict(model_name, layout, num_classes=21841)
    assert convert.detect_layout(state_dict) == layout
    assert convert.detect_model(state_dict, layout) == (model_name, 21841)


def test_headless_checkpoint_gives_num_classes_zero():
  params = helpers.random_params(models.create_model('convnext_atto', num_classes=0))
  state_dict = convert.flax_to_torch(params, 'convnext_atto', 'timm')
  assert not any(k.startswith('head.fc') for k in state_dict)
  name, back = convert.torch_to_flax(state_dict)
  assert name == 'convnext_atto' and 'head' not in back
  _assert_trees_equal(back, params)


def test_wrapper_prefixes_are_stripped():
  params = helpers.random_params(models.create_model('convnext_atto'))
  state_dict = convert.flax_to_torch(params, 'convnext_atto')
  wrapped = {f'module.{k}': v for k, v in state_dict.items()}
  _assert_trees_equal(convert.torch_to_flax(wrapped)[1], params)


def test_unknown_architecture_is_named():
  state_dict = {
      k: v
      for k, v in _fake_state_dict('convnext_atto', 'official').items()
      if not k.startswith('stages.2.5.')
  }
  with pytest.raises(
      convert.ConversionError,
      match=r'no known ConvNeXt variant is hierarchical V1 with depths '
      r'\(2, 2, 5, 2\) and dims \(40, 80, 160, 320\)',
  ):
    convert.torch_to_flax(state_dict)


def test_not_a_convnext_state_dict():
  with pytest.raises(convert.ConversionError, match='not a ConvNeXt state dict'):
    convert.torch_to_flax({'encoder.layer.0.weight': np.zeros(3)})


def test_mismatch_lists_missing_unexpected_and_misshaped_keys():
  state_dict = dict(_fake_state_dict('convnext_atto', 'official'))
  del state_dict['stages.1.0.gamma']
  state_dict['stages.0.0.dwconv.weight'] = jax.ShapeDtypeStruct((40, 1, 5, 5), np.float32)
  state_dict['extra.weight'] = jax.ShapeDtypeStruct((3,), np.float32)
  with pytest.raises(convert.ConversionError) as info:
    convert.torch_to_flax(state_dict)
  message = str(info.value)
  assert message == (
      'official state dict does not match convnext_atto: '
      'missing 1 key(s): stages.1.0.gamma; unexpected 1 key(s): extra.weight; '
      'mis-shaped 1 key(s): stages.0.0.dwconv.weight (40, 1, 5, 5) != expected (40, 1, 7, 7)'
  )


def test_export_of_params_that_do_not_fit_names_each_difference():
  params = helpers.random_params(models.create_model('convnext_atto', num_classes=3))
  del params['stages.3.1']['gamma']
  params['head']['bias'] = np.zeros(4, np.float32)
  params['extra'] = {'kernel': np.zeros(2, np.float32)}
  with pytest.raises(convert.ConversionError) as info:
    convert.flax_to_torch(params, 'convnext_atto')
  # Three classes by the head's kernel; a model without BatchNorm gets no statistics hint.
  assert str(info.value) == (
      'params do not match convnext_atto: missing 1 key(s): stages.3.1/gamma; '
      'unexpected 1 key(s): extra/kernel; mis-shaped 1 key(s): head/bias (4,) != expected (3,)'
  )


def test_forced_model_name_reports_the_difference():
  state_dict = _fake_state_dict('convnext_atto', 'timm')
  with pytest.raises(
      convert.ConversionError,
      match=r'timm state dict does not match convnext_nano \(it looks like '
      r'convnext_atto\): missing 18 key\(s\): stages.2.blocks.6.conv_dw.bias, ',
  ):
    convert.torch_to_flax(state_dict, model_name='convnext_nano')


def test_torch_half_precision_tensors_become_float32():
  params = helpers.random_params(models.create_model('convnext_atto'))
  state_dict = {
      k: torch.from_numpy(v).to(torch.bfloat16)
      for k, v in convert.flax_to_torch(params, 'convnext_atto').items()
  }
  _, back = convert.torch_to_flax(state_dict)
  assert {leaf.dtype for leaf in jax.tree.leaves(back)} == {np.dtype(np.float32)}
  leaf = back['stages.0.0']['pwconv1']['kernel']
  np.testing.assert_allclose(leaf, params['stages.0.0']['pwconv1']['kernel'], rtol=1e-2)
