"""Layers shared by the MobileNetV2 and EfficientNet modules.

Parameter layout follows Keras (the authors' framework): convolutions without bias
when followed by BatchNorm, BatchNorm with scale and bias (its moving mean and
variance live in the ``batch_stats`` collection and are not counted as parameters).
"""
from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
from jax import lax
import jax.numpy as jnp

from kd_landmarks.models import depthwise
from kd_landmarks import native

# ImageNet statistics of RGB in [0, 1]: the model normalises inside so that an exported model
# takes plain RGB (docs/contracts.md).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# He-normal over fan-out for full convolutions (as Keras' EfficientNet and torchvision do); a
# depthwise filter sees k*k inputs, so it is scaled by its fan-in instead.
conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
depthwise_init = nn.initializers.variance_scaling(2.0, "fan_in", "normal")


def normalize_images(images, dtype):
  """RGB in [0, 1] -> ImageNet-standardised, in the compute ``dtype``."""
  if images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(f"models expect images [B, H, W, 3] in [0, 1], got shape {images.shape}")
  mean = jnp.asarray(IMAGENET_MEAN, jnp.float32)
  std = jnp.asarray(IMAGENET_STD, jnp.float32)
  return ((images.astype(jnp.float32) - mean) / std).astype(dtype)


def make_divisible(value: float, divisor: int = 8, min_value: int | None = None) -> int:
  """Rounds channels to a multiple of ``divisor`` without going 10% below ``value`` (MobileNetV2)."""
  min_value = divisor if min_value is None else min_value
  new_value = max(min_value, int(value + divisor / 2) // divisor * divisor)
  if new_value < 0.9 * value:
    new_value += divisor
  return new_value


POINTWISE_IMPLS = ("auto", "conv", "dot")


def resolve_pointwise_impl(impl: str) -> str:
  """Maps ``'auto'`` to ``'dot'`` on CPU and ``'conv'`` elsewhere (see :class:`PointwiseConv`)."""
  if impl not in POINTWISE_IMPLS:
    raise ValueError(f"unknown pointwise_impl: {impl!r}; choose from {list(POINTWISE_IMPLS)}")
  if impl != "auto":
    return impl
  return "dot" if jax.default_backend() == "cpu" else "conv"


class PointwiseConv(nn.Module):
  """1x1 convolution with the parameter layout of ``nn.Conv`` (kernel ``[1, 1, Cin, Cout]``).

  ``impl='dot'`` runs it as a matrix product over the channel axis: the same arithmetic, but XLA's
  CPU backend computes the gradient of a 1x1 ``lax.conv`` about 4x slower than the gradient of a dot
  (65 vs 15 ms for [8, 56, 56, 144] -> 24 on one core). ``'conv'`` keeps a convolution, which
  accelerators prefer and which exporters map to a native Conv (ONNX Runtime then fuses it with its
  BatchNorm and activation; a dot exports as Einsum between layout transposes). ``'auto'``: 'dot' on
  CPU, 'conv' elsewhere.
  """
  features: int
  use_bias: bool = False
  impl: str = "auto"
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    kernel = self.param("kernel", conv_init, (1, 1, x.shape[-1], self.features), self.param_dtype)
    x = x.astype(self.dtype)
    kernel = kernel.astype(self.dtype)
    if resolve_pointwise_impl(self.impl) == "dot":
      # As a 2-D [B*H*W, Cin] x [Cin, Cout] product: the weight gradient is then a 2-D dot contracting
      # dimension 0 of both operands, which XLA's CPU backend runs in place. Contracting (B, H, W) of
      # 4-D operands instead, it recomputes the BatchNorm backward into a transposed [Cout, B*H*W] copy
      # (block1's expand layer: 123 ms of a 1.3 s train step at batch 8).
      y = lax.dot(x.reshape(-1, x.shape[-1]), kernel[0, 0]).reshape(x.shape[:-1] + (self.features,))
    else:
      y = lax.conv_general_dilated(x, kernel, (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    if self.use_bias:
      bias = self.param("bias", nn.initializers.zeros, (self.features,), self.param_dtype)
      y = y + bias.astype(self.dtype)
    return y


ACTIVATIONS = (None, "relu6", "swish")


def _check_activation(activation):
  if activation not in ACTIVATIONS:
    raise ValueError(f"unknown activation {activation!r}; choose from {ACTIVATIONS}")


def _activation(z, activation):
  if activation == "relu6":
    return jnp.minimum(jnp.maximum(z, 0.0), 6.0)
  if activation == "swish":
    return z * jax.nn.sigmoid(z)
  return z


def _activation_derivative(z, activation):
  if activation == "relu6":  # 0 at the kinks, as jax.nn.relu6's custom JVP.
    return ((z > 0.0) & (z < 6.0)).astype(z.dtype)
  if activation == "swish":
    sigmoid = jax.nn.sigmoid(z)
    return sigmoid * (1.0 + z * (1.0 - sigmoid))
  return jnp.ones_like(z)


NORM_IMPLS = ("auto", "xla", "native")
# benchmarks/models.py, student train step at batch 8 on one core (tcmalloc, A/B in one process), Intel Xeon
# with AVX-512: 'native' 0.477 -> 0.420 s. XLA's CPU backend materialises dz and xhat and reduces each in its
# own pass; the native kernels make one pass per reduction (kd_landmarks/native/batch_norm_cpu.cc).
# On an AMD EPYC (AVX2 only) the same benchmark measured 'native' 27% slower than 'xla' (issue 14): there
# -march=native means znver2/3 tuning, under which GCC 12 compiled the kernels' unaligned vector loads through
# the stack, 20x slower (native/common.h has the fix and the measurement); built that way on this Xeon, fixed,
# 'native' is again 16% faster on the student's step (313 vs 374 ms). Training runs measure instead of trusting
# this rule (kd_landmarks/models/autotune.py).
CPU_DEFAULT_NORM_IMPL = "native"


def resolve_norm_impl(impl: str) -> str:
  """Maps ``'auto'`` to ``'native'`` on CPU where the native kernels build, else ``'xla'``."""
  if impl not in NORM_IMPLS:
    raise ValueError(f"unknown norm_impl: {impl!r}; choose from {list(NORM_IMPLS)}")
  if impl == "native":
    native.require_requested("norm_impl='native'", off_cpu="'auto' or 'xla'", fallback="norm_impl='xla'")
  if impl != "auto":
    return impl
  if jax.default_backend() != "cpu":
    return "xla"
  return CPU_DEFAULT_NORM_IMPL if native.available() else "xla"


def batch_norm_act_train(x, scale, bias, epsilon: float, activation, impl: str = "auto"):
  """Training-mode BatchNorm then ``activation``, over all axes but the last (NHWC).

  Returns ``(y, mean, var)``: ``y = act(scale * (x - mean) / sqrt(var + epsilon) + bias)`` in float32 with
  the batch's mean and biased variance, computed as ``flax.linen.BatchNorm`` does (float32,
  ``E[x^2] - E[x]^2`` clipped at 0). The backward pass is the closed form (Ioffe & Szegedy 2015,
  Section 3): with ``dz = dy * act'(z)`` and ``xhat = (x - mean) / sqrt(var + eps)``,
  ``dx = scale / sqrt(var + eps) * (dz - mean(dz) - xhat * mean(dz * xhat))``: two reductions and one
  elementwise pass. JAX's autodiff of the same forward keeps more intermediates and, on XLA's CPU
  backend, makes several more passes over each activation.

  ``impl`` (:data:`NORM_IMPLS`): ``'native'`` computes the moments and the two backward reductions
  with the C++ kernels of :mod:`kd_landmarks.native`, one pass each with float64 totals
  (float32 ``x`` only; other dtypes keep XLA's reductions); ``'xla'`` with XLA's reductions.
  """
  _check_activation(activation)
  return _batch_norm_act_train(x, scale, bias, epsilon, activation, resolve_norm_impl(impl))


def _uses_native(x, impl):
  # impl comes from resolve_norm_impl, which checked that the kernels are usable.
  return impl == "native" and x.dtype == jnp.float32


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _batch_norm_act_train(x, scale, bias, epsilon, activation, impl):
  return _batch_norm_act_forward(x, scale, bias, epsilon, activation, impl)[0]


def _batch_norm_act_forward(x, scale, bias, epsilon, activation, impl):
  axes = tuple(range(x.ndim - 1))
  x32 = x.astype(jnp.float32)
  if _uses_native(x, impl):
    mean, raw_var = native.batch_norm_moments(x32)
  else:
    mean = jnp.mean(x32, axes)
    mean_sq = jnp.mean(jnp.square(x32), axes)
    raw_var = mean_sq - jnp.square(mean)
  var = jnp.maximum(0.0, raw_var)
  inv = lax.rsqrt(var + epsilon)
  z = (x32 - mean) * (inv * scale.astype(jnp.float32)) + bias.astype(jnp.float32)
  return (_activation(z, activation), mean, var), (x, mean, inv, raw_var > 0.0, scale, bias)


def _batch_norm_act_bwd(epsilon, activation, impl, residuals, cotangents):
  del epsilon
  x, mean, inv, var_positive, scale, bias = residuals
  grad_y, grad_mean, grad_var = cotangents
  axes = tuple(range(x.ndim - 1))
  count = x.size // x.shape[-1]
  scale32 = scale.astype(jnp.float32)
  centred = x.astype(jnp.float32) - mean
  xhat = centred * inv
  z = xhat * scale32 + bias.astype(jnp.float32)
  grad_z = grad_y.astype(jnp.float32) * _activation_derivative(z, activation)
  if (_uses_native(x, impl) and grad_y.dtype == jnp.float32
      and activation in native.GRAD_SUMS_ACTIVATIONS):
    sum_grad_z, sum_grad_z_xhat = native.batch_norm_grad_sums(
        grad_y, x, mean=mean, inv=inv, scale=scale32, bias=bias.astype(jnp.float32), activation=activation)
  else:
    sum_grad_z = jnp.sum(grad_z, axes)
    sum_grad_z_xhat = jnp.sum(grad_z * xhat, axes)
  # Through the variance (E[x^2] - E[x]^2, zero where it was clipped) and through the mean.
  # sum(dxhat * (x - mean)) * d(inv)/d(var), with dxhat = dz * scale and (x - mean) = xhat / inv.
  grad_var_total = jnp.where(var_positive, -0.5 * inv ** 2 * scale32 * sum_grad_z_xhat + grad_var, 0.0)
  grad_mean_total = -inv * scale32 * sum_grad_z + grad_mean
  grad_x = (grad_z * (inv * scale32) + grad_mean_total / count + centred * (2.0 * grad_var_total / count))
  return (grad_x.astype(x.dtype), sum_grad_z_xhat.astype(scale.dtype), sum_grad_z.astype(bias.dtype))


_batch_norm_act_train.defvjp(_batch_norm_act_forward, _batch_norm_act_bwd)


class BatchNormAct(nn.Module):
  """Training-mode ``flax.linen.BatchNorm`` followed by an activation (None, 'relu6', 'swish').

  The same variables (params ``scale``, ``bias``; batch_stats ``mean``, ``var``, float32), the same
  running-average update and the same values as ``act(nn.BatchNorm(use_running_average=False)(x))``;
  the gradient comes from :func:`batch_norm_act_train`'s closed form. Output in ``dtype``.
  Evaluation uses flax's own BatchNorm (see :func:`batch_norm`). ``impl``: see :data:`NORM_IMPLS`.
  """
  activation: str | None = None
  momentum: float = 0.99
  epsilon: float = 1e-3
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  impl: str = "auto"

  @nn.compact
  def __call__(self, x):
    _check_activation(self.activation)
    features = (x.shape[-1],)
    scale = self.param("scale", nn.initializers.ones, features, self.param_dtype)
    bias = self.param("bias", nn.initializers.zeros, features, self.param_dtype)
    running_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros(features, jnp.float32))
    running_var = self.variable("batch_stats", "var", lambda: jnp.ones(features, jnp.float32))
    y, mean, var = batch_norm_act_train(x, scale, bias, self.epsilon, self.activation, self.impl)
    if not self.is_initializing():
      running_mean.value = self.momentum * running_mean.value + (1 - self.momentum) * mean
      running_var.value = self.momentum * running_var.value + (1 - self.momentum) * var
    return y.astype(self.dtype)


def batch_norm(*, train: bool, momentum: float, epsilon: float, dtype, param_dtype, impl: str = "auto"):
  """The models' BatchNorm + activation: ``norm(activation=..., name=...)(x)``.

  Training: :class:`BatchNormAct` (closed-form backward; ``impl`` as there). Evaluation: ``flax.linen.BatchNorm`` with the
  running statistics, then the activation; the same variables under the same name, and the module
  exporters recognise (jax2onnx emits an ONNX BatchNormalization, which ONNX Runtime folds into the
  preceding Conv).
  """
  def norm(activation=None, name=None):
    if train:
      return BatchNormAct(activation, momentum, epsilon, dtype, param_dtype, impl, name=name)
    _check_activation(activation)
    module = nn.BatchNorm(use_running_average=True, momentum=momentum, epsilon=epsilon, dtype=dtype,
                          param_dtype=param_dtype, name=name)
    return lambda x: _activation(module(x), activation)

  return norm


class DepthwiseConv(nn.Module):
  """k x k depthwise convolution, SAME padding, no bias; kernel ``[k, k, 1, C]`` (as ``nn.Conv``)."""
  kernel_size: int
  strides: int = 1
  impl: str = "auto"
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    kernel = self.param("kernel", depthwise_init,
                        (self.kernel_size, self.kernel_size, 1, x.shape[-1]), self.param_dtype)
    return depthwise.depthwise_conv(x.astype(self.dtype), kernel, strides=self.strides, impl=self.impl)


class RegressionHead(nn.Module):
  """Global average pooling, dropout, Dense(2K) -> ``[B, K, 2]`` float32 (paper Section 2).

  Pooling and the Dense layer run in float32 whatever the backbone's dtype: coordinates in
  [-0.5, 0.5] need more than bfloat16's 8 bits of mantissa, and this layer costs nothing.
  """
  num_landmarks: int
  dropout_rate: float = 0.0
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, features, *, train: bool):
    pooled = jnp.mean(features.astype(jnp.float32), axis=(1, 2))
    pooled = nn.Dropout(self.dropout_rate, deterministic=not train)(pooled)
    out = nn.Dense(2 * self.num_landmarks, dtype=jnp.float32, param_dtype=self.param_dtype,
                   name="landmarks")(pooled)
    return out.reshape(out.shape[0], self.num_landmarks, 2).astype(jnp.float32)
