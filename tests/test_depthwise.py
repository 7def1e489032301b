"""Every depthwise implementation (the models' portable one and the CPU training kernels) equals lax.conv with
feature_group_count computed independently (values and gradients)."""
import itertools

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import require_native_kernels
from kd_landmarks.cpu import kernels as cpu_kernels
from kd_landmarks.cpu import native
from kd_landmarks.models import depthwise

# The portable form (models.PORTABLE) and the CPU training kernels' two forms (kd_landmarks/cpu).
IMPLS = {"lax": depthwise.depthwise_conv, "shifted_xla": cpu_kernels.depthwise_conv_xla,
         "shifted_native": cpu_kernels.depthwise_conv_native}
CONCRETE_IMPLS = list(IMPLS)


def _depthwise(x, kernel, *, strides=1, impl="lax"):
  if impl == "shifted_native":
    require_native_kernels()  # Skips here, fails in CI (CI=true).
  return IMPLS[impl](x, kernel, strides=strides)


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

  ours = lambda x, kernel: _depthwise(x, kernel, strides=stride, impl=impl)
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
    out = _depthwise(x, kernel, strides=2, impl=impl)
    assert out.shape == (1, 2, 2, 1)
    assert float(out[0, 0, 0, 0]) == 0 + 1 + 2 + 4 + 5 + 6 + 8 + 9 + 10
    assert float(out[0, 1, 1, 0]) == 10 + 11 + 14 + 15


def test_bfloat16_runs_and_is_close():
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(1, 6, 6, 8)), jnp.float32)
  kernel = jnp.asarray(rng.normal(size=(3, 3, 1, 8)), jnp.float32)
  want = _reference(x, kernel, 1)
  for impl in CONCRETE_IMPLS:
    out = _depthwise(x.astype(jnp.bfloat16), kernel, impl=impl)
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(out, np.float32), want, rtol=0.05, atol=0.1)
    grads = jax.grad(lambda k: jnp.sum(_depthwise(
        x.astype(jnp.bfloat16), k, impl=impl).astype(jnp.float32)))(kernel)
    assert grads.dtype == jnp.float32


def test_bad_arguments_are_named():
  with pytest.raises(ValueError, match=r"\[kh, kw, 1, C=4\]"):
    _depthwise(jnp.zeros((1, 4, 4, 4)), jnp.zeros((3, 3, 1, 3)))


