"""Optimisation: schedule, layer-wise lr decay, weight-decay mask, AdamW and EMA, checked
against hand computation, the official ConvNeXt and ConvNeXt-V2 layer-id tables (written out
below) and PyTorch's AdamW."""

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
from convnext_jax import train_step
from convnext_jax import trees

# Layer ids written out by hand, {PyTorch module name prefix: layer id}; a parameter takes the
# id of the longest prefix of its name ('stages.2.7' before 'stages.2'). Its lr multiplier is
# decay ** (num_layers + 1 - id), the values of the official `LayerDecayValueAssigner`.

# facebookresearch/ConvNeXt optim_factory.py `get_num_layer_for_convnext` (num_layers 12),
# which the official code applies to depths (3, 3, 27, 3) only (small, base, large, xlarge):
# downsample 0 -> 0, 1 -> 2, 2 -> 3, 3 -> 12; stage 0 -> 1, 1 -> 2, 3 -> 12; stage 2 block j ->
# 3 + j // 3, three blocks per group; anything else (norm, head) -> 13.
BASE_GROUP_IDS = {
    'downsample_layers.0': 0,
    'stages.0': 1,
    'downsample_layers.1': 2,
    'stages.1': 2,
    'downsample_layers.2': 3,
    **dict(
        zip(
            [f'stages.2.{j}' for j in range(27)],
            [3, 3, 3, 4, 4, 4, 5, 5, 5, 6, 6, 6, 7, 7, 7, 8, 8, 8, 9, 9, 9, 10, 10, 10, 11, 11, 11],
            strict=True,
        )
    ),
    'downsample_layers.3': 12,
    'stages.3': 12,
    'norm': 13,
    'head': 13,
}

# convnext_tiny, depths (3, 3, 9, 3), 'group': as the official table except stage 2, whose nine
# blocks the official 3 + j // 3 would put in groups 3, 3, 3, 4, 4, 4, 5, 5, 5 (leaving 6..11
# empty); convnext_jax/optim.py's docstring promises them spread over groups 3..11 instead.
TINY_GROUP_IDS = {
    'downsample_layers.0': 0,
    'stages.0': 1,
    'downsample_layers.1': 2,
    'stages.1': 2,
    'downsample_layers.2': 3,
    'stages.2.0': 3,
    'stages.2.1': 4,
    'stages.2.2': 5,
    'stages.2.3': 6,
    'stages.2.4': 7,
    'stages.2.5': 8,
    'stages.2.6': 9,
    'stages.2.7': 10,
    'stages.2.8': 11,
    'downsample_layers.3': 12,
    'stages.3': 12,
    'norm': 13,
    'head': 13,
}

# convnext_atto, depths (2, 2, 6, 2), 'group': stage 2's six blocks where the docstring's rule
# for depths other than 27, 3 + (9 * j) // 6, puts them (by hand: 9j = 0, 9, 18, 27, 36, 45,
# // 6 = 0, 1, 3, 4, 6, 7).
ATTO_GROUP_IDS = {
    'downsample_layers.0': 0,
    'stages.0': 1,
    'downsample_layers.1': 2,
    'stages.1': 2,
    'downsample_layers.2': 3,
    'stages.2.0': 3,
    'stages.2.1': 4,
    'stages.2.2': 6,
    'stages.2.3': 7,
    'stages.2.4': 9,
    'stages.2.5': 10,
    'downsample_layers.3': 12,
    'stages.3': 12,
    'norm': 13,
    'head': 13,
}

# facebookresearch/ConvNeXt-V2 optim_factory.py `get_num_layer_for_convnext_single`
# (layer_decay_type='single', num_layers = sum(depths) = 18 in main_finetune.py) on depths
# (3, 3, 9, 3): downsample i -> sum(depths[:i]) + 1, shared with the stage's first block;
# stage i block j -> sum(depths[:i]) + j + 1; anything else -> 19.
TINY_SINGLE_IDS = {
    'downsample_layers.0': 1,
    'stages.0.0': 1,
    'stages.0.1': 2,
    'stages.0.2': 3,
    'downsample_layers.1': 4,
    'stages.1.0': 4,
    'stages.1.1': 5,
    'stages.1.2': 6,
    'downsample_layers.2': 7,
    'stages.2.0': 7,
    'stages.2.1': 8,
    'stages.2.2': 9,
    'stages.2.3': 10,
    'stages.2.4': 11,
    'stages.2.5': 12,
    'stages.2.6': 13,
    'stages.2.7': 14,
    'stages.2.8': 15,
    'downsample_layers.3': 16,
    'stages.3.0': 16,
    'stages.3.1': 17,
    'stages.3.2': 18,
    'norm': 19,
    'head': 19,
}

# convnext_isotropic_small, 18 blocks (no official layer decay for isotropic models; the
# docstring's rules): 'group' (num_layers 12) stem 0, block k -> 1 + (12 * k) // 18, i.e.
# 1 + floor(2k / 3), norm and head 13; 'single' (num_layers 18) stem 0, block k -> k + 1,
# norm and head 19.
ISO_SMALL_GROUP_IDS = {
    'stem': 0,
    **dict(
        zip(
            [f'blocks.{k}' for k in range(18)],
            [1, 1, 2, 3, 3, 4, 5, 5, 6, 7, 7, 8, 9, 9, 10, 11, 11, 12],
            strict=True,
        )
    ),
    'norm': 13,
    'head': 13,
}
ISO_SMALL_SINGLE_IDS = {
    'stem': 0,
    **dict(
        zip(
            [f'blocks.{k}' for k in range(18)],
            [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18],
            strict=True,
        )
    ),
    'norm': 19,
    'head': 19,
}


