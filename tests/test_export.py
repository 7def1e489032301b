"""export.py: the ONNX student matches JAX, takes uint8 crops with a dynamic batch, and quantises to int8."""
import json
import os
import platform
import shutil
import subprocess
import sys

import jax
import numpy as np
import onnx
import pytest

from kd_landmarks.deploy import export
from kd_landmarks.training import machine
import predict_fixtures


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
  # Through the command line, from a model directory saved the way training saves it.
  from kd_landmarks.training import checkpoint

  from kd_landmarks.deploy import detect

  model_dir = predict_fixtures.write_model_dir(tmp_path_factory.mktemp("run") / "student_kd", config={
      "student_loss": "l2,kd", "optimizer": {"learning_rate": 0.001}, "dataset": "300w"})
  detect.save_box_map(model_dir, "dlib_hog", detect.BoxMap(0.0, 0.125, 1.25, source="fitted on 300w/train",
                                                           num_faces=3))
  os.makedirs(os.path.join(model_dir, "eval"))
  with open(os.path.join(model_dir, "eval", "metrics.json"), "w") as f:
    json.dump({"test_full": {"nme": 0.0345, "fr": 0.00725, "auc": 0.51234, "count": 689},
               "selection": {"checkpoint": "best", "split": "train_holdout"}}, f)
  assert export.main(["--checkpoint", model_dir, "--format", "onnx", "--quantize"]) == 0
  with open(os.path.join(model_dir, "export", "export.json")) as f:
    report = json.load(f)
  module, variables, meta = checkpoint.load_inference_variables(model_dir)
  return module, variables, meta, report


def test_onnx_matches_the_model_on_float_input(exported):
  # Independent of the export's serving function: the module applied to uint8 / 255 with the default
  # (CPU) depthwise implementation, against the exported graph (lax depthwise, casts inside the graph).
  module, variables, meta, report = exported
  rng = np.random.default_rng(0)
  images = np.concatenate([export.fixture_crops(meta["image_size"], count=2),
                           rng.integers(0, 256, (3, meta["image_size"], meta["image_size"], 3))]
                          ).astype(np.uint8)
  expected = np.asarray(jax.jit(lambda x: module.apply(variables, x, train=False))(
      images.astype(np.float32) / 255.0))
  got = export.run_onnx(export.ort_session(report["float32"]["path"]), images)
  assert got.shape == (5, 68, 2)  # a batch other than the traced one: the batch dimension is dynamic
  np.testing.assert_allclose(got, expected, atol=export.FP32_TOLERANCE, rtol=0)
  assert report["float32"]["max_abs_error_vs_jax"] <= export.FP32_TOLERANCE


def test_onnx_interface_is_documented_one(exported):
  _, _, meta, report = exported
  model = onnx.load(report["float32"]["path"])
  (graph_input,) = model.graph.input
  (graph_output,) = model.graph.output
  assert graph_input.name == export.INPUT_NAME and graph_output.name == export.OUTPUT_NAME
  assert graph_input.type.tensor_type.elem_type == onnx.TensorProto.UINT8
  dims = [d.dim_param or d.dim_value for d in graph_input.type.tensor_type.shape.dim]
  assert dims[1:] == [meta["image_size"], meta["image_size"], 3] and isinstance(dims[0], str)
  # Every ReLU6 became a Clip (which ONNX Runtime fuses into the preceding Conv); no Max/Min pair is left.
  op_types = [node.op_type for node in model.graph.node]
  assert op_types.count("Clip") > 0 and "Max" not in op_types and "Min" not in op_types
  # Every convolution of the model (stem, 1x1, depthwise) is one native Conv: no Einsum or Slice
  # (the CPU training implementations), which ONNX Runtime cannot fuse.
  module, variables, _, _ = exported
  kernels = [leaf for leaf in jax.tree_util.tree_leaves(variables["params"]) if leaf.ndim == 4]
  assert op_types.count("Conv") == len(kernels)
  assert not {"Einsum", "Slice", "Pad", "MatMul"} & set(op_types)
  # The input normalisation runs in NCHW, right after the layout transpose.
  assert op_types[:3] == ["Cast", "Transpose", "BatchNormalization"]


