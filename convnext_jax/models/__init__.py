"""ConvNeXt models in Flax linen: `create_model(name, ...)` and `list_models()`."""

from convnext_jax.models.convnext import Block
from convnext_jax.models.convnext import ConvNeXt
from convnext_jax.models.convnext import ConvNeXtIsotropic
from convnext_jax.models.convnext import REMAT_POLICIES
from convnext_jax.models.convnext import remat_policy
from convnext_jax.models.registry import create_model
from convnext_jax.models.registry import get_spec
from convnext_jax.models.registry import list_models
from convnext_jax.models.registry import MODEL_SPECS
from convnext_jax.models.registry import ModelSpec
from convnext_jax.models.utils import compiler_options
from convnext_jax.models.utils import count_params
from convnext_jax.models.utils import param_shapes

__all__ = [
    'Block', 'ConvNeXt', 'ConvNeXtIsotropic', 'MODEL_SPECS', 'ModelSpec', 'REMAT_POLICIES',
    'compiler_options', 'count_params', 'create_model', 'get_spec', 'list_models',
    'param_shapes', 'remat_policy'
]
