"""The depthwise weight gradient's two native loops against each other and against XLA's, in one run.

``kd_landmarks/cpu/native/depthwise_cpu.cc`` has a per-row loop (one pass per output row over all channels, for large
images) and a register-blocked one (all k*k tap sums in registers per image and 8 channels, for images that fit
in L2); ``method='auto'`` picks by the image's bytes (``kSmallImageBytes``) and is what
``kd_landmarks.cpu.kernels.depthwise_conv_native`` calls. This times both, 'auto', and two weight gradients in
XLA: the grouped convolution's (``jax.vjp`` of the portable ``kd_landmarks.models.depthwise.depthwise_conv``,
column 'lax') and the batch-folded sum over shifted slices of ``kd_landmarks.cpu.kernels.depthwise_conv_xla``
(what CPU training computes where the native kernels do not build, column 'xla'), at the demo's layer shapes
(batch 32, 4-32 px) and at MobileNetV2 / EfficientNet layers at 224 px (batch 8), on every thread the process
has, and prints the medians and the ratios.

  python benchmarks/depthwise_gradient.py
  taskset -c 0 python benchmarks/depthwise_gradient.py --repeats 50
  python benchmarks/depthwise_gradient.py --quick      # the demo's first two shapes, 2 repeats: checks it runs
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from kd_landmarks.cpu import kernels  # noqa: E402
from kd_landmarks.cpu import native  # noqa: E402
from kd_landmarks.models import depthwise  # noqa: E402
from kd_landmarks.training import machine  # noqa: E402

# (batch, size, channels, stride, kernel): the demo's student at 64 px, then 224 px networks' layers.
SHAPES = [(32, 32, 8, 1, 3), (32, 32, 48, 2, 3), (32, 16, 72, 1, 3), (32, 16, 72, 2, 3), (32, 8, 96, 1, 3),
          (32, 4, 192, 1, 3),
          (8, 112, 32, 1, 3), (8, 112, 96, 2, 3), (8, 56, 144, 2, 3), (8, 28, 192, 1, 3), (8, 14, 576, 1, 3),
          (8, 7, 960, 1, 3), (8, 28, 240, 1, 5), (8, 14, 672, 1, 5)]


def _median_ms(fn, args, repeats):
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return 1000 * float(np.median(times))


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--repeats", type=int, default=20)
  parser.add_argument("--quick", action="store_true", help="the first two shapes, 2 repeats: checks that it runs")
  args = parser.parse_args(argv)
  shapes = SHAPES[:2] if args.quick else SHAPES
  repeats = 2 if args.quick else args.repeats
  if not native.available():
    sys.exit(f"native kernels unavailable: {native.unavailable_reason()}")
  print(f"CPU {machine.cpu_description()}", flush=True)
  rng = np.random.default_rng(0)
  print(f"{'x shape, stride, k':32s} {'KB/image':>8s} {'rows ms':>8s} {'registers':>9s} {'auto':>8s} {'lax':>8s} "
        f"{'xla':>8s} {'rows/reg':>8s} {'lax/auto':>8s} {'xla/auto':>8s}")
  for batch, size, channels, stride, k in shapes:
    x = jnp.asarray(rng.normal(size=(batch, size, size, channels)), jnp.float32)
    out = -(-size // stride)
    g = jnp.asarray(rng.normal(size=(batch, out, out, channels)), jnp.float32)
    pads = (depthwise.same_padding(size, k, stride)[0],) * 2
    times = {}
    for method in ("rows", "registers", "auto"):
      fn = jax.jit(lambda x, g, m=method: native.depthwise_weight_gradient(x, g, (k, k), stride, pads, method=m))
      times[method] = _median_ms(fn, (x, g), repeats)
    kernel = jnp.zeros((k, k, 1, channels), jnp.float32)
    # The weight gradient alone: jit drops the input gradient, which nothing reads.
    for name, conv in (("lax", depthwise.depthwise_conv), ("xla", kernels.depthwise_conv_xla)):
      fn = jax.jit(lambda x, g, conv=conv: jax.vjp(lambda w: conv(x, w, strides=stride), kernel)[1](g)[0])
      times[name] = _median_ms(fn, (x, g), repeats)
    image_kb = (size * size + out * out) * channels * 4 / 1024
    print(f"{str(tuple(x.shape)) + f' s{stride} k{k}':32s} {image_kb:8.0f} {times['rows']:8.3f} "
          f"{times['registers']:9.3f} {times['auto']:8.3f} {times['lax']:8.3f} {times['xla']:8.3f} "
          f"{times['rows'] / times['registers']:7.2f}x {times['lax'] / times['auto']:7.2f}x "
          f"{times['xla'] / times['auto']:7.2f}x", flush=True)


if __name__ == "__main__":
  main()
