"""FCMAE weights between the official PyTorch layouts and ours, through `convnext-convert`:
the official pre-training checkpoint (MinkowskiEngine names and kernel shapes, decoder
included), built here from fcmae.md's key and shape rules, and the released encoder
(`pt_only/..._fcmae.pt`: the dense backbone's official keys)."""

import helpers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.torch
import torch
import torch_reference
import transformers

from convnext_jax import checkpoints
from convnext_jax import convert_cli
from convnext_jax import models

DEPTHS, DIMS = (2, 2, 6, 2), (40, 80, 160, 320)  # convnextv2_atto
DECODER = 512


def _from_reference_rules(dense):
  """The official pre-training checkpoint's 'model' state dict for an encoder whose dense
  (released-layout) state dict is `dense`, by fcmae.md: 'encoder.' prefix; the stem dense;
  LayerNorm and Linear under '.ln.' and '.linear.'; sparse kernels (k*k, C) depthwise and
  (k*k, C_in, C_out) for the 2x2 downsampling convs, laid out so that the official
  `remap_checkpoint_keys` (`_remap`) gives the dense weight back; biases and GRN (1, C)."""
  out = {}
  for key, w in dense.items():
    parts = key.split('.')
    if key.startswith('downsample_layers.0.'):
      out[f'encoder.{key}'] = w
    elif parts[0] == 'downsample_layers' and parts[2] == '0':
      out[f'encoder.{".".join(parts[:3])}.ln.{parts[3]}'] = w
    elif parts[0] == 'downsample_layers':  # The 2x2 conv.
      if parts[3] == 'weight':
        c_out, c_in, k, _ = w.shape
        out[f'encoder.{".".join(parts[:3])}.kernel'] = (
            w.transpose(3, 2).reshape(c_out, c_in, k * k).permute(2, 1, 0).contiguous()
        )
      else:
        out[f'encoder.{key}'] = w.reshape(1, -1)
    else:  # stages.i.j.<layer>.<leaf>
      block, layer, leaf = '.'.join(parts[:3]), parts[3], parts[4]
      if layer == 'dwconv' and leaf == 'weight':
        c, _, k, _ = w.shape
        out[f'encoder.{block}.dwconv.kernel'] = (
            w.transpose(3, 2).reshape(c, k * k).permute(1, 0).contiguous()
        )
      elif layer == 'dwconv':
        out[f'encoder.{key}'] = w.reshape(1, -1)
      elif layer == 'norm':
        out[f'encoder.{block}.norm.ln.{leaf}'] = w
      elif layer in ('pwconv1', 'pwconv2'):
        out[f'encoder.{block}.{layer}.linear.{leaf}'] = w
      else:  # grn, (1, 1, 1, C) dense
        out[f'encoder.{key}'] = w.reshape(1, -1)
  return out


def _remap(training):
  """fcmae.md's statement of the official `remap_checkpoint_keys`: the dense encoder of a
  pre-training checkpoint."""
  dense = {}
  for key, v in training.items():
    if not key.startswith('encoder.'):
      continue
    key = key[len('encoder.') :].replace('.ln.', '.').replace('.linear.', '.')
    if key.endswith('.kernel') and v.ndim == 3:
      c_in, c_out = v.shape[1:]
      k = round(v.shape[0] ** 0.5)
      v = v.permute(2, 1, 0).reshape(c_out, c_in, k, k).transpose(3, 2)
      key = key[: -len('kernel')] + 'weight'
    elif key.endswith('.kernel'):
      c, k = v.shape[1], round(v.shape[0] ** 0.5)
      v = v.permute(1, 0).reshape(c, 1, k, k).transpose(3, 2)
      key = key[: -len('kernel')] + 'weight'
    elif '.grn.' in key:
      v = v.reshape(1, 1, 1, -1)
    elif key.endswith('bias') and v.ndim == 2:
      v = v.reshape(-1)
    dense[key] = v
  return dense


