"""Two local CPU processes (gloo collectives, loopback coordinator) train like one process with 2 devices."""
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

WORKER = os.path.join(os.path.dirname(__file__), "train_worker.py")


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _two_processes_and_one(tmp_path, two_process_args, one_process_args):
  """Runs the worker as two processes of one distributed run (``two_process_args(i)``) and as a single
  process (``one_process_args``); returns their saved arrays (p0, p1, one) after checking every exit status
  and that the two processes really formed one run."""
  coordinator = f"127.0.0.1:{_free_port()}"
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  workers = [subprocess.Popen(
      [sys.executable, WORKER, *two_process_args(i), "--process_id", str(i), "--num_processes", "2",
       "--coordinator", coordinator], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
      for i in range(2)]
  reference = subprocess.run([sys.executable, WORKER, *one_process_args], capture_output=True, text=True,
                             timeout=900, env=env)
  outputs = []
  for worker in workers:
    try:
      outputs.append(worker.communicate(timeout=900)[0])
    finally:
      worker.kill()
  for worker, output in zip(workers, outputs):
    assert worker.returncode == 0, output[-3000:]
  assert "2 processes" in outputs[0]
  assert reference.returncode == 0, reference.stderr[-3000:]
  return outputs, tuple(np.load(tmp_path / name) for name in ("p0.npz", "p1.npz", "one.npz"))


@pytest.mark.slow
def test_two_processes_match_one_process_on_the_same_global_batch(tmp_path):
  shared_dir = str(tmp_path / "multi")  # Both processes write one checkpoint directory, as on a cluster.
  outputs, (p0, p1, one) = _two_processes_and_one(
      tmp_path, lambda i: ["fit", str(tmp_path / f"p{i}.npz"), shared_dir, "--steps", "4", "--devices", "1"],
      ["fit", str(tmp_path / "one.npz"), str(tmp_path / "one"), "--steps", "4", "--devices", "2"])
  assert "2 processes, 2 devices" in outputs[0]
  assert sorted(p0) == sorted(one)
  for name in one:
    np.testing.assert_array_equal(p0[name], p1[name])
    np.testing.assert_allclose(p0[name], one[name], rtol=1e-5, atol=1e-6)
  # And training moved the parameters (the comparison is not between two initialisations).
  from kd_landmarks.training import checkpoint
  assert checkpoint.state_manager(shared_dir).latest_step() == 4


@pytest.mark.slow
def test_evaluation_with_two_processes_gives_the_metrics_of_one(tmp_path):
  _, (p0, p1, one) = _two_processes_and_one(
      tmp_path, lambda i: ["evaluate", str(tmp_path / f"p{i}.npz")], ["evaluate", str(tmp_path / "one.npz")])
  assert sorted(p0) == sorted(one) and "metric_nme" in one
  # Every example once, in split order, with its own id: the index join of the processes' blocks.
  np.testing.assert_array_equal(one["index"], np.arange(11))
  np.testing.assert_array_equal(one["image_id"], [f"img{i}" for i in range(11)])
  for name in one:
    np.testing.assert_array_equal(p0[name], p1[name])
    if name in ("index", "image_id"):
      np.testing.assert_array_equal(p0[name], one[name])
    else:
      np.testing.assert_allclose(p0[name], one[name], rtol=1e-5, atol=1e-6)
  assert 0 < float(one["metric_nme"]) < 10


@pytest.mark.slow
def test_two_processes_share_process_zeros_workdir_lock(tmp_path):
  import json
  coordinator = f"127.0.0.1:{_free_port()}"
  workdir = tmp_path / "run"
  workdir.mkdir()
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  workers = [subprocess.Popen(
      [sys.executable, WORKER, "lock", str(tmp_path / f"p{i}.json"), str(workdir), "--process_id", str(i),
       "--num_processes", "2", "--coordinator", coordinator],
      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env) for i in range(2)]
  for worker in workers:
    try:
      output = worker.communicate(timeout=600)[0]
    finally:
      worker.kill()
    assert worker.returncode == 0, output[-3000:]
  p0, p1 = (json.loads((tmp_path / f"p{i}.json").read_text()) for i in range(2))
  # One lock file for the run, held by process 0; process 1 proceeded on its word.
  assert p0["first_holds_file"] and not p1["first_holds_file"] and p0["file_exists"] and p1["file_exists"]
  # A foreign run holds the workdir: both processes stop, process 1 with process 0's message.
  assert p0["second"].startswith(f"{workdir} is in use by pid 4242 on node-17")
  assert p1["second"] == p0["second"]