def _affine_chain_model(ops):
  """uint8 NHWC [1, 4, 5, 3] -> Cast -> ops (constant right-hand sides) -> Transpose(0, 3, 1, 2) -> Relu."""
  from onnx import TensorProto, helper, numpy_helper

  nodes = [helper.make_node("Cast", ["image"], ["v0"], to=TensorProto.FLOAT)]
  initializers = []
  for index, (op, constant) in enumerate(ops):
    name = f"c{index}"
    initializers.append(numpy_helper.from_array(np.asarray(constant, np.float32), name))
    nodes.append(helper.make_node(op, [f"v{index}", name], [f"v{index + 1}"]))
  nodes.append(helper.make_node("Transpose", [f"v{len(ops)}"], ["nchw"], perm=[0, 3, 1, 2]))
  nodes.append(helper.make_node("Relu", ["nchw"], ["out"]))
  graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("image", TensorProto.UINT8,
                                                                           [1, 4, 5, 3])],
                            [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 3, 4, 5])],
                            initializers)
  return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_input_normalization_pass_keeps_the_function(tmp_path):
  # Every op kind, scalar and per-channel constants, in an order where composition order matters.
  ops = [("Div", 255.0), ("Sub", [[[[0.4, 0.5, 0.6]]]]), ("Mul", [2.0, -1.0, 0.5]), ("Add", 0.25),
         ("Div", [0.2, 0.3, 0.4])]
  model = _affine_chain_model(ops)
  image = np.random.default_rng(0).integers(0, 256, (1, 4, 5, 3)).astype(np.uint8)
  x = image.astype(np.float64)
  for op, constant in ops:  # The chain by hand, in float64.
    constant = np.asarray(constant, np.float64)
    x = {"Div": np.divide, "Sub": np.subtract, "Mul": np.multiply, "Add": np.add}[op](x, constant)
  expected = np.maximum(x.transpose(0, 3, 1, 2), 0)
  assert export.input_normalization_to_nchw(model)
  assert [n.op_type for n in model.graph.node] == ["Cast", "Transpose", "BatchNormalization", "Relu"]
  assert {t.name for t in model.graph.initializer} == {f"input_normalization_{p}"
                                                        for p in ("scale", "bias", "mean", "var")}
  path = str(tmp_path / "chain.onnx")
  onnx.save(model, path)
  got = export.ort_session(path).run(None, {"image": image})[0]
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_input_normalization_pass_leaves_other_graphs_alone():
  # A chain whose intermediate value is used twice cannot be folded away.
  model = _affine_chain_model([("Div", 255.0), ("Sub", [0.4, 0.5, 0.6])])
  from onnx import helper
  model.graph.node.append(helper.make_node("Identity", ["v1"], ["side"]))
  before = [n.op_type for n in model.graph.node]
  assert not export.input_normalization_to_nchw(model)
  assert [n.op_type for n in model.graph.node] == before


def test_int8_model_stores_int8_weights_and_stays_close(exported):
  _, _, meta, report = exported
  model = onnx.load(report["int8"]["path"])
  conv_weights = {node.input[1] for node in onnx.load(report["float32"]["path"]).graph.node
                  if node.op_type == "Conv"}
  int8_initializers = [t for t in model.graph.initializer if t.data_type == onnx.TensorProto.INT8]
  # Every convolution's weights are stored as int8 (per-channel QDQ), none left in float.
  assert len(int8_initializers) >= len(conv_weights) > 0
  # 7-bit weights: a pair of uint8 x int8 products fits the int16 that x86 CPUs without VNNI add it into
  # (vpmaddubsw saturates at 32,767), so the file computes the same on every CPU.
  largest = max(int(np.abs(onnx.numpy_helper.to_array(t).astype(np.int32)).max()) for t in int8_initializers)
  assert 2 * 255 * largest <= 32767 and largest == 64  # Symmetric per-channel: each channel's max maps to 64.
  assert report["int8"]["weight_bits"] == 7
  assert report["int8"]["size_mb"] < report["float32"]["size_mb"]
  # Quantisation error, in crop pixels, small against the spread of the predictions themselves.
  images = export.fixture_crops(meta["image_size"], count=4)
  float_out = export.run_onnx(export.ort_session(report["float32"]["path"]), images)
  int8_out = export.run_onnx(export.ort_session(report["int8"]["path"]), images)
  error = np.abs(int8_out - float_out).mean()
  spread = np.abs(float_out - float_out.mean(axis=1, keepdims=True)).mean()
  assert error < 0.25 * spread


