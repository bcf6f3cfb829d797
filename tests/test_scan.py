"""Scan over blocks (`scan=True`) and remat policies: the scanned model computes what the
unscanned one does, on the same parameter tree (so conversion to PyTorch is unchanged), and
traces one block per stage; every remat policy gives the plain loss and gradients.

Models are tiny (a few blocks of 8-40 channels at 32 px): jit compilation is the cost.
"""

import helpers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from convnext_jax import convert
from convnext_jax import models
from convnext_jax.models import layers

# Stage 2 holds two blocks, so a wrong stacking order or a lost block shows.
DEPTHS, DIMS = (1, 1, 2, 1), (16, 24, 32, 40)


def _pair(name='convnext_atto', **kwargs):
  """The same small model unscanned and scanned ('conv' depthwise unless given: the CPU
  compiles it fastest; the default 'auto' is the shifted sum on CPU)."""
  kwargs.setdefault('depthwise_impl', 'conv')
  if 'isotropic' in name:
    kwargs = dict(depth=3, dim=32, **kwargs)
  else:
    kwargs = dict(depths=DEPTHS, dims=DIMS, **kwargs)
  plain = models.create_model(name, num_classes=10, **kwargs)
  return plain, plain.clone(scan=True)


def _outputs(model, params, x, every_output=False):
  """Logits, or logits, pre-logits features and stage maps, in one jitted call."""

  def run(p, x):
    variables = {'params': p}
    if not every_output:
      return model.apply(variables, x)
    return (
        model.apply(variables, x),
        model.apply(variables, x, method='forward_features'),
        model.apply(variables, x, output='stages'),
    )

  return jax.jit(run)(params, x)


def _assert_close(got, want, rtol, atol):
  assert jax.tree.structure(got) == jax.tree.structure(want)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=rtol, atol=atol), got, want)


@pytest.mark.parametrize(
    'name,every_output',
    [('convnext_atto', True), ('convnextv2_atto', False), ('convnext_isotropic_large', True)],
)
def test_scan_gives_the_unscanned_outputs(name, every_output):
  # V1 with layer scale and the shifted-sum depthwise form; V2 with GRN; isotropic with
  # layer scale (iso-L's structure). Logits, forward_features and output='stages'.
  plain, scanned = _pair(name, **({'depthwise_impl': 'shift'} if name == 'convnext_atto' else {}))
  params = helpers.random_params(plain)
  x = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
  want = _outputs(plain, params, x, every_output)
  got = _outputs(scanned, params, x, every_output)
  assert float(jnp.abs(jax.tree.leaves(want)[0]).max()) > 0.1  # Non-trivial logits.
  _assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_scan_with_bfloat16_compute():
  plain, scanned = _pair('convnextv2_atto', dtype=jnp.bfloat16)
  params = helpers.random_params(plain)
  x = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
  want, got = _outputs(plain, params, x), _outputs(scanned, params, x)
  stages = jax.eval_shape(lambda p: scanned.apply({'params': p}, x, output='stages'), params)
  assert stages[-1].dtype == jnp.bfloat16 and got.dtype == jnp.float32
  # The same bfloat16 arithmetic; fusion may round differently.
  scale = float(jnp.abs(want).max())
  _assert_close(got, want, rtol=0, atol=0.02 * scale)


def _loss_and_grads(model, params, x, rng=None):
  def loss(p):
    kwargs = {} if rng is None else {'rngs': {'drop_path': rng}}
    return jnp.mean(jnp.square(model.apply({'params': p}, x, train=True, **kwargs)))

  return jax.jit(jax.value_and_grad(loss))(params)


def test_scan_gives_the_unscanned_loss_and_gradients():
  plain, scanned = _pair()
  params = helpers.random_params(plain)
  x = jax.random.normal(jax.random.key(2), (2, 32, 32, 3))
  (loss, grads), (scan_loss, scan_grads) = (_loss_and_grads(m, params, x) for m in (plain, scanned))
  np.testing.assert_allclose(scan_loss, loss, rtol=1e-5)
  # Same tree, per-block names: autodiff slices the stacked gradient back.
  _assert_close(scan_grads, grads, rtol=1e-4, atol=1e-6)
  assert float(jnp.abs(grads['stages.2.1']['pwconv2']['kernel']).max()) > 0


