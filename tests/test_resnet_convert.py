"""The roadmap's ResNets and BatchNorm models through conversion, checkpoints and predict.

Reference: transformers' PyTorch `ResNetForImageClassification` (ResNet-50 v1.5, random
weights, its BatchNorm running statistics randomised so that they matter), and a torchvision
(= timm) layout state dict renamed from it by the rules below, written independently of
`convert.layouts`.
"""

import json
import re

import helpers
import jax
import numpy as np
from PIL import Image
import pytest
import safetensors.numpy
import torch
import transformers

from convnext_jax import checkpoints
from convnext_jax import convert
from convnext_jax import convert_cli
from convnext_jax import models
from convnext_jax import predict
from convnext_jax.convert import layouts

R50 = 'roadmap_r50_baseline'
CLASSES = ['ant', 'bee', 'cow', 'dog', 'eel', 'fox', 'gnu', 'hen', 'ibis', 'jay']
ATOL = 1e-4  # float32 logits


def _hf_resnet50(seed: int = 0):
  config = transformers.ResNetConfig(
      depths=[3, 4, 6, 3],
      hidden_sizes=[256, 512, 1024, 2048],
      embedding_size=64,
      layer_type='bottleneck',
      num_labels=len(CLASSES),
      id2label=dict(enumerate(CLASSES)),
      label2id={n: i for i, n in enumerate(CLASSES)},
  )
  torch.manual_seed(seed)
  hf = transformers.ResNetForImageClassification(config)
  generator = torch.Generator().manual_seed(seed)

  def noise(n):
    return torch.randn(n, generator=generator)

  with torch.no_grad():
    for name, module in hf.named_modules():
      if isinstance(module, torch.nn.BatchNorm2d):
        n = module.num_features
        # The last norm of a residual branch smaller, so that 16 blocks keep logits O(1).
        scale = 0.5 if name.endswith('layer.2.normalization') else 1.0
        module.weight.copy_(scale * (1 + 0.2 * noise(n)))
        module.bias.copy_(0.1 * noise(n))
        module.running_mean.copy_(0.2 * noise(n))
        module.running_var.copy_(0.5 + noise(n).abs())
        module.num_batches_tracked.fill_(1234)
  return hf.eval()


def _hf_to_torchvision(key: str) -> str:
  """transformers' ResNet key -> torchvision's (and timm's) name of the same tensor."""
  key = key.removeprefix('resnet.')
  key = key.replace('embedder.embedder.convolution.', 'conv1.')
  key = key.replace('embedder.embedder.normalization.', 'bn1.')
  key = key.replace('classifier.1.', 'fc.')
  key = re.sub(
      r'^encoder\.stages\.(\d+)\.layers\.(\d+)\.',
      lambda m: f'layer{int(m.group(1)) + 1}.{m.group(2)}.',
      key,
  )
  key = key.replace('.shortcut.convolution.', '.downsample.0.')
  key = key.replace('.shortcut.normalization.', '.downsample.1.')
  key = re.sub(r'\.layer\.(\d)\.convolution\.', lambda m: f'.conv{int(m.group(1)) + 1}.', key)
  return re.sub(r'\.layer\.(\d)\.normalization\.', lambda m: f'.bn{int(m.group(1)) + 1}.', key)


_FORWARD = {}


def _forward(model_name, weights, images_nchw):
  """Logits of a BatchNorm model in evaluation (running statistics), jitted once."""
  if model_name not in _FORWARD:
    model = models.create_model(model_name, num_classes=len(CLASSES))
    _FORWARD[model_name] = jax.jit(
        lambda p, s, x: model.apply({'params': p, 'batch_stats': s}, x, train=False)
    )
  params, batch_stats = models.split_batch_stats(weights)
  return np.asarray(_FORWARD[model_name](params, batch_stats, helpers.nhwc(images_nchw)))


def _torch_logits(module, images_nchw):
  with torch.no_grad():
    out = module(torch.from_numpy(images_nchw))
  return (out.logits if hasattr(out, 'logits') else out).numpy()