def test_export_json_records_what_was_made(exported):
  _, _, _, report = exported
  with open(os.path.join(os.path.dirname(report["float32"]["path"]), "export.json")) as f:
    written = json.load(f)
  assert written["int8"]["paper_table6_size_mb"] == export.PAPER_MODEL_SIZE_MB
  assert written["float32"]["size_mb"] == pytest.approx(
      os.path.getsize(report["float32"]["path"]) / 1e6, abs=1e-3)


def test_export_json_names_the_cpu_that_quantised(exported):
  _, _, _, report = exported
  cpu = report["int8"]["quantized_on"]
  assert cpu["machine"] == platform.machine()
  if not os.path.exists("/proc/cpuinfo"):
    return
  # Independently of machine.cpu_description: grep's reading of the same file.
  def grep(pattern):
    return subprocess.run(["grep", "-m1", "-o", "-w", pattern, "/proc/cpuinfo"], capture_output=True,
                          text=True).stdout.strip() == pattern
  assert cpu["avx512_vnni"] == grep("avx512_vnni") and cpu["avx_vnni"] == grep("avx_vnni")
  assert cpu["vnni"] == (grep("avx512_vnni") or grep("avx_vnni")) and cpu["avx2"] == grep("avx2")
  model_name = subprocess.run(["grep", "-m1", "model name", "/proc/cpuinfo"], capture_output=True,
                              text=True).stdout
  if model_name:
    assert cpu["name"] == model_name.split(":", 1)[1].strip()


# ONNX Runtime picks its uint8 x int8 kernels by the CPU it runs on: with VNNI (vpdpbusd) the products add
# into int32; on x86 CPUs with AVX2 and no VNNI (AVX2-only AMD EPYC, AVX-512 Skylake) each pair of products
# adds into a saturating int16 (vpmaddubsw), which the exported 7-bit weights stay clear of and full-range
# 8-bit weights do not (export.INT8_WEIGHT_BITS). The tests below run the files on the CPUs at hand: this
# host natively and, with qemu-user, an emulated Haswell, which reports AVX2 and no AVX-512/VNNI to ONNX
# Runtime's CPUID dispatch.
ORT_CPUS = {"host": [], "qemu_haswell": ["qemu-x86_64", "-cpu", "Haswell"]}
VNNI, AVX2_WITHOUT_VNNI, OTHER = (
    "an x86 CPU with VNNI", "an x86 CPU with AVX2 and without VNNI", "neither (not x86, or x86 without AVX2)")
_HOST = machine.cpu_description()  # /proc/cpuinfo's flags (checked against grep above)
_QEMU_MISSING = (None if platform.machine() == "x86_64" and shutil.which("qemu-x86_64") else
                 "needs an x86_64 host and qemu-x86_64 (Debian qemu-user; .ci/run installs it) to run ONNX "
                 "Runtime on an emulated AVX2 CPU without VNNI")


def ort_cpu_kind(cpu):
  """What ONNX Runtime's integer kernels find on ``cpu`` (a key of ``ORT_CPUS``): ``VNNI``, or
  ``AVX2_WITHOUT_VNNI`` (the int16-saturating kernels), or ``OTHER``: not x86 (ARM's dot products
  accumulate in int32), or an x86 CPU without AVX2, whose SSE kernels these tests do not cover."""
  if cpu == "qemu_haswell":
    return AVX2_WITHOUT_VNNI
  if platform.machine() not in ("x86_64", "AMD64"):
    return OTHER
  return VNNI if _HOST["vnni"] else AVX2_WITHOUT_VNNI if _HOST["avx2"] else OTHER


