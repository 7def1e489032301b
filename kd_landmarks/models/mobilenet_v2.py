"""MobileNetV2 (Sandler et al. 2018), the student network of the paper (mnv2, Table 5: 2.4 M params).

Layer for layer the Keras ``tf.keras.applications.MobileNetV2`` the authors used, so the backbone
has exactly 2,223,872 parameters (Keras' "trainable params" of ``include_top=False``; the 34,112
BatchNorm moving statistics are in ``batch_stats``), followed by the coordinate regression head.
"""
from __future__ import annotations

import functools
import math
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from kd_landmarks.models import layers

# (expansion t, output channels c, repeats n, first stride s): Table 2 of Sandler et al. (2018).
INVERTED_RESIDUAL_SETTINGS = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)


class InvertedResidual(nn.Module):
  """1x1 expand (ReLU6) -> 3x3 depthwise (ReLU6) -> 1x1 linear project, residual when shapes match."""
  out_channels: int
  expansion: int
  strides: int
  kernels: layers.Kernels
  norm: Any
  dtype: Any
  param_dtype: Any

  @nn.compact
  def __call__(self, x):
    conv = functools.partial(layers.PointwiseConv, use_bias=False, kernels=self.kernels,
                             dtype=self.dtype, param_dtype=self.param_dtype)
    in_channels = x.shape[-1]
    y = x
    if self.expansion != 1:
      y = conv(in_channels * self.expansion, name="expand")(y)
      y = self.norm(activation="relu6", name="expand_bn")(y)
    y = layers.DepthwiseConv(3, self.strides, self.kernels, self.dtype, self.param_dtype,
                             name="depthwise")(y)
    y = self.norm(activation="relu6", name="depthwise_bn")(y)
    y = conv(self.out_channels, name="project")(y)
    y = self.norm(name="project_bn")(y)
    if self.strides == 1 and in_channels == self.out_channels:
      y = x + y
    return y


class MobileNetV2(nn.Module):
  """MobileNetV2 backbone + global pooling + Dense(2K) head; images ``[B, H, W, 3]`` in [0, 1] -> ``[B, K, 2]``.

  Attributes:
    num_landmarks: K.
    width_multiplier: alpha of Sandler et al. (channels scaled, rounded to multiples of 8).
    depth_multiplier: scales the repeats of each stage (``ceil(n * d)``); 1.0 is the paper's network,
      smaller values make the tiny test variants with the same code.
    last_channels: channels of the final 1x1 conv (None: 1280, scaled when alpha > 1 as Keras does).
    dropout_rate: dropout before the head.
    kernels: the compute primitives of the layers (:class:`layers.Kernels`; the default is portable JAX, CPU
      training passes faster ones with the same parameters and mathematics).
    dtype: compute dtype (e.g. bfloat16); parameters stay ``param_dtype``.
    bn_momentum, bn_epsilon: BatchNorm moving-average momentum and epsilon (Keras: epsilon 1e-3).
  """
  num_landmarks: int
  width_multiplier: float = 1.0
  depth_multiplier: float = 1.0
  last_channels: int | None = None
  dropout_rate: float = 0.0
  kernels: layers.Kernels = layers.PORTABLE
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  bn_momentum: float = 0.99
  bn_epsilon: float = 1e-3

  @nn.compact
  def __call__(self, images, *, train: bool = False, batch_mask=None, sync_axis: str | None = None):
    """``[B, H, W, 3]`` RGB in [0, 1] -> ``[B, K, 2]``. In training, ``batch_mask`` ([B], 0 on padding rows)
    and ``sync_axis`` (the mesh axis the batch is split over) give BatchNorm the statistics of the whole
    global batch's valid examples (:func:`kd_landmarks.models.layers.batch_norm_train`)."""
    norm = layers.batch_norm(train=train, momentum=self.bn_momentum, epsilon=self.bn_epsilon,
                             dtype=self.dtype, param_dtype=self.param_dtype, kernels=self.kernels,
                             batch_mask=batch_mask, axis_name=sync_axis)
    x = layers.normalize_images(images, self.dtype)
    x = nn.Conv(layers.make_divisible(32 * self.width_multiplier), (3, 3), strides=(2, 2), padding="SAME",
                use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype,
                kernel_init=layers.conv_init, name="stem")(x)
    x = norm(activation="relu6", name="stem_bn")(x)
    block = 0
    for expansion, channels, repeats, first_stride in INVERTED_RESIDUAL_SETTINGS:
      out_channels = layers.make_divisible(channels * self.width_multiplier)
      for repeat in range(max(1, math.ceil(repeats * self.depth_multiplier))):
        x = InvertedResidual(out_channels, expansion, first_stride if repeat == 0 else 1,
                             self.kernels, norm, self.dtype, self.param_dtype,
                             name=f"block{block}")(x)
        block += 1
    if self.last_channels is not None:
      last_channels = self.last_channels
    elif self.width_multiplier > 1.0:
      last_channels = layers.make_divisible(1280 * self.width_multiplier)
    else:
      last_channels = 1280
    x = layers.PointwiseConv(last_channels, kernels=self.kernels, dtype=self.dtype, param_dtype=self.param_dtype, name="top")(x)
    x = norm(activation="relu6", name="top_bn")(x)
    return layers.RegressionHead(self.num_landmarks, self.dropout_rate, self.param_dtype,
                                 name="head")(x, train=train)
