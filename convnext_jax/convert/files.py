"""Reading and writing PyTorch-side checkpoints of ConvNeXt and the roadmap's ResNets.

Read: official `.pth` (`{'model': ...}`, `{'model_ema': ...}`), torchvision `.pth`, timm
`.safetensors`/`.pth`/`.bin`, and Hugging Face model directories. Write: official `.pth`, timm
`.safetensors`, and Hugging Face directories (`config.json` + `model.safetensors`).

Only `.pth`/`.bin` need torch (imported lazily). Pickles are loaded with
`weights_only=True`: a weights file must not be able to run code. Every output is written to a
temporary path next to the destination and renamed into place, so a failure leaves nothing
half-written.
"""

import argparse
import json
import os
import re
from typing import Any

import numpy as np
import safetensors
import safetensors.numpy

from convnext_jax import fileio
from convnext_jax import models
from convnext_jax.convert.layouts import HF_NORM_EPS
from convnext_jax.convert.layouts import ConversionError
from convnext_jax.convert.layouts import contiguous
from convnext_jax.convert.layouts import family
from convnext_jax.fileio import atomic_output

PICKLE_SUFFIXES = ('.pth', '.pt', '.bin', '.ckpt', '.tar')
SAFETENSORS_SUFFIX = '.safetensors'
HF_CONFIG = 'config.json'
# Nested state dicts in training checkpoints, in the order they are looked for.
_STATE_DICT_KEYS = ('model', 'state_dict', 'module')
_EMA_KEYS = ('model_ema', 'state_dict_ema')


def _import_torch():
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise ConversionError(
        "reading or writing .pth files needs PyTorch: pip install 'convnext_jax[torch]'"
    ) from None
  return torch


def _torch_load(path: str) -> Any:
  """torch.load with weights_only=True (tensors, containers and numbers only)."""
  torch = _import_torch()
  # Training checkpoints of the official repository carry their argparse flags ('args');
  # a Namespace only holds attributes, so it is safe to allow.
  with torch.serialization.safe_globals([argparse.Namespace]):
    try:
      try:
        # mmap keeps a multi-GB checkpoint out of RAM until each tensor is converted.
        return torch.load(path, map_location='cpu', weights_only=True, mmap=True)
      except RuntimeError as e:
        if 'mmap' not in str(e):  # Legacy (pre-zip) files cannot be mmapped; others are bad.
          raise
        return torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:  # torch raises RuntimeError, UnpicklingError, EOFError, ...
      message = str(e)
      if 'Weights only load failed' in message:
        found = re.search(r'Unsupported global: GLOBAL ([\w.]+)', message)
        what = found.group(1) if found else 'non-tensor objects'
        raise ConversionError(
            f'{path} holds {what}, which a weights-only load refuses to unpickle (a pickle can '
            'run code); re-save just the state dict with torch.save'
        ) from None
      reason = message.strip().splitlines()[0] if message.strip() else type(e).__name__
      raise ConversionError(
          f'cannot read {path}: {reason}; the file is truncated or not a '
          'PyTorch checkpoint, re-download or re-save it'
      ) from None


def _load_safetensors(path: str) -> dict[str, Any]:
  try:
    try:
      with safetensors.safe_open(path, framework='numpy') as f:
        return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (not a dict)
    except TypeError as e:  # numpy has no bfloat16: read such files through torch.
      if 'bfloat16' not in str(e).lower() and 'bf16' not in str(e).lower():
        raise
      _import_torch()
      with safetensors.safe_open(path, framework='pt') as f:
        return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (not a dict)
  except ConversionError:
    raise
  except Exception as e:  # SafetensorError, OSError, ...
    raise ConversionError(
        f'cannot read {path}: {e}; the file is truncated or not a safetensors file'
    ) from None


def _select_state_dict(obj: Any, path: str, ema: bool) -> tuple[dict[str, Any], bool]:
  """The state dict inside a loaded `.pth` object; returns (state_dict, is_ema)."""
  if not isinstance(obj, dict):
    raise ConversionError(f'{path} holds a {type(obj).__name__}, not a state dict')
  nested = [k for k in _STATE_DICT_KEYS + _EMA_KEYS if isinstance(obj.get(k), dict)]
  if not nested:
    if ema:
      raise ConversionError(f'{path} is a plain state dict with no EMA weights; drop --ema')
    return obj, False
  if ema:
    for key in _EMA_KEYS:
      if key in nested:
        return obj[key], True
    raise ConversionError(
        f"{path} has no EMA weights (keys: {', '.join(sorted(obj))}); "
        'drop --ema to convert the raw weights'
    )
  for key in _STATE_DICT_KEYS:
    if key in nested:
      return obj[key], False
  # Only EMA weights are present (some releases store just those): use them, and say so.
  return obj[nested[0]], True


