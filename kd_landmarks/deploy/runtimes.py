"""One interface over the runtimes a trained student runs in: JAX, ONNX Runtime and LiteRT.

Every runner maps uint8 RGB face crops ``[B, S, S, 3]`` (cut as :func:`kd_landmarks.deploy.predict.crop_for_landmark_box`
cuts them) to landmarks ``[B, K, 2]`` in normalised crop coordinates: the contract of the exported files
(``kd_landmarks.deploy.export``), so the three backends are interchangeable behind :class:`kd_landmarks.Predictor`.

* :class:`JaxRunner`: the model directory's checkpoint, the module as trained (uint8 / 255 in).
* :class:`OnnxRunner`: an exported ``.onnx`` file in ONNX Runtime (extra ``export``).
* :class:`LiteRtRunner`: an exported ``.tflite`` file in ai-edge-litert's interpreter (extra ``tflite``).
"""
from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from kd_landmarks import errors

BACKENDS = ("jax", "onnx", "litert")
EXPORT_JSON = "export.json"
# A .tflite file is a FlatBuffer whose bytes 4-8 are this file identifier.
TFLITE_IDENTIFIER = b"TFL3"
REEXPORT = "export it again with `kd-landmarks-export` (or copy the whole file again)"


class ModelFileError(errors.UserError, ValueError):
  """An exported model file its runtime cannot load or whose shapes contradict its export.json."""


def _first_line(error: BaseException) -> str:
  text = " ".join(str(error).split())
  return f"{type(error).__name__}: {text[:300]}"


def ort_session(path: str, *, threads: int = 1):
  """An ONNX Runtime CPU session (``threads`` intra-op threads; errors only in the log)."""
  import onnxruntime as ort  # Optional: extra 'export'.

  options = ort.SessionOptions()
  options.intra_op_num_threads = threads
  options.inter_op_num_threads = 1
  options.log_severity_level = 3
  return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


class JaxRunner:
  """The student in JAX. Batches are padded to a power of two so that at most log2(B) shapes compile."""

  backend = "jax"

  def __init__(self, module, variables, meta: dict):
    self.meta = dict(meta)
    self.image_size = int(meta["image_size"])
    self.num_landmarks = int(meta["num_landmarks"])
    self.variables = variables

    # The module as trained (its 'auto' layer implementations pick the fast ones for this platform), not
    # export.serving_function's export-friendly clone: its lax depthwise convolution is 6x slower on XLA's
    # CPU backend (full MobileNetV2 at 224 px, one thread: 68 ms against 11 ms per face).
    def apply(variables, images_uint8):
      return module.apply(variables, images_uint8.astype(jnp.float32) / 255.0, train=False)

    # Variables are an argument, not closed-over constants, so XLA does not fold megabytes into the program.
    self._apply = jax.jit(apply)

  def __call__(self, crops_uint8: np.ndarray) -> np.ndarray:
    crops = np.asarray(crops_uint8, dtype=np.uint8)
    count = len(crops)
    padded = 1 << max(0, (count - 1).bit_length())
    if padded != count:
      crops = np.concatenate([crops, np.zeros((padded - count,) + crops.shape[1:], np.uint8)])
    return np.asarray(self._apply(self.variables, crops))[:count]


class OnnxRunner:
  """An exported ``.onnx`` file in ONNX Runtime's CPU provider (dynamic batch: one run per call)."""

  backend = "onnx"

  def __init__(self, path: str, *, threads: int = 1):
    try:
      self.session = ort_session(path, threads=threads)
    except ImportError as error:
      raise errors.MissingExtraError(f"{path}: the onnx backend needs onnxruntime: pip install "
                                "'kd_landmarks[export]'") from error
    except Exception as error:  # pylint: disable=broad-except  (ONNX Runtime's InvalidProtobuf, Fail, ...
      # derive from Exception alone; any other type is a fault of ours and keeps its traceback)
      if not type(error).__module__.startswith("onnxruntime"):
        raise
      raise ModelFileError(f"{path}: ONNX Runtime cannot load it ({_first_line(error)}): the file is truncated "
                           f"or not an ONNX model; {REEXPORT}") from None
    (graph_input,) = self.session.get_inputs()
    shape = graph_input.shape
    if len(shape) != 4 or shape[1] != shape[2] or shape[3] != 3 or graph_input.type != "tensor(uint8)":
      raise ModelFileError(f"{path}: input {graph_input.name} is {graph_input.type} {shape}; a kd_landmarks "
                           "export takes uint8 [B, S, S, 3] (re-export with `kd-landmarks-export`)")
    self.input_name = graph_input.name
    self.image_size = int(shape[1])
    self.num_landmarks = int(self.session.get_outputs()[0].shape[1])
    self.meta = read_export_meta(path, self.image_size, self.num_landmarks)

  def __call__(self, crops_uint8: np.ndarray) -> np.ndarray:
    crops = np.ascontiguousarray(crops_uint8, dtype=np.uint8)
    return self.session.run(None, {self.input_name: crops})[0]


