"""Depthwise convolutions, several implementations with identical mathematics.

MobileNetV2 and EfficientNet spend most of their time in depthwise convolutions
(Sandler et al. 2018, Section 3.1; one k x k filter per channel). XLA's CPU
backend lowers ``lax.conv_general_dilated`` with ``feature_group_count == C``
to a slow generic loop (about 50 ms for a MobileNetV2 forward at 224 px on two
cores), while accelerators have fast kernels for it. The implementations here
compute the same function:

  y[b, h, w, c] = sum_{i, j} x_pad[b, s*h + i, s*w + j, c] * kernel[i, j, 0, c]

with TensorFlow/Keras ``SAME`` padding (``x_pad``), stride ``s``:

* ``'lax'``: ``lax.conv_general_dilated`` with ``feature_group_count``; fast on
  GPU/TPU, and what ONNX/TFLite exporters map to a native grouped convolution.
* ``'shifted'``: the sum above written as k*k shifted (strided) slices of
  ``x_pad``, each scaled per channel. XLA fuses the whole sum into one
  elementwise loop; the gradient comes from JAX's autodiff (pads and adds).
* ``'shifted_vjp'``: the same forward with a hand-written backward pass that is
  also made of shifted slices: the weight gradient is, per tap, a sum of the
  products of the output gradient with the tap's slice of ``x_pad`` (batch
  folded first in a fused elementwise loop, then reduced); the input
  gradient is a correlation of the (zero-dilated, for stride 2) output gradient
  with the flipped kernel, i.e. the transposed shifts.
* ``'shifted_native'``: ``'shifted_vjp'`` with the float32 weight gradient computed
  by a C++ kernel (:mod:`kd_landmarks.native`) in one pass over the
  activations instead of k*k; compiled on first use, CPU only.

``'auto'`` resolves, at trace time, to ``'lax'`` on GPU/TPU and on CPU to
``'shifted_native'`` where the native kernel builds, else ``'shifted_vjp'``
(see ``benchmarks/models.py``).
"""
from __future__ import annotations

import functools

import jax
from jax import lax
import jax.numpy as jnp

from kd_landmarks import native

DEPTHWISE_IMPLS = ("auto", "lax", "shifted", "shifted_vjp", "shifted_native")
# benchmarks/models.py on the shared 2-core CPU: 'shifted' and 'shifted_vjp' run the MobileNetV2 forward
# 7-8x faster than 'lax' and the train step about 4x faster. 'shifted_vjp' folds the batch before
# reducing its weight gradient (see _weight_gradient), which took the student's train step at batch 8
# on one core from 4.0 to 5.6 img/s; 'shifted_native' computes that gradient in one pass instead of
# nine (about 100 -> 30 ms of the step), the CPU default where its kernel builds.
CPU_DEFAULT_IMPL = "shifted_native"
CPU_FALLBACK_IMPL = "shifted_vjp"


