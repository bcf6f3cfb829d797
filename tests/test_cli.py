"""`convnext-convert`: import/export through files, and every error case of bad input."""

import json
import os
import subprocess
import sys

import helpers
import jax
import numpy as np
import pytest
import safetensors.numpy
import torch
import torch_reference
import transformers

from convnext_jax import checkpoints
from convnext_jax import convert
from convnext_jax import convert_cli
from convnext_jax import models

MODEL = 'convnext_atto'


@pytest.fixture(scope='module')
def weights():
  """Raw and EMA params of a small model (10 classes) and their official state dicts."""
  model = models.create_model(MODEL, num_classes=10)
  raw = helpers.random_params(model, seed=10)
  ema = helpers.random_params(model, seed=11)
  return {
      'raw': raw,
      'ema': ema,
      'raw_official': convert.flax_to_torch(raw, MODEL, 'official'),
      'ema_official': convert.flax_to_torch(ema, MODEL, 'official'),
  }


def _torch_dict(state_dict):
  return {k: torch.from_numpy(v) for k, v in state_dict.items()}


def _official_pth(path, weights, **extra):
  torch.save(
      {
          'model': _torch_dict(weights['raw_official']),
          'model_ema': _torch_dict(weights['ema_official']),
          'epoch': 299,
          **extra,
      },
      path,
  )
  return str(path)


def _run(capsys, *argv):
  code = convert_cli.main([str(a) for a in argv])
  out, err = capsys.readouterr()
  return code, out, err


def _assert_same(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)


def test_import_official_raw_and_ema(tmp_path, capsys, weights):
  src = _official_pth(tmp_path / 'checkpoint-best.pth', weights)
  code, out, _ = _run(capsys, 'import', src, tmp_path / 'raw')
  assert code == 0 and 'convnext_atto, 10 classes, raw weights from official' in out
  params, meta = checkpoints.load_params(str(tmp_path / 'raw'))
  _assert_same(params, weights['raw'])
  assert meta['model_name'] == MODEL and meta['num_classes'] == 10 and not meta['ema']
  assert meta['source'] == src and meta['source_layout'] == 'official'

  assert _run(capsys, 'import', src, tmp_path / 'ema', '--ema')[0] == 0
  params, meta = checkpoints.load_params(str(tmp_path / 'ema'))
  _assert_same(params, weights['ema'])
  assert meta['ema']


def test_official_training_checkpoint_with_argparse_args_loads(tmp_path, capsys, weights):
  import argparse  # pylint: disable=g-import-not-at-top

  src = _official_pth(
      tmp_path / 'checkpoint-299.pth',
      weights,
      args=argparse.Namespace(model='convnext_atto', lr=4e-3),
  )
  assert _run(capsys, 'import', src, tmp_path / 'out')[0] == 0


def test_official_round_trip_through_files_is_bit_exact(tmp_path, capsys, weights):
  src = _official_pth(tmp_path / 'in.pth', weights)
  assert _run(capsys, 'import', src, tmp_path / 'ckpt')[0] == 0
  code, out, _ = _run(capsys, 'export', tmp_path / 'ckpt', tmp_path / 'out.pth')
  assert code == 0 and 'official layout' in out
  exported = torch.load(tmp_path / 'out.pth', weights_only=True)
  assert list(exported) == ['model']
  original = weights['raw_official']
  assert list(exported['model']) == list(original)
  for key, value in original.items():
    assert torch.equal(exported['model'][key], torch.from_numpy(value)), key
  reference = torch_reference.OfficialConvNeXt((2, 2, 6, 2), (40, 80, 160, 320), 10)
  reference.load_state_dict(exported['model'], strict=True)


def test_timm_safetensors_round_trip(tmp_path, capsys, weights):
  timm_file = tmp_path / 'model.safetensors'
  safetensors.numpy.save_file(convert.flax_to_torch(weights['raw'], MODEL, 'timm'), str(timm_file))
  assert _run(capsys, 'import', timm_file, tmp_path / 'ckpt')[0] == 0
  params, meta = checkpoints.load_params(str(tmp_path / 'ckpt'))
  assert meta['source_layout'] == 'timm'
  _assert_same(params, weights['raw'])
  assert _run(capsys, 'export', tmp_path / 'ckpt', tmp_path / 'timm_out.safetensors')[0] == 0
  again = safetensors.numpy.load_file(str(tmp_path / 'timm_out.safetensors'))
  original = safetensors.numpy.load_file(str(timm_file))
  assert again.keys() == original.keys()
  for key in original:
    np.testing.assert_array_equal(again[key], original[key])


