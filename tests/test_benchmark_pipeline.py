"""Smoke test of benchmarks/pipeline.py, the full-pipeline rehearsal, at its tiny size: every phase runs
through kd_landmarks.pipeline and every figure it prints is there and consistent."""
import json
import math
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_rehearsal_runs_every_phase_and_projects_the_paper_run(tmp_path):
  out = tmp_path / "rehearsal.json"
  env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), JAX_PLATFORMS="cpu")
  # The teachers as tiny MobileNetV2s: the same phases, a shorter compile than EfficientNet's.
  result = subprocess.run(
      [sys.executable, "benchmarks/pipeline.py", "--scale", "tiny", "--teacher_model", "mobilenet_v2_tiny",
       "--workdir", str(tmp_path / "w"), "--out", str(out)],
      capture_output=True, text=True, cwd=ROOT, timeout=1200, env=env)
  assert result.returncode == 0, result.stderr[-4000:]
  report = json.loads(out.read_text())
  phases = report["phases"]
  assert list(phases) == ["teacher_tough", "teacher_tolerant", "cache_teachers", "student_l2", "student_kd",
                          "eval", "report"]
  for name in ("teacher_tough", "teacher_tolerant", "student_l2", "student_kd"):
    train = phases[name]["train"]
    assert train["global_batch"] == 8 and train["window_steps"] == 2   # --scale tiny: batch 8, 2 timed steps.
    assert train["compile_s"] > 0 and train["img_s"] > 0 and train["device_only_img_s"] > 0
    assert train["img_s"] == pytest.approx(2 * 8 / train["window_s"])
    assert 0.0 <= train["input_wait"] < 1.0 and 0.0 <= train["host_blocked"] < 1.0
    assert len(train["checkpoint_s"]) == 1 and len(train["validation"]) == 1   # At the end of the run.
    assert train["validation"][0][1] == 16    # The synthetic test split (--num_test 16 at this scale).
  assert phases["eval"]["img_s"] == pytest.approx(4 * 16 / phases["eval"]["wall_s"])
  assert os.path.exists(tmp_path / "w" / "report.md")
  projection = report["projection"]
  # 300W: 3,148 train crops, batch 8 -> 393 steps per epoch (remainder dropped), 250 epochs.
  for model in projection["models"].values():
    assert model["steps"] == 250 * 393 == 98250
    assert model["checkpoints"] == math.ceil(98250 / 1000) and model["validations"] == math.ceil(98250 / 5000)
    assert model["total_s"] >= model["steps"] * model["step_s"]
  parts = sum(m["total_s"] for m in projection["models"].values()) + sum(
      projection[k] for k in ("cache_s", "eval_s", "report_s"))
  assert projection["total_s"] == pytest.approx(parts)
  assert "[projection] the full run of 300w" in result.stdout and "input wait" in result.stdout