def _random_weights(model, seed):
  """Random params and BatchNorm statistics (running variances positive) of `model`."""
  params = helpers.random_params(model, seed=seed)
  rng = np.random.default_rng(seed)
  shapes = jax.eval_shape(
      lambda x: model.init(jax.random.key(0), x), jax.ShapeDtypeStruct((1, 32, 32, 3), np.float32)
  )['batch_stats']
  stats = jax.tree_util.tree_map_with_path(
      lambda path, leaf: (
          0.2 * rng.standard_normal(leaf.shape)
          if path[-1].key == 'mean'
          else 0.5 + rng.random(leaf.shape)
      ).astype(np.float32),
      shapes,
  )
  return models.merge_batch_stats(params, stats)


def _assert_trees_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert x.dtype == y.dtype and x.shape == y.shape
    np.testing.assert_array_equal(x, y)


def _cli(capsys, *argv):
  code = convert_cli.main([str(a) for a in argv])
  out, err = capsys.readouterr()
  return code, out, err


@pytest.fixture(scope='module')
def hf_r50():
  return _hf_resnet50()


@pytest.fixture(scope='module')
def imported(hf_r50, tmp_path_factory):
  """`convnext-convert import` of the transformers model's save_pretrained directory."""
  root = tmp_path_factory.mktemp('resnet')
  hf_r50.save_pretrained(root / 'hf')
  assert convert_cli.main(['import', str(root / 'hf'), str(root / 'ckpt')]) == 0
  return root / 'ckpt'


def test_hf_directory_imports_with_the_logits_of_transformers(hf_r50, imported):
  weights, metadata = checkpoints.load_params(str(imported))
  assert metadata['model_name'] == R50 and metadata['source_layout'] == 'hf'
  assert metadata['num_classes'] == 10 and metadata['class_names'] == CLASSES
  running_mean = hf_r50.resnet.encoder.stages[2].layers[0].shortcut.normalization.running_mean
  np.testing.assert_array_equal(weights['layer3.0']['downsample.1']['mean'], running_mean.numpy())
  for height, width in ((64, 64), (96, 64)):
    x = helpers.images(2, height, width)
    expected = _torch_logits(hf_r50, x)
    assert np.abs(expected).max() > 0.5  # Non-trivial logits.
    np.testing.assert_allclose(_forward(R50, weights, x), expected, atol=ATOL, rtol=0)


def test_torchvision_layout_imports_and_every_layout_round_trips(hf_r50, imported):
  state_dict = {_hf_to_torchvision(k): v for k, v in hf_r50.state_dict().items()}
  assert 'layer4.0.downsample.1.running_var' in state_dict and 'fc.weight' in state_dict
  name, weights = convert.torch_to_flax(state_dict)
  assert name == R50
  _assert_trees_equal(weights, checkpoints.load_params(str(imported))[0])
  # torchvision's files before PyTorch 0.4.1 have no num_batches_tracked.
  old = {k: v for k, v in state_dict.items() if not k.endswith('num_batches_tracked')}
  _assert_trees_equal(convert.torch_to_flax(old)[1], weights)
  for layout in ('official', 'timm', 'hf'):
    exported = convert.flax_to_torch(weights, R50, layout)
    counters = [v for k, v in exported.items() if k.endswith('.num_batches_tracked')]
    assert len(counters) == 53 and all(
        v.dtype == np.int64 and v.shape == () and v == 0 for v in counters
    )
    if layout != 'hf':  # torchvision's names, which timm's resnet50 has too.
      assert set(exported) == set(state_dict)
    name, back = convert.torch_to_flax({k: torch.from_numpy(v) for k, v in exported.items()})
    assert name == R50
    _assert_trees_equal(back, weights)


def test_export_loads_strictly_into_transformers_with_the_same_logits(tmp_path, capsys):
  weights = _random_weights(models.create_model(R50, num_classes=10), seed=5)
  checkpoints.save_params(
      str(tmp_path / 'ckpt'),
      weights,
      {'model_name': R50, 'num_classes': 10, 'class_names': CLASSES},
  )
  code, out, _ = _cli(capsys, 'export', tmp_path / 'ckpt', tmp_path / 'hf')
  assert code == 0 and 'hf layout' in out
  config = json.loads((tmp_path / 'hf' / 'config.json').read_text())
  assert config['model_type'] == 'resnet' and config['id2label']['9'] == 'jay'
  hf, info = transformers.AutoModelForImageClassification.from_pretrained(
      tmp_path / 'hf', output_loading_info=True
  )
  assert not any(info.values()), info  # No missing, unexpected or mis-shaped key.
  fresh = transformers.ResNetForImageClassification(hf.config)
  state_dict = {
      k: torch.from_numpy(v) for k, v in convert.flax_to_torch(weights, R50, 'hf').items()
  }
  fresh.load_state_dict(state_dict, strict=True)
  x = helpers.images(2, 64, 64, seed=1)
  ours = _forward(R50, weights, x)
  np.testing.assert_allclose(_torch_logits(hf.eval(), x), ours, atol=ATOL, rtol=0)
  np.testing.assert_array_equal(_torch_logits(fresh.eval(), x), _torch_logits(hf, x))