def _hf_weights_files(directory: str) -> list[str]:
  for index_name in ('model.safetensors.index.json', 'pytorch_model.bin.index.json'):
    index = os.path.join(directory, index_name)
    if os.path.exists(index):
      with open(index) as f:
        shards = sorted(set(json.load(f)['weight_map'].values()))
      return [os.path.join(directory, s) for s in shards]
  for name in ('model.safetensors', 'pytorch_model.bin'):
    if os.path.exists(os.path.join(directory, name)):
      return [os.path.join(directory, name)]
  raise ConversionError(
      f'{directory} has no model.safetensors or pytorch_model.bin; '
      'expected a Hugging Face model directory'
  )


def _class_names(hf_config: dict[str, Any]) -> list[str] | None:
  id2label = hf_config.get('id2label')
  if not id2label:
    return None
  names = [id2label[k] for k in sorted(id2label, key=int)]
  # transformers fills in 'LABEL_0', 'LABEL_1', ... when no names were given.
  if all(n == f'LABEL_{i}' for i, n in enumerate(names)):
    return None
  return names


def load_torch_checkpoint(path: str, ema: bool = False) -> tuple[dict[str, Any], dict[str, Any]]:
  """Reads a PyTorch-side ConvNeXt checkpoint.

  Args:
    path: `.pth`/`.pt`/`.bin`/`.ckpt` (torch pickle, official or timm), `.safetensors`
      (timm or transformers), or a Hugging Face model directory.
    ema: take the EMA weights (`model_ema`) of an official training checkpoint.

  Returns:
    (state_dict, info): info has 'source' (the path), 'ema' (bool) and 'class_names'
    (list of str, from a Hugging Face config, or None).

  Raises:
    ConversionError: missing, unreadable or truncated file; no EMA weights when asked.
  """
  if fileio.is_remote(path):
    with fileio.local_copy(path) as local:
      if local == path:
        raise ConversionError(f'{path} does not exist')
      state_dict, info = load_torch_checkpoint(local, ema)
    return state_dict, dict(info, source=path)
  info: dict[str, Any] = {'source': os.path.abspath(path), 'ema': False, 'class_names': None}
  if os.path.isdir(path):
    config_path = os.path.join(path, HF_CONFIG)
    if not os.path.exists(config_path):
      raise ConversionError(
          f'{path} is a directory without {HF_CONFIG}; expected a Hugging '
          'Face model directory or a checkpoint file'
      )
    with open(config_path) as f:
      config = json.load(f)
    info['class_names'] = _class_names(config)
    state_dict = {}
    for file in _hf_weights_files(path):
      state_dict.update(load_torch_checkpoint(file)[0])
    # A base model without a head (`ConvNextV2Model`, `ResNetModel`) saves its keys without
    # the prefix that the classifier puts before them (transformers' `base_model_prefix`, the
    # model type); read both alike.
    prefix = f"{config.get('model_type')}."
    if state_dict and not any(k.startswith(prefix) for k in state_dict):
      state_dict = {prefix + k: v for k, v in state_dict.items()}
    return state_dict, info
  if not os.path.exists(path):
    raise ConversionError(f'{path} does not exist')
  if path.endswith(SAFETENSORS_SUFFIX):
    if ema:
      raise ConversionError(f'{path}: a safetensors file holds one set of weights; drop --ema')
    return _load_safetensors(path), info
  if path.endswith(PICKLE_SUFFIXES):
    state_dict, info['ema'] = _select_state_dict(_torch_load(path), path, ema)
    return state_dict, info
  raise ConversionError(
      f'{path}: unknown checkpoint type; expected a .pth/.pt/.bin/.ckpt or '
      f'{SAFETENSORS_SUFFIX} file, or a Hugging Face model directory'
  )


# ----------------------------------------------------------------------------------------
# Writing, each through `atomic_output`: a temporary path, then a rename.
# ----------------------------------------------------------------------------------------


