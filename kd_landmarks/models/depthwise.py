"""The depthwise convolution of MobileNetV2 and EfficientNet, and TensorFlow's ``SAME`` padding.

MobileNetV2 and EfficientNet spend most of their time in depthwise convolutions (Sandler et al. 2018,
Section 3.1; one k x k filter per channel):

  y[b, h, w, c] = sum_{i, j} x_pad[b, s*h + i, s*w + j, c] * kernel[i, j, 0, c]

with TensorFlow/Keras ``SAME`` padding (``x_pad``) and stride ``s``. The portable form here is
``lax.conv_general_dilated`` with ``feature_group_count = C``: accelerators have fast kernels for it and
the ONNX and TFLite exporters map it to a native grouped convolution. On XLA's CPU backend it lowers to a
slow generic loop; CPU training replaces it through :class:`kd_landmarks.models.layers.Kernels`
(``kd_landmarks/cpu``), with the same parameters and mathematics.
"""
from __future__ import annotations

from jax import lax


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
  """TensorFlow ``SAME`` padding (low, high) for one spatial axis: output ``ceil(size / stride)``."""
  out = -(-size // stride)
  total = max((out - 1) * stride + kernel - size, 0)
  return total // 2, total - total // 2


def check_shapes(x, kernel) -> None:
  """Raises ValueError unless ``x`` is NHWC and ``kernel`` is ``[kh, kw, 1, C]`` with x's C."""
  if x.ndim != 4:
    raise ValueError(f"depthwise_conv expects NHWC input of rank 4, got shape {x.shape}")
  _, _, one, channels = kernel.shape
  if one != 1 or channels != x.shape[-1]:
    raise ValueError(f"depthwise kernel must be [kh, kw, 1, C={x.shape[-1]}], got {kernel.shape}")


def depthwise_conv(x, kernel, *, strides: int = 1):
  """Depthwise convolution of NHWC ``x`` with ``kernel`` ``[kh, kw, 1, C]`` (SAME padding).

  Args:
    x: ``[B, H, W, C]``.
    kernel: ``[kh, kw, 1, C]``, the layout of ``flax.linen.Conv`` with ``feature_group_count=C``.
    strides: the same stride on both spatial axes (1 or 2 in the models here).

  Returns:
    ``[B, ceil(H / s), ceil(W / s), C]`` in ``x``'s dtype (the kernel is cast to it).
  """
  check_shapes(x, kernel)
  kernel = kernel.astype(x.dtype)
  pads = [same_padding(x.shape[1], kernel.shape[0], strides), same_padding(x.shape[2], kernel.shape[1], strides)]
  return lax.conv_general_dilated(x, kernel, window_strides=(strides, strides), padding=pads,
                                  dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=x.shape[-1])
