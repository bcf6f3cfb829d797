"""Numerical parity with independent PyTorch implementations, through the converter.

Hugging Face transformers' ConvNext/ConvNextV2 (installed from PyPI) for V1 and V2; small
PyTorch statements of the official and timm definitions (tests/torch_reference.py) for the
isotropic models, timm's key layout and 1x1-conv MLP, and xxlarge's LayerNorm eps.
"""

from flax import traverse_util
import helpers
import numpy as np
import pytest
import torch
import torch_reference
import transformers

from convnext_jax import convert
from convnext_jax import models
from convnext_jax.convert import layouts

ATOL = 1e-4  # float32 logits and features


def _hf_model(model_name, num_classes=1000):
  spec = models.get_spec(model_name)
  kwargs = dict(
      hidden_sizes=list(spec.dims),
      depths=list(spec.depths),
      num_labels=num_classes,
      layer_norm_eps=1e-6,
  )
  if spec.use_grn:
    return transformers.ConvNextV2ForImageClassification(transformers.ConvNextV2Config(**kwargs))
  return transformers.ConvNextForImageClassification(transformers.ConvNextConfig(**kwargs))


def _torch_forward(module, x):
  with torch.no_grad():
    return module(torch.from_numpy(x))


@pytest.mark.parametrize('model_name', ['convnext_tiny', 'convnextv2_atto'])
@pytest.mark.parametrize('height,width', [(224, 224), (160, 192)])
def test_logits_and_stage_features_match_transformers(model_name, height, width):
  hf = torch_reference.randomize_(_hf_model(model_name), seed=1)
  detected, params = convert.torch_to_flax(hf.state_dict())
  assert detected == model_name
  x = helpers.images(2, height, width)
  out = _torch_forward(lambda t: hf(t, output_hidden_states=True), x)
  logits, stages = helpers.forward(models.create_model(model_name), params, helpers.nhwc(x))
  assert np.abs(out.logits.numpy()).max() > 0.5  # Non-trivial logits.
  np.testing.assert_allclose(logits, out.logits.numpy(), atol=ATOL, rtol=0)
  # hidden_states: the embeddings, then each stage's output.
  for ours, theirs in zip(stages, out.hidden_states[1:], strict=True):
    np.testing.assert_allclose(ours, helpers.nhwc(theirs.numpy()), atol=ATOL, rtol=0)


def test_isotropic_small_matches_official_definition():
  reference = torch_reference.randomize_(torch_reference.OfficialIsotropic(18, 384), seed=2)
  name, params = convert.torch_to_flax(reference.state_dict())
  assert name == 'convnext_isotropic_small'
  x = helpers.images(2, 224, 224)
  logits, _ = helpers.forward(models.create_model(name), params, helpers.nhwc(x))
  np.testing.assert_allclose(logits, _torch_forward(reference, x)[0].numpy(), atol=ATOL, rtol=0)


def _custom_size_to_torch(model, model_name, layout, params=None):
  """(Random) params of a custom-size variant and their PyTorch state dict in `layout`."""
  params = helpers.random_params(model, seed=3) if params is None else params
  shapes = {p: v.shape for p, v in traverse_util.flatten_dict(params).items()}
  maps = layouts.maps_from_shapes(shapes, model_name, layout)
  return params, {
      k: torch.from_numpy(v) for k, v in layouts.params_to_state_dict(params, maps).items()
  }


def test_isotropic_with_layer_scale_matches_official_definition():
  # iso-L's structure (layer scale on) at a test-sized depth and width.
  model = models.create_model('convnext_isotropic_large', depth=3, dim=64, num_classes=10)
  params, state_dict = _custom_size_to_torch(model, 'convnext_isotropic_large', 'official')
  reference = torch_reference.OfficialIsotropic(3, 64, num_classes=10, layer_scale=1e-6)
  reference.load_state_dict(state_dict, strict=True)
  x = helpers.images(2, 96, 80)
  logits, (features,) = helpers.forward(model, params, helpers.nhwc(x))
  ref_logits, (ref_features,) = _torch_forward(reference.eval(), x)
  np.testing.assert_allclose(logits, ref_logits.numpy(), atol=ATOL, rtol=0)
  np.testing.assert_allclose(features, helpers.nhwc(ref_features.numpy()), atol=ATOL, rtol=0)


def test_xxlarge_layernorm_eps_matches_reference():
  # xxlarge's structure with eps 1e-5 at a test-sized width. A stem scaled down to outputs of
  # order 1e-3 gives the stem LayerNorm a variance near eps, so 1e-5 vs 1e-6 is visible.
  model = models.create_model(
      'convnext_xxlarge', depths=(1, 1, 1, 1), dims=(8, 16, 24, 32), num_classes=5
  )
  params = helpers.random_params(model, seed=3)
  params['downsample_layers.0.0'] = {
      k: v * 1e-3 for k, v in params['downsample_layers.0.0'].items()
  }
  params, state_dict = _custom_size_to_torch(model, 'convnext_xxlarge', 'official', params)
  x = helpers.images(2, 64, 64)
  logits, _ = helpers.forward(model, params, helpers.nhwc(x))
  for eps, agrees in ((1e-5, True), (1e-6, False)):
    reference = torch_reference.OfficialConvNeXt((1, 1, 1, 1), (8, 16, 24, 32), 5, eps=eps)
    reference.load_state_dict(state_dict, strict=True)
    ref_logits = _torch_forward(reference.eval(), x)[0].numpy()
    assert np.allclose(logits, ref_logits, atol=ATOL, rtol=0) == agrees, eps


@pytest.mark.parametrize(
    'model_name,conv_mlp',
    [('convnext_atto', True), ('convnextv2_atto', True), ('convnext_tiny', False)],
)
def test_timm_layout_matches_timm_definition(model_name, conv_mlp):
  spec = models.get_spec(model_name)
  model = models.create_model(model_name, num_classes=10)
  params = helpers.random_params(model, seed=4)
  state_dict = convert.flax_to_torch(params, model_name, layout='timm')
  reference = torch_reference.TimmConvNeXt(
      spec.depths,
      spec.dims,
      num_classes=10,
      layer_scale=spec.layer_scale_init_value,
      use_grn=spec.use_grn,
      conv_mlp=conv_mlp,
  )
  reference.load_state_dict({k: torch.from_numpy(v) for k, v in state_dict.items()}, strict=True)
  x = helpers.images(2, 96, 64)
  logits, stages = helpers.forward(model, params, helpers.nhwc(x))
  ref_logits, ref_stages = _torch_forward(reference.eval(), x)
  np.testing.assert_allclose(logits, ref_logits.numpy(), atol=ATOL, rtol=0)
  np.testing.assert_allclose(stages[2], helpers.nhwc(ref_stages[2].numpy()), atol=ATOL, rtol=0)


def test_official_v2_definition_loads_official_export():
  model = models.create_model('convnextv2_atto', num_classes=10)
  params = helpers.random_params(model, seed=5)
  state_dict = convert.flax_to_torch(params, 'convnextv2_atto', layout='official')
  reference = torch_reference.OfficialConvNeXt(
      (2, 2, 6, 2), (40, 80, 160, 320), 10, layer_scale=None, use_grn=True
  )
  reference.load_state_dict({k: torch.from_numpy(v) for k, v in state_dict.items()}, strict=True)
  x = helpers.images(2, 64, 96)
  logits, _ = helpers.forward(model, params, helpers.nhwc(x))
  np.testing.assert_allclose(
      logits, _torch_forward(reference.eval(), x)[0].numpy(), atol=ATOL, rtol=0
  )
