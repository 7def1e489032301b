"""EfficientNet B0-B3 (Tan & Le 2019), the teacher networks of the paper (efn, Table 5: B3, 12 M params).

Layer for layer Keras' ``tf.keras.applications.EfficientNetB*`` (the authors' framework): compound
scaling of width/depth, MBConv blocks with squeeze-and-excitation and swish, stochastic depth on the
residual branches. The B3 backbone has exactly 10,696,232 parameters (Keras' trainable params of
``include_top=False``; BatchNorm moving statistics are in ``batch_stats``).
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from kd_landmarks.models import layers


@dataclasses.dataclass(frozen=True)
class StageArgs:
  kernel_size: int
  repeats: int
  in_channels: int
  out_channels: int
  expansion: int
  strides: int
  se_ratio: float = 0.25


# The B0 stages (Tan & Le 2019, Table 1), scaled per variant below.
BASE_STAGES = (
    StageArgs(3, 1, 32, 16, 1, 1),
    StageArgs(3, 2, 16, 24, 6, 2),
    StageArgs(5, 2, 24, 40, 6, 2),
    StageArgs(3, 3, 40, 80, 6, 2),
    StageArgs(5, 3, 80, 112, 6, 1),
    StageArgs(5, 4, 112, 192, 6, 2),
    StageArgs(3, 1, 192, 320, 6, 1),
)

# name -> (width coefficient, depth coefficient, native resolution, head dropout).
VARIANTS = {
    "b0": (1.0, 1.0, 224, 0.2),
    "b1": (1.0, 1.1, 240, 0.2),
    "b2": (1.1, 1.2, 260, 0.3),
    "b3": (1.2, 1.4, 300, 0.3),
}


def round_filters(filters: float, width_coefficient: float, divisor: int = 8) -> int:
  """Channels after width scaling, rounded to a multiple of ``divisor`` (never 10% below)."""
  return layers.make_divisible(filters * width_coefficient, divisor)


def round_repeats(repeats: int, depth_coefficient: float) -> int:
  return int(math.ceil(depth_coefficient * repeats))


class MBConv(nn.Module):
  """Expand 1x1 (swish) -> depthwise kxk (swish) -> squeeze-excite -> project 1x1, stochastic-depth residual."""
  out_channels: int
  kernel_size: int
  strides: int
  expansion: int
  se_ratio: float
  drop_rate: float
  kernels: layers.Kernels
  norm: Any
  dtype: Any
  param_dtype: Any

  @nn.compact
  def __call__(self, x, *, train: bool):
    conv = functools.partial(layers.PointwiseConv, kernels=self.kernels, dtype=self.dtype,
                             param_dtype=self.param_dtype)
    in_channels = x.shape[-1]
    y = x
    if self.expansion != 1:
      y = conv(in_channels * self.expansion, use_bias=False, name="expand")(y)
      y = self.norm(activation="swish", name="expand_bn")(y)
    y = layers.DepthwiseConv(self.kernel_size, self.strides, self.kernels, self.dtype,
                             self.param_dtype, name="depthwise")(y)
    y = self.norm(activation="swish", name="depthwise_bn")(y)
    if self.se_ratio:
      # Squeeze-excite width is a fraction of the block's *input* channels (as in Keras).
      squeezed = max(1, int(in_channels * self.se_ratio))
      s = jnp.mean(y, axis=(1, 2), keepdims=True)
      s = nn.swish(conv(squeezed, use_bias=True, name="se_reduce")(s))
      s = nn.sigmoid(conv(y.shape[-1], use_bias=True, name="se_expand")(s))
      y = y * s
    y = conv(self.out_channels, use_bias=False, name="project")(y)
    y = self.norm(name="project_bn")(y)
    if self.strides == 1 and in_channels == self.out_channels:
      if train and self.drop_rate > 0:
        # Stochastic depth (Huang et al. 2016): drop the whole residual branch per example.
        keep = 1.0 - self.drop_rate
        mask = jax.random.bernoulli(self.make_rng("dropout"), keep, (y.shape[0], 1, 1, 1))
        y = jnp.where(mask, y / keep, jnp.zeros_like(y))
      y = x + y
    return y


class EfficientNet(nn.Module):
  """EfficientNet backbone + global pooling + Dense(2K) head; images ``[B, H, W, 3]`` in [0, 1] -> ``[B, K, 2]``.

  Attributes:
    num_landmarks: K.
    width_coefficient, depth_coefficient: compound scaling (see :data:`VARIANTS`).
    width_multiplier: an extra channel scale on top of ``width_coefficient`` (tiny variants).
    depth_multiplier: an extra scale of the repeats (tiny variants).
    top_channels: channels of the final 1x1 conv before scaling (1280 in the paper).
    dropout_rate: dropout before the head.
    stochastic_depth_rate: drop probability of the last block's residual branch, linearly growing
      from 0 over the blocks (Keras' ``drop_connect_rate``).
    kernels, dtype, param_dtype, bn_momentum, bn_epsilon: as in MobileNetV2.
  """
  num_landmarks: int
  width_coefficient: float = 1.0
  depth_coefficient: float = 1.0
  width_multiplier: float = 1.0
  depth_multiplier: float = 1.0
  top_channels: int = 1280
  dropout_rate: float = 0.2
  stochastic_depth_rate: float = 0.2
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
    width = self.width_coefficient * self.width_multiplier
    depth = self.depth_coefficient * self.depth_multiplier
    norm = layers.batch_norm(train=train, momentum=self.bn_momentum, epsilon=self.bn_epsilon,
                             dtype=self.dtype, param_dtype=self.param_dtype, kernels=self.kernels,
                             batch_mask=batch_mask, axis_name=sync_axis)
    x = layers.normalize_images(images, self.dtype)
    x = nn.Conv(round_filters(32, width), (3, 3), strides=(2, 2), padding="SAME", use_bias=False,
                dtype=self.dtype, param_dtype=self.param_dtype, kernel_init=layers.conv_init,
                name="stem")(x)
    x = norm(activation="swish", name="stem_bn")(x)
    total_blocks = sum(max(1, round_repeats(stage.repeats, depth)) for stage in BASE_STAGES)
    block = 0
    for stage in BASE_STAGES:
      out_channels = round_filters(stage.out_channels, width)
      for repeat in range(max(1, round_repeats(stage.repeats, depth))):
        x = MBConv(out_channels, stage.kernel_size, stage.strides if repeat == 0 else 1, stage.expansion,
                   stage.se_ratio, self.stochastic_depth_rate * block / total_blocks, self.kernels, norm, self.dtype, self.param_dtype,
                   name=f"block{block}")(x, train=train)
        block += 1
    x = layers.PointwiseConv(round_filters(self.top_channels, width), kernels=self.kernels,
                             dtype=self.dtype, param_dtype=self.param_dtype, name="top")(x)
    x = norm(activation="swish", name="top_bn")(x)
    return layers.RegressionHead(self.num_landmarks, self.dropout_rate, self.param_dtype,
                                 name="head")(x, train=train)
