"""The native BatchNorm reductions (kd_landmarks/cpu/native/batch_norm_cpu.cc) by value."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kd_landmarks.cpu import kernels as cpu_kernels
from kd_landmarks.cpu import native
from conftest import require_native_kernels

# Skipped where the kernels cannot be built, but failed in CI (conftest.require_native_kernels).
needs_native = pytest.mark.usefixtures("native_kernels")


@pytest.fixture
def native_kernels():
  require_native_kernels()


def _swish_derivative(z):
  s = 1.0 / (1.0 + np.exp(-np.float64(z)))
  return s * (1.0 + z * (1.0 - s))


def _reference_grad_sums(grad_y, x, mean, inv, scale, bias, activation):
  """float64 numpy: (sum dz, sum dz * xhat) over all axes but the last."""
  grad_y, x = np.float64(grad_y), np.float64(x)
  xhat = (x - mean) * inv
  z = xhat * scale + bias
  if activation == "relu6":
    derivative = ((z > 0) & (z < 6)).astype(np.float64)
  elif activation == "swish":
    derivative = _swish_derivative(z)
  else:
    derivative = np.ones_like(z)
  dz = (grad_y * derivative).reshape(-1, x.shape[-1])
  return dz.sum(0), (dz * xhat.reshape(dz.shape)).sum(0)


@needs_native
def test_grad_sums_hand_worked():
  # One channel, mean 0, inv 1, scale 1, bias 0, so z = xhat = x. x = (-1, 0, 0.5, 3, 6, 7), dy = 1..6.
  # relu6 passes only 0.5 and 3 (0 and 6 are kinks: derivative 0): sum dz = 3 + 4 = 7,
  # sum dz * xhat = 3 * 0.5 + 4 * 3 = 13.5. Identity: sum dz = 21, sum dz * x = -1 + 0 + 1.5 + 12 + 30 + 42.
  x = jnp.asarray([-1.0, 0.0, 0.5, 3.0, 6.0, 7.0]).reshape(6, 1)
  dy = jnp.arange(1.0, 7.0).reshape(6, 1)
  one, zero = jnp.ones(1), jnp.zeros(1)
  sums = lambda act: native.batch_norm_grad_sums(dy, x, mean=zero, inv=one, scale=one, bias=zero, activation=act)
  assert [float(s[0]) for s in sums("relu6")] == [7.0, 13.5]
  assert [float(s[0]) for s in sums(None)] == [21.0, 84.5]


@needs_native
@pytest.mark.parametrize("shape", [(3, 1, 1, 21), (2, 9, 7, 21), (4, 30, 20, 19), (1, 50, 50, 8)])
@pytest.mark.parametrize("activation", [None, "relu6", "swish"])
def test_grad_sums_match_float64(shape, activation):
  # 19/21 channels: vector lanes plus a scalar remainder; 2,400-2,500 rows: several flush blocks and,
  # with two or more intra-op threads, several row ranges.
  rng = np.random.default_rng(sum(shape))
  x = rng.normal(2.0, 2.0, size=shape).astype(np.float32)
  grad_y = rng.normal(size=shape).astype(np.float32)
  channels = shape[-1]
  mean = rng.normal(2.0, 0.1, channels).astype(np.float32)
  inv = rng.uniform(1.0, 2.0, channels).astype(np.float32)
  scale = rng.uniform(0.5, 1.5, channels).astype(np.float32)
  bias = rng.uniform(0.5, 1.5, channels).astype(np.float32)
  got = jax.jit(lambda g, x: native.batch_norm_grad_sums(
      g, x, mean=mean, inv=inv, scale=scale, bias=bias, activation=activation))(grad_y, x)
  want = _reference_grad_sums(grad_y, x, mean, inv, scale, bias, activation)
  if activation == "relu6":  # the mask cuts through the data: both sides of 0 and 6 occur
    z = (x - mean) * inv * scale + bias
    assert (z <= 0).any() and (z >= 6).any() and ((z > 0) & (z < 6)).any()
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-4)


@needs_native
def test_swish_derivative_per_element():
  # One row, z = x (mean 0, inv 1, scale 1, bias 0), dy = 1: each channel's sum(dz) is swish'(z) of one
  # value. z from -100 to 100 covers the exp clamps and both saturated ends; 2,001 channels also run the
  # scalar path (std::exp) on the last one.
  z = np.concatenate([np.linspace(-100.0, 100.0, 1995), [-88.0, -87.0, 0.0, 1e-8, 87.0, 89.0]])
  x = jnp.asarray(z, jnp.float32).reshape(1, -1)
  ones, zeros = jnp.ones(x.shape[1]), jnp.zeros(x.shape[1])
  got, _ = native.batch_norm_grad_sums(jnp.ones_like(x), x, mean=zeros, inv=ones, scale=ones, bias=zeros,
                                       activation="swish")
  np.testing.assert_allclose(got, _swish_derivative(np.float32(z)), rtol=2e-6, atol=1e-7)
  assert np.all(np.isfinite(got))
  # The same values as JAX's autodiff of swish, to float32 rounding.
  want = jax.vmap(jax.grad(jax.nn.swish))(x[0])
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@needs_native
@pytest.mark.parametrize("shape", [(5, 3), (2, 40, 30, 21), (3000, 4)])
def test_moments_match_float64(shape):
  rng = np.random.default_rng(len(shape))
  x = rng.normal(1.0, 3.0, size=shape).astype(np.float32)
  mean, var = jax.jit(native.batch_norm_moments)(x)
  x64 = np.float64(x).reshape(-1, shape[-1])
  np.testing.assert_allclose(mean, x64.mean(0), rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(var, x64.var(0), rtol=1e-5)


@needs_native
def test_moments_keep_precision_over_many_rows():
  # 400,000 rows with a mean of 3.5 (sum 1.4e6, where a float32 ulp is 0.125): accumulating every row
  # into one float32 total drifts by about 1e-5 relative; the kernel's float64 totals stay at float32
  # rounding of the result.
  rng = np.random.default_rng(0)
  x = (3.0 + rng.uniform(size=(400_000, 8))).astype(np.float32)
  mean, var = native.batch_norm_moments(jnp.asarray(x))
  x64 = np.float64(x)
  np.testing.assert_allclose(mean, x64.mean(0), rtol=3e-7)
  np.testing.assert_allclose(var, x64.var(0), rtol=1e-4)


@needs_native
def test_constant_channel_has_zero_variance_and_finite_gradient():
  # var = E[x^2] - E[x]^2 is 0 up to rounding for a constant channel; it is clipped at 0 and the
  # gradient through it is zero, not NaN.
  x = jnp.concatenate([jnp.full((4, 3, 3, 1), 0.7), jnp.linspace(-1, 1, 36).reshape(4, 3, 3, 1)], -1)
  y, _, var = cpu_kernels.batch_norm_train_native(x, jnp.ones(2), jnp.zeros(2), 1e-3, "relu6")
  assert float(var[0]) == pytest.approx(0.0, abs=1e-6) and float(var[0]) >= 0.0
  grad = jax.grad(lambda x: jnp.sum(cpu_kernels.batch_norm_train_native(
      x, jnp.ones(2), jnp.zeros(2), 1e-3, "relu6")[0] ** 2))(x)
  assert np.all(np.isfinite(grad))


@needs_native
def test_kernel_rejects_mismatched_operands():
  x = jnp.ones((4, 3))
  with pytest.raises(Exception, match="dy must have x's shape"):
    native.batch_norm_grad_sums(jnp.ones((5, 3)), x, mean=jnp.zeros(3), inv=jnp.ones(3), scale=jnp.ones(3),
                                bias=jnp.zeros(3), activation=None).__array__()
  with pytest.raises(ValueError, match="relu6"):
    native.batch_norm_grad_sums(x, x, mean=jnp.zeros(3), inv=jnp.ones(3), scale=jnp.ones(3),
                                bias=jnp.zeros(3), activation="gelu")


# Builds the kernels with another -march in a child process (its own cache) and prints their results.
_OTHER_MARCH = """
import sys
import jax
import numpy as np
from kd_landmarks.cpu import native
assert native.cxx_flags()[1] == "-march=" + sys.argv[1], native.cxx_flags()
assert native.available(), native.unavailable_reason()
inputs = np.load(sys.argv[2])
x, dy, g = inputs["x"], inputs["dy"], inputs["g"]
C = x.shape[-1]
mean, var = native.batch_norm_moments(x)
sums = native.batch_norm_grad_sums(dy, x, mean=inputs["mean"], inv=inputs["inv"], scale=inputs["scale"],
                                   bias=inputs["bias"], activation="swish")
