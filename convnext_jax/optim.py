"""Optimisation as the official ConvNeXt recipe has it: AdamW, warmup + per-step cosine,
weight decay on >= 2-D kernels only, layer-wise lr decay, and an EMA of the parameters.

Layer-wise lr decay assigns every parameter a layer id; its learning rate (and with it the
decoupled weight decay, as PyTorch's param groups scale both) is multiplied by
`decay ** (num_layers + 1 - layer_id)`. Two schemes:

'group' (the official ConvNeXt one, 12 groups, num_layers = 12): stem 0; stage 0 blocks 1;
  downsample 1 and stage 1 blocks 2; downsample 2 3; stage 2 blocks 3..11; downsample 3 and
  stage 3 blocks 12; final norm and head 13. The official code spreads stage 2's 27 blocks
  three per group (3 + j // 3); for any other stage-2 depth d the rule here is
  3 + (9 * j) // d, which is the same for d = 27 and always fills groups 3..11 in order.
  Isotropic models: stem 0, block k -> 1 + (12 * k) // depth, norm and head 13.
'single' (ConvNeXt-V2's per-block scheme, num_layers = sum(depths)): downsample i and the
  first block of stage i share id sum(depths[:i]) + 1; block j of stage i gets
  sum(depths[:i]) + j + 1; norm and head sum(depths) + 1 (scale 1). Isotropic: stem 0,
  block k -> k + 1, norm and head depth + 1.
"""

import re

import jax
import jax.numpy as jnp
import optax

from convnext_jax import models
from convnext_jax import trees

LAYER_DECAY_SCHEMES = ('group', 'single')


def lr_schedule(
    base_lr: float, min_lr: float, warmup_steps: int, total_steps: int
) -> optax.Schedule:
  """Linear warmup from 0 to `base_lr`, then cosine to `min_lr` at `total_steps`, per step."""
  if warmup_steps >= total_steps:
    raise ValueError(
        f'warmup ({warmup_steps} steps) must be shorter than training ({total_steps} steps)'
    )
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0,
      peak_value=base_lr,
      warmup_steps=warmup_steps,
      decay_steps=total_steps,
      end_value=min_lr,
  )


def layer_id(name: str, spec: models.ModelSpec, scheme: str) -> tuple[int, int]:
  """(layer id, num_layers) of the '/'-joined parameter `name` (see the module docstring)."""
  if scheme not in LAYER_DECAY_SCHEMES:
    raise ValueError(f'layer decay scheme {scheme!r}; expected one of {LAYER_DECAY_SCHEMES}')
  top = name.split('/')[0]
  if spec.isotropic:
    depth = spec.depths[0]
    num_layers = 12 if scheme == 'group' else depth
    if top == 'stem':
      return 0, num_layers
    if m := re.fullmatch(r'blocks\.(\d+)', top):
      k = int(m.group(1))
      return (1 + (12 * k) // depth if scheme == 'group' else k + 1), num_layers
    return num_layers + 1, num_layers
  depths = spec.depths
  if scheme == 'single':
    num_layers = sum(depths)
    if m := re.fullmatch(r'downsample_layers\.(\d+)\.\d+', top):
      return sum(depths[: int(m.group(1))]) + 1, num_layers
    if m := re.fullmatch(r'stages\.(\d+)\.(\d+)', top):
      stage, block = int(m.group(1)), int(m.group(2))
      return sum(depths[:stage]) + block + 1, num_layers
    return num_layers + 1, num_layers
  if m := re.fullmatch(r'downsample_layers\.(\d+)\.\d+', top):
    return {0: 0, 1: 2, 2: 3, 3: 12}[int(m.group(1))], 12
  if m := re.fullmatch(r'stages\.(\d+)\.(\d+)', top):
    stage, block = int(m.group(1)), int(m.group(2))
    if stage == 2:
      return 3 + (9 * block) // depths[2], 12
    return {0: 1, 1: 2, 3: 12}[stage], 12
  return 13, 12


def weight_decay_mask(params):
  """True for >= 2-D tensors (conv and dense kernels): no decay on biases, norms, gamma, GRN."""
  return jax.tree.map(lambda p: len(jnp.shape(p)) >= 2, params)


def pretraining_weight_decay_mask(params):
  """FCMAE pre-training's decay (fcmae.md): timm's `add_weight_decay` over the official
  model, which skips 1-D tensors and biases only, so it decays the kernels, the mask token
  and GRN's gamma and beta (stored (1, C) there, (C,) here)."""

  def decayed(path, p):
    name = trees.name(path)
    return len(jnp.shape(p)) >= 2 or name.endswith(('grn/gamma', 'grn/beta'))

  return jax.tree_util.tree_map_with_path(decayed, params)


def make_optimizer(
    schedule: optax.Schedule,
    params,
    spec: models.ModelSpec,
    *,
    weight_decay: float = 0.05,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    layer_decay: float = 1.0,
    layer_decay_scheme: str = 'group',
    grad_clip_norm: float = 0.0,
) -> optax.GradientTransformation:
  """AdamW (PyTorch's decoupled, lr-scaled weight decay) with optional clipping and layer decay.

  Weight decay applies to the kernels (`weight_decay_mask`); in FCMAE pre-training also to
  the mask token and GRN, as the official code has it (`pretraining_weight_decay_mask`).

  With layer decay, each layer group is an `optax.partition` group running AdamW at
  `schedule(step) * scale`, like a PyTorch param group with its own lr.

  Args:
    schedule: step -> learning rate.
    params: the params tree or its shapes (for labels and masks).
    spec: the model's ModelSpec (for layer ids).
    weight_decay, b1, b2, eps: AdamW hyper-parameters.
    layer_decay: 1.0 disables layer-wise decay.
    layer_decay_scheme: 'group' or 'single'.
    grad_clip_norm: clip gradients to this global norm first; 0 disables.
  """

  mask = pretraining_weight_decay_mask if spec.masked_autoencoder else weight_decay_mask

  def adamw(scale: float = 1.0):
    lr = schedule if scale == 1.0 else (lambda step: schedule(step) * scale)
    return optax.adamw(lr, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=mask)

  if layer_decay == 1.0:
    core = adamw()
  else:
    ids = jax.tree_util.tree_map_with_path(
        lambda path, _: layer_id(trees.name(path), spec, layer_decay_scheme), params
    )
    is_id = lambda x: isinstance(x, tuple)
    labels = jax.tree.map(lambda i: f'layer_{i[0]:03d}', ids, is_leaf=is_id)
    groups = {
        f'layer_{lid:03d}': adamw(layer_decay ** (num_layers + 1 - lid))
        for lid, num_layers in set(jax.tree.leaves(ids, is_leaf=is_id))
    }
    core = optax.partition(groups, labels)
  if grad_clip_norm > 0:
    return optax.chain(optax.clip_by_global_norm(grad_clip_norm), core)
  return core


def ema_decay_at(step, decay: float, warmup: bool):
  """EMA decay for optimizer step `step` (0-based): constant, or with timm's warmup
  min(decay, (1 + step) / (10 + step)) so early averages are not dominated by the init."""
  if not warmup:
    return jnp.asarray(decay, jnp.float32)
  step = jnp.asarray(step, jnp.float32)
  return jnp.minimum(decay, (1.0 + step) / (10.0 + step))


def update_ema(ema_params, params, decay):
  """ema <- decay * ema + (1 - decay) * params."""
  return optax.incremental_update(params, ema_params, step_size=1.0 - decay)
