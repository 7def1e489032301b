"""Models: the MobileNetV2 student and EfficientNet teachers, built by name from one table.

``create_model(name, *, num_landmarks, **overrides)`` returns a ``flax.linen.Module`` whose
``apply(variables, images, train=..., mutable=[...])`` maps RGB images ``[B, H, W, 3]`` in [0, 1]
to landmarks ``[B, K, 2]`` (float32, normalised coordinates). Variables: ``params``, ``batch_stats``.
Training with ``train=True`` needs ``mutable=['batch_stats']`` and a ``'dropout'`` rng.
"""
from __future__ import annotations

import dataclasses

from kd_landmarks.models import layers
from kd_landmarks.models.layers import PORTABLE, Kernels
from kd_landmarks.models.efficientnet import VARIANTS as _EFFICIENTNET_VARIANTS
from kd_landmarks.models.efficientnet import EfficientNet
from kd_landmarks.models.mobilenet_v2 import MobileNetV2


def _efficientnet(variant):
  width, depth, _, dropout = _EFFICIENTNET_VARIANTS[variant]
  return EfficientNet, dict(width_coefficient=width, depth_coefficient=depth, dropout_rate=dropout)


# name -> (module class, default fields). Tiny variants: the same code with small width and depth,
# for tests and the CPU demo.
_REGISTRY = {
    "mobilenet_v2": (MobileNetV2, {}),
    # Keras' narrower MobileNetV2s (alpha 0.75 / 0.5 / 0.35): lighter students for phones, where the
    # paper's 224 px network is 2.5-3x MediaPipe's latency (docs/deploy.md, "Measured").
    **{f"mobilenet_v2_{tag}": (MobileNetV2, dict(width_multiplier=alpha))
       for tag, alpha in (("075", 0.75), ("050", 0.5), ("035", 0.35))},
    "mobilenet_v2_tiny": (MobileNetV2, dict(width_multiplier=0.25, depth_multiplier=0.34,
                                            last_channels=128)),
    **{f"efficientnet_{v}": _efficientnet(v) for v in _EFFICIENTNET_VARIANTS},
    **{f"efficientnet_{v}_tiny": (_efficientnet(v)[0], dict(
        _efficientnet(v)[1], width_multiplier=0.25, depth_multiplier=0.34, top_channels=256))
       for v in _EFFICIENTNET_VARIANTS},
}

MODEL_NAMES = tuple(_REGISTRY)


def create_model(name: str, *, num_landmarks: int, kernels: Kernels = PORTABLE, **overrides):
  """Builds the module called ``name`` (see :data:`MODEL_NAMES`) with ``overrides`` of its fields.

  ``kernels`` (:class:`layers.Kernels`) computes the layers; it changes neither parameters nor mathematics, so
  variables trained with one set are evaluated and exported with another.

  Raises ValueError naming the known models (unknown ``name``) or the module's fields (unknown
  override), so that a config typo says what to write instead.
  """
  try:
    module_class, defaults = _REGISTRY[name]
  except KeyError:
    raise ValueError(f"unknown model: {name!r}; choose from {list(MODEL_NAMES)}") from None
  if not isinstance(num_landmarks, int) or num_landmarks <= 0:
    raise ValueError(f"num_landmarks must be a positive int, got {num_landmarks!r}")
  fields = {f.name for f in dataclasses.fields(module_class)} - {"parent", "name", "num_landmarks", "kernels"}
  unknown = sorted(set(overrides) - fields)
  if unknown:
    raise ValueError(f"unknown override(s) {unknown} for model {name!r}; its fields are {sorted(fields)}")
  return module_class(num_landmarks=num_landmarks, kernels=kernels, **{**defaults, **overrides})


def with_kernels(module, kernels: Kernels):
  """``module`` computing with ``kernels`` (the same variables and function); a module of another kind (a test
  stand-in, an exported graph's wrapper) is returned as it is."""
  if "kernels" in getattr(module, "__dataclass_fields__", {}):
    return module.clone(kernels=kernels)
  return module


__all__ = ["create_model", "with_kernels", "MODEL_NAMES", "Kernels", "PORTABLE", "MobileNetV2", "EfficientNet"]