def test_hf_directory_import_and_export(tmp_path, capsys):
  hf = transformers.ConvNextV2ForImageClassification(
      transformers.ConvNextV2Config(
          hidden_sizes=[40, 80, 160, 320],
          depths=[2, 2, 6, 2],
          num_labels=3,
          layer_norm_eps=1e-6,
          id2label={0: 'ant', 1: 'bee', 2: 'cow'},
          label2id={'ant': 0, 'bee': 1, 'cow': 2},
      )
  )
  torch_reference.randomize_(hf, seed=12)
  hf.save_pretrained(tmp_path / 'hf_in')
  assert _run(capsys, 'import', tmp_path / 'hf_in', tmp_path / 'ckpt')[0] == 0
  _, meta = checkpoints.load_params(str(tmp_path / 'ckpt'))
  assert meta['model_name'] == 'convnextv2_atto' and meta['class_names'] == ['ant', 'bee', 'cow']
  code, out, _ = _run(capsys, 'export', tmp_path / 'ckpt', tmp_path / 'hf_out')
  assert code == 0 and 'hf layout' in out
  config = json.loads((tmp_path / 'hf_out' / 'config.json').read_text())
  assert config['model_type'] == 'convnextv2' and config['id2label']['2'] == 'cow'
  loaded = transformers.AutoModelForImageClassification.from_pretrained(tmp_path / 'hf_out')
  x = torch.from_numpy(helpers.images(2, 64, 64))
  with torch.no_grad():
    np.testing.assert_array_equal(loaded.eval()(x).logits.numpy(), hf.eval()(x).logits.numpy())


def test_inspect(tmp_path, capsys, weights):
  src = _official_pth(tmp_path / 'in.pth', weights)
  code, out, _ = _run(capsys, 'inspect', src)
  assert code == 0
  assert 'layout: official\nmodel_name: convnext_atto\nnum_classes: 10\nema: False' in out
  assert f'parameters: {models.count_params(weights["raw"])}' in out


# ---------------------------------------------------------------------------------------
# Bad input: one error line, exit status 1, nothing written.
# ---------------------------------------------------------------------------------------


def _assert_fails_cleanly(capsys, tmp_path, argv, message, dest):
  before = sorted(os.listdir(tmp_path))
  code, out, err = _run(capsys, *argv)
  assert code == 1
  assert out == ''
  assert err.count('\n') == 1 and err.startswith('convnext-convert: error: '), err
  assert message in err, err
  assert sorted(os.listdir(tmp_path)) == before  # No output, no temporary left behind.
  assert not os.path.exists(dest) or dest in [str(tmp_path / b) for b in before]


def _write_pth(path, state_dict):
  torch.save({'model': _torch_dict(state_dict)}, path)
  return str(path)


def test_error_wrong_variant(tmp_path, capsys, weights):
  src = _write_pth(tmp_path / 'atto.pth', weights['raw_official'])
  _assert_fails_cleanly(
      capsys,
      tmp_path,
      ['import', src, tmp_path / 'out', '--model', 'convnext_nano'],
      f'{src}: official state dict does not match convnext_nano (it looks like convnext_atto): '
      'missing 18 key(s): stages.2.6.dwconv.bias, ',
      str(tmp_path / 'out'),
  )


def test_error_missing_and_unexpected_keys(tmp_path, capsys, weights):
  state_dict = dict(weights['raw_official'])
  del state_dict['stages.3.1.gamma']
  state_dict['stages.3.1.layer_scale'] = np.ones(320, np.float32)
  src = _write_pth(tmp_path / 'edited.pth', state_dict)
  _assert_fails_cleanly(
      capsys,
      tmp_path,
      ['import', src, tmp_path / 'out'],
      'missing 1 key(s): stages.3.1.gamma; unexpected 1 key(s): stages.3.1.layer_scale',
      str(tmp_path / 'out'),
  )


def test_error_wrong_shape(tmp_path, capsys, weights):
  state_dict = dict(weights['raw_official'])
  state_dict['stages.1.0.pwconv1.weight'] = np.zeros((160, 80), np.float32)
  src = _write_pth(tmp_path / 'bad_shape.pth', state_dict)
  _assert_fails_cleanly(
      capsys,
      tmp_path,
      ['import', src, tmp_path / 'out'],
      'mis-shaped 1 key(s): stages.1.0.pwconv1.weight (160, 80) != expected (320, 80)',
      str(tmp_path / 'out'),
  )