@pytest.fixture(scope='module')
def official(tmp_path_factory):
  """A random convnextv2_atto FCMAE in the official layouts: the dense encoder, the
  pre-training checkpoint's state dict (with a random dense decoder) and its file."""
  backbone = torch_reference.randomize_(
      torch_reference.OfficialConvNeXt(DEPTHS, DIMS, layer_scale=0, use_grn=True), seed=4
  )
  dense = {k: v for k, v in backbone.state_dict().items() if not k.startswith(('norm.', 'head.'))}
  decoder = torch_reference.randomize_(torch_reference.OfficialBlock(DECODER, 0, True, 1e-6), 5)
  generator = torch.Generator().manual_seed(6)
  training = _from_reference_rules(dense)
  training.update(
      {
          'proj.weight': torch.randn(DECODER, DIMS[-1], 1, 1, generator=generator),
          'proj.bias': torch.randn(DECODER, generator=generator),
          'mask_token': torch.randn(1, DECODER, 1, 1, generator=generator),
          'pred.weight': torch.randn(32 * 32 * 3, DECODER, 1, 1, generator=generator),
          'pred.bias': torch.randn(32 * 32 * 3, generator=generator),
      }
  )
  training.update({f'decoder.0.{k}': v for k, v in decoder.state_dict().items()})
  path = tmp_path_factory.mktemp('official') / 'checkpoint-1599.pth'
  torch.save({'model': training, 'optimizer': {}, 'epoch': 1599, 'scaler': {}, 'args': None}, path)
  return backbone, dense, training, path


def _cli(*args):
  assert convert_cli.main([str(a) for a in args]) == 0


def test_reference_rules_are_consistent(official):
  _, dense, training, _ = official
  remapped = _remap(training)
  assert remapped.keys() == dense.keys()
  for key, value in dense.items():
    torch.testing.assert_close(remapped[key], value, rtol=0, atol=0, msg=key)


def test_training_checkpoint_imports_and_exports_bit_exactly(official, tmp_path):
  _, dense, training, path = official
  _cli('import', path, tmp_path / 'imported')
  params, metadata = checkpoints.load_params(str(tmp_path / 'imported'))
  assert metadata['model_name'] == 'fcmae_convnextv2_atto'
  assert metadata['source_layout'] == 'fcmae_training'
  assert set(params) == {'encoder', 'proj', 'mask_token', 'decoder.0', 'pred'}
  assert params['mask_token'].shape == (1, 1, 1, DECODER)
  _cli('export', tmp_path / 'imported', tmp_path / 'again.pth', '--layout', 'fcmae_training')
  again = torch.load(tmp_path / 'again.pth', weights_only=True)['model']
  assert again.keys() == training.keys()
  for key, value in training.items():
    assert again[key].shape == value.shape, key
    torch.testing.assert_close(again[key], value, rtol=0, atol=0, msg=key)
  # The released form of the same weights: the official remapping of the encoder.
  _cli('export', tmp_path / 'imported', tmp_path / 'encoder.pth')
  released = torch.load(tmp_path / 'encoder.pth', weights_only=True)['model']
  assert released.keys() == dense.keys()
  for key, value in dense.items():
    torch.testing.assert_close(released[key], value, rtol=0, atol=0, msg=key)


def test_released_encoder_round_trips_and_gives_the_official_models_features(official, tmp_path):
  backbone, dense, _, _ = official
  torch.save({'model': dense}, tmp_path / 'convnextv2_atto_1k_224_fcmae.pt')
  _cli('import', tmp_path / 'convnextv2_atto_1k_224_fcmae.pt', tmp_path / 'encoder')
  params, metadata = checkpoints.load_params(str(tmp_path / 'encoder'))
  assert (metadata['model_name'], metadata['source_layout']) == ('fcmae_convnextv2_atto', 'fcmae')
  assert set(params) == {'encoder'}
  _cli('export', tmp_path / 'encoder', tmp_path / 'again.pt')
  again = torch.load(tmp_path / 'again.pt', weights_only=True)['model']
  assert again.keys() == dense.keys()
  for key, value in dense.items():
    torch.testing.assert_close(again[key], value, rtol=0, atol=0, msg=key)
  # The official (dense) definition with these weights, its final norm and head aside,
  # computes the features our encoder computes with nothing masked.
  images = helpers.images(2, 64, 96, seed=8)
  with torch.no_grad():
    _, stages = backbone(torch.from_numpy(images))
  ours = _encoder_features(params['encoder'], images)
  np.testing.assert_allclose(ours, helpers.nhwc(stages[-1].numpy()), atol=1e-4, rtol=0)


