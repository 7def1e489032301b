"""Tests of kd_landmarks.training.checkpoint: model.json, best-by-NME, restore for inference."""
import json
import os
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kd_landmarks import models
from kd_landmarks.training import checkpoint


class _TinyModel(nn.Module):
  """A trivial landmark model with batch norm, standing in for models.create_model in these tests."""
  num_landmarks: int
  dtype: object = jnp.float32

  @nn.compact
  def __call__(self, images, train=False):
    x = images.mean(axis=(1, 2))
    x = nn.BatchNorm(use_running_average=not train)(x)
    return nn.Dense(self.num_landmarks * 2)(x).reshape(images.shape[0], self.num_landmarks, 2)


def _meta(**extra):
  return dict(model="tiny", num_landmarks=3, image_size=8, dataset="synthetic", overrides={},
              dtype="float32", **extra)


def _variables(seed):
  return _TinyModel(3).init(jax.random.PRNGKey(seed), jnp.zeros((1, 8, 8, 3)))


@pytest.fixture
def patched_models(monkeypatch):
  from kd_landmarks import models
  calls = []

  def create_model(name, *, num_landmarks, **overrides):
    calls.append((name, num_landmarks, overrides))
    return _TinyModel(num_landmarks, dtype=overrides.get("dtype", jnp.float32))

  monkeypatch.setattr(models, "create_model", create_model, raising=False)
  return calls


def test_model_json_requires_every_key(tmp_path):
  with pytest.raises(ValueError, match="lacks"):
    checkpoint.write_model_json(str(tmp_path), {"model": "x"})
  path = checkpoint.write_model_json(str(tmp_path), _meta(phase="student", loss="kd"))
  assert json.load(open(path))["phase"] == "student"
  assert checkpoint.read_model_json(str(tmp_path))["num_landmarks"] == 3


def test_missing_model_dir_says_how_to_train(tmp_path):
  with pytest.raises(FileNotFoundError, match="kd_landmarks.main"):
    checkpoint.read_model_json(str(tmp_path / "nope"))


def test_best_keeps_lowest_nme_and_loader_prefers_it(tmp_path, patched_models):
  model_dir = str(tmp_path / "student_kd")
  checkpoint.write_model_json(model_dir, _meta())
  candidates = {10: (_variables(1), 0.08), 20: (_variables(2), 0.05), 30: (_variables(3), 0.07),
                40: (_variables(4), float("nan"))}
  best = checkpoint.best_manager(model_dir)
  for step, (variables, nme) in candidates.items():
    checkpoint.save_best(best, step, variables, nme)
  # The train state's newest checkpoint is another model again: the loader must not take it.
  state = checkpoint.state_manager(model_dir)
  checkpoint.save_state(state, 40, dict(step=40, **_variables(5)))

  module, variables, meta = checkpoint.load_inference_variables(model_dir)
  assert meta["checkpoint"] == ("best", 20)
  # Loaded for inference: the portable kernels (evaluation, export and predict never take the CPU training ones).
  assert patched_models == [("tiny", 3, {"kernels": models.PORTABLE, "dtype": jnp.float32})]
  np.testing.assert_array_equal(variables["params"]["Dense_0"]["kernel"],
                                candidates[20][0]["params"]["Dense_0"]["kernel"])
  out = module.apply(variables, jnp.ones((2, 8, 8, 3)), train=False)
  assert out.shape == (2, 3, 2)


def test_loader_falls_back_to_latest_state(tmp_path, patched_models):
  model_dir = str(tmp_path / "teacher_tough")
  checkpoint.write_model_json(model_dir, _meta())
  state = checkpoint.state_manager(model_dir)
  for step in (5, 9):
    checkpoint.save_state(state, step, dict(step=step, **_variables(step)))
  _, variables, meta = checkpoint.load_inference_variables(model_dir)
  assert meta["checkpoint"] == ("latest", 9)
  np.testing.assert_array_equal(variables["batch_stats"]["BatchNorm_0"]["mean"],
                                _variables(9)["batch_stats"]["BatchNorm_0"]["mean"])


