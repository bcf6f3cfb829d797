"""The depthwise convolution and the exact GELU, against PyTorch's grouped convolution and
`F.gelu`: values and gradients. The sweep is of `depthwise_impl='shift'`, the form with the
hand-written backward pass; 'conv' (XLA's grouped convolution and its autodiff) is checked
at one kernel and stride per spatial size, and beside 'shift' in test_models.py."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from convnext_jax.models import layers

# (height, width): odd, even, mixed, and smaller than the kernels, down to the one row of
# ConvNeXt's last stage at 32 px (kernel taps that read padding only are skipped there).
SIZES = ((9, 11), (8, 8), (13, 6), (2, 3), (1, 5))


def _torch_conv(x, kernel, dy, stride):
  """PyTorch's grouped conv of NHWC `x` with an HWIO depthwise `kernel`: (y, dx, dkernel) for
  the cotangent `dy`, all NHWC / HWIO, in float64."""
  channels = x.shape[-1]
  tx = torch.tensor(x, dtype=torch.float64).permute(0, 3, 1, 2).requires_grad_()
  tk = torch.tensor(kernel, dtype=torch.float64).permute(3, 2, 0, 1).contiguous().requires_grad_()
  ty = torch.nn.functional.conv2d(
      tx, tk, stride=stride, padding=kernel.shape[0] // 2, groups=channels
  )
  ty.backward(torch.tensor(dy, dtype=torch.float64).permute(0, 3, 1, 2))
  return (
      ty.detach().permute(0, 2, 3, 1).numpy(),
      tx.grad.permute(0, 2, 3, 1).numpy(),
      tk.grad.permute(2, 3, 1, 0).numpy(),
  )


def _ours(impl, x, kernel, dy, stride, dtype):
  def conv(x, kernel):
    return layers.depthwise_conv2d(x, kernel, kernel.shape[0] // 2, impl, stride)

  @jax.jit  # One program: the backward pass run op by op would compile each op on its own.
  def forward_and_backward(x, kernel, dy):
    y, vjp = jax.vjp(conv, x, kernel)
    return (y, *vjp(dy))

  out = forward_and_backward(*(jnp.asarray(a, dtype) for a in (x, kernel, dy)))
  return [np.asarray(a, np.float64) for a in out]


@pytest.mark.parametrize(
    'impl, kernel_size, stride',
    [('shift', k, s) for k in (3, 5, 7, 11) for s in (1, 2)] + [('conv', 7, 2)],
)
def test_values_and_both_gradients_are_pytorchs(impl, kernel_size, stride):
  rng = np.random.default_rng(kernel_size * 10 + stride)
  for height, width in SIZES:
    x = rng.normal(size=(2, height, width, 5)).astype(np.float32)
    kernel = rng.normal(size=(kernel_size, kernel_size, 1, 5)).astype(np.float32)
    out = (height + 2 * (kernel_size // 2) - kernel_size) // stride + 1
    out_w = (width + 2 * (kernel_size // 2) - kernel_size) // stride + 1
    dy = rng.normal(size=(2, out, out_w, 5)).astype(np.float32)
    expected = _torch_conv(x, kernel, dy, stride)
    got = _ours(impl, x, kernel, dy, stride, jnp.float32)
    for name, g, e in zip(('y', 'dx', 'dkernel'), got, expected):
      assert g.shape == e.shape, (name, height, width)
      # float32 rounding of sums of up to 2 * 13 * 11 products of unit normals.
      np.testing.assert_allclose(
          g, e, rtol=0, atol=2e-6 * np.abs(e).max(), err_msg=f'{name} at {height}x{width}'
      )


@pytest.mark.parametrize('stride', [1, 2])
def test_bfloat16_is_pytorchs_on_the_rounded_inputs(stride):
  # bfloat16 compute: each product and partial sum rounds to 8 significant bits, except the
  # kernel gradient's sums over the batch and positions, which run in float32.
  rng = np.random.default_rng(stride)
  x, kernel = rng.normal(size=(2, 12, 10, 8)), rng.normal(size=(7, 7, 1, 8))
  dy = rng.normal(size=(2, 12 // stride, 10 // stride, 8))
  as_bf16 = lambda a: np.asarray(jnp.asarray(a, jnp.bfloat16), np.float64)
  x, kernel, dy = map(as_bf16, (x, kernel, dy))
  expected = _torch_conv(x, kernel, dy, stride)
  got = _ours('shift', x, kernel, dy, stride, jnp.bfloat16)
  for name, g, e, tol in zip(('y', 'dx', 'dkernel'), got, expected, (3e-2, 3e-2, 1e-2)):
    np.testing.assert_allclose(g, e, rtol=0, atol=tol * np.abs(e).max(), err_msg=name)


def test_gelu_and_its_gradient_are_pytorchs():
  x = np.linspace(-12, 12, 24001, dtype=np.float32)
  w = np.random.default_rng(0).normal(size=x.shape).astype(np.float32)
  y, vjp = jax.vjp(jax.jit(layers.gelu), jnp.asarray(x))
  (dx,) = vjp(jnp.asarray(w))
  tx = torch.tensor(x, dtype=torch.float64).requires_grad_()
  ty = torch.nn.functional.gelu(tx)
  ty.backward(torch.tensor(w, dtype=torch.float64))
  np.testing.assert_allclose(y, ty.detach().numpy(), rtol=0, atol=2e-6)
  np.testing.assert_allclose(dx, tx.grad.numpy(), rtol=0, atol=4e-6)
  # Exact (erf), not the tanh approximation, which differs by up to about 5e-4.
  assert np.abs(np.asarray(y) - np.asarray(jax.nn.gelu(x, approximate=True))).max() > 1e-4


def test_every_depthwise_form_keeps_the_layer_output_shape():
  for (height, width), stride in itertools.product(SIZES, (1, 2)):
    x = jnp.zeros((1, height, width, 3))
    conv = layers.DepthwiseConv(7, stride=stride, impl='shift')
    y = conv.apply(conv.init(jax.random.key(0), x), x)
    assert y.shape == (1, -(-height // stride), -(-width // stride), 3)
