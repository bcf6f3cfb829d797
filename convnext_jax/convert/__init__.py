"""ConvNeXt weight conversion between PyTorch (official, timm, Hugging Face) and Flax.

  model_name, params = torch_to_flax(state_dict)        # layout and variant detected
  state_dict = flax_to_torch(params, model_name, layout='official' | 'timm' | 'hf')

Command line: `convnext-convert` / `python -m convnext_jax.convert` (see `cli`).
"""

from convnext_jax.convert.files import load_torch_checkpoint
from convnext_jax.convert.layouts import ConversionError
from convnext_jax.convert.layouts import detect_layout
from convnext_jax.convert.layouts import detect_model
from convnext_jax.convert.layouts import flax_to_torch
from convnext_jax.convert.layouts import LAYOUTS
from convnext_jax.convert.layouts import torch_to_flax

__all__ = [
    'ConversionError', 'LAYOUTS', 'detect_layout', 'detect_model', 'flax_to_torch',
    'load_torch_checkpoint', 'torch_to_flax'
]