def test_loader_without_checkpoint_says_train_first(tmp_path, patched_models):
  model_dir = str(tmp_path / "m")
  checkpoint.write_model_json(model_dir, _meta())
  with pytest.raises(FileNotFoundError, match="never saved"):
    checkpoint.load_inference_variables(model_dir)


def test_restore_state_keeps_structure_and_step(tmp_path):
  import optax
  variables = _variables(0)
  tx = optax.adam(1e-3)
  tree = dict(step=7, params=variables["params"], batch_stats=variables["batch_stats"],
              opt_state=tx.init(variables["params"]))
  manager = checkpoint.state_manager(str(tmp_path))
  assert checkpoint.restore_state(manager, tree) is None
  checkpoint.save_state(manager, 7, tree)
  restored = checkpoint.restore_state(checkpoint.state_manager(str(tmp_path)), tree)
  assert int(restored["step"]) == 7
  assert type(restored["opt_state"][0]).__name__ == "ScaleByAdamState"
  jax.tree.map(np.testing.assert_array_equal, restored["params"], tree["params"])


def test_resume_check_compares_only_what_makes_another_model(tmp_path):
  model_dir = str(tmp_path / "student_kd")
  stored = dict(_meta(config={"student": {"num_train_steps": 4}}), overrides={"width": (1, 2)})
  checkpoint.write_model_json(model_dir, stored)
  # model.json alone (a run killed before its first save) holds nothing to resume.
  checkpoint.check_resumable(model_dir, dict(stored, dataset="wflw"))
  checkpoint.save_best(checkpoint.best_manager(model_dir), 2, _variables(0), val_nme=0.1)
  assert checkpoint.has_checkpoint(model_dir)
  # The tuple is the list model.json holds; steps, dtype and the rest of the config may change.
  checkpoint.check_resumable(model_dir, dict(stored, dtype="bfloat16",
                                             config={"student": {"num_train_steps": 8}}))
  with pytest.raises(ValueError) as error:
    checkpoint.check_resumable(model_dir, dict(stored, image_size=16, overrides={"width": (1, 3)}))
  message = str(error.value)
  assert model_dir in message and "delete " + model_dir in message
  assert "image_size: stored 8, configured 16" in message
  assert "overrides: stored {'width': [1, 2]}, configured {'width': [1, 3]}" in message
  assert "dataset" not in message


