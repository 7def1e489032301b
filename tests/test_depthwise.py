"""Every depthwise implementation equals lax.conv with feature_group_count (values and gradients)."""
import itertools

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np
import pytest

from kd_landmarks.models import depthwise

CONCRETE_IMPLS = [impl for impl in depthwise.DEPTHWISE_IMPLS if impl != "auto"]


def _reference(x, kernel, stride):
  """Independent reference: lax.conv with the padding TensorFlow's SAME defines, computed by hand."""
  def pads(size, k):
    out = -(-size // stride)
    total = max((out - 1) * stride + k - size, 0)
    return (total // 2, total - total // 2)
  return lax.conv_general_dilated(
      x, kernel, (stride, stride), [pads(x.shape[1], kernel.shape[0]), pads(x.shape[2], kernel.shape[1])],
      dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=x.shape[-1],
      precision=lax.Precision.HIGHEST)


CASES = list(itertools.product(CONCRETE_IMPLS, [1, 2], [(7, 7, 3), (8, 6, 3), (9, 10, 5), (5, 5, 1)]))


@pytest.mark.parametrize("impl,stride,hw_k", CASES)
def test_forward_and_gradients_match_lax(impl, stride, hw_k):
  height, width, k = hw_k
  rng = np.random.default_rng(height * 100 + width * 10 + k + stride)
  x = jnp.asarray(rng.normal(size=(2, height, width, 4)), jnp.float32)
  kernel = jnp.asarray(rng.normal(size=(k, k, 1, 4)), jnp.float32)
  cotangent = jnp.asarray(rng.normal(size=(2, -(-height // stride), -(-width // stride), 4)), jnp.float32)

  def loss(fn):
    return lambda x, kernel: jnp.sum(fn(x, kernel) * cotangent)

  ours = lambda x, kernel: depthwise.depthwise_conv(x, kernel, strides=stride, impl=impl)
  ref = lambda x, kernel: _reference(x, kernel, stride)
  np.testing.assert_allclose(ours(x, kernel), ref(x, kernel), rtol=1e-5, atol=1e-5)
  got = jax.grad(loss(ours), argnums=(0, 1))(x, kernel)
  want = jax.grad(loss(ref), argnums=(0, 1))(x, kernel)
  np.testing.assert_allclose(got[0], want[0], rtol=1e-5, atol=1e-4, err_msg="input gradient")
  np.testing.assert_allclose(got[1], want[1], rtol=1e-5, atol=1e-4, err_msg="kernel gradient")


def test_hand_worked_stride_two_value():
  # A 4x4 ramp, 3x3 all-ones kernel, stride 2: SAME pads (0, 1), so output (0, 0) sums x[0:3, 0:3]
  # and output (1, 1) sums x[2:4, 2:4] (the rest is padding).
  x = jnp.arange(16, dtype=jnp.float32).reshape(1, 4, 4, 1)
  kernel = jnp.ones((3, 3, 1, 1), jnp.float32)
  for impl in CONCRETE_IMPLS:
    out = depthwise.depthwise_conv(x, kernel, strides=2, impl=impl)
    assert out.shape == (1, 2, 2, 1)
    assert float(out[0, 0, 0, 0]) == 0 + 1 + 2 + 4 + 5 + 6 + 8 + 9 + 10
    assert float(out[0, 1, 1, 0]) == 10 + 11 + 14 + 15


def test_bfloat16_runs_and_is_close():
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(1, 6, 6, 8)), jnp.float32)
  kernel = jnp.asarray(rng.normal(size=(3, 3, 1, 8)), jnp.float32)
  want = _reference(x, kernel, 1)
  for impl in CONCRETE_IMPLS:
    out = depthwise.depthwise_conv(x.astype(jnp.bfloat16), kernel, impl=impl)
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(out, np.float32), want, rtol=0.05, atol=0.1)
    grads = jax.grad(lambda k: jnp.sum(depthwise.depthwise_conv(
        x.astype(jnp.bfloat16), k, impl=impl).astype(jnp.float32)))(kernel)
    assert grads.dtype == jnp.float32


def test_auto_resolves_per_backend():
  expected = depthwise.CPU_DEFAULT_IMPL if jax.default_backend() == "cpu" else "lax"
  assert depthwise.resolve_impl("auto") == expected


def test_bad_arguments_are_named():
  with pytest.raises(ValueError, match="depthwise_impl"):
    depthwise.resolve_impl("fft")
  with pytest.raises(ValueError, match=r"\[kh, kw, 1, C=4\]"):
    depthwise.depthwise_conv(jnp.zeros((1, 4, 4, 4)), jnp.zeros((3, 3, 1, 3)))


@pytest.mark.parametrize("batch,stride", [(1, 1), (3, 2), (10, 1), (16, 2)])
def test_shifted_vjp_weight_gradient_folds_any_batch(batch, stride):
  # The hand-written weight gradient folds the batch in groups of up to 8 before reducing; every
  # batch size (prime, larger than 8, a multiple of 8) must give lax.conv's gradients.
  rng = np.random.default_rng(batch * 10 + stride)
  x = jnp.asarray(rng.normal(size=(batch, 9, 8, 5)), jnp.float32)
  kernel = jnp.asarray(rng.normal(size=(3, 3, 1, 5)), jnp.float32)
  cotangent = jnp.asarray(rng.normal(size=(batch, -(-9 // stride), -(-8 // stride), 5)), jnp.float32)

  def loss(fn):
    return lambda x, kernel: jnp.sum(fn(x, kernel) * cotangent)

  ours = lambda x, kernel: depthwise.depthwise_conv(x, kernel, strides=stride, impl="shifted_vjp")
  ref = lambda x, kernel: _reference(x, kernel, stride)
  got = jax.jit(jax.grad(loss(ours), argnums=(0, 1)))(x, kernel)
  want = jax.grad(loss(ref), argnums=(0, 1))(x, kernel)
  np.testing.assert_allclose(got[0], want[0], rtol=1e-5, atol=1e-4, err_msg="input gradient")
  np.testing.assert_allclose(got[1], want[1], rtol=1e-5, atol=1e-4, err_msg="kernel gradient")


def test_shifted_vjp_bfloat16_weight_gradient_accumulates_in_float32():
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.normal(size=(4, 12, 12, 8)), jnp.float32)
  kernel = jnp.asarray(rng.normal(size=(3, 3, 1, 8)), jnp.float32)
  want = jax.grad(lambda k: jnp.sum(_reference(x, k, 1)))(kernel)
  got = jax.grad(lambda k: jnp.sum(depthwise.depthwise_conv(
      x.astype(jnp.bfloat16), k, impl="shifted_vjp").astype(jnp.float32)))(kernel)
  assert got.dtype == jnp.float32
  # 576 products of bfloat16 inputs per tap: the sum is close when accumulated in float32.
  np.testing.assert_allclose(got, want, rtol=0.02, atol=0.5)
