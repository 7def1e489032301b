"""The CPU training kernels: the models' depthwise convolution, 1x1 convolution and training BatchNorm, and the
augmentation's warp and noise, computed faster on XLA's CPU backend than the portable forms, with the same
parameters and mathematics (tests/test_depthwise.py, test_models.py and test_augment.py compare each with its
portable form by value).

* Depthwise convolution as ``k*k`` shifted, strided slices of the padded input, each scaled per channel
  (XLA fuses the sum into one loop; its own grouped convolution is a slow generic loop on CPU), with a
  hand-written backward pass: the input gradient is the transposed shifts, the weight gradient either XLA's
  batch-folded reduction (:func:`_weight_gradient`) or the native kernel's single pass.
* 1x1 convolution as a ``[B*H*W, Cin] x [Cin, Cout]`` matrix product: XLA's CPU backend computes the
  gradient of a 1x1 ``lax.conv`` about 4x slower than that of a dot (65 vs 15 ms for [8, 56, 56, 144] -> 24).
* Training BatchNorm with the closed-form backward pass (Ioffe & Szegedy 2015, Section 3): with
  ``dz = dy * act'(z)`` and ``xhat = (x - mean) / sqrt(var + eps)``,
  ``dx = scale / sqrt(var + eps) * (dz - mean(dz) - xhat * mean(dz * xhat))``: two reductions and one
  elementwise pass where autodiff of the forward makes several more passes over each activation; the
  reductions in XLA or in one native pass each (float64 totals).
* The augmentation's bilinear warp of uint8 crops and its Gaussian noise as native kernels.
"""
from __future__ import annotations

import functools

import jax
from jax import lax
import jax.numpy as jnp

from kd_landmarks.cpu import native
from kd_landmarks.models import depthwise
from kd_landmarks.models import layers

# ---------------------------------------------------------------------------------------------- depthwise


def depthwise_conv_xla(x, kernel, *, strides: int = 1):
  """:func:`kd_landmarks.models.depthwise.depthwise_conv` as shifted slices, weight gradient in XLA."""
  depthwise.check_shapes(x, kernel)
  return _depthwise_xla(x, kernel.astype(x.dtype), strides)


def depthwise_conv_native(x, kernel, *, strides: int = 1):
  """:func:`depthwise_conv_xla` with the float32 weight gradient in one native pass instead of ``k*k``."""
  depthwise.check_shapes(x, kernel)
  return _depthwise_native(x, kernel.astype(x.dtype), strides)


def _pad_same(x, kh, kw, stride):
  """Zero-pads H and W as ``SAME`` does; returns the padded array, output size and pads."""
  pad_h = depthwise.same_padding(x.shape[1], kh, stride)
  pad_w = depthwise.same_padding(x.shape[2], kw, stride)
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
def _depthwise_xla(x, kernel, stride):
  return _depthwise_shifted(x, kernel, stride)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _depthwise_native(x, kernel, stride):
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


_depthwise_xla.defvjp(_shifted_vjp_fwd, _shifted_vjp_bwd)
_depthwise_native.defvjp(_shifted_vjp_fwd, functools.partial(_shifted_vjp_bwd, weight_gradient_impl="native"))


# ---------------------------------------------------------------------------------------------- pointwise


def pointwise_conv_dot(x, kernel):
  """:func:`kd_landmarks.models.layers.pointwise_conv` as a 2-D matrix product over the channel axis.

  As ``[B*H*W, Cin] x [Cin, Cout]``, the weight gradient is a 2-D dot contracting dimension 0 of both
  operands, which XLA's CPU backend runs in place; contracting (B, H, W) of 4-D operands instead, it
  recomputes the BatchNorm backward into a transposed copy (block1's expand layer: 123 of 1,300 ms at batch 8).
  """
  return lax.dot(x.reshape(-1, x.shape[-1]), kernel[0, 0]).reshape(x.shape[:-1] + (kernel.shape[-1],))


# ---------------------------------------------------------------------------------------------- BatchNorm


def batch_norm_train_xla(x, scale, bias, epsilon, activation):
  """Training BatchNorm + ``activation`` (a :class:`kd_landmarks.models.layers.Kernels` ``batch_norm_train``)
  with the closed-form backward pass, reductions in XLA. Returns ``(y float32, mean, var)``."""
  layers.check_activation(activation)
  return _batch_norm_act_train(x, scale, bias, epsilon, activation, "xla")


def batch_norm_train_native(x, scale, bias, epsilon, activation):
  """:func:`batch_norm_train_xla` with the moments and the two backward reductions in one native pass each
  (float32 ``x``; other dtypes keep XLA's reductions)."""
  layers.check_activation(activation)
  return _batch_norm_act_train(x, scale, bias, epsilon, activation, "native")


def _uses_native(x, impl):
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
  return (layers.activation_fn(z, activation), mean, var), (x, mean, inv, raw_var > 0.0, scale, bias)


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


def _activation_derivative(z, activation):
  if activation == "relu6":  # 0 at the kinks, as jax.nn.relu6's custom JVP.
    return ((z > 0.0) & (z < 6.0)).astype(z.dtype)
  if activation == "swish":
    sigmoid = jax.nn.sigmoid(z)
    return sigmoid * (1.0 + z * (1.0 - sigmoid))
  return jnp.ones_like(z)


# ------------------------------------------------------------------------------------------- augmentation


def warp_native(image_uint8, out_to_input, out_size, fill_mode, fill_value):
  """The augmentation's bilinear warp (an :class:`kd_landmarks.augment.AugmentKernels` ``warp``) in one native
  pass that reads the uint8 taps directly; under ``jax.vmap`` the whole batch goes in one call."""
  return native.affine_warp(image_uint8, out_to_input, out_size, fill_mode=fill_mode, fill_value=fill_value)


def batch_noise_native(rng, images, noise_std):
  """The augmentation's Gaussian noise for a whole batch (an :class:`kd_landmarks.augment.AugmentKernels`
  ``batch_noise``): the inverse normal CDF at 16-bit uniforms from a table, counter-based bits keyed by
  ``rng``, instead of Box-Muller's log, cos and sin over every pixel."""
  return native.gaussian_noise(rng, images, noise_std)