@pytest.mark.slow
def test_sigkill_mid_run_then_restart_ends_like_an_uninterrupted_run(tmp_path):
  """A run killed with SIGKILL resumes from its last checkpoint and ends with the uninterrupted params."""
  import signal
  import subprocess
  import sys
  import time
  worker = os.path.join(os.path.dirname(__file__), "train_worker.py")
  killed_dir = str(tmp_path / "killed")
  command = [sys.executable, worker, "fit", str(tmp_path / "unused.npz"), killed_dir, "--steps", "400",
             "--checkpoint_every", "4"]
  process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  try:
    deadline = time.time() + 600
    # Wait for a checkpoint past the first, then kill without warning (no cleanup handlers run).
    while time.time() < deadline and process.poll() is None:
      steps = [int(d) for d in os.listdir(os.path.join(killed_dir, "checkpoints"))
               if d.isdigit()] if os.path.isdir(os.path.join(killed_dir, "checkpoints")) else []
      if steps and max(steps) >= 8:
        break
      time.sleep(0.2)
    assert process.poll() is None, "the run ended before it could be killed: " + process.stderr.read()[-2000:]
    process.send_signal(signal.SIGKILL)
    process.wait()
  finally:
    process.kill()
  killed_at = checkpoint.state_manager(killed_dir).latest_step()
  assert 8 <= killed_at < 400
  assert not os.path.exists(os.path.join(killed_dir, "train_done.json"))
  # Restart the killed run (resumes) and run an uninterrupted one; same number of steps, 20 here.
  resumed_out, whole_out = tmp_path / "resumed.npz", tmp_path / "whole.npz"
  total = str(killed_at + 8)
  for out, model_dir in ((resumed_out, killed_dir), (whole_out, str(tmp_path / "whole"))):
    result = subprocess.run([sys.executable, worker, "fit", str(out), model_dir, "--steps", total,
                             "--checkpoint_every", "4"], capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
  resumed, whole = np.load(resumed_out), np.load(whole_out)
  assert sorted(resumed) == sorted(whole)
  for name in whole:
    np.testing.assert_array_equal(resumed[name], whole[name])


# ----------------------------------------------------------------------------------------------------------
# Damaged files.


def _largest_file(directory):
  files = [os.path.join(root, name) for root, _, names in os.walk(directory) for name in names]
  return max(files, key=os.path.getsize)


def _saved_steps(tmp_path, steps=(2, 4)):
  rng = np.random.default_rng(0)
  tree = {"step": np.asarray(0, np.int32), "params": {"w": rng.normal(size=4096).astype(np.float32)}}
  manager = checkpoint.state_manager(str(tmp_path))
  trees = {}
  for step in steps:
    tree = trees[step] = {"step": np.asarray(step, np.int32), "params": {"w": tree["params"]["w"] + 1}}
    checkpoint.save_state(manager, step, tree)
  return trees


def test_truncated_newest_checkpoint_is_reported_and_the_older_one_restored(tmp_path, caplog):
  trees = _saved_steps(tmp_path)
  tree = trees[4]
  with open(_largest_file(tmp_path / "checkpoints" / "4"), "r+b") as f:
    f.truncate(100)
  manager = checkpoint.state_manager(str(tmp_path))
  restored = checkpoint.restore_state(manager, tree)
  assert int(restored["step"]) == 2
  np.testing.assert_array_equal(restored["params"]["w"], trees[2]["params"]["w"])
  warning = [r.getMessage() for r in caplog.records if "cannot be read" in r.getMessage()]
  assert len(warning) == 1 and "\n" not in warning[0]
  assert f"checkpoint {tmp_path}/checkpoints/4 cannot be read (ValueError: OUT_OF_RANGE" in warning[0]
  # Moved aside, so that training can save step 4 again.
  assert manager.all_steps() == [2]
  assert [n.split("-")[0] for n in os.listdir(tmp_path / checkpoint.UNREADABLE_DIR)] == ["4"]
  checkpoint.save_state(manager, 4, tree)
  assert checkpoint.state_manager(str(tmp_path)).all_steps() == [2, 4]


def test_empty_metadata_names_the_file_and_falls_back(tmp_path, caplog):
  tree = _saved_steps(tmp_path)[4]
  open(tmp_path / "checkpoints" / "4" / "default" / "_METADATA", "w").close()
  restored = checkpoint.restore_state(checkpoint.state_manager(str(tmp_path)), tree)
  assert int(restored["step"]) == 2
  assert any("JSONDecodeError" in r.getMessage() and
             f"({tmp_path}/checkpoints/4/default/_METADATA is empty or not JSON)" in r.getMessage()
             for r in caplog.records)


def test_no_readable_checkpoint_says_what_to_delete(tmp_path):
  tree = _saved_steps(tmp_path)[4]
  for step in (2, 4):
    open(tmp_path / "checkpoints" / str(step) / "default" / "_METADATA", "w").close()
  with pytest.raises(checkpoint.CheckpointError,
                     match=rf"no checkpoint in {tmp_path}/checkpoints can be read: .*/4: JSONDecodeError.*"
                     rf"/2: JSONDecodeError.*Delete {tmp_path}/checkpoints to train this model from the start"):
    checkpoint.restore_state(checkpoint.state_manager(str(tmp_path)), tree)


def test_fit_resumes_from_the_older_checkpoint_and_ends_like_an_uninterrupted_run(tmp_path):
  import train_fixtures as fx
  from kd_landmarks.training import train
  whole = train.fit(fx.fit_setup(str(tmp_path / "a"), num_train_steps=6, checkpoint_every=2))
  damaged = str(tmp_path / "b")
  train.fit(fx.fit_setup(damaged, num_train_steps=6, checkpoint_every=2, stop_after_steps=4))
  with open(_largest_file(os.path.join(damaged, "checkpoints", "4")), "r+b") as f:
    f.truncate(64)
  resumed = train.fit(fx.fit_setup(damaged, num_train_steps=6, checkpoint_every=2))
  jax.tree.map(np.testing.assert_array_equal, resumed, whole)


def test_inference_on_an_unreadable_checkpoint_is_one_line(tmp_path, patched_models):
  model_dir = str(tmp_path)
  checkpoint.write_model_json(model_dir, _meta())
  checkpoint.save_best(checkpoint.best_manager(model_dir), 3, _variables(0), 0.1)
  open(tmp_path / "best" / "3" / "default" / "_METADATA", "w").close()
  with pytest.raises(checkpoint.CheckpointError, match=rf"checkpoint {tmp_path}/best/3 cannot be read "
                     r"\(JSONDecodeError: .*_METADATA is empty or not JSON\)\); delete "):
    checkpoint.load_inference_variables(model_dir)


def test_corrupt_model_json_names_the_file(tmp_path):
  # Probe: a JSONDecodeError naming no file.
  checkpoint.write_model_json(str(tmp_path), _meta())
  with open(tmp_path / "model.json", "w") as f:
    f.write('{"model": "tiny", "num_la')
  checkpoint.save_state(checkpoint.state_manager(str(tmp_path)), 1, {"w": np.zeros(2, np.float32)})
  for call in (checkpoint.read_model_json, lambda d: checkpoint.check_resumable(d, _meta())):
    with pytest.raises(ValueError, match=rf"{tmp_path}/model.json is not valid JSON \(.*line 1 column .*\): "
                       "delete it and re-run this model's training phase"):
      call(str(tmp_path))


def test_num_landmarks_disagreeing_with_the_checkpoint_names_the_field(tmp_path, patched_models):
  # Probe: flax's ScopeParamShapeError at the first forward pass.
  model_dir = str(tmp_path)
  checkpoint.write_model_json(model_dir, _meta())
  checkpoint.save_best(checkpoint.best_manager(model_dir), 3, _variables(0), 0.1)
  checkpoint.write_model_json(model_dir, dict(_meta(), num_landmarks=5))
  with pytest.raises(ValueError, match=rf"{tmp_path}/model.json says num_landmarks=5 but the checkpoint's "
                     r"output layer \(params/Dense_0/bias, shape \(6,\)\) predicts 3 landmarks: set "
                     rf"\"num_landmarks\": 3 in {tmp_path}/model.json"):
    checkpoint.load_inference_variables(model_dir)
  checkpoint.write_model_json(model_dir, _meta())
  _, variables, _ = checkpoint.load_inference_variables(model_dir)  # Consistent again: loads.
  assert variables["params"]["Dense_0"]["kernel"].shape == (3, 6)


def test_newest_checkpoint_with_other_values_is_caught_by_its_checksum(tmp_path, caplog):
  # Probe: a bit-flipped file; orbax restores raw float data without a checksum (2.7e14 instead of ~1).
  # The damage here is step 2's array files in step 4's place: valid files with other values, which orbax
  # reads back without complaint, as it does a flipped bit in raw float data. (A searched bit flip depended on
  # orbax's file layout, which differs between runs: with zstd frames whose own checks fail first, the search
  # could run for hours.)
  import train_fixtures as fx
  from kd_landmarks.training import train
  from test_train import _host_tree
  model_dir = str(tmp_path / "m")
  train.fit(fx.fit_setup(model_dir, num_train_steps=6, checkpoint_every=2, stop_after_steps=4))
  # A train state saved by fit passes its own checksum: the newest step restores without a warning.
  intact = checkpoint.restore_state(checkpoint.state_manager(model_dir), _host_tree())
  assert int(intact["step"]) == 4 and not [r for r in caplog.records if "cannot be read" in r.getMessage()]
  step_two = checkpoint.restore_state(checkpoint.state_manager(model_dir), _host_tree(), step=2)
  step_dirs = [os.path.join(model_dir, "checkpoints", str(step), "default") for step in (2, 4)]
  shutil.rmtree(step_dirs[1])
  shutil.copytree(step_dirs[0], step_dirs[1])
  # orbax alone (an explicit step skips the checksum) reads step 4 back silently, with other values.
  read = checkpoint.restore_state(checkpoint.state_manager(model_dir), _host_tree(), step=4)
  assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(read["params"]),
                                                      jax.tree.leaves(intact["params"])))
  restored = checkpoint.restore_state(checkpoint.state_manager(model_dir), _host_tree())
  assert int(restored["step"]) == 2
  jax.tree.map(np.testing.assert_array_equal, restored["params"], step_two["params"])
  assert any("checksum mismatch" in r.getMessage() and "checkpoints/4" in r.getMessage() for r in caplog.records)