_HOST_KIND = f"the host CPU, {_HOST['name']} ({platform.machine()}), is {ort_cpu_kind('host')}"


@pytest.fixture(scope="module")
def ort_outputs(exported, tmp_path_factory):
  """A function of a key of ``ORT_CPUS`` that returns the outputs, on 4 fixture crops, of the exported
  float32 and int8 (7-bit) files and of a full-range 8-bit int8 file of the same model, run by ONNX Runtime
  on that CPU in a child process (tests/ort_worker.py: no JAX, so that it runs under qemu too); each CPU
  runs once per module."""
  _, _, meta, report = exported
  folder = tmp_path_factory.mktemp("ort_cpus")
  np.save(folder / "images.npy", export.fixture_crops(meta["image_size"], count=4))
  full_range = export.quantize_static_int8(report["float32"]["path"], str(folder / "int8_8bit.onnx"),
                                           export.fixture_crops(meta["image_size"]), weight_bits=8)
  models = [f"float32={report['float32']['path']}", f"int8={report['int8']['path']}", f"int8_8bit={full_range}"]
  worker = os.path.join(os.path.dirname(__file__), "ort_worker.py")
  outputs = {}

  def run(cpu):
    if cpu not in outputs:
      subprocess.run(ORT_CPUS[cpu] + [sys.executable, worker, str(folder / "images.npy"),
                                      str(folder / f"{cpu}.npz"), *models], check=True,
                     capture_output=True, timeout=600)
      outputs[cpu] = dict(np.load(folder / f"{cpu}.npz"))
    return outputs[cpu]

  return run


def assert_7bit_file_avoids_the_saturation(outputs):
  """The assertions for a CPU without VNNI, on its outputs (``ort_outputs``): the full-range file's int16
  pair sums saturate there, so its landmarks move from the float32 file's several times as far as the
  7-bit file's (measured under qemu's Haswell: mean 0.517 against 0.127), and the 7-bit file meets the
  accuracy bound of test_int8_model_stores_int8_weights_and_stays_close."""
  error = {name: float(np.abs(outputs[name] - outputs["float32"]).mean()) for name in ("int8", "int8_8bit")}
  spread = np.abs(outputs["float32"] - outputs["float32"].mean(axis=1, keepdims=True)).mean()
  assert error["int8_8bit"] > 2 * error["int8"], f"mean |int8 - float32|: {error}; spread {spread:.3f}"
  assert error["int8"] < 0.25 * spread, f"mean |int8 - float32|: {error}; spread {spread:.3f}"


# The case of a CPU without VNNI runs natively where the host is one ([host]), else under qemu
# ([qemu_haswell]); the other one skips, naming the host's CPU kind (pytest -rs).
@pytest.mark.parametrize("cpu", [
    pytest.param("host", marks=pytest.mark.skipif(
        ort_cpu_kind("host") != AVX2_WITHOUT_VNNI,
        reason=f"{_HOST_KIND}, not {AVX2_WITHOUT_VNNI}; [qemu_haswell] emulates one")),
    pytest.param("qemu_haswell", marks=pytest.mark.skipif(
        _QEMU_MISSING is not None or ort_cpu_kind("host") == AVX2_WITHOUT_VNNI,
        reason=_QEMU_MISSING or f"{_HOST_KIND}: [host] runs this case natively"))])
def test_int8_7bit_file_avoids_the_int16_saturation_of_a_cpu_without_vnni(ort_outputs, cpu):
  assert_7bit_file_avoids_the_saturation(ort_outputs(cpu))


@pytest.mark.skipif(_QEMU_MISSING is not None, reason=str(_QEMU_MISSING))
@pytest.mark.skipif(ort_cpu_kind("host") != VNNI,
                    reason=f"{_HOST_KIND}: the comparison needs a host with VNNI, whose int8 kernels "
                           "differ from the emulated CPU's")