def test_scan_drop_path_is_random_per_key_and_finite_at_rate_one():
  _, scanned = _pair('convnext_isotropic_small', drop_path_rate=1.0)  # Last block: rate 1.
  params = helpers.random_params(scanned)
  x = jax.random.normal(jax.random.key(3), (16, 32, 32, 3))
  fn = jax.jit(lambda p, key: scanned.apply({'params': p}, x, train=True, rngs={'drop_path': key}))
  a, b, again = (
      fn(params, jax.random.key(0)),
      fn(params, jax.random.key(1)),
      fn(params, jax.random.key(0)),
  )
  np.testing.assert_array_equal(a, again)
  assert np.isfinite(a).all() and np.isfinite(b).all()
  assert np.abs(a - b).max() > 1e-3
  eval_logits = jax.jit(lambda p: scanned.apply({'params': p}, x))(params)
  assert np.abs(a - eval_logits).max() > 1e-3
  loss, grads = _loss_and_grads(scanned, params, x, jax.random.key(0))
  assert np.isfinite(loss) and all(np.isfinite(g).all() for g in jax.tree.leaves(grads))
  # Rate 1: the last block's branch is always dropped, so its weights get no gradient.
  assert not np.any(grads['blocks.2']['pwconv2']['kernel'])
  assert np.any(grads['blocks.1']['pwconv2']['kernel'])


def test_scan_draws_a_different_drop_path_key_per_block(monkeypatch):
  keys = []
  drop_path = layers.drop_path

  def recording(x, rate, rng):
    jax.debug.callback(lambda k: keys.append(np.asarray(k).tobytes()), jax.random.key_data(rng))
    return drop_path(x, rate, rng)

  monkeypatch.setattr(layers, 'drop_path', recording)
  _, scanned = _pair(drop_path_rate=0.5)
  params = helpers.random_params(scanned)
  x = jnp.ones((2, 32, 32, 3))
  jax.jit(
      lambda p: scanned.apply({'params': p}, x, train=True, rngs={'drop_path': jax.random.key(0)})
  )(params)
  jax.effects_barrier()
  # One key per stage, folded with the block index: every block of every stage differs.
  assert len(keys) == sum(DEPTHS) and len(set(keys)) == sum(DEPTHS)


def test_drop_path_takes_a_traced_rate():
  x = jax.random.normal(jax.random.key(0), (4000, 2, 2, 3))
  drop = jax.jit(lambda x, rate: layers.drop_path(x, rate, jax.random.key(1)))
  np.testing.assert_array_equal(drop(x, 0.0), x)
  np.testing.assert_array_equal(drop(x, 1.0), np.zeros_like(x))
  half = np.asarray(drop(x, 0.5))
  dropped = np.all(half == 0, axis=(1, 2, 3))
  assert 0.45 < dropped.mean() < 0.55
  np.testing.assert_allclose(half[~dropped], 2 * np.asarray(x)[~dropped], rtol=1e-6)
  grad = jax.jit(jax.grad(lambda x, rate: layers.drop_path(x, rate, jax.random.key(1)).sum()))
  np.testing.assert_array_equal(grad(x, 1.0), np.zeros_like(x))  # No 0/0.
  # Python floats keep their path: rate 1 gives zeros without drawing a mask.
  np.testing.assert_array_equal(layers.drop_path(x, 1.0, None), np.zeros_like(x))


@pytest.mark.parametrize('name', ['convnext_atto', 'convnextv2_atto', 'convnext_isotropic_small'])
def test_scan_keeps_the_parameter_tree(name):
  plain, scanned = _pair(name)
  want, got = models.param_shapes(plain, 32), models.param_shapes(scanned, 32)
  assert jax.tree.structure(got) == jax.tree.structure(want)
  assert jax.tree.map(lambda s: s.shape, got) == jax.tree.map(lambda s: s.shape, want)
  full = models.create_model(name)
  assert jax.tree.structure(models.param_shapes(full.clone(scan=True), 32)) == (
      jax.tree.structure(models.param_shapes(full, 32))
  )


def _count(model, params, x, primitive):
  return str(jax.make_jaxpr(lambda p: model.apply({'params': p}, x))(params)).count(primitive)