def resolve_impl(impl: str) -> str:
  """Maps ``'auto'`` to a concrete implementation for the default backend."""
  if impl not in DEPTHWISE_IMPLS:
    raise ValueError(f"unknown depthwise_impl: {impl!r}; choose from {list(DEPTHWISE_IMPLS)}")
  if impl != "auto":
    return impl
  if jax.default_backend() != "cpu":
    return "lax"
  return CPU_DEFAULT_IMPL if native.available() else CPU_FALLBACK_IMPL


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
  """TensorFlow ``SAME`` padding (low, high) for one spatial axis: output ``ceil(size / stride)``."""
  out = -(-size // stride)
  total = max((out - 1) * stride + kernel - size, 0)
  return total // 2, total - total // 2


def depthwise_conv(x, kernel, *, strides: int = 1, impl: str = "auto"):
  """Depthwise convolution of NHWC ``x`` with ``kernel`` ``[kh, kw, 1, C]`` (SAME padding).

  Args:
    x: ``[B, H, W, C]``.
    kernel: ``[kh, kw, 1, C]``, the layout of ``flax.linen.Conv`` with ``feature_group_count=C``.
    strides: the same stride on both spatial axes (1 or 2 in the models here).
    impl: one of :data:`DEPTHWISE_IMPLS`.

  Returns:
    ``[B, ceil(H / s), ceil(W / s), C]`` in ``x``'s dtype (the kernel is cast to it).
  """
  if x.ndim != 4:
    raise ValueError(f"depthwise_conv expects NHWC input of rank 4, got shape {x.shape}")
  kh, kw, one, channels = kernel.shape
  if one != 1 or channels != x.shape[-1]:
    raise ValueError(f"depthwise kernel must be [kh, kw, 1, C={x.shape[-1]}], got {kernel.shape}")
  kernel = kernel.astype(x.dtype)
  impl = resolve_impl(impl)
  if impl == "lax":
    return _depthwise_lax(x, kernel, strides)
  if impl == "shifted":
    return _depthwise_shifted(x, kernel, strides)
  if impl == "shifted_native":
    # Asked for by name: say why not here rather than fail inside the backward pass.
    native.require_requested("depthwise_impl='shifted_native'", off_cpu="'auto' or 'lax'",
                             fallback="depthwise_impl='shifted_vjp'")
    return _depthwise_shifted_native(x, kernel, strides)
  return _depthwise_shifted_vjp(x, kernel, strides)


def _depthwise_lax(x, kernel, stride):
  pads = [same_padding(x.shape[1], kernel.shape[0], stride),
          same_padding(x.shape[2], kernel.shape[1], stride)]
  return lax.conv_general_dilated(
      x, kernel, window_strides=(stride, stride), padding=pads,
      dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=x.shape[-1])


def _pad_same(x, kh, kw, stride):
  """Zero-pads H and W as ``SAME`` does; returns the padded array, output size and pads."""
  pad_h = same_padding(x.shape[1], kh, stride)
  pad_w = same_padding(x.shape[2], kw, stride)
  x_pad = jnp.pad(x, ((0, 0), pad_h, pad_w, (0, 0)))
  out_h = -(-x.shape[1] // stride)
  out_w = -(-x.shape[2] // stride)
  return x_pad, (out_h, out_w), (pad_h, pad_w)


def _tap(x_pad, i, j, out_hw, stride):
  """The slice of ``x_pad`` that tap (i, j) multiplies: rows i, i+s, ..., i+s*(out_h-1)."""
  out_h, out_w = out_hw
  return lax.slice(
      x_pad, (0, i, j, 0),
      (x_pad.shape[0], i + stride * (out_h - 1) + 1, j + stride * (out_w - 1) + 1, x_pad.shape[3]),
      (1, stride, stride, 1))


def _shifted_sum(x_pad, kernel, out_hw, stride):
  kh, kw = kernel.shape[:2]
  out = None
  for i in range(kh):
    for j in range(kw):
      term = _tap(x_pad, i, j, out_hw, stride) * kernel[i, j, 0]
      out = term if out is None else out + term
  return out


def _depthwise_shifted(x, kernel, stride):
  x_pad, out_hw, _ = _pad_same(x, kernel.shape[0], kernel.shape[1], stride)
  return _shifted_sum(x_pad, kernel, out_hw, stride)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _depthwise_shifted_vjp(x, kernel, stride):
  return _depthwise_shifted(x, kernel, stride)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _depthwise_shifted_native(x, kernel, stride):
  return _depthwise_shifted(x, kernel, stride)


def _shifted_vjp_fwd(x, kernel, stride):
  return _depthwise_shifted(x, kernel, stride), (x, kernel)


def _shifted_vjp_bwd(stride, residuals, grad_out, weight_gradient_impl="xla"):
  x, kernel = residuals
  kh, kw = kernel.shape[:2]
  x_pad, out_hw, (pad_h, pad_w) = _pad_same(x, kh, kw, stride)
  # Weight gradient: dL/dk[i, j, c] = sum_{b,h,w} g[b,h,w,c] * x_pad[b, s*h+i, s*w+j, c].
  # Accumulate in float32 so that bfloat16 activations do not lose the sum (the native kernel takes
  # float32 only; other dtypes keep the XLA loops).
  if weight_gradient_impl == "native" and x.dtype == jnp.float32 and grad_out.dtype == jnp.float32:
    grad_kernel = native.depthwise_weight_gradient(x, grad_out, (kh, kw), stride, (pad_h[0], pad_w[0]))
  else:
    grad_kernel = _weight_gradient(x_pad, grad_out, kh, kw, out_hw, stride)
  grad_kernel = grad_kernel.astype(kernel.dtype)
  # Input gradient: the transposed shifts. Scatter g back onto the stride grid (interior zeros for
  # stride 2), pad by k-1 and correlate with the flipped kernel; this yields dL/dx_pad, then crop.
  padded_h, padded_w = x_pad.shape[1], x_pad.shape[2]
  dilated_h = stride * (out_hw[0] - 1) + 1
  dilated_w = stride * (out_hw[1] - 1) + 1
  zero = jnp.zeros((), grad_out.dtype)
  grad_full = lax.pad(grad_out, zero, (
      (0, 0, 0),
      (kh - 1, kh - 1 + padded_h - (dilated_h + kh - 1), stride - 1),
      (kw - 1, kw - 1 + padded_w - (dilated_w + kw - 1), stride - 1),
      (0, 0, 0)))
  flipped = kernel[::-1, ::-1]
  grad_x_pad = _shifted_sum(grad_full, flipped, (padded_h, padded_w), 1)
  grad_x = grad_x_pad[:, pad_h[0]:padded_h - pad_h[1], pad_w[0]:padded_w - pad_w[1], :]
  return grad_x, grad_kernel


def _weight_gradient(x_pad, grad_out, kh, kw, out_hw, stride):
  """``[kh, kw, 1, C]``: per tap, the sum over (b, h, w) of ``grad_out`` times the tap's slice.

  Summed in two stages. First, in one elementwise loop per tap that XLA fuses with the slices (as in
  the forward pass), the batch is folded: ``q[t, b', h, w, c] = sum_k g[k, b', h, w, c] *
  tap_t[k, b', h, w, c]`` over up to 8 batch slices ``k``. Then a plain reduction of the stacked
  ``q`` over (b', h, w). Written as nine direct ``sum(g * tap, axis=(0, 1, 2))`` instead, XLA's CPU
  backend materialises every shifted slice before reducing it, about 3x slower for [8, 112, 112, 96]
  (317 vs 105 ms on one core). The optimization barrier keeps the folded products out of the
  reduction's fusion. Accumulates in float32 when ``grad_out`` is bfloat16.
  """
  acc_dtype = jnp.float32 if grad_out.dtype == jnp.bfloat16 else grad_out.dtype
  batch = grad_out.shape[0]
  fold = max(k for k in range(1, min(batch, 8) + 1) if batch % k == 0)

  def split(a):
    return a.astype(acc_dtype).reshape((fold, batch // fold) + a.shape[1:])

  grad = split(grad_out)
  folded = []
  for i in range(kh):
    for j in range(kw):
      tap = split(_tap(x_pad, i, j, out_hw, stride))
      q = grad[0] * tap[0]
      for k in range(1, fold):
        q = q + grad[k] * tap[k]
      folded.append(q)
  folded = lax.optimization_barrier(jnp.stack(folded))
  return jnp.sum(folded, axis=(1, 2, 3)).reshape(kh, kw, 1, grad_out.shape[-1])


_depthwise_shifted_vjp.defvjp(_shifted_vjp_fwd, _shifted_vjp_bwd)
_depthwise_shifted_native.defvjp(
    _shifted_vjp_fwd, functools.partial(_shifted_vjp_bwd, weight_gradient_impl="native"))