def test_a_workdir_gives_its_params_with_their_running_statistics(tmp_path):
  # A roadmap step at a test size: what matters is where the statistics are.
  model = models.create_model(
      'roadmap_r50_gelu', num_classes=10, depths=(1, 1, 2, 1), widths=(8, 16, 32, 64)
  )
  weights = _random_weights(model, seed=6)
  params, batch_stats = models.split_batch_stats(weights)
  workdir = str(tmp_path / 'run')
  saver = checkpoints.TrainingCheckpoints(
      workdir, save_interval_steps=1, keep=1, enable_async=False
  )
  state = {
      'params': params,
      'ema_params': jax.tree.map(lambda a: a + 1, params),
      'batch_stats': batch_stats,
      'step': np.int64(3),
  }
  saver.save(3, state, {'model_name': 'roadmap_r50_gelu', 'num_classes': 10}, force=True)
  saver.close()
  # Export and predict read the weights with the statistics, which the EMA params share.
  _assert_trees_equal(checkpoints.load_params(workdir, which='raw')[0], weights)
  ema, _ = checkpoints.load_params(workdir, which='ema')
  _assert_trees_equal(ema, models.merge_batch_stats(state['ema_params'], batch_stats))
  # init_from: a merged tree takes the statistics too; a params tree only the params.
  zeros = jax.tree.map(lambda a: jax.numpy.zeros(a.shape, a.dtype), weights)
  loaded, report, _ = checkpoints.load_params_into(workdir, zeros, which='raw')
  _assert_trees_equal(jax.tree.map(np.asarray, loaded), weights)
  assert not report['missing'] and not report['unexpected']
  loaded, _, _ = checkpoints.load_params_into(
      workdir, models.split_batch_stats(zeros)[0], which='raw'
  )
  _assert_trees_equal(jax.tree.map(np.asarray, loaded), params)


def test_other_roadmap_steps_export_officially_with_their_running_statistics():
  name = 'roadmap_r50_gelu'  # BatchNorm, official layout only.
  weights = _random_weights(models.create_model(name, num_classes=10), seed=7)
  state_dict = convert.flax_to_torch(weights, name)
  assert state_dict['layer2.0.bn2.num_batches_tracked'].dtype == np.int64
  np.testing.assert_array_equal(
      state_dict['layer2.0.downsample.1.running_var'], weights['layer2.0']['downsample.1']['var']
  )
  with pytest.raises(convert.ConversionError, match='name the model'):
    convert.torch_to_flax(state_dict)
  _assert_trees_equal(convert.torch_to_flax(state_dict, model_name=name)[1], weights)
  with pytest.raises(
      convert.ConversionError, match='the timm layout has no such model.*; use --layout official$'
  ):
    convert.flax_to_torch(weights, name, 'timm')


def test_predict_normalises_with_the_running_statistics(imported, hf_r50, tmp_path, capsys):
  image = np.random.default_rng(2).integers(0, 256, (80, 72, 3), dtype=np.uint8)
  Image.fromarray(image).save(tmp_path / 'a.png')
  code = predict.main(
      [
          str(tmp_path / 'a.png'),
          '--checkpoint',
          str(imported),
          '--size',
          '64',
          '--top_k',
          '3',
          '--json',
      ]
  )
  out = json.loads(capsys.readouterr().out)
  assert code == 0
  crop = predict.load_image(str(tmp_path / 'a.png'), 64, 0.875)
  x = (crop.astype(np.float32) / 255 - np.array([0.485, 0.456, 0.406])) / np.array(
      [0.229, 0.224, 0.225]
  )
  expected = torch.softmax(
      torch.from_numpy(_torch_logits(hf_r50, x.transpose(2, 0, 1)[None].astype(np.float32))), -1
  ).numpy()[0]
  top = np.argsort(-expected)[:3]
  assert [p['label'] for p in out[0]['predictions']] == [CLASSES[k] for k in top]
  np.testing.assert_allclose(
      [p['probability'] for p in out[0]['predictions']], expected[top], atol=1e-5
  )