def test_scan_traces_one_block_per_stage():
  x = jnp.zeros((1, 32, 32, 3))
  counts = {}
  for depths in ((1, 1, 2, 1), (1, 1, 6, 1)):
    plain = models.create_model('convnext_atto', depths=depths, dims=DIMS)
    params = models.param_shapes(plain, 32)
    counts[depths] = [_count(m, params, x, 'dot_general') for m in (plain, plain.clone(scan=True))]
    assert _count(plain.clone(scan=True), params, x, 'scan[') == 4
  # Two matmuls a block, plus the head: unscanned grows with depth, scanned does not.
  assert counts[(1, 1, 2, 1)] == [2 * 5 + 1, 2 * 4 + 1]
  assert counts[(1, 1, 6, 1)] == [2 * 9 + 1, 2 * 4 + 1]


def test_scanned_model_converts_to_transformers_with_the_same_logits():
  spec = models.get_spec('convnext_atto')
  model = models.create_model('convnext_atto', num_classes=5, scan=True, depthwise_impl='conv')
  params = helpers.random_params(model, seed=4)
  state_dict = convert.flax_to_torch(params, 'convnext_atto', 'hf')
  hf = transformers.ConvNextForImageClassification(
      transformers.ConvNextConfig(
          hidden_sizes=list(spec.dims), depths=list(spec.depths), num_labels=5, layer_norm_eps=1e-6
      )
  )
  hf.load_state_dict({k: torch.from_numpy(v) for k, v in state_dict.items()}, strict=True)
  x = helpers.images(2, 32, 32)
  with torch.no_grad():
    expected = hf.eval()(torch.from_numpy(x)).logits.numpy()
  logits = jax.jit(lambda p, x: model.apply({'params': p}, x))(params, helpers.nhwc(x))
  assert np.abs(expected).max() > 0.1
  np.testing.assert_allclose(logits, expected, atol=1e-4, rtol=0)
  name, back = convert.torch_to_flax(hf.state_dict())
  assert name == 'convnext_atto'
  assert jax.tree.structure(back) == jax.tree.structure(params)
  jax.tree.map(np.testing.assert_array_equal, back, params)


# ---------------------------------------------------------------------------------------
# Remat policies.


def test_remat_policy_names():
  assert models.remat_policy('') is None and models.remat_policy(False) is None
  assert (
      models.remat_policy(True)
      is models.remat_policy('full')
      is (jax.checkpoint_policies.nothing_saveable)
  )
  assert models.remat_policy('dots_saveable') is jax.checkpoint_policies.dots_saveable
  assert {
      'full',
      'dots_saveable',
      'dots_with_no_batch_dims_saveable',
      'everything_saveable',
      'nothing_saveable',
  } <= set(models.REMAT_POLICIES)
  # Policy factories need arguments: not names a config can give.
  assert 'save_only_these_names' not in models.REMAT_POLICIES
  for bad in ('dots', 'save_only_these_names', 1, 'True'):
    with pytest.raises(
        ValueError,
        match=r"remat must be '' or False \(off\), True, or one of "
        r'full, checkpoint_dots, .*dots_saveable.*; got',
    ):
      models.remat_policy(bad)
  with pytest.raises(ValueError, match='everything_saveable'):
    models.param_shapes(models.create_model('convnext_atto', remat='dots'), 32)


@pytest.mark.parametrize('scan', [False, True], ids=['unscanned', 'scan'])
def test_every_remat_policy_gives_the_plain_loss_and_gradients(scan):
  # One tiny model; every policy's gradient in one jitted function (one compilation).
  plain = models.create_model(
      'convnext_isotropic_large',
      depth=2,
      dim=8,
      num_classes=4,
      depthwise_impl='conv',
      drop_path_rate=0.2,
      scan=scan,
  )
  names = ('', True) + models.REMAT_POLICIES
  variants = [plain.clone(remat=r) for r in names]
  params = helpers.random_params(plain)
  x = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))

  def all_grads(p):
    def loss(model):
      return lambda p: jnp.mean(
          jnp.square(
              model.apply({'params': p}, x, train=True, rngs={'drop_path': jax.random.key(1)})
          )
      )

    return [jax.value_and_grad(loss(m))(p) for m in variants]

  (loss, grads), *rest = jax.jit(all_grads)(params)
  for remat, (other_loss, other_grads) in zip(names[1:], rest, strict=True):
    np.testing.assert_allclose(other_loss, loss, rtol=1e-6, err_msg=str(remat))
    _assert_close(other_grads, grads, rtol=1e-5, atol=1e-6)
