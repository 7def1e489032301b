"""CPU training speed-ups behind one switch, ``config.cpu_kernels``.

The models and the augmentation compute with portable JAX by default (``models.PORTABLE``,
``augment.PORTABLE``): what accelerators, export and predict run. Training on the CPU (and the pipeline's own
evaluation there) takes instead the kernels of :mod:`kd_landmarks.cpu.kernels` (the same mathematics, the
same parameters, computed faster on XLA's CPU backend), with the native C++ pieces
(:mod:`kd_landmarks.cpu.native`) where this machine's compiler builds them. Only
``kd_landmarks.training.train`` imports this package (tests/test_imports.py). Each piece is here because it
measured faster on the demo's training loop (docs/performance.md, ``benchmarks/cpu_kernels.py``).
"""
from __future__ import annotations

import dataclasses

from kd_landmarks import augment
from kd_landmarks import models
from kd_landmarks.cpu import kernels
from kd_landmarks.cpu import native


@dataclasses.dataclass(frozen=True)
class TrainingKernels:
  """What a training step computes with: the models' kernels and the augmentation's."""
  model: models.Kernels = models.PORTABLE
  augment: augment.AugmentKernels = augment.PORTABLE
  description: str = "portable"


PORTABLE = TrainingKernels()


def training_kernels(*, use_native: bool | None = None) -> TrainingKernels:
  """The CPU training kernels: native where they build (``use_native`` None: try), else their XLA forms."""
  if use_native is None:
    use_native = native.available()
  if not use_native:
    return TrainingKernels(
        model=models.Kernels(depthwise_conv=kernels.depthwise_conv_xla, pointwise_conv=kernels.pointwise_conv_dot,
                             batch_norm_train=kernels.batch_norm_train_xla),
        description=f"cpu (XLA forms; native kernels unavailable: {native.unavailable_reason()})")
  return TrainingKernels(
      model=models.Kernels(depthwise_conv=kernels.depthwise_conv_native, pointwise_conv=kernels.pointwise_conv_dot,
                           batch_norm_train=kernels.batch_norm_train_native),
      augment=augment.AugmentKernels(warp=kernels.warp_native, batch_noise=kernels.batch_noise_native),
      description="cpu (native kernels)")
