"""ConvNeXt models in Flax linen: `create_model(name, ...)` and `list_models()`; the paper's
roadmap networks (`roadmap_*`, `RoadmapNet`); ConvNeXt-V2's masked autoencoder
(`fcmae_convnextv2_*`, `FCMAE`)."""

from convnext_jax.models.convnext import REMAT_POLICIES
from convnext_jax.models.convnext import Block
from convnext_jax.models.convnext import ConvNeXt
from convnext_jax.models.convnext import ConvNeXtIsotropic
from convnext_jax.models.convnext import remat_policy
from convnext_jax.models.fcmae import FCMAE
from convnext_jax.models.registry import MODEL_SPECS
from convnext_jax.models.registry import ModelSpec
from convnext_jax.models.registry import create_model
from convnext_jax.models.registry import get_spec
from convnext_jax.models.registry import list_models
from convnext_jax.models.registry import module_arguments
from convnext_jax.models.roadmap_net import TRACKS as ROADMAP_TRACKS
from convnext_jax.models.roadmap_net import RoadmapNet
from convnext_jax.models.utils import HEAD_NAMES
from convnext_jax.models.utils import compiler_options
from convnext_jax.models.utils import count_macs
from convnext_jax.models.utils import count_params
from convnext_jax.models.utils import merge_batch_stats
from convnext_jax.models.utils import param_shapes
from convnext_jax.models.utils import split_batch_stats
from convnext_jax.models.utils import weight_shapes

__all__ = [
    'FCMAE',
    'HEAD_NAMES',
    'MODEL_SPECS',
    'REMAT_POLICIES',
    'ROADMAP_TRACKS',
    'Block',
    'ConvNeXt',
    'ConvNeXtIsotropic',
    'ModelSpec',
    'RoadmapNet',
    'compiler_options',
    'count_macs',
    'count_params',
    'create_model',
    'get_spec',
    'list_models',
    'merge_batch_stats',
    'module_arguments',
    'param_shapes',
    'remat_policy',
    'split_batch_stats',
    'weight_shapes',
]