@pytest.mark.parametrize("batch,stride", [(1, 1), (3, 2), (10, 1), (16, 2)])
def test_shifted_xla_weight_gradient_folds_any_batch(batch, stride):
  # The hand-written weight gradient folds the batch in groups of up to 8 before reducing; every
  # batch size (prime, larger than 8, a multiple of 8) must give lax.conv's gradients.
  rng = np.random.default_rng(batch * 10 + stride)
  x = jnp.asarray(rng.normal(size=(batch, 9, 8, 5)), jnp.float32)
  kernel = jnp.asarray(rng.normal(size=(3, 3, 1, 5)), jnp.float32)
  cotangent = jnp.asarray(rng.normal(size=(batch, -(-9 // stride), -(-8 // stride), 5)), jnp.float32)

  def loss(fn):
    return lambda x, kernel: jnp.sum(fn(x, kernel) * cotangent)

  ours = lambda x, kernel: _depthwise(x, kernel, strides=stride, impl="shifted_xla")
  ref = lambda x, kernel: _reference(x, kernel, stride)
  got = jax.jit(jax.grad(loss(ours), argnums=(0, 1)))(x, kernel)
  want = jax.grad(loss(ref), argnums=(0, 1))(x, kernel)
  np.testing.assert_allclose(got[0], want[0], rtol=1e-5, atol=1e-4, err_msg="input gradient")
  np.testing.assert_allclose(got[1], want[1], rtol=1e-5, atol=1e-4, err_msg="kernel gradient")


def test_shifted_xla_bfloat16_weight_gradient_accumulates_in_float32():
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.normal(size=(4, 12, 12, 8)), jnp.float32)
  kernel = jnp.asarray(rng.normal(size=(3, 3, 1, 8)), jnp.float32)
  want = jax.grad(lambda k: jnp.sum(_reference(x, k, 1)))(kernel)
  got = jax.grad(lambda k: jnp.sum(_depthwise(
      x.astype(jnp.bfloat16), k, impl="shifted_xla").astype(jnp.float32)))(kernel)
  assert got.dtype == jnp.float32
  # 576 products of bfloat16 inputs per tap: the sum is close when accumulated in float32.
  np.testing.assert_allclose(got, want, rtol=0.02, atol=0.5)


# The native kernel vectorises 8 channels at a time and unrolls output columns by 4: 21 channels
# (16 + 5) and widths with every remainder modulo 4 exercise the vector, unrolled and scalar paths;
# 5x5 kernels are EfficientNet's; batches 1 and 3 check the batch loop.
NATIVE_CASES = [(1, 7, 9, 21, 3, 1), (3, 12, 11, 21, 3, 2), (2, 9, 10, 16, 5, 1), (2, 10, 13, 8, 5, 2),
                (1, 4, 5, 3, 3, 1), (2, 2, 3, 9, 5, 2)]


@pytest.mark.parametrize("method", ["rows", "registers"])
@pytest.mark.parametrize("batch,height,width,channels,k,stride", NATIVE_CASES)
def test_native_weight_gradient_matches_lax(batch, height, width, channels, k, stride, method):
  require_native_kernels()  # Skips here, fails in CI (CI=true).
  rng = np.random.default_rng(batch + height + width + channels + k + stride)
  x = jnp.asarray(rng.normal(size=(batch, height, width, channels)), jnp.float32)
  kernel = jnp.asarray(rng.normal(size=(k, k, 1, channels)), jnp.float32)
  out_shape = (batch, -(-height // stride), -(-width // stride), channels)
  cotangent = jnp.asarray(rng.normal(size=out_shape), jnp.float32)
  want = jax.grad(lambda k_: jnp.sum(_reference(x, k_, stride) * cotangent))(kernel)
  pads = (depthwise.same_padding(height, k, stride)[0], depthwise.same_padding(width, k, stride)[0])
  direct = jax.jit(lambda x, g: native.depthwise_weight_gradient(x, g, (k, k), stride, pads, method=method))(
      x, cotangent)
  np.testing.assert_allclose(direct, want, rtol=1e-5, atol=1e-4)
  through_model = jax.grad(lambda k_: jnp.sum(_depthwise(
      x, k_, strides=stride, impl="shifted_native") * cotangent))(kernel)
  np.testing.assert_allclose(through_model, want, rtol=1e-5, atol=1e-4)


def test_native_weight_gradient_hand_worked():
  # x = 1 everywhere on a 3x3 image, g = 1 on the 3x3 output, stride 1, SAME pads (1, 1): tap (i, j)
  # sees the input wherever the shifted window stays inside, i.e. (3 - |i - 1|) * (3 - |j - 1|) times.
  require_native_kernels()  # Skips here, fails in CI (CI=true).
  x = jnp.ones((1, 3, 3, 1), jnp.float32)
  for method in ("rows", "registers"):
    got = np.asarray(native.depthwise_weight_gradient(x, jnp.ones((1, 3, 3, 1)), (3, 3), 1, (1, 1),
                                                      method=method))
    assert got[:, :, 0, 0].tolist() == [[4, 6, 4], [6, 9, 6], [4, 6, 4]], method


def test_native_build_failure_is_reported(monkeypatch, tmp_path):
  # A "compiler" that always fails, and an empty cache: the reason carries the command that failed.
  monkeypatch.setenv("CXX", "false")
  monkeypatch.setenv("KD_LANDMARKS_NATIVE_CACHE", str(tmp_path))
  native._load.cache_clear()
  try:
    assert not native.available()
    assert "compiling" in native.unavailable_reason() and "depthwise_cpu.cc" in native.unavailable_reason()
    assert not list(tmp_path.glob("*.so"))  # no half-written library left behind (the .lock may stay)
  finally:
    monkeypatch.delenv("CXX")
    monkeypatch.delenv("KD_LANDMARKS_NATIVE_CACHE")
    native._load.cache_clear()