def _table_id(flax_name: str, ids: dict[str, int]) -> int:
  """The id `ids` gives a Flax parameter: 'stages.2.7/dwconv/kernel' is PyTorch
  'stages.2.7.dwconv.weight', matched by its longest prefix in `ids`."""
  parts = flax_name.split('/')[0].split('.')
  for n in range(len(parts), 0, -1):
    if (prefix := '.'.join(parts[:n])) in ids:
      return ids[prefix]
  raise KeyError(f'{flax_name} is in no table entry')


def _expected_scales(names, ids: dict[str, int], decay: float, num_layers: int):
  """{name: decay ** (num_layers + 1 - id)} with the ids of the table `ids`, every entry of
  which must name some parameter (a mistyped entry would check nothing)."""
  prefixes = {'.'.join(n.split('/')[0].split('.')[:k]) for n in names for k in (1, 2, 3)}
  assert not set(ids) - prefixes, f'table entries naming no parameter: {set(ids) - prefixes}'
  return {name: decay ** (num_layers + 1 - _table_id(name, ids)) for name in names}


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
  scales = _lr_scales('convnext_base', decay, 'group', **SMALL)
  assert len(scales) == 344  # Every parameter tensor of convnext_base has a scale.
  assert scales == _approx(_expected_scales(scales, BASE_GROUP_IDS, decay, 12))
  # Three entries of the official list of values, decay ** (12 + 1 - id), by hand.
  assert scales['downsample_layers.0.0/kernel'] == _approx(0.8**13)  # Id 0.
  assert scales['stages.2.26/pwconv2/kernel'] == _approx(0.8**2)  # Id 11.
  assert scales['head/kernel'] == _approx(1.0)  # Id 13.


def test_layer_decay_tiny_spreads_its_nine_stage2_blocks_over_groups_3_to_11():
  scales = _lr_scales('convnext_tiny', 0.7, 'group', **SMALL)
  assert scales == _approx(_expected_scales(scales, TINY_GROUP_IDS, 0.7, 12))
  assert scales['stages.2.4/dwconv/kernel'] == _approx(0.7**6)  # Id 7 (official: 4).
  assert scales['stages.2.8/gamma'] == _approx(0.7**2)  # Id 11 (official: 5).


def test_layer_decay_isotropic_and_single_schemes():
  decay = 0.9
  iso = _lr_scales('convnext_isotropic_small', decay, 'group', **SMALL_ISOTROPIC)
  assert iso == _approx(_expected_scales(iso, ISO_SMALL_GROUP_IDS, decay, 12))
  single = _lr_scales('convnext_isotropic_small', decay, 'single', **SMALL_ISOTROPIC)
  assert single == _approx(_expected_scales(single, ISO_SMALL_SINGLE_IDS, decay, 18))
  assert single['stem/kernel'] == _approx(decay**19)
  assert single['blocks.17/pwconv2/kernel'] == _approx(decay)
  tiny = _lr_scales('convnextv2_tiny', decay, 'single', **SMALL)  # ConvNeXt-V2's own scheme.
  assert len(tiny) == 200  # Stem 4, downsamples 12, 18 blocks of 10 (GRN: 2), norm 2, head 2.
  assert tiny == _approx(_expected_scales(tiny, TINY_SINGLE_IDS, decay, 18))
  assert tiny['downsample_layers.2.1/kernel'] == _approx(decay ** (19 - 7))
  assert tiny['stages.2.8/grn/gamma'] == _approx(decay ** (19 - 15))
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
    # The official code decays all but 1-D tensors.
    scale = decay ** (13 - _table_id(trees.name(path), ATTO_GROUP_IDS))
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


def test_the_guard_skips_a_non_finite_update_and_reports_the_kept_weights_norm():
  """The update as the step applies it (jitted, its state donated): gradients with an inf
  change nothing but the step count, and the logged weight norm is that of the weights kept
  (13 = |(3, 4, 12)|, by hand); a finite update logs the norm of the new weights."""
  params = {'a': jnp.array([3.0, 4.0]), 'b': {'kernel': jnp.array([[12.0]])}}
  optimizer = optax.adamw(0.1, weight_decay=0.0)
  update = jax.jit(train_step.make_update(optimizer, lambda step: 0.1), donate_argnums=0)

  def fresh_state():
    return {
        'params': jax.tree.map(jnp.copy, params),
        'opt_state': optimizer.init(params),
        'step': jnp.zeros((), jnp.int32),
    }

  bad = {'a': jnp.array([jnp.inf, 1.0]), 'b': {'kernel': jnp.array([[1.0]])}}
  new, step_metrics, health = update(fresh_state(), jnp.float32(1.0), bad, None)
  assert not health['finite'] and int(new['step']) == 1
  jax.tree.map(np.testing.assert_array_equal, new['params'], params)
  assert float(step_metrics.compute()['param_norm']) == pytest.approx(13.0)
  assert int(step_metrics.compute()['skipped_steps']) == 1

  good = {'a': jnp.array([1.0, -1.0]), 'b': {'kernel': jnp.array([[1.0]])}}
  new, step_metrics, health = update(fresh_state(), jnp.float32(1.0), good, None)
  assert health['finite']
  # Adam's first step moves each weight by lr against its gradient's sign.
  expected = np.array([3.0 - 0.1, 4.0 + 0.1, 12.0 - 0.1])
  np.testing.assert_allclose(
      np.concatenate([np.ravel(x) for x in jax.tree.leaves(new['params'])]), expected, rtol=1e-5
  )
  norm = float(np.linalg.norm(expected))
  assert float(step_metrics.compute()['param_norm']) == pytest.approx(norm, rel=1e-5)
