"""Tests of kd_landmarks.training.parallel: shard_map steps equal jax.pmap steps on 2 fake CPU devices."""
import os
import subprocess
import sys

import numpy as np
import pytest

from kd_landmarks.training import parallel

WORKER = os.path.join(os.path.dirname(__file__), "train_worker.py")


@pytest.mark.slow
def test_pmap_and_shard_map_give_the_same_params(tmp_path):
  out = tmp_path / "params.npz"
  result = subprocess.run([sys.executable, WORKER, "pmap_vs_shard_map", str(out), "--devices", "2"],
                          capture_output=True, text=True, timeout=900)
  assert result.returncode == 0, result.stderr[-3000:]
  arrays = np.load(out)
  names = [k[len("pmap"):] for k in arrays if k.startswith("pmap[")]
  assert names
  differs_from_single = False
  for name in names:
    np.testing.assert_allclose(arrays["shard_map" + name], arrays["pmap" + name], rtol=1e-5, atol=1e-7)
    # pmean really synchronised the replicas.
    np.testing.assert_array_equal(arrays["pmap" + name], arrays["pmap_device1" + name])
    differs_from_single |= not np.allclose(arrays["single" + name], arrays["pmap" + name])
  np.testing.assert_allclose(arrays["shard_map_loss"], arrays["pmap_loss"], rtol=1e-5)
  assert differs_from_single, "2-device steps equal the 1-device step: the 'data' axis was not used"


def test_batch_size_must_split_over_devices():
  import jax
  mesh = parallel.make_mesh(jax.devices()[:1])
  parallel.check_batch_size(3, mesh)
  fake = type("FakeMesh", (), {"devices": np.zeros(4)})()
  with pytest.raises(ValueError, match="per_device_batch_size"):
    parallel.check_batch_size(6, fake)


def test_initialize_distributed_is_a_no_op_for_one_process(monkeypatch):
  for name in (parallel.ENV_COORDINATOR, parallel.ENV_NUM_PROCESSES, parallel.ENV_PROCESS_ID,
               "SLURM_NTASKS", "TPU_WORKER_HOSTNAMES"):
    monkeypatch.delenv(name, raising=False)
  assert parallel.initialize_distributed() is False
  with pytest.raises(ValueError, match="process count"):
    parallel.initialize_distributed("127.0.0.1:1234")
