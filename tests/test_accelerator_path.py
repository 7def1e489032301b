"""The accelerator path rehearsed on the CPU: the paper's configs (300W, COFW, WFLW, each on fixture data in
its own official format) run every phase to the report in bfloat16, with the portable kernels an accelerator
computes with (``cpu_kernels=False``), on 8, 2 and 1 virtual devices and the paper's batch sizes (teachers 40,
students 70: 72 rows on 8 devices, 2 of them masked padding).

Tiny networks (the tiny variants of EfficientNet-B3 and MobileNetV2) at 32 px and two steps per model: what
is checked is that every phase runs on every device count with every landmark count, that the models are
made of what the config names (bfloat16, the paper's batches, the dataset's K), and that the report is
written from them.
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import fixtures_formats as ff
from kd_landmarks.datasets import builder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# 80 training faces: the held-out validation slice (5%) leaves 76, enough for the student's batch of 70.
NUM_TRAIN = 80
NUM_LANDMARKS = {"300w": 68, "cofw": 29, "wflw": 98}


def _write_manual_dir(dataset, root):
  if dataset == "300w":
    # 300W's training folders (afw, helen/trainset, lfpw/trainset) and its common and challenging subsets.
    ff.write_300w(root, {"afw": 30, "helen/trainset": 30, "lfpw/trainset": NUM_TRAIN - 60, "helen/testset": 3,
                         "lfpw/testset": 2, "ibug": 3})
  elif dataset == "cofw":
    ff.write_cofw(root, num_train=NUM_TRAIN, num_test=6)
  else:
    ff.write_wflw(root, num_train=NUM_TRAIN, test_flags=[[1, 0, 0, 0, 0, 0], [0, 1, 1, 1, 1, 1]] * 3)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
  """dataset -> data_dir, each prepared from its fixture manual dir."""
  data_dirs = {}
  for dataset in NUM_LANDMARKS:
    root = tmp_path_factory.mktemp(dataset)
    _write_manual_dir(dataset, root / "manual")
    builder.prepare(dataset, data_dir=root / "data", manual_dir=root / "manual", allow_partial=True,
                    show_progress=False)
    data_dirs[dataset] = str(root / "data")
  return data_dirs


@pytest.mark.slow
@pytest.mark.parametrize("dataset, devices", [("300w", 8), ("cofw", 2), ("wflw", 1)])
def test_the_papers_config_runs_every_phase_in_bfloat16_on_virtual_devices(tmp_path, prepared, dataset, devices):
  workdir = tmp_path / "run"
  env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), JAX_PLATFORMS="cpu",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
  overrides = [
      f"--config.data_dir={prepared[dataset]}", "--config.dtype=bfloat16", "--config.cpu_kernels=False",
      "--config.teacher_model=efficientnet_b3_tiny", "--config.student_model=mobilenet_v2_tiny",
      "--config.image_size=32", "--config.teacher.num_train_steps=2", "--config.student.num_train_steps=2",
      "--config.checkpoint_every_steps=2", "--config.log_every_steps=1", "--config.eval_batch_size=12",
      "--config.box_robustness=False"]
  result = subprocess.run([sys.executable, "-m", "kd_landmarks.main", "--config", f"configs/{dataset}.py",
                           "--workdir", str(workdir), *overrides], capture_output=True, text=True, cwd=ROOT,
                          env=env, timeout=2400)
  assert result.returncode == 0, result.stderr[-4000:]
  # The paper's batches, laid out over the devices as logged before the first phase.
  rows = -(-70 // devices) * devices
  padding = f", {rows - 70} padding row(s)" if rows > 70 else ""
  assert (f"student phases: global batch 70 over {devices} device(s): {rows // devices} rows per device"
          f"{padding}") in result.stderr
  for name in ("teacher_tough", "teacher_tolerant", "student_kd", "student_l2"):
    meta = json.loads((workdir / name / "model.json").read_text())
    assert (meta["dtype"], meta["num_landmarks"], meta["dataset"]) == ("bfloat16", NUM_LANDMARKS[dataset], dataset)
    assert meta["config"]["teacher"]["batch_size"] == 40 and meta["config"]["student"]["batch_size"] == 70
    assert meta["train_kernels"] == "portable"
    metrics = json.loads((workdir / name / "eval" / "metrics.json").read_text())
    assert all(np.isfinite(split["nme"]) for split in metrics.values() if isinstance(split, dict) and "nme" in split)
  report = (workdir / "report.md").read_text()
  assert "KD" in report and dataset.upper() in report.upper()
