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
    assert train["validation"][0][1] == 2     # The held-out slice: 5% of the 48 training faces, rounded.
  assert phases["eval"]["img_s"] == pytest.approx(4 * 16 / phases["eval"]["wall_s"])
  assert os.path.exists(tmp_path / "w" / "report.md")
  projection = report["projection"]
  # 300W: 3,148 train crops less 157 held out (5%), batch 8 -> 373 steps per epoch (remainder dropped), 250
  # epochs.
  assert projection["held_out"] == 157
  for model in projection["models"].values():
    assert model["steps"] == 250 * 373 == 93250
    assert model["checkpoints"] == math.ceil(93250 / 1000) and model["validations"] == math.ceil(93250 / 5000)
    assert model["total_s"] >= model["steps"] * model["step_s"]
  parts = sum(m["total_s"] for m in projection["models"].values()) + sum(
      projection[k] for k in ("cache_s", "eval_s", "report_s"))
  assert projection["total_s"] == pytest.approx(parts)
  assert "[projection] the full run of 300w" in result.stdout and "input wait" in result.stdout


def _load_benchmark():
  import importlib.util
  spec = importlib.util.spec_from_file_location("benchmark_pipeline", os.path.join(ROOT, "benchmarks", "pipeline.py"))
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module  # Its dataclasses look their module up there.
  spec.loader.exec_module(module)
  return module


def test_in_memory_source_yields_the_batches_of_the_stored_source():
  """--source memory (the split decoded once) must feed training exactly what the stored split feeds it."""
  import numpy as np
  from kd_landmarks.training import input_pipeline
  rng = np.random.default_rng(0)
  stored = [{"image": rng.integers(0, 256, (6, 6, 3), dtype=np.uint8),
             "landmarks": rng.uniform(0, 6, (68, 2)).astype(np.float32), "index": np.int64(i),
             "image_id": f"face/{i}"} for i in range(23)]
  memory = input_pipeline.InMemorySource(stored, None, chunk=5)
  assert len(memory) == 23 and memory[7]["image_id"] == "face/7"
  assert memory.nbytes == 23 * (6 * 6 * 3 + 68 * 2 * 4 + 8)
  keys = ("image", "landmarks", "index")
  batches = [input_pipeline.make_train_iterator(source, global_batch_size=4, seed=3, keys=keys, num_steps=9)
             for source in (stored, memory)]
  for _ in range(9):  # Past the first epoch (5 batches of 4 from 23): a new permutation, same on both.
    a, b = (next(iterator) for iterator in batches)
    assert all(np.array_equal(a[key], b[key]) for key in keys)
