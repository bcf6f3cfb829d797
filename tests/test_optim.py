"""Optimisation: schedule, layer-wise lr decay, weight-decay mask, AdamW and EMA, checked
against hand computation and PyTorch's AdamW."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

from convnext_jax import config_lib
from convnext_jax import models
from convnext_jax import optim
from convnext_jax import run
from convnext_jax import trees


def _group_layer_id(torch_name: str, stage2_depth: int = 27) -> int:
  """The 12-group layer id, restated from the official ConvNeXt definition: stem 0, stage s
  blocks s + 1 for s < 2, stage 2 block j 3 + j // 3, stage 3 and downsample 3 12,
  downsample 1 and 2 their index + 1, everything else 13. Stage 2 of another depth d spreads
  over the same groups 3..11 as 3 + (9 * j) // d (j // 3 for the official d = 27)."""
  parts = torch_name.split('.')
  if parts[0] == 'downsample_layers':
    return {0: 0, 1: 2, 2: 3, 3: 12}[int(parts[1])]
  if parts[0] == 'stages':
    stage, block = int(parts[1]), int(parts[2])
    return {0: 1, 1: 2, 2: 3 + (9 * block) // stage2_depth, 3: 12}[stage]
  return 13


def _lr_scales(name, decay, scheme, **sizes):
  """{parameter name: lr multiplier} as the optimizer applies it, read off its first step.

  With unit gradients and no weight decay, AdamW's first update is -lr * m / (sqrt(v) + eps)
  with bias-corrected m = v = 1: -lr / (1 + 1e-8) per element, times the multiplier. Small
  widths (`sizes`) keep the step cheap; the multipliers depend on the names alone.
  """
  spec = models.get_spec(name)
  shapes = models.param_shapes(models.create_model(name, **sizes), 32)
  params = jax.tree.map(lambda s: jnp.zeros(s.shape), shapes)
  tx = optim.make_optimizer(
      lambda _: 1.0, shapes, spec, weight_decay=0.0, layer_decay=decay, layer_decay_scheme=scheme
  )
  updates, _ = jax.jit(tx.update)(jax.tree.map(jnp.ones_like, params), tx.init(params), params)
  return {
      trees.name(p): -float(u.ravel()[0]) for p, u in jax.tree_util.tree_leaves_with_path(updates)
  }


def _approx(scale):
  # Float32 Adam arithmetic (m's bias correction, sqrt(v)) leaves a few ulp.
  return pytest.approx(scale, rel=1e-5)


SMALL = dict(dims=(8, 8, 8, 8))  # Hierarchical models at 8 channels per stage.
SMALL_ISOTROPIC = dict(dim=8)


def test_layer_decay_base_equals_the_official_table():
  decay = 0.8
  table = [decay ** (12 + 1 - i) for i in range(12 + 2)]  # The official list of scales.
  scales = _lr_scales('convnext_base', decay, 'group', **SMALL)
  assert len(scales) == 344  # Every parameter tensor of convnext_base has a scale.
  for name, scale in scales.items():
    # Flax 'stages.2.7/dwconv/kernel' is PyTorch 'stages.2.7.dwconv.weight'.
    assert scale == _approx(table[_group_layer_id(name.split('/')[0])]), name
  assert scales['downsample_layers.0.0/kernel'] == _approx(decay**13)
  assert scales['stages.2.26/pwconv2/kernel'] == _approx(decay**2)  # Layer 11.
  assert scales['head/kernel'] == _approx(1.0)


def test_layer_decay_tiny_spreads_its_nine_stage2_blocks_over_groups_3_to_11():
  scales = _lr_scales('convnext_tiny', 0.7, 'group', **SMALL)
  ids = [13 - round(math.log(scales[f'stages.2.{j}/gamma'], 0.7)) for j in range(9)]
  assert ids == list(range(3, 12))  # 3 + (9 * j) // 9: one group per block.
  assert 13 - round(math.log(scales['stages.3.2/gamma'], 0.7)) == 12
  assert 13 - round(math.log(scales['stages.0.0/gamma'], 0.7)) == 1
  # decay ** (12 + 1 - layer id), by hand from the ids above.
  assert scales['downsample_layers.0.0/kernel'] == _approx(0.7**13)  # Stem: id 0.
  assert scales['downsample_layers.1.1/kernel'] == _approx(0.7**11)  # Id 2.
  assert scales['stages.1.2/pwconv1/kernel'] == _approx(0.7**11)  # Id 2.
  assert scales['downsample_layers.2.0/bias'] == _approx(0.7**10)  # Id 3.
  assert scales['stages.2.4/dwconv/kernel'] == _approx(0.7**6)  # Id 3 + 4 = 7.
  assert scales['downsample_layers.3.1/kernel'] == _approx(0.7)  # Id 12.
  assert scales['norm/scale'] == scales['head/bias'] == _approx(1.0)  # Id 13.


def test_layer_decay_isotropic_and_single_schemes():
  decay = 0.9
  iso = _lr_scales('convnext_isotropic_small', decay, 'group', **SMALL_ISOTROPIC)  # 18 blocks.
  assert iso['stem/kernel'] == _approx(decay**13)
  for k in range(18):
    assert iso[f'blocks.{k}/pwconv1/kernel'] == _approx(decay ** (12 - (12 * k) // 18))
  assert iso['head/kernel'] == iso['norm/scale'] == _approx(1.0)
  single = _lr_scales('convnext_isotropic_small', decay, 'single', **SMALL_ISOTROPIC)
  assert single['stem/kernel'] == _approx(decay**19)
  assert single['blocks.17/pwconv2/kernel'] == _approx(decay)
  tiny = _lr_scales('convnext_tiny', decay, 'single', **SMALL)  # Depths (3, 3, 9, 3): 18 layers.
  assert tiny['downsample_layers.0.0/kernel'] == _approx(decay**18)  # Id 1.
  assert tiny['stages.0.0/dwconv/kernel'] == _approx(decay**18)
  assert tiny['downsample_layers.2.1/kernel'] == _approx(decay ** (19 - 7))
  assert tiny['stages.2.8/gamma'] == _approx(decay ** (19 - 15))
  assert tiny['stages.3.2/gamma'] == _approx(decay)
  assert tiny['head/kernel'] == _approx(1.0)


def test_weight_decay_mask_is_kernels_only():
  shapes = models.param_shapes(models.create_model('convnextv2_atto'), 64)
  mask = {
      trees.name(p): m
      for p, m in jax.tree_util.tree_flatten_with_path(optim.weight_decay_mask(shapes))[0]
  }
  decayed = sorted({n.split('/')[-1] for n, m in mask.items() if m})
  kept = sorted({n.split('/')[-1] for n, m in mask.items() if not m})
  assert decayed == ['kernel']
  assert kept == ['beta', 'bias', 'gamma', 'scale']  # GRN beta/gamma, biases, LayerNorms.
  assert mask['stages.0.0/dwconv/kernel'] and not mask['stages.0.0/grn/gamma']


def test_lr_schedule_matches_hand_computation():
  base, final, warmup, total = 4e-3, 1e-6, 20, 100
  fn = optim.lr_schedule(base, final, warmup, total)
  assert float(fn(0)) == 0.0
  assert float(fn(5)) == pytest.approx(base * 5 / 20, rel=1e-6)
  assert float(fn(20)) == pytest.approx(base, rel=1e-6)
  for step in (21, 50, 77, 99):
    t = (step - warmup) / (total - warmup)
    want = final + 0.5 * (base - final) * (1 + math.cos(math.pi * t))
    assert float(fn(step)) == pytest.approx(want, rel=1e-5, abs=1e-7 * base), step
  assert float(fn(total)) == pytest.approx(final, abs=1e-7 * base)
  with pytest.raises(ValueError, match='warmup'):
    optim.lr_schedule(base, final, 100, 100)


def test_schedule_steps_from_epochs():
  c = config_lib.base()  # 300 epochs, 20 warmup, batch 4096.
  sched = run.schedule(c, 1_281_167)
  assert sched.steps_per_epoch == 312
  assert sched.total_steps == 300 * 312
  assert sched.warmup_steps == 20 * 312
  assert sched.eval_every == 312
  c.num_steps, c.optim.warmup_steps, c.eval_every_steps = 1000, 10, 250
  assert run.schedule(c, 1_281_167) == run.Schedule(312, 1000, 10, 250)


def test_adamw_with_layer_decay_equals_pytorch_param_groups():
  """Layer decay scales the whole AdamW update, decoupled weight decay included, exactly
  like a PyTorch param group with lr * scale and the same weight_decay."""
  model = models.create_model('convnext_atto', num_classes=5)
  spec = models.get_spec('convnext_atto')
  rng = np.random.default_rng(0)
  shapes = models.param_shapes(model, 32)
  params = jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(np.float32), shapes)
  grads = [
      jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(np.float32), shapes)
      for _ in range(3)
  ]
  lr_values = [1e-3, 2e-3, 1.5e-3]
  decay, wd = 0.75, 0.05
  tx = optim.make_optimizer(
      lambda step: jnp.asarray(lr_values)[step], shapes, spec, weight_decay=wd, layer_decay=decay
  )
  state = tx.init(params)
  ours = params
  for g in grads:
    updates, state = tx.update(g, state, ours)
    ours = optax.apply_updates(ours, updates)

  leaves = jax.tree_util.tree_flatten_with_path(params)[0]
  tensors = [torch.tensor(np.array(v), requires_grad=True) for _, v in leaves]
  groups = []
  for (path, v), t in zip(leaves, tensors):
    # convnext_atto: depths (2, 2, 6, 2). The official code decays all but 1-D tensors.
    scale = decay ** (13 - _group_layer_id(trees.name(path).split('/')[0], stage2_depth=6))
    groups.append({'params': [t], 'lr_scale': scale, 'weight_decay': wd if v.ndim >= 2 else 0.0})
  opt = torch.optim.AdamW(groups, lr=1.0, betas=(0.9, 0.999), eps=1e-8)
  for lr, g in zip(lr_values, grads):
    for group in opt.param_groups:  # The official code sets lr * lr_scale every step.
      group['lr'] = lr * group['lr_scale']
    for t, gl in zip(tensors, jax.tree.leaves(g)):
      t.grad = torch.tensor(np.array(gl))
    opt.step()
  for (path, _), t, o in zip(leaves, tensors, jax.tree.leaves(ours)):
    np.testing.assert_allclose(
        np.asarray(o), t.detach().numpy(), rtol=1e-5, atol=1e-6, err_msg=trees.name(path)
    )


def test_gradient_clipping_bounds_the_global_norm():
  spec = models.get_spec('convnext_atto')
  params = {'head': {'kernel': jnp.ones((4, 3))}}
  tx = optim.make_optimizer(lambda _: 1.0, params, spec, weight_decay=0.0, grad_clip_norm=1.0)
  big = {'head': {'kernel': jnp.full((4, 3), 10.0)}}
  tiny = {'head': {'kernel': jnp.full((4, 3), 1e-3)}}
  # Adam's first update is g / |g| per element whatever the scale, so compare the state.
  _, state = tx.update(big, tx.init(params), params)
  mu = jax.tree.leaves(state)[1]
  np.testing.assert_allclose(np.asarray(mu), 0.1 * 10 / np.sqrt(12 * 100), rtol=1e-5)
  _, state = tx.update(tiny, tx.init(params), params)
  np.testing.assert_allclose(np.asarray(jax.tree.leaves(state)[1]), 1e-4, rtol=1e-5)


def test_ema_by_hand():
  ema = {'w': jnp.array([1.0, 2.0])}
  new = {'w': jnp.array([3.0, -2.0])}
  out = optim.update_ema(ema, new, 0.9)
  np.testing.assert_allclose(out['w'], [0.9 * 1 + 0.1 * 3, 0.9 * 2 - 0.1 * 2], rtol=1e-6)
  assert float(optim.ema_decay_at(0, 0.9999, warmup=False)) == pytest.approx(0.9999)
  assert float(optim.ema_decay_at(0, 0.9999, warmup=True)) == pytest.approx(1 / 10)
  assert float(optim.ema_decay_at(90, 0.9999, warmup=True)) == pytest.approx(91 / 100)
  assert float(optim.ema_decay_at(10**6, 0.9999, warmup=True)) == pytest.approx(0.9999)
