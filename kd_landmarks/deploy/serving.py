"""The function every exported file computes, and the real face crops every export is checked on.

``serving_function``: uint8 RGB face crops ``[B, S, S, 3]`` (cut as :func:`kd_landmarks.deploy.predict.crop_for_landmark_box`
cuts them) -> normalised landmarks ``[B, K, 2]``, the module in its export-friendly form. Shared by the ONNX
(``export``) and TFLite (``export_tflite``) exporters, so neither imports the other.
"""
from __future__ import annotations

import os

import jax.numpy as jnp
import numpy as np

from kd_landmarks import coords
from kd_landmarks import models
from kd_landmarks.deploy import predict
from kd_landmarks.datasets import images as image_io
from kd_landmarks.datasets import readers

# Max |ONNX - JAX| in normalised coordinates (1e-4 = 0.02 px of a 224 px crop).
FP32_TOLERANCE = 1e-4
INPUT_NAME = "image"
OUTPUT_NAME = "landmarks"
# The paper's MobileNetV2 student file size (Table 6).
PAPER_MODEL_SIZE_MB = 3.2
# The real fixture photo ships inside the package (package_data, BSD-3 notice beside it): every export is
# checked on its crops, and int8 calibrates on it without --data_dir, from an installed wheel too.
FIXTURE_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "takeo")



def serving_function(module, variables):
  """uint8 RGB crops ``[B, S, S, 3]`` -> normalised landmarks ``[B, K, 2]``: the function exported."""
  # The portable kernels: the lax depthwise convolution maps to ONNX's native grouped Conv and a 1x1 conv to a
  # Conv; the CPU-training kernels (shifted slices, channel dots) would export as dozens of Slice/Mul nodes and
  # as Einsums between layout transposes, which ONNX Runtime cannot fuse (2.5x slower). Same parameters, same
  # mathematics.
  module = models.with_kernels(module, models.PORTABLE)
  # A model trained on an accelerator computes in bfloat16; mobile runtimes (and ONNX Runtime's CPU Conv)
  # want float32, and the parameters are float32 already.
  if "dtype" in getattr(module, "__dataclass_fields__", {}):
    module = module.clone(dtype=jnp.float32)

  def serve(images_uint8):
    return module.apply(variables, images_uint8.astype(jnp.float32) / 255.0, train=False)

  return serve


def fixture_crops(image_size: int, *, count: int = 16, seed: int = 0) -> np.ndarray:
  """Face crops of the real fixture photo (takeo) around its annotated landmark box, with the small
  shifts and scalings a detector box brings (so calibration sees more than one framing)."""
  image = image_io.read_image(os.path.join(FIXTURE_DIR, "takeo.ppm"))
  landmarks = readers.read_pts(os.path.join(FIXTURE_DIR, "takeo.pts"))
  cx, cy, side = coords.square_box_from_landmarks(landmarks)
  rng = np.random.default_rng(seed)
  crops = []
  for index in range(count):
    jitter = np.zeros(3) if index == 0 else rng.uniform(-0.05, 0.05, size=3)
    box = (cx + jitter[0] * side, cy + jitter[1] * side, side * (1 + jitter[2]))
    crop, _ = predict.crop_for_landmark_box(image, box, image_size=image_size,
                                            box_scale=predict.eval_box_scale())
    crops.append(np.round(crop * 255.0).astype(np.uint8))
  return np.stack(crops)
