"""Helpers: parameter trees and counts without allocating weights; XLA compiler options."""

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp


def param_shapes(model: nn.Module, image_size: int = 224):
  """The model's parameter tree as `jax.ShapeDtypeStruct`s (via `jax.eval_shape`, no FLOPs)."""
  images = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
  variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x), images)
  return variables['params']


def count_params(tree) -> int:
  """Number of scalars in a tree of arrays or `ShapeDtypeStruct`s."""
  return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(tree))


# XLA:CPU (jax 0.10) hands reductions to YNNPACK fusions by default. For ConvNeXt's
# depthwise-conv -> LayerNorm pattern this materialises shifted copies of the activations and
# made the convnext_tiny forward about 1.7x slower on a 2-core x86 host (1060-1400 ms vs
# 650-750 ms at batch 8, 224px). An empty list turns these library fusions off. For the
# training step the picture is mixed (convnext_atto, batch 64, 2 cores: 0.40 s per step with
# them vs 0.86 s without at 48 px, but 2.0 s vs 1.1 s at 64 px; docs/benchmarks.md), so
# training keeps XLA's defaults.
_CPU_INFERENCE_OPTIONS = {'xla_cpu_experimental_ynn_fusion_type': ''}


@functools.cache
def _cpu_options_supported() -> bool:
  try:
    jax.jit(lambda x: x + 1, compiler_options=_CPU_INFERENCE_OPTIONS).lower(1.0).compile()
    return True
  except Exception:  # An XLA that does not know the option: nothing to turn off.
    return False


def compiler_options(training: bool = False) -> dict[str, str] | None:
  """`jax.jit(..., compiler_options=...)` for ConvNeXt functions on the default backend.

  Forward-only functions on CPU get XLA's YNNPACK library fusions turned off (see the note
  above), when the XLA in use has that option; training steps and other backends get None
  (XLA's defaults).
  """
  if training or jax.default_backend() != 'cpu' or not _cpu_options_supported():
    return None
  return dict(_CPU_INFERENCE_OPTIONS)