def _encoder_features(params, images: np.ndarray) -> np.ndarray:
  """Our encoder's last stage (NHWC) on NCHW `images`, nothing masked."""
  encoder = models.ConvNeXt(
      num_classes=0, depths=DEPTHS, dims=DIMS, use_grn=True, layer_scale_init_value=None
  )
  n, _, height, width = images.shape
  mask = np.zeros((n, height // 32, width // 32), np.float32)
  apply = jax.jit(lambda p, x, m: encoder.apply({'params': p}, x, output='stages', mask=m)[-1])
  return np.asarray(apply(params, helpers.nhwc(images), mask))


def test_an_encoder_exports_as_the_backbone_that_transformers_and_timm_load(official, tmp_path):
  """A released encoder, imported, then exported with --layout hf and --layout timm as
  convnextv2_atto without a head: transformers' ConvNextV2Model loads the directory with no
  weight missing, unexpected or mis-shaped, and its last hidden state is our encoder's
  features and the official backbone's last stage; the timm file loads strictly into timm's
  module names (num_classes 0) and gives the same features."""
  backbone, dense, _, _ = official
  torch.save({'model': dense}, tmp_path / 'encoder.pt')
  _cli('import', tmp_path / 'encoder.pt', tmp_path / 'encoder')
  encoder = checkpoints.load_params(str(tmp_path / 'encoder'))[0]['encoder']
  images = torch.from_numpy(helpers.images(2, 64, 96, seed=8))
  with torch.no_grad():
    expected = backbone(images)[1][-1]

  _cli('export', tmp_path / 'encoder', tmp_path / 'hf', '--layout', 'hf')
  hf, info = transformers.ConvNextV2Model.from_pretrained(tmp_path / 'hf', output_loading_info=True)
  assert not any(info.values()), info
  with torch.no_grad():
    hidden = hf.eval()(pixel_values=images).last_hidden_state
  torch.testing.assert_close(hidden, expected, atol=1e-4, rtol=0)
  ours = _encoder_features(encoder, images.numpy())
  np.testing.assert_allclose(helpers.nhwc(hidden.numpy()), ours, atol=1e-4, rtol=0)
  _cli('import', tmp_path / 'hf', tmp_path / 'back')  # And back: the backbone, no head.
  back, metadata = checkpoints.load_params(str(tmp_path / 'back'))
  assert (metadata['model_name'], metadata['num_classes']) == ('convnextv2_atto', 0)
  norm = back.pop('norm')
  np.testing.assert_array_equal(norm['scale'], 1.0)
  np.testing.assert_array_equal(norm['bias'], 0.0)
  jax.tree.map(np.testing.assert_array_equal, back, encoder)

  _cli('export', tmp_path / 'encoder', tmp_path / 'timm.safetensors', '--layout', 'timm')
  timm_like = torch_reference.TimmConvNeXt(
      DEPTHS, DIMS, num_classes=0, layer_scale=0, use_grn=True, conv_mlp=True
  )
  timm_like.load_state_dict(safetensors.torch.load_file(tmp_path / 'timm.safetensors'))
  with torch.no_grad():
    torch.testing.assert_close(timm_like(images)[1][-1], expected, atol=1e-4, rtol=0)


def test_fcmae_layouts_and_models_do_not_mix(official, tmp_path):
  _, dense, _, path = official
  _cli('import', path, tmp_path / 'imported')
  assert (
      convert_cli.main(
          ['export', str(tmp_path / 'imported'), str(tmp_path / 'x.pth'), '--layout', 'official']
      )
      == 1
  )
  # A released encoder is no classifier: named as one, the import is refused in one line.
  torch.save({'model': dense}, tmp_path / 'enc.pt')
  assert (
      convert_cli.main(
          ['import', str(tmp_path / 'enc.pt'), str(tmp_path / 'y'), '--model', 'convnextv2_atto']
      )
      == 1
  )


def test_a_released_encoder_initialises_a_classifier(official, tmp_path):
  _, dense, _, _ = official
  torch.save({'model': dense}, tmp_path / 'fcmae.pt')
  _cli('import', tmp_path / 'fcmae.pt', tmp_path / 'encoder')
  shapes = models.param_shapes(models.create_model('convnextv2_atto', num_classes=10), 64)
  initial = jax.tree.map(lambda s: jnp.full(s.shape, 7.0, s.dtype), shapes)
  merged, report, _ = checkpoints.load_params_into(str(tmp_path / 'encoder'), initial)
  assert sorted(report['reinitialized']) == ['head/bias', 'head/kernel', 'norm/bias', 'norm/scale']
  np.testing.assert_array_equal(merged['norm']['scale'], 7.0)  # Kept as initialised.
  np.testing.assert_array_equal(
      np.asarray(merged['stages.2.5']['dwconv']['kernel'])[:, :, 0, :].transpose(2, 0, 1),
      dense['stages.2.5.dwconv.weight'][:, 0].numpy(),
  )