def test_bit_flipped_best_checkpoint_is_refused_for_inference(tmp_path, patched_models):
  model_dir = str(tmp_path)
  checkpoint.write_model_json(model_dir, _meta())
  variables = _variables(0)
  checkpoint.save_best(checkpoint.best_manager(model_dir), 3, variables, 0.1)
  _, loaded, _ = checkpoint.load_inference_variables(model_dir)  # Intact: its own checksum passes.
  jax.tree.map(np.testing.assert_array_equal, loaded["params"], dict(variables["params"]))
  # Its array files replaced by another model's of the same shapes (valid files, other values): as a
  # flipped bit in raw float data, orbax reads them back without complaint.
  other_dir = tmp_path / "other"
  checkpoint.save_best(checkpoint.best_manager(str(other_dir)), 3, _variables(1), 0.1)
  import shutil
  shutil.rmtree(tmp_path / "best" / "3" / "default")
  shutil.copytree(other_dir / "best" / "3" / "default", tmp_path / "best" / "3" / "default")
  with pytest.raises(checkpoint.CheckpointError, match=rf"checkpoint {tmp_path}/best/3 cannot be read "
                     r"\(ValueError: checksum mismatch"):
    checkpoint.load_inference_variables(model_dir)


def test_a_full_disk_while_saving_a_step_is_one_write_error_and_leaves_nothing(tmp_path, monkeypatch, caplog):
  # Probe: a full disk during training gave 236 lines. tensorstore's error, as measured by saving a 1 MB state
  # into a 200 kB tmpfs: a ValueError ending in the OS error code, logged with its traceback by orbax's thread.
  from kd_landmarks import errors
  manager = checkpoint.state_manager(str(tmp_path))
  partial = tmp_path / "checkpoints" / "4.orbax-checkpoint-tmp"

  def save_on_a_full_disk(step, args, force):
    del args, force
    (partial / "ocdbt.process_0").mkdir(parents=True)
    message = (f'RESOURCE_EXHAUSTED: Error writing "w/0" in OCDBT database at local file "{partial}/": Failed '
               "writing: Failed to write 881451 bytes to file 14: No space left on device [os_error_code='28']")
    import logging
    logging.getLogger("absl").error("_SignalingThread.run() raised an exception: %s", message)
    raise ValueError(message)

  monkeypatch.setattr(manager, "save", save_on_a_full_disk)
  with pytest.raises(errors.WriteError) as raised:
    checkpoint.save_state(manager, 4, {"w": np.zeros(3, np.float32)})
  assert str(raised.value) == (f"cannot write {tmp_path}/checkpoints/4: the disk is full: free space there or "
                               "choose a folder on another disk")
  assert raised.value.errno == 28 and raised.value.filename == f"{tmp_path}/checkpoints/4"
  assert os.listdir(tmp_path / "checkpoints") == []  # orbax's temporary step is gone, no step to read back.
  assert "os_error_code" not in caplog.text  # Reported once, by the raised error, not also as a traceback.
  # Any other ValueError is a fault, unchanged.
  monkeypatch.setattr(manager, "save", lambda *a, **k: (_ for _ in ()).throw(ValueError("shape mismatch")))
  with pytest.raises(ValueError, match="^shape mismatch$"):
    checkpoint.save_state(manager, 5, {"w": np.zeros(3, np.float32)})
