"""Layers shared by the MobileNetV2 and EfficientNet modules.

Parameter layout follows Keras (the authors' framework): convolutions without bias
when followed by BatchNorm, BatchNorm with scale and bias (its moving mean and
variance live in the ``batch_stats`` collection and are not counted as parameters).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import flax.linen as nn
import jax
from jax import lax
import jax.numpy as jnp

from kd_landmarks.models import depthwise

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


def pointwise_conv(x, kernel):
  """1x1 convolution of NHWC ``x`` with ``kernel`` ``[1, 1, Cin, Cout]`` (the portable form: exporters map it
  to a Conv, which ONNX Runtime fuses with the BatchNorm and activation after it)."""
  return lax.conv_general_dilated(x, kernel, (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"))


ACTIVATIONS = (None, "relu6", "swish")


def check_activation(activation):
  if activation not in ACTIVATIONS:
    raise ValueError(f"unknown activation {activation!r}; choose from {ACTIVATIONS}")


def activation_fn(z, activation):
  """``activation`` (one of :data:`ACTIVATIONS`) applied to ``z``."""
  if activation == "relu6":
    return jnp.minimum(jnp.maximum(z, 0.0), 6.0)
  if activation == "swish":
    return z * jax.nn.sigmoid(z)
  return z


def batch_norm_train(x, scale, bias, epsilon, activation, *, mask=None, axis_name=None):
  """Training-mode BatchNorm then ``activation``, with statistics over the valid examples of the global batch.

  The statistics are sums, so that they add up exactly over devices and padding: with ``S1 = sum(m x)``,
  ``S2 = sum(m x^2)`` and ``N = sum(m) * H * W`` over this device's block (``m`` the example mask, 1 where
  ``mask`` is None), summed over ``axis_name`` with ``lax.psum`` when given, ``mean = S1 / N`` and
  ``var = max(0, S2 / N - mean^2)`` (flax's fast variance). A global batch of 70 therefore normalises with the
  same statistics on 1 device as on 8 devices holding 9 rows each, 2 of them padding. Under ``jax.grad`` the
  transpose of ``psum`` sums each device's cotangent, which is the gradient of the sum of the devices' losses.

  Args:
    x: ``[B, ..., C]``.
    scale, bias: ``[C]``.
    epsilon: added to the variance.
    activation: one of :data:`ACTIVATIONS`.
    mask: optional ``[B]``, nonzero for the examples that count (padding rows are 0).
    axis_name: the mesh axis the global batch is split over (None: this block is the whole batch).

  Returns:
    ``(y float32, mean [C], var [C])``.
  """
  check_activation(activation)
  axes = tuple(range(x.ndim - 1))
  x32 = x.astype(jnp.float32)
  pixels_per_example = math.prod(x.shape[1:-1])
  if mask is None:
    weighted = x32
    count = jnp.float32(x.shape[0] * pixels_per_example)
  else:
    weights = jnp.asarray(mask, jnp.float32).reshape((x.shape[0],) + (1,) * (x.ndim - 1))
    weighted = x32 * weights
    count = jnp.sum(weights) * pixels_per_example
  sums = (jnp.sum(weighted, axes), jnp.sum(weighted * x32, axes), count)
  if axis_name is not None:
    sums = lax.psum(sums, axis_name)
  sum_x, sum_sq, count = sums
  mean = sum_x / count
  var = jnp.maximum(0.0, sum_sq / count - jnp.square(mean))
  z = (x32 - mean) * (lax.rsqrt(var + epsilon) * scale.astype(jnp.float32)) + bias.astype(jnp.float32)
  return activation_fn(z, activation), mean, var


@dataclasses.dataclass(frozen=True)
class Kernels:
  """The compute primitives the models' layers call, swappable without changing parameters or mathematics.

  The default, :data:`PORTABLE`, is plain JAX that every backend and exporter handles; ``kd_landmarks/cpu``
  builds the set CPU training uses (the same functions computed faster on XLA's CPU backend). Frozen and
  compared by identity, so a module holding one is hashable.

  Fields:
    depthwise_conv: ``(x [B, H, W, C], kernel [k, k, 1, C], *, strides) -> y``, SAME padding
      (:func:`kd_landmarks.models.depthwise.depthwise_conv`).
    pointwise_conv: ``(x [B, H, W, Cin], kernel [1, 1, Cin, Cout]) -> y`` (:func:`pointwise_conv`).
    batch_norm_train: ``(x, scale, bias, epsilon, activation) -> (y float32, batch mean, biased batch
      variance)``, the training-mode BatchNorm then ``activation`` over all axes but the last, with the
      variance as ``E[x^2] - E[x]^2`` clipped at 0 (as ``flax.linen.BatchNorm``), on one device's whole block.
      A step that pads its batch or spans several devices computes it with :func:`batch_norm_train` instead
      (masked, synchronised), whatever this field holds.
  """
  depthwise_conv: Callable = depthwise.depthwise_conv
  pointwise_conv: Callable = pointwise_conv
  batch_norm_train: Callable = batch_norm_train


PORTABLE = Kernels()


class PointwiseConv(nn.Module):
  """1x1 convolution with the parameter layout of ``nn.Conv`` (kernel ``[1, 1, Cin, Cout]``), computed by
  ``kernels.pointwise_conv``."""
  features: int
  use_bias: bool = False
  kernels: Kernels = PORTABLE
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    kernel = self.param("kernel", conv_init, (1, 1, x.shape[-1], self.features), self.param_dtype)
    y = self.kernels.pointwise_conv(x.astype(self.dtype), kernel.astype(self.dtype))
    if self.use_bias:
      bias = self.param("bias", nn.initializers.zeros, (self.features,), self.param_dtype)
      y = y + bias.astype(self.dtype)
    return y


class BatchNormAct(nn.Module):
  """Training-mode BatchNorm then the activation, through ``batch_norm_train`` (a :class:`Kernels` field), or
  through the masked, synchronised :func:`batch_norm_train` where ``mask`` or ``axis_name`` is given.

  The variables of ``flax.linen.BatchNorm`` under the same names (params ``scale``, ``bias``; batch_stats
  ``mean``, ``var``, float32) and its running-average update, so that evaluation reads them with flax's own
  module. Output in ``dtype``.
  """
  batch_norm_train: Callable
  activation: str | None = None
  momentum: float = 0.99
  epsilon: float = 1e-3
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  mask: Any = None
  axis_name: str | None = None

  @nn.compact
  def __call__(self, x):
    features = (x.shape[-1],)
    scale = self.param("scale", nn.initializers.ones, features, self.param_dtype)
    bias = self.param("bias", nn.initializers.zeros, features, self.param_dtype)
    running_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros(features, jnp.float32))
    running_var = self.variable("batch_stats", "var", lambda: jnp.ones(features, jnp.float32))
    if self.mask is None and self.axis_name is None:
      y, mean, var = self.batch_norm_train(x, scale, bias, self.epsilon, self.activation)
    else:
      y, mean, var = batch_norm_train(x, scale, bias, self.epsilon, self.activation, mask=self.mask,
                                      axis_name=self.axis_name)
    if not self.is_initializing():
      running_mean.value = self.momentum * running_mean.value + (1 - self.momentum) * mean
      running_var.value = self.momentum * running_var.value + (1 - self.momentum) * var
    return y.astype(self.dtype)


def batch_norm(*, train: bool, momentum: float, epsilon: float, dtype, param_dtype, kernels: Kernels = PORTABLE,
               batch_mask=None, axis_name: str | None = None):
  """The models' BatchNorm + activation: ``norm(activation=..., name=...)(x)``.

  In evaluation ``flax.linen.BatchNorm`` with the running statistics, then the activation: the module
  exporters recognise (jax2onnx emits an ONNX BatchNormalization, which ONNX Runtime folds into the preceding
  Conv). In training :class:`BatchNormAct` (same variables and values) with ``kernels.batch_norm_train``, or,
  for a padded batch (``batch_mask``) or one split over devices (``axis_name``), with the statistics of the
  whole global batch's valid examples (:func:`batch_norm_train`).
  """
  def norm(activation=None, name=None):
    check_activation(activation)
    if train:
      return BatchNormAct(kernels.batch_norm_train, activation, momentum, epsilon, dtype, param_dtype,
                          batch_mask, axis_name, name=name)
    module = nn.BatchNorm(use_running_average=True, momentum=momentum, epsilon=epsilon, dtype=dtype,
                          param_dtype=param_dtype, name=name)
    return lambda x: activation_fn(module(x), activation)

  return norm


class DepthwiseConv(nn.Module):
  """k x k depthwise convolution, SAME padding, no bias; kernel ``[k, k, 1, C]`` (as ``nn.Conv``), computed by
  ``kernels.depthwise_conv``."""
  kernel_size: int
  strides: int = 1
  kernels: Kernels = PORTABLE
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    kernel = self.param("kernel", depthwise_init,
                        (self.kernel_size, self.kernel_size, 1, x.shape[-1]), self.param_dtype)
    return self.kernels.depthwise_conv(x.astype(self.dtype), kernel, strides=self.strides)


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