def test_int8_model_computes_the_same_on_an_avx2_cpu_without_vnni(ort_outputs):
  # The user's CPU may lack VNNI (AMD EPYC with AVX2 only): ONNX Runtime then picks other integer kernels
  # than on this host, which has VNNI.
  host, avx2 = ort_outputs("host"), ort_outputs("qemu_haswell")
  spread = np.abs(host["float32"] - host["float32"].mean(axis=1, keepdims=True)).mean()
  # The exported (7-bit) file: the same landmarks on both CPUs, within the bound of the accuracy test.
  np.testing.assert_allclose(avx2["int8"], host["int8"], atol=1e-4, rtol=0)
  assert np.abs(avx2["int8"] - avx2["float32"]).mean() < 0.25 * spread
  # Control: the emulated CPU really lacks VNNI, since the full-range file computes differently there
  # (its int16 pair sums saturate); otherwise this test would prove nothing.
  assert np.abs(avx2["int8_8bit"] - host["int8_8bit"]).max() > 1e-2


def test_model_card_states_the_run_s_values(exported):
  # The fixture's model dir has a fitted box map and an evaluation (written before the export): the card
  # carries their numbers, the input contract of this model, the dataset's terms and the limits.
  _, _, meta, report = exported
  out_dir = os.path.dirname(report["float32"]["path"])
  card = open(os.path.join(out_dir, "MODEL_CARD.md")).read()
  assert "| test_full | 689 | 3.45 | 0.73 | 0.5123 |" in card  # 0.0345 NME, 0.00725 FR (rounds to 0.73)
  assert "RGB **uint8** `[B, 64, 64, 3]`" in card and "float32 `[B, 68, 2]`" in card
  assert "(n + 0.5) * 64 - 0.5" in card and "scaled by 1.05" in card
  assert "Checkpoint: best, step 1; phase student, loss kd." in card
  assert "offset (0.0000, 0.1250) x width, side 1.2500 x width; fitted on 300w/train" in card
  assert "research and non-commercial use only" in card  # 300W's terms
  assert "| student_loss | \"l2,kd\" |" in card and "| optimizer.learning_rate | 0.001 |" in card
  assert "frontal faces" in card and "synthetic" not in card.split("## Limits")[1]
  assert f"| `student_kd.int8.onnx` | ONNX int8 (static QDQ) | {report['int8']['size_mb']:.3f} |" in card
  # The box map travels with the files.
  assert json.load(open(os.path.join(out_dir, "box_map.json")))["dlib_hog"]["side_scale"] == 1.25


def test_model_card_of_a_demo_run_says_synthetic_and_missing_evaluation():
  from kd_landmarks.deploy import model_card

  meta = {"model": "mobilenet_v2_tiny", "dataset": "synthetic", "image_size": 24, "num_landmarks": 68}
  card = model_card.render(meta, {}, metrics=None)
  limits = card.split("## Limits")[1]
  assert "**Trained on synthetic faces** (the demo run)" in limits
  assert "No evaluation found" in card and "holds no training config" in card


def test_tflite_without_tensorflow_says_what_to_install(capsys):
  import importlib.util

  if importlib.util.find_spec("tensorflow") is not None:
    pytest.skip("TensorFlow is installed here: tests/test_tflite.py runs the export")
  with pytest.raises(SystemExit):
    export.main(["--checkpoint", "unused", "--format", "tflite"])
  assert "pip install 'kd_landmarks[tflite]'" in capsys.readouterr().err


def test_export_of_a_workdir_without_a_student_names_the_phase(tmp_path):
  # Probe: `export` on a workdir with no student gave a traceback about model.json.
  workdir = tmp_path / "run"
  predict_fixtures.write_model_dir(workdir / "teacher_tough")
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""), JAX_PLATFORMS="cpu")
  result = subprocess.run([sys.executable, "-m", "kd_landmarks.deploy.export", "--workdir", str(workdir)],
                          capture_output=True, text=True, cwd=root, env=env, timeout=300)
  assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
  assert result.stderr.strip().splitlines()[-1] == (
      f"error: {workdir} has no trained student_kd ({workdir}/student_kd/model.json is missing); it has "
      "teacher_tough (pass --model NAME). Train it: `python -m kd_landmarks.main --config <config>:phase=student "
      f"--workdir {workdir} --config.student_loss=kd` (after the teachers)")
  assert not (workdir / "student_kd").exists()
