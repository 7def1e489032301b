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
  for name in names:
    np.testing.assert_allclose(arrays["shard_map" + name], arrays["pmap" + name], rtol=1e-5, atol=1e-7)
    # The gradient sum really synchronised the replicas.
    np.testing.assert_array_equal(arrays["pmap" + name], arrays["pmap_device1" + name])
    # Per-row augmentation keys and synchronised BatchNorm: two devices take the one-device step.
    np.testing.assert_allclose(arrays["single" + name], arrays["pmap" + name], rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(arrays["shard_map_loss"], arrays["pmap_loss"], rtol=1e-5)


def _step_on_each_device_count(tmp_path, batch):
  out = tmp_path / f"steps_{batch}.npz"
  result = subprocess.run([sys.executable, WORKER, "device_counts", str(out), "--devices", "8", "--batch",
                           str(batch)], capture_output=True, text=True, timeout=1500)
  assert result.returncode == 0, result.stderr[-3000:]
  return np.load(out)


@pytest.mark.slow
@pytest.mark.parametrize("batch, padded_rows", [(70, {1: 70, 2: 70, 4: 72, 8: 72}),
                                                (40, {1: 40, 2: 40, 4: 40, 8: 40})])
def test_one_step_is_the_same_on_1_2_4_and_8_devices(tmp_path, batch, padded_rows):
  """The same global batch (70: the paper's student batch, which 4 and 8 devices hold as 72 rows with 2 of
  padding; 40: no padding) gives the same loss, gradient and BatchNorm statistics on every device count.
  SGD with learning rate 1, so the update is the gradient itself."""
  arrays = _step_on_each_device_count(tmp_path, batch)
  assert {d: int(arrays[f"rows_{d}"]) for d in (1, 2, 4, 8)} == padded_rows
  gradient = {key[len("params_1"):]: arrays[key] - arrays["params_init" + key[len("params_1"):]]
              for key in arrays if key.startswith("params_1")}
  largest = max(np.abs(g).max() for g in gradient.values())
  for devices in (2, 4, 8):
    np.testing.assert_allclose(arrays[f"loss_{devices}"], arrays["loss_1"], rtol=2e-6)
    for leaf, reference in gradient.items():
      if np.abs(reference).max() < 1e-3 * largest:
        continue  # Leaves with a vanishing gradient (a BatchNorm bias before BatchNorm): rounding only.
      other = arrays[f"params_{devices}{leaf}"] - arrays["params_init" + leaf]
      # Relative to the leaf's largest entry: float32 rounding of the update is ~1e-5 of it here.
      assert np.abs(other - reference).max() <= 1e-3 * np.abs(reference).max(), (devices, leaf)
    for key in (k for k in arrays if k.startswith("stats_1")):
      np.testing.assert_allclose(arrays[f"stats_{devices}" + key[len("stats_1"):]], arrays[key],
                                 rtol=1e-4, atol=1e-6, err_msg=f"{devices} devices {key}")


def test_a_batch_is_padded_to_the_next_multiple_of_the_device_count():
  assert [parallel.padded_batch_size(70, d) for d in (1, 2, 3, 4, 6, 8)] == [70, 70, 72, 72, 72, 72]
  assert parallel.padded_batch_size(1, 8) == 8
  assert "9 rows per device, 2 padding row(s)" in parallel.describe_batch(70, 8)
  assert "padding" not in parallel.describe_batch(40, 8)


def test_initialize_distributed_is_a_no_op_for_one_process(monkeypatch):
  for name in (parallel.ENV_COORDINATOR, parallel.ENV_NUM_PROCESSES, parallel.ENV_PROCESS_ID,
               "SLURM_NTASKS", "TPU_WORKER_HOSTNAMES"):
    monkeypatch.delenv(name, raising=False)
  assert parallel.initialize_distributed() is False
  with pytest.raises(ValueError, match="process count"):
    parallel.initialize_distributed("127.0.0.1:1234")
