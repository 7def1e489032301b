"""Export a trained student, with its preprocessing, for runtimes without JAX (paper Section 4.6, Table 6).

Usage::

  python -m kd_landmarks.deploy.export --workdir RUN [--model student_kd] [--checkpoint MODEL_DIR] \
      --format onnx|tflite [--quantize] [--out DIR] [--data_dir DATA]
  kd-landmarks-export ...      (the same, as the installed console script)

The exported graph takes what a camera gives: the face crop as RGB **uint8** ``[B, S, S, 3]`` (NHWC,
S = ``image_size`` of model.json, cut as in :func:`kd_landmarks.deploy.predict.crop_for_landmark_box`) and returns
``landmarks`` float32 ``[B, K, 2]`` in normalised crop coordinates (``px = (n + 0.5) * S - 0.5``). The
division by 255 and the model's own input normalisation are inside the graph.

Formats:
  * ``onnx``: float32 via jax2onnx (``<model dir name>.onnx``, e.g. ``student_kd.onnx``); with
    ``--quantize`` also a statically quantised int8 QDQ model (``student_kd.int8.onnx``,
    onnxruntime.quantization, per-channel weights, activations calibrated on face crops: the training
    split when ``--data_dir`` is given, else the real fixture photo). Teachers export the same way.
  * ``tflite``: float32 ``<name>.tflite`` (and int8 ``<name>.int8.tflite`` with ``--quantize``) through
    jax2tf + ``tf.lite.TFLiteConverter`` (:mod:`kd_landmarks.deploy.export_tflite`; extra ``tflite``, TensorFlow
    imported only there), checked with ai-edge-litert's interpreter.

Every export is checked: the float32 output must match JAX within ``FP32_TOLERANCE`` on the check images,
or the export fails; the quantised model's error is measured and written to ``export.json``. The folder
also receives ``MODEL_CARD.md`` (:mod:`kd_landmarks.deploy.model_card`) and the model's ``box_map.json`` (so that
``kd_landmarks.Predictor.load(<file>)`` frames faces as the model directory does).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import sys
import time
import types
from typing import Sequence

import jax
import numpy as np

from kd_landmarks.training import checkpoint
from kd_landmarks import coords
from kd_landmarks import datasets
from kd_landmarks import errors
from kd_landmarks import files
from kd_landmarks.deploy import detect
from kd_landmarks.training import machine
from kd_landmarks.deploy import model_card
from kd_landmarks.deploy import predict
from kd_landmarks.datasets import info
# The ONNX Runtime session lives with the other runtimes (below export and predict); export.ort_session
# stays its name here for the tests and benchmarks.
from kd_landmarks.deploy.runtimes import ort_session  # noqa: F401
# The exported function's contract, shared with export_tflite (kept importable from here).
from kd_landmarks.deploy.serving import FIXTURE_DIR  # noqa: F401
from kd_landmarks.deploy.serving import FP32_TOLERANCE
from kd_landmarks.deploy.serving import INPUT_NAME
from kd_landmarks.deploy.serving import OUTPUT_NAME
from kd_landmarks.deploy.serving import PAPER_MODEL_SIZE_MB
from kd_landmarks.deploy.serving import fixture_crops
from kd_landmarks.deploy.serving import serving_function

# int8 weight precision. x86 CPUs without VNNI (AVX2-only AMD EPYC, AVX-512 Skylake) multiply uint8
# activations by int8 weights with vpmaddubsw, which adds each pair of products into a saturating int16:
# 2 * 255 * 127 = 64,770 overflows 32,767, and the model silently computes something else (the test model's
# mean error against float32: 0.52 against 0.13 crop px with VNNI). With 7-bit weights the pair is at most
# 2 * 255 * 64 = 32,640 and never saturates, so the file computes the same everywhere; VNNI (vpdpbusd)
# and ARM's dot products accumulate in int32 and never saturate either way. 8 bits stays reachable
# (``--int8_weight_bits 8``) for files that only ever run on such CPUs.
INT8_WEIGHT_BITS = {7: "portable: no int16 saturation on any x86 CPU (onnxruntime reduce_range)",
                    8: "full int8 range: only exact on CPUs with VNNI or on ARM dot-product kernels"}
DEFAULT_INT8_WEIGHT_BITS = 7
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


def run_onnx(session, images_uint8) -> np.ndarray:
  return session.run([OUTPUT_NAME], {INPUT_NAME: np.ascontiguousarray(images_uint8, dtype=np.uint8)})[0]


def quantize_static_int8(float_path: str, int8_path: str, calibration_images: np.ndarray, *,
                         weight_bits: int = DEFAULT_INT8_WEIGHT_BITS) -> str:
  """int8 QDQ quantisation: per-channel symmetric weights, activation ranges calibrated (MinMax) on
  ``calibration_images`` (uint8 ``[N, S, S, 3]``), which should be real face crops.

  ``weight_bits=7`` (the default) quantises the weights to [-64, 64] (onnxruntime's ``reduce_range``), so
  that the file computes the same on every x86 CPU; 8 uses the full int8 range (see ``INT8_WEIGHT_BITS``).
  """
  from onnxruntime import quantization as q  # Optional dependency (export only).

  if weight_bits not in INT8_WEIGHT_BITS:
    raise ValueError(f"weight_bits must be one of {sorted(INT8_WEIGHT_BITS)}, got {weight_bits!r}")

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
    # uint8 activations x int8 weights (U8S8): ONNX Runtime's fast kernels on every CPU. U8U8 was measured
    # too and is portable, but it runs 7.3 ms against float32's 5.7 ms (full student, VNNI Xeon).
    q.quantize_static(prepared_path, int8_path, _Reader(np.asarray(calibration_images, dtype=np.uint8)),
                      quant_format=q.QuantFormat.QDQ, per_channel=True,
                      reduce_range=weight_bits == 7,
                      activation_type=q.QuantType.QUInt8,
                      weight_type=q.QuantType.QInt8, calibrate_method=q.CalibrationMethod.MinMax)
  finally:
    os.remove(prepared_path)
  return int8_path


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


def export_onnx(module, variables, meta: dict, out_dir: str, *, quantize: bool = False,
                check_images: np.ndarray | None = None, calibration_images: np.ndarray | None = None,
                name: str = "student", int8_weight_bits: int = DEFAULT_INT8_WEIGHT_BITS) -> dict:
  """Writes ``out_dir/<name>.onnx`` (and ``<name>.int8.onnx``), checks them against JAX, and returns
  (and merges into ``out_dir/export.json``) what was made: paths, sizes, max errors, export time."""
  image_size = int(meta["image_size"])
  os.makedirs(out_dir, exist_ok=True)
  if check_images is None:
    check_images = fixture_crops(image_size, count=4)
  check_images = np.asarray(check_images, dtype=np.uint8)
  expected = np.asarray(jax.jit(serving_function(module, variables))(check_images))

  start = time.perf_counter()
  proto = to_onnx_model(module, variables, image_size)
  float_path = os.path.join(out_dir, f"{name}.onnx")
  with files.atomic_write(float_path, "wb") as f:  # Never half a model file that predict would try to load.
    f.write(proto.SerializeToString())
  report = {**interface(meta), "export_seconds": round(time.perf_counter() - start, 1),
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
                                     calibration_images, weight_bits=int8_weight_bits)
    int8_error = np.abs(run_onnx(ort_session(int8_path), check_images) - expected)
    report["int8"] = {"path": int8_path, "size_mb": round(os.path.getsize(int8_path) / 1e6, 3),
                      "paper_table6_size_mb": PAPER_MODEL_SIZE_MB,
                      "calibration_images": int(len(calibration_images)),
                      "weight_bits": int(int8_weight_bits),
                      "weight_bits_note": INT8_WEIGHT_BITS[int8_weight_bits],
                      # The CPU that quantised and checked this file (its errors below were measured here).
                      "quantized_on": machine.cpu_description(),
                      "max_abs_error_vs_jax": float(int8_error.max()),
                      # In pixels of the crop: what the quantisation costs on the landmarks.
                      "mean_px_error_vs_jax": float(
                          np.linalg.norm(int8_error * image_size, axis=-1).mean())}
  # Merged: a TFLite export of the same checkpoint in this folder keeps its entries.
  return merge_report(out_dir, meta, report)


def main(argv: Sequence[str] | None = None) -> int:
  """The command line; a mistake the user can fix is one ``error:`` line and exit ``errors.EXIT_CODE``."""
  try:
    return _export_main(argv)
  except errors.UserError as error:
    return errors.report(error)


def _export_main(argv: Sequence[str] | None) -> int:
  parser = argparse.ArgumentParser(prog="kd-landmarks-export",
                                   description="Export a trained student to ONNX or TFLite (float32, int8).")
  parser.add_argument("--workdir")
  parser.add_argument("--model", default="student_kd")
  parser.add_argument("--checkpoint", help="a model directory (overrides WORKDIR/MODEL)")
  parser.add_argument("--format", default="onnx", choices=["onnx", "tflite"])
  parser.add_argument("--quantize", action="store_true", help="also write a static int8 model")
  parser.add_argument("--out", help="default: MODEL_DIR/export")
  parser.add_argument("--data_dir", help="calibrate int8 on the model's training split from here")
  parser.add_argument("--calibration_images", type=int, default=64)
  parser.add_argument("--int8_weight_bits", type=int, default=DEFAULT_INT8_WEIGHT_BITS,
                      choices=sorted(INT8_WEIGHT_BITS),
                      help="7 (default): the int8 file computes the same on every x86 CPU; 8: full range, "
                           "exact only with VNNI or on ARM")
  args = parser.parse_args(argv)
  if args.format == "tflite" and importlib.util.find_spec("tensorflow") is None:
    parser.error("--format tflite needs TensorFlow and ai-edge-litert: pip install 'kd_landmarks[tflite]'")
  model_dir = predict.resolve_model_dir(args.workdir, args.model, args.checkpoint)
  module, variables, meta = checkpoint.load_inference_variables(model_dir)
  calibration = None
  if args.quantize and args.data_dir:
    if meta["dataset"] == info.CUSTOM:  # Its splits are the prepared set's.
      datasets.register_custom(args.data_dir)
    calibration = dataset_crops(meta["dataset"], info.get_info(meta["dataset"]).train_split,
                                args.data_dir, int(meta["image_size"]), count=args.calibration_images)
  out_dir = args.out or os.path.join(model_dir, "export")
  # Files are named after the model directory (student_kd.onnx, teacher_tough.onnx, ...).
  name = os.path.basename(os.path.normpath(model_dir))
  with files.writing(out_dir):
    return _export_to(args, module, variables, meta, model_dir, out_dir, name, calibration)


def _export_to(args, module, variables, meta, model_dir, out_dir, name, calibration) -> int:
  if args.format == "onnx":
    report = export_onnx(module, variables, meta, out_dir, quantize=args.quantize,
                         calibration_images=calibration, name=name, int8_weight_bits=args.int8_weight_bits)
  else:
    from kd_landmarks.deploy import export_tflite  # Imports TensorFlow: only for this format.

    report = merge_report(out_dir, meta, export_tflite.export_tflite(
        module, variables, meta, out_dir, quantize=args.quantize, calibration_images=calibration,
        name=name))
  # The box maps travel with the files: Predictor.load(<file>) then frames faces as the model dir does.
  box_map_path = os.path.join(model_dir, detect.BOX_MAP_JSON)
  if os.path.exists(box_map_path):
    shutil.copyfile(box_map_path, os.path.join(out_dir, detect.BOX_MAP_JSON))
  model_card.write_model_card(out_dir, meta, report, model_dir=model_dir,
                              box_map=detect.load_box_map(model_dir, detect.DEFAULT_DETECTOR),
                              detector=detect.DEFAULT_DETECTOR, box_scale=predict.eval_box_scale())
  print(json.dumps(report, indent=1))
  return 0


def interface(meta: dict) -> dict:
  """The input/output contract of every exported file (export.json's ``input``/``output``)."""
  image_size, num_landmarks = int(meta["image_size"]), int(meta["num_landmarks"])
  return {"model": meta.get("model"), "dataset": meta.get("dataset"), "num_landmarks": num_landmarks,
          "image_size": image_size, "checkpoint": meta.get("checkpoint"),
          "input": {"name": INPUT_NAME, "dtype": "uint8", "shape": ["B", image_size, image_size, 3],
                    "layout": "NHWC RGB face crop"},
          "output": {"name": OUTPUT_NAME, "dtype": "float32", "shape": ["B", num_landmarks, 2],
                     "units": "normalised crop coordinates: px = (n + 0.5) * image_size - 0.5"}}


def merge_report(out_dir: str, meta: dict, entries: dict) -> dict:
  """Adds ``entries`` to ``out_dir/export.json``, keeping the other format's entries when they were
  exported from the same checkpoint (else they are stale and dropped); writes and returns the result."""
  path = os.path.join(out_dir, "export.json")
  report = interface(meta)
  if os.path.exists(path):
    with open(path) as f:
      existing = json.load(f)
    if existing.get("checkpoint") == json.loads(json.dumps(meta.get("checkpoint"))):
      report = {**existing, **report}
  report.update(entries)
  with files.atomic_write(path) as f:
    json.dump(report, f, indent=1)
  return report


if __name__ == "__main__":
  sys.exit(main())
