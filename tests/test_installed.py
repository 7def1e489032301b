"""The package as a user gets it: a wheel built from the source, installed outside the checkout, run with the
working directory elsewhere and neither the checkout nor tests/ importable.

One wheel build (pip, setuptools in pip's isolated build environment) and three processes: the export
console script (ONNX float32 + int8, calibrated on the photo shipped in the package), the Python API, and
the predict console script (when dlib is installed).
"""
import json
import os
import pathlib
import shutil
import subprocess
import sys

import pytest

import predict_fixtures

ROOT = pathlib.Path(__file__).resolve().parent.parent
# What a wheel is built from (setup.py's package_data and license_files name files in these).
SOURCES = ("setup.py", "README.md", "LICENSE", "NOTICE", "kd_landmarks")

API_SCRIPT = r"""
import json, os, sys
import numpy as np
import kd_landmarks
from kd_landmarks import Predictor
from kd_landmarks.deploy import export
from kd_landmarks.datasets import images, readers
from kd_landmarks import coords
site, model_dir = sys.argv[1], sys.argv[2]
assert kd_landmarks.__file__.startswith(site), kd_landmarks.__file__
try:
  import predict_fixtures
  raise SystemExit("tests/ is importable")
except ImportError:
  pass
assert export.FIXTURE_DIR.startswith(site) and os.path.exists(os.path.join(export.FIXTURE_DIR, "LICENSE"))
image = images.read_image(os.path.join(export.FIXTURE_DIR, "takeo.ppm"))
cx, cy, side = coords.square_box_from_landmarks(readers.read_pts(os.path.join(export.FIXTURE_DIR, "takeo.pts")))
boxes = [[cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2]]
jax_points = Predictor.load(model_dir).predict(image, boxes=boxes)
onnx_points = Predictor.load(os.path.join(model_dir, "export", "student_kd.onnx")).predict(image, boxes=boxes)
print(json.dumps({"version": kd_landmarks.__version__, "shape": list(jax_points.shape),
                  "max_px_difference": float(np.abs(jax_points - onnx_points).max()),
                  "crop_px": float(side * 1.05)}))
"""


def _run(command, cwd, env, timeout=600):
  result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
  assert result.returncode == 0, f"{command} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
  return result.stdout


@pytest.mark.slow
def test_wheel_exports_and_predicts_outside_the_checkout(tmp_path):
  source = tmp_path / "source"
  source.mkdir()
  for name in SOURCES:
    if (ROOT / name).is_dir():
      shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    else:
      shutil.copy(ROOT / name, source / name)
  _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(tmp_path / "dist"), str(source)],
       tmp_path, os.environ.copy())
  (wheel,) = (tmp_path / "dist").glob("kd_landmarks-*.whl")
  site = tmp_path / "site"
  _run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel)],
       tmp_path, os.environ.copy())
  # Only what the wheel holds: no source file of the checkout, no tests/.
  shutil.rmtree(source)
  assert (site / "kd_landmarks" / "data" / "takeo" / "takeo.ppm").exists()

  model_dir = predict_fixtures.write_model_dir(tmp_path / "run" / "student_kd")
  elsewhere = tmp_path / "elsewhere"
  elsewhere.mkdir()
  env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
  env.update(PYTHONPATH=str(site), JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3")
  # The console script pip wrote (its shebang is this interpreter).
  _run([str(site / "bin" / "kd-landmarks-export"), "--checkpoint", model_dir, "--format", "onnx",
        "--quantize"], elsewhere, env)
  report = json.loads((pathlib.Path(model_dir) / "export" / "export.json").read_text())
  assert report["float32"]["max_abs_error_vs_jax"] <= 1e-4 and report["int8"]["calibration_images"] == 16
  assert (pathlib.Path(model_dir) / "export" / "MODEL_CARD.md").exists()

  result = json.loads(_run([sys.executable, "-c", API_SCRIPT, str(site), model_dir], elsewhere, env))
  assert result["shape"] == [1, 68, 2]
  assert result["max_px_difference"] <= 1e-4 * result["crop_px"]

  try:
    import dlib  # noqa: F401  (extra 'predict')
  except ImportError:
    return
  out = elsewhere / "predictions"
  _run([str(site / "bin" / "kd-landmarks-predict"), "--checkpoint", model_dir,
        str(site / "kd_landmarks" / "data" / "takeo" / "takeo.ppm"), "--out", str(out)], elsewhere, env)
  assert json.loads((out / "summary.json").read_text())["counts"]["ok"] == 1


def _setup_keywords() -> dict:
  """The literal keyword arguments of setup.py's setup() call (read with ast: nothing is run)."""
  import ast

  tree = ast.parse((ROOT / "setup.py").read_text())
  (call,) = [node for node in ast.walk(tree) if isinstance(node, ast.Call)
             and getattr(node.func, "id", None) == "setup"]
  return {k.arg: ast.literal_eval(k.value) for k in call.keywords
          if isinstance(k.value, (ast.Dict, ast.List, ast.Constant))}


def test_package_data_and_license_files_name_only_what_exists():
  keywords = _setup_keywords()
  for package, patterns in keywords["package_data"].items():
    for pattern in patterns:
      matches = [p for p in (ROOT / package.replace(".", "/")).glob(pattern) if p.is_file()]
      assert matches, f"setup.py package_data {package}: {pattern!r} matches no file"
  for name in keywords["license_files"]:
    assert (ROOT / name).is_file(), name


def test_console_scripts_name_callable_mains():
  import importlib

  scripts = _setup_keywords()["entry_points"]["console_scripts"]
  assert {s.split("=")[0].strip() for s in scripts} == {
      "kd-landmarks", "kd-landmarks-predict", "kd-landmarks-export", "kd-landmarks-datasets"}
  for script in scripts:
    module, function = script.split("=")[1].strip().split(":")
    assert callable(getattr(importlib.import_module(module), function)), script


def test_one_version_and_a_citation_for_paper_and_code():
  import re

  import kd_landmarks

  setup_text = (ROOT / "setup.py").read_text()
  assert not re.search(r'version="\d', setup_text)  # read from kd_landmarks/__init__.py, not written twice
  assert re.fullmatch(r"\d+\.\d+\.\d+", kd_landmarks.__version__)
  yaml = pytest.importorskip("yaml", reason="parsing CITATION.cff needs PyYAML")
  citation = yaml.safe_load((ROOT / "CITATION.cff").read_text())
  assert citation["cff-version"] == "1.2.0" and citation["type"] == "software"
  paper = citation["preferred-citation"]
  assert paper["doi"] == "10.1016/j.cviu.2021.103316" and paper["year"] == 2022
  assert [a["family-names"] for a in paper["authors"]] == ["Pourramezan Fard", "Mahoor"]
