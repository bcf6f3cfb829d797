"""Helpers: parameter trees and counts without allocating weights; XLA compiler options."""

import functools
import math

import flax.linen as nn
import jax
from jax.extend import core as jax_core
import jax.numpy as jnp


def param_shapes(model: nn.Module, image_size: int = 224):
  """The model's parameter tree as `jax.ShapeDtypeStruct`s (via `jax.eval_shape`, no FLOPs)."""
  images = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
  variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x), images)
  return variables['params']


def weight_shapes(model: nn.Module, image_size: int = 32):
  """The model's weights tree (params, with any BatchNorm statistics merged in: see
  `merge_batch_stats`) as `jax.ShapeDtypeStruct`s, without computing anything."""
  images = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
  variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x), images)
  return merge_batch_stats(variables['params'], variables.get('batch_stats'))


def count_params(tree) -> int:
  """Number of scalars in a tree of arrays or `ShapeDtypeStruct`s."""
  return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(tree))


# XLA:CPU can hand reductions to YNNPACK library fusions. For ConvNeXt's depthwise-conv ->
# LayerNorm pattern such a fusion materialises shifted copies of the activations, which makes
# the forward pass markedly slower; an empty list turns these fusions off. Training steps keep
# XLA's defaults: there the fusions help at some image sizes and hurt at others
# (docs/benchmarks.md).
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


# BatchNorm's running statistics (flax's 'batch_stats' collection) are named so in every
# BatchNorm module; no parameter has these names.
BATCH_STATS_LEAVES = ('mean', 'var')
# The classifier's module: ConvNeXt's `head`, the roadmap's ResNet's `fc` (torchvision's name).
HEAD_NAMES = ('head', 'fc')


def merge_batch_stats(params, batch_stats=None):
  """One weights tree: `params` with each BatchNorm's `mean` and `var` beside its `scale`
  and `bias`, as PyTorch keeps running_mean/var beside weight/bias. This is the tree that
  params checkpoints and conversion hold; `split_batch_stats` undoes it.

  Args:
    params: the 'params' collection (nested dicts).
    batch_stats: the 'batch_stats' collection, or None/empty (no BatchNorm): `params` as is.
  """
  if not batch_stats:
    return params
  merged = dict(params)
  for name, value in batch_stats.items():
    merged[name] = merge_batch_stats(params[name], value) if name in params else value
  return merged


def split_batch_stats(weights):
  """(params, batch_stats) of a weights tree from `merge_batch_stats`; batch_stats is {}
  when it holds no BatchNorm statistics."""
  params, stats = {}, {}
  for name, value in weights.items():
    if isinstance(value, dict) or hasattr(value, 'items'):
      p, s = split_batch_stats(value)
      if p:
        params[name] = p
      if s:
        stats[name] = s
    elif name in BATCH_STATS_LEAVES:
      stats[name] = value
    else:
      params[name] = value
  return params, stats


def count_macs(model: nn.Module, image_size: int = 224, **apply_kwargs) -> int:
  """Multiply-adds of one image's forward pass, as the ConvNeXt paper (fvcore) counts FLOPs:
  every convolution and matrix product, padded positions included; nothing else.

  Counted from the jaxpr (the program as traced), so it follows whatever the model does.
  Depthwise convolutions must run as convolutions for this (`depthwise_impl='conv'`; the
  CPU's shifted-sum path is elementwise arithmetic). Of a `cond`'s branches, the largest.
  """
  images = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
  # One trace: `init` runs the forward pass too, and its initialisers multiply nothing. (It
  # runs a scanned model's blocks unscanned, so each block is counted, not a scan body once.)
  jaxpr = jax.make_jaxpr(lambda x: model.init_with_output(jax.random.key(0), x, **apply_kwargs))(
      images
  )
  return _jaxpr_macs(jaxpr.jaxpr)


def _jaxpr_macs(jaxpr) -> int:
  total = 0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == 'conv_general_dilated':
      lhs, rhs = (v.aval for v in eqn.invars[:2])
      out = eqn.outvars[0].aval
      spec = eqn.params['dimension_numbers'].rhs_spec  # (out feature, in feature, spatial...)
      kernel_in = rhs.shape[spec[1]]
      kernel_spatial = math.prod(rhs.shape[d] for d in spec[2:])
      total += math.prod(out.shape) * kernel_in * kernel_spatial
      del lhs
    elif name == 'dot_general':
      (contract, _), _ = eqn.params['dimension_numbers']
      lhs = eqn.invars[0].aval
      total += math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs.shape[d] for d in contract)
    else:
      subs = [_jaxpr_macs(getattr(j, 'jaxpr', j)) for j in jax_core.jaxprs_in_params(eqn.params)]
      if subs:
        total += max(subs) if name == 'cond' else sum(subs)
  return total
