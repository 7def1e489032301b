"""Export a trained student, with its preprocessing, for runtimes without JAX (paper Section 4.6, Table 6).

Usage::

  python -m kd_landmarks.export --workdir RUN [--model student_kd] [--checkpoint MODEL_DIR] \
      --format onnx [--quantize] [--out DIR] [--data_dir DATA]

The exported graph takes what a camera gives: the face crop as RGB **uint8** ``[B, S, S, 3]`` (NHWC,
S = ``image_size`` of model.json, cut as in :func:`kd_landmarks.predict.crop_for_landmark_box`) and returns
``landmarks`` float32 ``[B, K, 2]`` in normalised crop coordinates (``px = (n + 0.5) * S - 0.5``). The
division by 255 and the model's own input normalisation are inside the graph.

Formats:
  * ``onnx``: float32 via jax2onnx (``<model dir name>.onnx``, e.g. ``student_kd.onnx``); with
    ``--quantize`` also a statically quantised int8 QDQ model (``student_kd.int8.onnx``,
    onnxruntime.quantization, per-channel weights, activations calibrated on face crops: the training
    split when ``--data_dir`` is given, else the real fixture photo). Teachers export the same way.
  * TFLite/LiteRT: no converter route works here without TensorFlow (jax2tf and ai-edge-torch need it; the
    ``ai-edge-litert`` package is an interpreter only), so it is not offered. Convert the ONNX file with
    a TensorFlow-based tool (e.g. onnx2tf) on a machine that has TensorFlow.

Every export is checked: the float32 ONNX output must match JAX within ``FP32_TOLERANCE`` on the check
images, or the export fails; the quantised model's error is measured and written to ``export.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import types
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from kd_landmarks import checkpoint
from kd_landmarks import coords
from kd_landmarks import datasets
from kd_landmarks import predict
from kd_landmarks.datasets import images as image_io
from kd_landmarks.datasets import info
from kd_landmarks.datasets import readers
from kd_landmarks.models import native

# Max |ONNX - JAX| in normalised coordinates (1e-4 = 0.02 px of a 224 px crop).
FP32_TOLERANCE = 1e-4
INPUT_NAME = "image"
OUTPUT_NAME = "landmarks"
# The paper's MobileNetV2 student file size (Table 6).
PAPER_MODEL_SIZE_MB = 3.2
FIXTURE_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests", "data",
                           "takeo")


def serving_function(module, variables):
  """uint8 RGB crops ``[B, S, S, 3]`` -> normalised landmarks ``[B, K, 2]``: the function exported."""
  # The lax depthwise convolution maps to ONNX's native grouped Conv and a 1x1 'conv' to a Conv; the
  # CPU-training implementations (shifted slices, channel dots) would export as dozens of Slice/Mul
  # nodes and as Einsums between layout transposes, which ONNX Runtime cannot fuse (2.5x slower).
  # Same parameters, same mathematics.
  fields = getattr(module, "__dataclass_fields__", {})
  if "depthwise_impl" in fields:
    module = module.clone(depthwise_impl="lax")
  if "pointwise_impl" in fields:
    module = module.clone(pointwise_impl="conv")
  # A model trained on an accelerator computes in bfloat16; mobile runtimes (and ONNX Runtime's CPU Conv)
  # want float32, and the parameters are float32 already.
  if "dtype" in getattr(module, "__dataclass_fields__", {}):
    module = module.clone(dtype=jnp.float32)

  def serve(images_uint8):
    return module.apply(variables, images_uint8.astype(jnp.float32) / 255.0, train=False)

  return serve


def to_onnx_model(module, variables, image_size: int, *, model_name: str = "kd_landmarks_student"):
  """Traces the serving function with jax2onnx; returns an ``onnx.ModelProto`` with a dynamic batch."""
  from jax2onnx import to_onnx  # Optional dependency (export only).

  # jax2onnx takes any object with .shape/.dtype; a string dimension makes the batch dynamic.
  spec = types.SimpleNamespace(shape=("B", int(image_size), int(image_size), 3), dtype=np.uint8)
  proto = to_onnx(serving_function(module, variables), [spec], model_name=model_name,
                  input_names=[INPUT_NAME], output_names=[OUTPUT_NAME])
  # jax2onnx 0.17 annotates some intermediate values with NHWC shapes where its graph holds NCHW; ONNX
  # Runtime then warns on every load and its quantiser's shape inference fails. The annotations are
  # optional (ONNX Runtime infers shapes itself), so drop them.
  del proto.graph.value_info[:]
  relu6_as_clip(proto)
  input_normalization_to_nchw(proto)
  return proto


def input_normalization_to_nchw(model) -> bool:
  """Moves the per-channel input normalisation past the NHWC -> NCHW transpose, in place.

  The serving function's ``x / 255``, ``- mean``, ``/ std`` run on the NHWC image, where each op
  broadcasts a 3-vector over the last axis; jax2onnx emits them before the transpose that feeds the
  first Conv. ONNX Runtime runs that broadcast slowly, and its int8 quantiser turns the ops into
  QLinearMul/QLinearAdd (together 1.7 ms of a 6 ms int8 MobileNetV2, one core). Rewritten as
  ``Cast -> Transpose -> BatchNormalization`` (scale and bias composed from the constants, mean 0,
  variance 1, epsilon 0): the same affine map per channel, in the layout ONNX Runtime is fast in, and
  one op the quantiser leaves in float. Returns whether the pattern was found.
  """
  from onnx import helper  # Optional dependency (export only).
  from onnx import numpy_helper  # Optional dependency (export only).

  graph = model.graph
  constants = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
  producers = {out: node for node in graph.node for out in node.output}
  transpose = next((n for n in graph.node if n.op_type == "Transpose" and
                    [a.ints for a in n.attribute if a.name == "perm"] == [[0, 3, 1, 2]]), None)
  if transpose is None:
    return False
  # Walk back from the transpose through elementwise ops with a constant right-hand side.
  chain, value = [], transpose.input[0]
  while value in producers and producers[value].op_type in ("Div", "Sub", "Mul", "Add"):
    node = producers[value]
    if len(node.input) != 2 or node.input[1] not in constants:
      return False
    chain.append(node)
    value = node.input[0]
  channels = None
  scale, bias = np.float64(1.0), np.float64(0.0)
  for node in reversed(chain):  # Compose x -> scale * x + bias in the order the ops run.
    constant = constants[node.input[1]].astype(np.float64)
    if constant.size not in (1, constant.shape[-1] if constant.ndim else 1):
      return False
    constant = constant.reshape(-1)
    channels = constant.size if constant.size > 1 else channels
    if node.op_type == "Div":
      scale, bias = scale / constant, bias / constant
    elif node.op_type == "Mul":
      scale, bias = scale * constant, bias * constant
    elif node.op_type == "Sub":
      bias = bias - constant
    else:
      bias = bias + constant
  chain_outputs = {node.output[0] for node in chain}
  consumers = [n for n in graph.node for name in n.input if name in chain_outputs]
  if not chain or channels is None or len(consumers) != len(chain):  # Used elsewhere: leave it.
    return False
  scale = np.broadcast_to(scale, (channels,)).astype(np.float32)
  bias = np.broadcast_to(bias, (channels,)).astype(np.float32)
  names = [f"input_normalization_{part}" for part in ("scale", "bias", "mean", "var")]
  for name, array in zip(names, (scale, bias, np.zeros(channels, np.float32), np.ones(channels, np.float32))):
    graph.initializer.append(numpy_helper.from_array(array, name))
  transposed = transpose.output[0] + "_raw"
  normalise = helper.make_node("BatchNormalization", [transposed] + names, [transpose.output[0]],
                               epsilon=0.0, name="input_normalization")
  transpose.input[0] = value
  transpose.output[0] = transposed
  chain_ids = {id(node) for node in chain}
  nodes = []
  for node in graph.node:
    if id(node) in chain_ids:
      continue
    nodes.append(node)
    if node is transpose:
      nodes.append(normalise)
  del graph.node[:]
  graph.node.extend(nodes)
  used = {name for node in graph.node for name in node.input}
  unused = [t for t in graph.initializer if t.name not in used]
  for tensor in unused:  # The chain's constants (ONNX Runtime warns about each on every load).
    graph.initializer.remove(tensor)
  return True


def relu6_as_clip(model) -> int:
  """Rewrites ReLU6 exported as ``Min(Max(x, 0), 6)`` into ``Clip(x, 0, 6)``, in place; returns the count.

  Same values, but ONNX Runtime fuses a Conv followed by Clip into one kernel and does not fuse the
  Max/Min pair: 1.6x faster for MobileNetV2 at batch 1 (24 ms vs 40 ms, untrained, one thread of the
  shared 2-core CPU), and the int8 quantiser then sees Conv+Clip, which it also fuses.
  """
  from onnx import helper  # Optional dependency (export only).
  from onnx import numpy_helper  # Optional dependency (export only).

  graph = model.graph
  constants = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
  consumers: dict[str, list] = {}
  for node in graph.node:
    for name in node.input:
      consumers.setdefault(name, []).append(node)

  def is_scalar(name, value):
    return name in constants and constants[name].size == 1 and float(constants[name].reshape(())) == value

  rewritten, dropped, nodes = 0, set(), []
  for node in graph.node:
    if id(node) in dropped:
      continue
    users = consumers.get(node.output[0], []) if node.output else []
    if (node.op_type == "Max" and len(node.input) == 2 and is_scalar(node.input[1], 0.0) and
        len(users) == 1 and users[0].op_type == "Min" and list(users[0].input[:1]) == [node.output[0]] and
        is_scalar(users[0].input[1], 6.0) and node.output[0] not in {o.name for o in graph.output}):
      minimum = users[0]
      nodes.append(helper.make_node("Clip", [node.input[0], node.input[1], minimum.input[1]],
                                    [minimum.output[0]], name=f"{node.name}_relu6"))
      dropped.add(id(minimum))
      rewritten += 1
    else:
      nodes.append(node)
  del graph.node[:]
  graph.node.extend(nodes)
  return rewritten


def ort_session(path: str, *, threads: int = 1):
  """An ONNX Runtime CPU session (``threads`` intra-op threads; errors only in the log)."""
  import onnxruntime as ort  # Optional dependency (export only).

  options = ort.SessionOptions()
  options.intra_op_num_threads = threads
  options.inter_op_num_threads = 1
  options.log_severity_level = 3
  return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def run_onnx(session, images_uint8) -> np.ndarray:
  return session.run([OUTPUT_NAME], {INPUT_NAME: np.ascontiguousarray(images_uint8, dtype=np.uint8)})[0]


def quantize_static_int8(float_path: str, int8_path: str, calibration_images: np.ndarray) -> str:
  """int8 QDQ quantisation: per-channel symmetric weights, activation ranges calibrated (MinMax) on
  ``calibration_images`` (uint8 ``[N, S, S, 3]``), which should be real face crops."""
  from onnxruntime import quantization as q  # Optional dependency (export only).

  class _Reader(q.CalibrationDataReader):

    def __init__(self, images):
      self._batches = iter([{INPUT_NAME: image[None]} for image in images])

    def get_next(self):
      return next(self._batches, None)

  # Fold batch norm into the convolutions first (ONNX Runtime's recommended pre-processing): otherwise
  # each BatchNormalization gets its own quantise/dequantise pair, which costs accuracy and makes the
  # int8 model slower than the float one (untrained full MobileNetV2, 1 thread of the shared 2-core CPU:
  # 98 ms int8 vs 60 ms float; folded: 55 ms).
  from onnxruntime.quantization import shape_inference  # Optional dependency (export only).

  prepared_path = int8_path + ".prepared.onnx"
  shape_inference.quant_pre_process(float_path, prepared_path, skip_symbolic_shape=True)
  try:
    q.quantize_static(prepared_path, int8_path, _Reader(np.asarray(calibration_images, dtype=np.uint8)),
                      quant_format=q.QuantFormat.QDQ, per_channel=True,
                      activation_type=q.QuantType.QUInt8,
                      weight_type=q.QuantType.QInt8, calibrate_method=q.CalibrationMethod.MinMax)
  finally:
    os.remove(prepared_path)
  return int8_path


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


def dataset_crops(dataset: str, split: str, data_dir: str, image_size: int, *, count: int = 64):
  """Evaluation crops of ``count`` evenly spaced stored examples of a prepared split."""
  source = datasets.load_split(dataset, split, data_dir)
  crops = []
  for index in np.unique(np.linspace(0, len(source) - 1, min(count, len(source))).round().astype(int)):
    example = source[int(index)]
    box = coords.square_box_from_landmarks(np.asarray(example["landmarks"]))
    crop, _ = predict.crop_for_landmark_box(np.asarray(example["image"]), box, image_size=image_size,
                                            box_scale=predict.eval_box_scale())
    crops.append(np.round(crop * 255.0).astype(np.uint8))
  return np.stack(crops)


@native.no_build()  # Inference: the native CPU kernels only serve training; never compile them here.
def export_onnx(module, variables, meta: dict, out_dir: str, *, quantize: bool = False,
                check_images: np.ndarray | None = None, calibration_images: np.ndarray | None = None,
                name: str = "student") -> dict:
  """Writes ``out_dir/<name>.onnx`` (and ``<name>.int8.onnx``), checks them against JAX, and returns
  (and writes to ``out_dir/export.json``) what was made: paths, sizes, max errors, export time."""
  image_size = int(meta["image_size"])
  os.makedirs(out_dir, exist_ok=True)
  if check_images is None:
    check_images = fixture_crops(image_size, count=4)
  check_images = np.asarray(check_images, dtype=np.uint8)
  expected = np.asarray(jax.jit(serving_function(module, variables))(check_images))

  start = time.perf_counter()
  proto = to_onnx_model(module, variables, image_size)
  float_path = os.path.join(out_dir, f"{name}.onnx")
  with open(float_path, "wb") as f:
    f.write(proto.SerializeToString())
  report = {"model": meta.get("model"), "num_landmarks": int(meta["num_landmarks"]),
            "image_size": image_size, "checkpoint": meta.get("checkpoint"),
            "input": {"name": INPUT_NAME, "dtype": "uint8", "shape": ["B", image_size, image_size, 3],
                      "layout": "NHWC RGB face crop"},
            "output": {"name": OUTPUT_NAME, "dtype": "float32", "shape": ["B", int(meta["num_landmarks"]), 2],
                       "units": "normalised crop coordinates: px = (n + 0.5) * image_size - 0.5"},
            "export_seconds": round(time.perf_counter() - start, 1),
            "check_images": int(len(check_images))}
  error = float(np.abs(run_onnx(ort_session(float_path), check_images) - expected).max())
  report["float32"] = {"path": float_path, "size_mb": round(os.path.getsize(float_path) / 1e6, 3),
                       "max_abs_error_vs_jax": error}
  if not error <= FP32_TOLERANCE:
    raise RuntimeError(f"{float_path}: ONNX Runtime differs from JAX by {error:.3g} > {FP32_TOLERANCE} "
                       "(normalised units); the export is wrong, do not ship it")
  if quantize:
    if calibration_images is None:
      calibration_images = fixture_crops(image_size)
    int8_path = quantize_static_int8(float_path, os.path.join(out_dir, f"{name}.int8.onnx"),
                                     calibration_images)
    int8_error = np.abs(run_onnx(ort_session(int8_path), check_images) - expected)
    report["int8"] = {"path": int8_path, "size_mb": round(os.path.getsize(int8_path) / 1e6, 3),
                      "paper_table6_size_mb": PAPER_MODEL_SIZE_MB,
                      "calibration_images": int(len(calibration_images)),
                      "max_abs_error_vs_jax": float(int8_error.max()),
                      # In pixels of the crop: what the quantisation costs on the landmarks.
                      "mean_px_error_vs_jax": float(
                          np.linalg.norm(int8_error * image_size, axis=-1).mean())}
  with open(os.path.join(out_dir, "export.json"), "w") as f:
    json.dump(report, f, indent=1)
  return report


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m kd_landmarks.export",
                                   description="Export a trained student to ONNX (float32, int8).")
  parser.add_argument("--workdir")
  parser.add_argument("--model", default="student_kd")
  parser.add_argument("--checkpoint", help="a model directory (overrides WORKDIR/MODEL)")
  parser.add_argument("--format", default="onnx", choices=["onnx", "tflite"])
  parser.add_argument("--quantize", action="store_true", help="also write a static int8 model")
  parser.add_argument("--out", help="default: MODEL_DIR/export")
  parser.add_argument("--data_dir", help="calibrate int8 on the model's training split from here")
  parser.add_argument("--calibration_images", type=int, default=64)
  args = parser.parse_args(argv)
  if args.format == "tflite":
    parser.error("TFLite export needs TensorFlow (jax2tf / ai-edge-torch), which kd_landmarks keeps out; "
                 "export ONNX and convert it with onnx2tf on a machine with TensorFlow (docs/deploy.md)")
  model_dir = predict.resolve_model_dir(args.workdir, args.model, args.checkpoint)
  module, variables, meta = checkpoint.load_inference_variables(model_dir)
  calibration = None
  if args.quantize and args.data_dir:
    calibration = dataset_crops(meta["dataset"], info.get_info(meta["dataset"]).train_split,
                                args.data_dir, int(meta["image_size"]), count=args.calibration_images)
  # Files are named after the model directory (student_kd.onnx, teacher_tough.onnx, ...).
  report = export_onnx(module, variables, meta, args.out or os.path.join(model_dir, "export"),
                       quantize=args.quantize, calibration_images=calibration,
                       name=os.path.basename(os.path.normpath(model_dir)))
  print(json.dumps(report, indent=1))
  return 0


if __name__ == "__main__":
  sys.exit(main())