def save_official_pth(state_dict: dict[str, np.ndarray], path: str, overwrite: bool = False):
  """Writes `torch.save({'model': state_dict})`, as the official repository loads it."""
  torch = _import_torch()
  tensors = {k: torch.from_numpy(contiguous(v)) for k, v in state_dict.items()}
  # Through a Python file, so a full disk surfaces as OSError(ENOSPC) (in the context of
  # torch's RuntimeError); torch's own file writer reports it as an 'iostream error'.
  with atomic_output(path, overwrite) as tmp, open(tmp, 'wb') as f:
    torch.save({'model': tensors}, f)


def save_safetensors(state_dict: dict[str, np.ndarray], path: str, overwrite: bool = False):
  """Writes a safetensors file (metadata format 'pt', which timm and transformers expect)."""
  with atomic_output(path, overwrite) as tmp:
    safetensors.numpy.save_file(
        {k: contiguous(v) for k, v in state_dict.items()}, tmp, metadata={'format': 'pt'}
    )


def _hf_resnet_config(spec: models.ModelSpec) -> dict[str, Any]:
  """`ResNetConfig` entries of a torchvision ResNet (v1.5: the stride on the 3x3 conv)."""
  return {
      'architectures': ['ResNetForImageClassification'],
      'model_type': 'resnet',
      'num_channels': 3,
      'embedding_size': dict(spec.roadmap)['widths'][0],
      'hidden_sizes': list(spec.dims),
      'depths': list(spec.depths),
      'layer_type': 'bottleneck',
      'hidden_act': 'relu',
      'downsample_in_first_stage': False,
      'downsample_in_bottleneck': False,
  }


def hf_config(
    model_name: str, num_classes: int, class_names: list[str] | None = None
) -> dict[str, Any]:
  """A transformers `ConvNextConfig`/`ConvNextV2Config`/`ResNetConfig` dict for a registered
  model (one that the 'hf' layout can represent, `layouts.layouts_of`)."""
  spec = models.get_spec(model_name)
  v2 = spec.use_grn
  if class_names is None or len(class_names) != num_classes:
    class_names = [f'LABEL_{i}' for i in range(num_classes)]
  labels = {
      'id2label': {str(i): n for i, n in enumerate(class_names)},
      'label2id': {n: i for i, n in enumerate(class_names)},
      'torch_dtype': 'float32',
  }
  if family(spec) == 'resnet':
    config = _hf_resnet_config(spec)
    if not num_classes:
      config['architectures'] = ['ResNetModel']
    return dict(config, **labels)
  config = {
      'architectures': [
          ('ConvNextV2' if v2 else 'ConvNext')
          + ('ForImageClassification' if num_classes else 'Model')
      ],
      'model_type': 'convnextv2' if v2 else 'convnext',
      'num_channels': 3,
      'patch_size': 4,
      'num_stages': len(spec.depths),
      'hidden_sizes': list(spec.dims),
      'depths': list(spec.depths),
      'hidden_act': 'gelu',
      'initializer_range': 0.02,
      # Only the final LayerNorm reads this; transformers' default (1e-12) is not ConvNeXt's.
      'layer_norm_eps': HF_NORM_EPS,
      'drop_path_rate': 0.0,
      'image_size': 224,
      **labels,
  }
  if not v2:
    # Any positive value creates `layer_scale_parameter`; the loaded weights set its value.
    config['layer_scale_init_value'] = spec.layer_scale_init_value or 0.0
  return config


def save_hf_directory(
    state_dict: dict[str, np.ndarray],
    path: str,
    model_name: str,
    num_classes: int,
    class_names: list[str] | None = None,
    overwrite: bool = False,
):
  """Writes a directory that `transformers.AutoModel*.from_pretrained` loads."""
  config = hf_config(model_name, num_classes, class_names)
  if not num_classes:
    prefix = config['model_type'] + '.'  # ConvNextModel/ResNetModel: no prefix on their keys.
    state_dict = {k[len(prefix) :]: v for k, v in state_dict.items()}
  with atomic_output(path, overwrite) as tmp:
    os.mkdir(tmp)
    with open(os.path.join(tmp, HF_CONFIG), 'w') as f:
      json.dump(config, f, indent=2)
    safetensors.numpy.save_file(
        {k: contiguous(v) for k, v in state_dict.items()},
        os.path.join(tmp, 'model.safetensors'),
        metadata={'format': 'pt'},
    )