@pytest.mark.parametrize('suffix', ['.pth', '.safetensors'])
def test_error_truncated_file(tmp_path, capsys, weights, suffix):
  whole = tmp_path / f'whole{suffix}'
  if suffix == '.pth':
    _write_pth(whole, weights['raw_official'])
  else:
    safetensors.numpy.save_file(weights['raw_official'], str(whole))
  data = whole.read_bytes()
  truncated = tmp_path / f'truncated{suffix}'
  truncated.write_bytes(data[: len(data) // 2])
  _assert_fails_cleanly(
      capsys,
      tmp_path,
      ['import', truncated, tmp_path / 'out'],
      f'cannot read {truncated}: ',
      str(tmp_path / 'out'),
  )


class _Payload:
  """Stands for a pickle that would run code when loaded."""

  def __reduce__(self):
    return (os.system, ('echo pwned',))


def test_error_pickle_with_code_is_refused(tmp_path, capsys, weights):
  src = tmp_path / 'evil.pth'
  torch.save({'model': _torch_dict(weights['raw_official']), 'x': _Payload()}, src)
  _assert_fails_cleanly(
      capsys,
      tmp_path,
      ['import', src, tmp_path / 'out'],
      'which a weights-only load refuses to unpickle',
      str(tmp_path / 'out'),
  )


def test_error_ema_requested_but_absent(tmp_path, capsys, weights):
  src = _write_pth(tmp_path / 'no_ema.pth', weights['raw_official'])
  _assert_fails_cleanly(
      capsys,
      tmp_path,
      ['import', src, tmp_path / 'out', '--ema'],
      'has no EMA weights',
      str(tmp_path / 'out'),
  )


def test_error_missing_source(tmp_path, capsys):
  _assert_fails_cleanly(
      capsys,
      tmp_path,
      ['import', tmp_path / 'nope.pth', tmp_path / 'out'],
      'nope.pth does not exist',
      str(tmp_path / 'out'),
  )
  _assert_fails_cleanly(
      capsys,
      tmp_path,
      ['export', tmp_path / 'nope', tmp_path / 'o.pth'],
      'nope does not exist',
      str(tmp_path / 'o.pth'),
  )


def test_error_existing_output_is_kept(tmp_path, capsys, weights):
  src = _write_pth(tmp_path / 'in.pth', weights['raw_official'])
  assert _run(capsys, 'import', src, tmp_path / 'ckpt')[0] == 0
  (tmp_path / 'out.pth').write_bytes(b'precious')
  _assert_fails_cleanly(
      capsys,
      tmp_path,
      ['export', tmp_path / 'ckpt', tmp_path / 'out.pth'],
      'out.pth already exists; pass --overwrite',
      str(tmp_path / 'out.pth'),
  )
  assert (tmp_path / 'out.pth').read_bytes() == b'precious'
  assert _run(capsys, 'export', tmp_path / 'ckpt', tmp_path / 'out.pth', '--overwrite')[0] == 0
  assert list(torch.load(tmp_path / 'out.pth', weights_only=True)) == ['model']


def test_error_isotropic_to_hf(tmp_path, capsys):
  params = helpers.random_params(models.create_model('convnext_isotropic_small'))
  checkpoints.save_params(
      str(tmp_path / 'iso'), params, {'model_name': 'convnext_isotropic_small', 'num_classes': 1000}
  )
  _assert_fails_cleanly(
      capsys,
      tmp_path,
      ['export', tmp_path / 'iso', tmp_path / 'hf'],
      'the hf layout has no isotropic ConvNeXt',
      str(tmp_path / 'hf'),
  )


def test_error_not_a_checkpoint(tmp_path, capsys):
  (tmp_path / 'notes').mkdir()
  _assert_fails_cleanly(
      capsys,
      tmp_path,
      ['export', tmp_path / 'notes', tmp_path / 'o.pth'],
      'is neither a convnext_jax params checkpoint',
      str(tmp_path / 'o.pth'),
  )
  _assert_fails_cleanly(
      capsys,
      tmp_path,
      ['import', tmp_path / 'notes', tmp_path / 'out'],
      'is a directory without config.json',
      str(tmp_path / 'out'),
  )


def test_module_entry_point_exit_status(tmp_path):
  result = subprocess.run(
      [
          sys.executable,
          '-m',
          'convnext_jax.convert_cli',
          'import',
          str(tmp_path / 'x.pth'),
          str(tmp_path / 'out'),
      ],
      capture_output=True,
      text=True,
      check=False,
      env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL='3'),
  )
  assert result.returncode == 1
  assert result.stderr.strip().splitlines()[-1] == (
      f'convnext-convert: error: {tmp_path / "x.pth"} does not exist'
  )
  assert not (tmp_path / 'out').exists()


def test_bfloat16_safetensors_and_legacy_pickle_import(tmp_path, capsys, weights):
  timm = convert.flax_to_torch(weights['raw'], MODEL, 'timm')
  import safetensors.torch  # pylint: disable=g-import-not-at-top

  safetensors.torch.save_file(
      {k: torch.from_numpy(v).to(torch.bfloat16) for k, v in timm.items()},
      str(tmp_path / 'bf16.safetensors'),
  )
  assert _run(capsys, 'import', tmp_path / 'bf16.safetensors', tmp_path / 'a')[0] == 0
  params, _ = checkpoints.load_params(str(tmp_path / 'a'))
  expected = torch.from_numpy(weights['raw']['head']['kernel']).to(torch.bfloat16).float()
  np.testing.assert_array_equal(params['head']['kernel'], expected.numpy())

  legacy = tmp_path / 'legacy.pth'
  torch.save(
      {'model': _torch_dict(weights['raw_official'])}, legacy, _use_new_zipfile_serialization=False
  )
  assert _run(capsys, 'import', legacy, tmp_path / 'b')[0] == 0
  _assert_same(checkpoints.load_params(str(tmp_path / 'b'))[0], weights['raw'])
