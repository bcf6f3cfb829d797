"""Shared test helpers."""

import jax
import numpy as np

from convnext_jax import models


def random_params(model, seed: int = 0):
  """Random float32 numpy params for `model`, shaped by `jax.eval_shape` (no jitted init:
  compiling dozens of RNG calls costs XLA:CPU seconds). Values exercise every tensor:
  fan-in-scaled kernels, LayerNorm scales near 1, and order-0.1 biases, layer scales and GRN
  parameters."""
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    name = path[-1].key
    noise = rng.standard_normal(leaf.shape)
    if name == 'kernel':
      value = noise / np.sqrt(np.prod(leaf.shape[:-1]))
    elif name == 'scale':
      value = 1.0 + 0.1 * noise
    else:
      value = 0.1 * noise
    return value.astype(np.float32)

  return jax.tree_util.tree_map_with_path(draw, models.param_shapes(model, image_size=32))


_FORWARD_CACHE = {}


def forward(model, params, images_nhwc):
  """(logits, stage maps) of `model`, jitted once per model configuration."""
  key = repr(model)
  if key not in _FORWARD_CACHE:

    def both(p, x):
      variables = {'params': p}
      return model.apply(variables, x), model.apply(variables, x, output='stages')

    _FORWARD_CACHE[key] = jax.jit(both)
  logits, stages = _FORWARD_CACHE[key](params, images_nhwc)
  return np.asarray(logits), [np.asarray(s) for s in stages]


def images(batch: int, height: int, width: int, seed: int = 0) -> np.ndarray:
  """Random NCHW float32 images (PyTorch layout); `.transpose(0, 2, 3, 1)` for Flax."""
  return np.random.default_rng(seed).standard_normal((batch, 3, height, width)).astype(
      np.float32)


def nhwc(x: np.ndarray) -> np.ndarray:
  return np.ascontiguousarray(x.transpose(0, 2, 3, 1))