class LiteRtRunner:
  """An exported ``.tflite`` file in ai-edge-litert's interpreter.

  A file with a dynamic batch runs a batch in one invoke; a file with a fixed batch of 1 (what
  ``export --format tflite`` writes) runs face by face. The uint8 input of an int8 file is quantised with scale 1 and
  zero point 0, so the camera's bytes are fed as they are (checked here).
  """

  backend = "litert"

  def __init__(self, path: str, *, threads: int = 1):
    check_tflite_header(path)
    try:
      from ai_edge_litert import interpreter as litert  # Optional: extra 'tflite' (or 'bench').
    except ImportError as error:
      raise errors.MissingExtraError(f"{path}: the litert backend needs ai-edge-litert: pip install "
                                "'kd_landmarks[tflite]'") from error
    try:
      self.interpreter = litert.Interpreter(model_path=path, num_threads=threads)
    except (ValueError, RuntimeError) as error:  # What the interpreter raises for a file it cannot parse.
      raise ModelFileError(f"{path}: LiteRT cannot load it ({_first_line(error)}): the file is truncated or "
                           f"not a TFLite model; {REEXPORT}") from None
    (detail,) = self.interpreter.get_input_details()
    shape = [int(v) for v in detail["shape"]]
    if detail["dtype"] != np.uint8 or len(shape) != 4 or shape[1] != shape[2] or shape[3] != 3:
      raise ModelFileError(f"{path}: input is {np.dtype(detail['dtype']).name} {shape}; a kd_landmarks export "
                           "takes uint8 [B, S, S, 3] (re-export with `kd-landmarks-export --format tflite`)")
    scale, zero_point = detail["quantization"]
    if (scale, zero_point) not in ((0.0, 0), (1.0, 0)):
      raise ModelFileError(f"{path}: uint8 input quantised with scale {scale}, zero point {zero_point}; "
                           "kd_landmarks feeds raw pixel bytes and needs (1, 0) (re-export it)")
    self.input_index = detail["index"]
    self.output_index = self.interpreter.get_output_details()[0]["index"]
    self.dynamic_batch = int(detail["shape_signature"][0]) == -1
    self.batch = None
    self.interpreter.allocate_tensors()
    self.image_size = shape[1]
    self.num_landmarks = int(self.interpreter.get_output_details()[0]["shape"][1])
    self.meta = read_export_meta(path, self.image_size, self.num_landmarks)

  def _invoke(self, crops: np.ndarray) -> np.ndarray:
    if self.dynamic_batch and self.batch != len(crops):
      self.interpreter.resize_tensor_input(self.input_index, list(crops.shape))
      self.interpreter.allocate_tensors()
      self.batch = len(crops)
    self.interpreter.set_tensor(self.input_index, crops)
    self.interpreter.invoke()
    return np.array(self.interpreter.get_tensor(self.output_index))

  def __call__(self, crops_uint8: np.ndarray) -> np.ndarray:
    crops = np.ascontiguousarray(crops_uint8, dtype=np.uint8)
    if self.dynamic_batch:
      return self._invoke(crops)
    return np.concatenate([self._invoke(crop[None]) for crop in crops]) if len(crops) else np.zeros(
        (0, self.num_landmarks, 2), np.float32)


def check_tflite_header(path: str) -> None:
  """Raises :class:`ModelFileError` unless ``path`` starts like a TFLite FlatBuffer (cut short, empty, or
  another format: caught before the runtime, which may not be installed)."""
  with open(path, "rb") as f:
    head = f.read(8)
  if len(head) < 8 or head[4:8] != TFLITE_IDENTIFIER:
    raise ModelFileError(f"{path}: not a TFLite model (its first 8 bytes {head!r} lack the identifier "
                         f"{TFLITE_IDENTIFIER!r}): the file is truncated or of another format; {REEXPORT}")


def read_export_meta(path: str, image_size: int, num_landmarks: int) -> dict:
  """What an exported file says about itself: its shapes, plus model/dataset/checkpoint from the
  ``export.json`` written beside it (absent when the file was copied alone), whose ``image_size`` and
  ``num_landmarks`` must be the file's own."""
  meta = {"image_size": image_size, "num_landmarks": num_landmarks, "model": None, "dataset": None,
          "checkpoint": None, "file": os.path.abspath(path)}
  report_path = os.path.join(os.path.dirname(os.path.abspath(path)), EXPORT_JSON)
  if os.path.exists(report_path):
    try:
      with open(report_path) as f:
        report = json.load(f)
    except ValueError as error:
      raise ModelFileError(f"{report_path} is not valid JSON ({error}): delete it (predict then reads the "
                           f"shapes of {path} alone) or {REEXPORT}") from None
    for key in ("model", "dataset", "checkpoint"):
      meta[key] = report.get(key, meta[key])
    for key, value in (("image_size", image_size), ("num_landmarks", num_landmarks)):
      if key in report and report[key] != value:
        raise ModelFileError(f"{report_path} says {key}={report[key]!r} but {path} has {value} (its "
                             f"{'input' if key == 'image_size' else 'output'} shape): the folder mixes "
                             f"exports of two models; {REEXPORT}")
  return meta


def runner_for_file(path: str, *, threads: int = 1):
  """The runner for an exported file, chosen by its extension (.onnx, .tflite)."""
  if not os.path.isfile(path):
    raise errors.MissingFileError(f"{path}: no such exported model file")
  extension = os.path.splitext(path)[1].lower()
  if extension == ".onnx":
    return OnnxRunner(path, threads=threads)
  if extension == ".tflite":
    return LiteRtRunner(path, threads=threads)
  raise ModelFileError(f"{path}: unknown model file type {extension!r}; give a .onnx or .tflite file, a model "
                       "directory (with model.json) or a training workdir")