dw = native.depthwise_weight_gradient(x, g, (3, 3), 2, (1, 0))
warp = native.affine_warp(inputs["image"], inputs["affine"], 12, fill_value=0.25)
noise = native.gaussian_noise(jax.random.key(3), inputs["grey"], inputs["std"])
np.savez(sys.argv[3], mean=mean, var=var, sum_dz=sums[0], sum_dz_xhat=sums[1], dw=dw, warp=warp, noise=noise)
"""


@needs_native
@pytest.mark.parametrize("march", ["znver2", "haswell"])
def test_kernels_built_for_an_amd_epyc_or_avx2_compute_the_same(tmp_path, march):
  """Built with an AVX2 CPU's flags (KD_LANDMARKS_NATIVE_MARCH: what -march=native means on an AMD EPYC,
  znver2/3; Haswell), the kernels, the augmentation's included, give this machine's results. Their speed under those flags (20x slower before native/common.h's fix)
  is benchmarks/native_isa.py's to show."""
  import os
  import subprocess
  import sys
  rng = np.random.default_rng(0)
  x = rng.normal(size=(3, 9, 10, 21)).astype(np.float32)
  inputs = dict(x=x, dy=rng.normal(size=x.shape).astype(np.float32),
                g=rng.normal(size=(3, 5, 5, 21)).astype(np.float32),
                mean=rng.normal(size=21).astype(np.float32), inv=rng.uniform(0.5, 2, 21).astype(np.float32),
                scale=rng.normal(size=21).astype(np.float32), bias=rng.normal(size=21).astype(np.float32),
                image=rng.integers(0, 256, (2, 15, 17, 3), dtype=np.uint8),
                affine=np.array([[[0.9, -0.4, 1.5], [0.4, 0.9, -2.0]], [[-1.1, 0.2, 14.0], [0.2, 1.1, 0.5]]],
                                np.float32),
                grey=np.full((2, 9, 9, 3), 0.5, np.float32), std=np.array([0.05, 0.1], np.float32))
  np.savez(tmp_path / "in.npz", **inputs)
  env = dict(os.environ, KD_LANDMARKS_NATIVE_CACHE=str(tmp_path / "cache"), KD_LANDMARKS_NATIVE_MARCH=march,
             PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  subprocess.run([sys.executable, "-c", _OTHER_MARCH, march, str(tmp_path / "in.npz"), str(tmp_path / "out.npz")],
                 check=True, env=env, timeout=600)
  other = np.load(tmp_path / "out.npz")
  mean, var = native.batch_norm_moments(x)
  sums = native.batch_norm_grad_sums(inputs["dy"], x, mean=inputs["mean"], inv=inputs["inv"],
                                     scale=inputs["scale"], bias=inputs["bias"], activation="swish")
  dw = native.depthwise_weight_gradient(x, inputs["g"], (3, 3), 2, (1, 0))
  warp = native.affine_warp(inputs["image"], inputs["affine"], 12, fill_value=0.25)
  noise = native.gaussian_noise(jax.random.key(3), inputs["grey"], inputs["std"])
  # FMA contraction may differ between -march targets: agreement to float32 rounding, not bit for bit.
  for name, ours in dict(mean=mean, var=var, sum_dz=sums[0], sum_dz_xhat=sums[1], dw=dw, warp=warp,
                         noise=noise).items():
    np.testing.assert_allclose(other[name], np.asarray(ours), rtol=2e-5, atol=2e-5, err_msg=name)