def _shapes_only(model_name, layout, num_classes=10):
  return {
      m.torch_key: jax.ShapeDtypeStruct(m.torch_shape, np.float32)
      for m in layouts.tensor_maps(model_name, num_classes, layout)
  }


def test_recognition_of_resnets_and_convnext():
  for name in ('roadmap_r50_baseline', 'roadmap_r200_baseline', 'roadmap_r50_stage_ratio'):
    assert convert.layouts_of(name) == ('official', 'timm', 'hf')
    for layout in ('official', 'hf'):
      state_dict = _shapes_only(name, layout)
      assert convert.detect_model(state_dict, convert.detect_layout(state_dict)) == (name, 10)
  # The roadmap's last step is convnext_tiny's tree: a ConvNeXt checkpoint is convnext_tiny.
  for layout in ('official', 'timm', 'hf'):
    state_dict = _shapes_only('roadmap_r50_downsample', layout)
    assert convert.detect_model(state_dict, layout) == ('convnext_tiny', 10)


def test_unsupported_resnets_are_one_clear_error():
  r50 = _shapes_only(R50, 'official')
  r101 = dict(
      r50,
      **{
          k.replace('layer3.1.', f'layer3.{j}.'): v
          for k, v in r50.items()
          if k.startswith('layer3.1.')
          for j in range(6, 23)
      },
  )
  with pytest.raises(
      convert.ConversionError,
      match=r'^no known ResNet has depths \(3, 4, 23, 3\) and widths \(256, 512, '
      r'1024, 2048\) \(official layout\); known ResNets: roadmap_r50_baseline',
  ):
    convert.torch_to_flax(r101)
  basic = {k: v for k, v in r50.items() if '.conv3.' not in k and '.bn3.' not in k}
  with pytest.raises(convert.ConversionError, match='basic blocks'):
    convert.torch_to_flax(basic)
  with pytest.raises(
      convert.ConversionError,
      match=r'does not match roadmap_r200_baseline \(it looks like '
      r'roadmap_r50_baseline\): missing 750 key\(s\): layer2.10.bn1.bias, ',
  ):
    convert.torch_to_flax(r50, model_name='roadmap_r200_baseline')
  with pytest.raises(
      convert.ConversionError, match=r'the hf layout has no such model.*roadmap_r50_baseline'
  ):
    layouts.tensor_maps('roadmap_r50_fewer_norm', 10, 'hf')
  params = helpers.random_params(models.create_model(R50, num_classes=10))
  with pytest.raises(
      convert.ConversionError,
      match='missing 106 key.*; merge the BatchNorm statistics in with '
      r'models.merge_batch_stats\(params, batch_stats\)$',
  ):
    convert.flax_to_torch(params, R50)


def test_cli_import_error_is_one_line(tmp_path, capsys):
  r50 = _shapes_only(R50, 'official')
  arrays = {
      k: np.zeros(v.shape, np.float32) for k, v in r50.items() if not k.startswith('layer4.2.')
  }
  safetensors.numpy.save_file(arrays, str(tmp_path / 'r.safetensors'))
  code, out, err = _cli(capsys, 'import', tmp_path / 'r.safetensors', tmp_path / 'out')
  assert code == 1 and out == '' and err.count('\n') == 1
  assert 'no known ResNet has depths (3, 4, 6, 2)' in err
  assert not (tmp_path / 'out').exists()


def test_init_from_remakes_a_resnet_head_of_another_class_count():
  report = checkpoints.compare_params(
      {'fc/kernel': (2048, 5), 'bn1/mean': (64,)}, {'fc/kernel': (2048, 10), 'bn1/mean': (64,)}
  )
  assert report['reinitialized'] == ['fc/kernel (2048, 10) -> (2048, 5)']
  assert report['taken'] == ['bn1/mean']
