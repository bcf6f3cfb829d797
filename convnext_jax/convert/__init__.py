"""ConvNeXt and ResNet weight conversion between PyTorch (official/torchvision, timm, Hugging
Face) and Flax.

  model_name, weights = torch_to_flax(state_dict)       # layout and variant detected
  state_dict = flax_to_torch(weights, model_name, layout='official' | 'timm' | 'hf')

`weights` are the params with BatchNorm's running statistics merged in (for models with
BatchNorm; `models.split_batch_stats` separates them).

Command line: `convnext-convert` / `python -m convnext_jax.convert_cli`, an entry point above
this package (it also reads and writes orbax checkpoints).
"""

from convnext_jax.convert.files import load_torch_checkpoint
from convnext_jax.convert.layouts import LAYOUTS
from convnext_jax.convert.layouts import ConversionError
from convnext_jax.convert.layouts import detect_layout
from convnext_jax.convert.layouts import detect_model
from convnext_jax.convert.layouts import flax_to_torch
from convnext_jax.convert.layouts import layouts_of
from convnext_jax.convert.layouts import torch_to_flax

__all__ = [
    'LAYOUTS',
    'ConversionError',
    'detect_layout',
    'detect_model',
    'flax_to_torch',
    'layouts_of',
    'load_torch_checkpoint',
    'torch_to_flax',
]
