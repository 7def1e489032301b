"""Tests that pin the pipeline's wiring: which teacher learns which target, what the
teacher cache holds, how cached predictions are augmented, online against cached teachers, the
author_code variant through a step, and phase=all's skips. Every expected value is computed here from the
batch, independently of kd_landmarks.pipeline."""
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kd_landmarks import augment
from kd_landmarks.training import backend
from kd_landmarks.training import checkpoint
from kd_landmarks import coords
from kd_landmarks import losses
from kd_landmarks import pipeline
from kd_landmarks.training import train
from kd_landmarks.datasets import teacher_cache
import train_fixtures as fx
from test_main import _config
from test_train import _single_device_step
from test_train import _state

NUM_EXAMPLES = 12
AUGMENT_OFF = augment.AugmentConfig(box_expansion=False, shift=False, rotation=False, flip=False,
                                    photometric=False, noise=False)


def _wiring_config(**overrides):
  values = {"image_size": fx.IMAGE_SIZE, "eval_batch_size": 4, "teacher.batch_size": 4,
            "student.batch_size": 4, "compilation_cache": False}
  values.update(overrides)
  # The phases are called directly here, not through pipeline.run: resolve the platform as run does.
  return backend.resolve_settings(_config(**values), "cpu")


def _hand_step_loss(spec, state, batch, rng, sets, *, loss_fn, gt_key, tough_key=None, tolerant_key=None,
                    variant="paper"):
  """The step's loss written out: augment every set in ``sets`` as the train steps do (device 0 of the
  'data' axis, the spec's augmentation kernels), the train-mode forward, then ``loss_fn`` on the named targets."""
  augment_rng, dropout_rng = jax.random.split(jax.random.fold_in(rng, 0))
  images, targets, _ = augment.augment(augment_rng, jnp.asarray(batch["image"]),
                                       {k: jnp.asarray(v) for k, v in sets.items()}, reference="landmarks",
                                       out_size=spec.image_size, flip_permutation=spec.flip_permutation,
                                       config=spec.augment_config, kernels=spec.augment_kernels)
  pred, _ = state.apply_fn({"params": state.params, "batch_stats": state.batch_stats}, images, train=True,
                           mutable=["batch_stats"], rngs={"dropout": dropout_rng})
  gt = targets[gt_key]
  return float(loss_fn(pred.astype(jnp.float32), gt, targets[tough_key or gt_key],
                       targets[tolerant_key or gt_key], variant=variant, reduction="mean"))


# ---------------------------------------------------------------------------------- teacher targets


@pytest.mark.parametrize("teacher, target_key, other_key", [("tough", "landmarks", "soft_landmarks"),
                                                            ("tolerant", "soft_landmarks", "landmarks")])
def test_tough_learns_the_ground_truth_and_tolerant_the_soft_landmarks(tmp_path, monkeypatch, teacher,
                                                                       target_key, other_key):
  source = fx.InMemorySource(NUM_EXAMPLES)
  monkeypatch.setattr(pipeline, "load_split", lambda config, workdir, split: source)
  captured = {}
  monkeypatch.setattr(train, "fit", lambda setup: captured.setdefault("setup", setup))
  pipeline.train_teacher(_wiring_config(), str(tmp_path), teacher)
  spec = captured["setup"].spec
  # The batch the phase's iterator reads, then one step of the phase's own spec on the tiny model
  # (_single_device_step gives it to the step through train.step_batch, as fit does).
  batch = fx.make_batch(source, range(4), keys=train.batch_keys(spec))
  assert set(train.step_batch(spec, batch)) == {"image", "landmarks", "target"}  # One program for both teachers.
  state = _state()
  rng = jax.random.PRNGKey(5)
  _, metrics = _single_device_step(spec, state, batch, rng)
  sets = {"landmarks": batch["landmarks"], "soft_landmarks": source.soft[:4]}
  expected = _hand_step_loss(spec, state, batch, rng, sets, loss_fn=losses.get_student_loss("l2"),
                             gt_key=target_key)
  wrong = _hand_step_loss(spec, state, batch, rng, sets, loss_fn=losses.get_student_loss("l2"),
                          gt_key=other_key)
  np.testing.assert_allclose(metrics["loss"], expected, rtol=1e-5)
  assert abs(expected - wrong) > 1e-3 * expected  # The two targets are told apart by the loss.
  assert captured["setup"].model_dir == os.path.join(str(tmp_path), f"teacher_{teacher}")


# ------------------------------------------------------------------------------------ teacher cache


class _TeacherWorkdir:
  """A workdir with two distinct trained teachers (tiny models, different weights) on an in-memory
  train split; checkpoint loading and the split are patched to return them."""

  def __init__(self, tmp_path, monkeypatch):
    self.source = fx.InMemorySource(NUM_EXAMPLES)
    self.workdir = str(tmp_path)
    self.module = fx.TinyModel()
    dummy = jnp.zeros((1, fx.IMAGE_SIZE, fx.IMAGE_SIZE, 3))
    self.variables = {}
    for seed, teacher in enumerate(pipeline.TEACHERS):
      variables = self.module.init(jax.random.PRNGKey(10 + seed), dummy)
      # Moving batch statistics away from (0, 1), so that eval mode differs from train mode.
      variables = {"params": variables["params"], "batch_stats": jax.tree.map(
          lambda x, s=seed: x + 0.1 * (s + 1), variables["batch_stats"])}
      self.variables[teacher] = variables
      model_dir = os.path.join(self.workdir, f"teacher_{teacher}")
      os.makedirs(model_dir)
      checkpoint.write_done(model_dir, 1)
    monkeypatch.setattr(pipeline, "load_split", lambda config, workdir, split: self.source)
    monkeypatch.setattr(checkpoint, "load_inference_variables", self._load)

  def _load(self, model_dir):
    teacher = os.path.basename(model_dir).split("_", 1)[1]
    return self.module, self.variables[teacher], {
        "image_size": fx.IMAGE_SIZE, "model": "tiny", "overrides": {}, "dtype": "float32",
        "checkpoint": ("best", 1)}

  def expected_crop_predictions(self, teacher):
    """Each example on its own: the evaluation crop, the teacher in eval mode, back to stored-crop px."""
    rows = []
    for i in range(len(self.source)):
      example = self.source[i]
      images, _, out_to_input = augment.preprocess_eval(example["image"][None],
                                                        {"landmarks": example["landmarks"][None]},
                                                        out_size=fx.IMAGE_SIZE)
      pred = self.module.apply(self.variables[teacher], images, train=False)
      rows.append(np.asarray(coords.apply_affine(np.asarray(out_to_input[0], np.float64),
                                                 coords.to_pixels(np.asarray(pred[0], np.float64),
                                                                  fx.IMAGE_SIZE))))
    return np.stack(rows)


@pytest.fixture
def teacher_workdir(tmp_path, monkeypatch):
  return _TeacherWorkdir(tmp_path, monkeypatch)


def test_cache_holds_each_teachers_own_predictions_by_example_index(teacher_workdir):
  path = pipeline.cache_teachers(_wiring_config(), teacher_workdir.workdir)
  cache = teacher_cache.load_teacher_outputs(path, dataset="synthetic").as_cache()
  for teacher in pipeline.TEACHERS:
    np.testing.assert_allclose(cache[teacher], teacher_workdir.expected_crop_predictions(teacher),
                               rtol=1e-5, atol=1e-4)
  assert np.abs(cache["tough"] - cache["tolerant"]).max() > 0.1  # Two different teachers.


def test_online_and_cached_teachers_give_the_same_student_step(teacher_workdir):
  """With the augmentation off, the training crop is the evaluation crop the cache was made on, so the
  cached predictions (stored-crop pixels, transformed by the step) must equal the online teachers'."""
  path = pipeline.cache_teachers(_wiring_config(), teacher_workdir.workdir)
  cache = teacher_cache.load_teacher_outputs(path, dataset="synthetic").as_cache()
  indices = np.array([7, 2, 9, 4])
  batch = fx.make_batch(teacher_workdir.source, indices)
  cached_batch = dict(batch, tough=cache["tough"][indices], tolerant=cache["tolerant"][indices])
  rng = jax.random.PRNGKey(3)
  spec_cached = train.StepSpec(
      target="student", loss_fn=losses.get_student_loss("kd"), loss_variant="paper", image_size=fx.IMAGE_SIZE,
      flip_permutation=None, augment_config=AUGMENT_OFF, learning_rate_fn=lambda step: 1e-2, distill=True)
  module = teacher_workdir.module
  spec_online = train.StepSpec(**{**spec_cached.__dict__, "teacher_modules": {"tough": module,
                                                                              "tolerant": module}})
  cached_state, cached_metrics = _single_device_step(spec_cached, _state(), cached_batch, rng)
  online_state, online_metrics = _single_device_step(spec_online, _state(), batch, rng,
                                                     teacher_workdir.variables)
  np.testing.assert_allclose(cached_metrics["loss"], online_metrics["loss"], rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), cached_state.params,
               online_state.params)
  # And the value: KD-Loss on the teachers' predictions, computed by hand.
  expected = _hand_step_loss(spec_cached, _state(), batch, rng,
                             {"landmarks": batch["landmarks"], "tough": cached_batch["tough"],
                              "tolerant": cached_batch["tolerant"]},
                             loss_fn=losses.get_student_loss("kd"), gt_key="landmarks", tough_key="tough",
                             tolerant_key="tolerant")
  np.testing.assert_allclose(cached_metrics["loss"], expected, rtol=1e-5)


# ------------------------------------------------------- cached predictions through the augmentation


@pytest.mark.parametrize("variant", ["paper", "author_code"])
def test_cached_predictions_are_augmented_like_the_landmarks(variant):
  """Rotation and flips on: the step's KD-Loss equals the loss of the student against the teachers'
  cached predictions put through the very transform of the image (flip relabelling included)."""
  source = fx.InMemorySource(8)
  batch = fx.make_batch(source, range(4))
  rng = np.random.default_rng(1)
  tough = (batch["landmarks"] + rng.normal(0, 0.7, batch["landmarks"].shape)).astype(np.float32)
  tolerant = (batch["landmarks"] + rng.normal(0, 1.3, batch["landmarks"].shape)).astype(np.float32)
  cached = dict(batch, tough=tough, tolerant=tolerant)
  config = augment.AugmentConfig(rotation=True, max_rotation_degrees=30.0, flip=True, flip_probability=0.5)
  spec = train.StepSpec(target="student", loss_fn=losses.get_student_loss("kd"), loss_variant=variant,
                        image_size=fx.IMAGE_SIZE, flip_permutation=fx.make_spec().flip_permutation,
                        augment_config=config, learning_rate_fn=lambda step: 1e-2, distill=True)
  state = _state()
  step_rng = jax.random.PRNGKey(11)
  _, metrics = _single_device_step(spec, state, cached, step_rng)
  sets = {"landmarks": batch["landmarks"], "tough": tough, "tolerant": tolerant}
  hand = lambda **kw: _hand_step_loss(spec, state, batch, step_rng, sets, loss_fn=losses.kd_loss,
                                      gt_key="landmarks", **kw)
  expected = hand(tough_key="tough", tolerant_key="tolerant", variant=variant)
  np.testing.assert_allclose(metrics["loss"], expected, rtol=1e-5)
  # Each wire matters: teachers equal to the ground truth, swapped teachers (author_code weighs them
  # differently; the paper's constants are symmetric), or the other variant give another loss.
  assert abs(hand(variant=variant) - expected) > 1e-4 * expected
  if variant == "author_code":
    assert abs(hand(tough_key="tolerant", tolerant_key="tough", variant=variant) - expected) > 1e-3 * expected
  other = "paper" if variant == "author_code" else "author_code"
  assert abs(hand(tough_key="tough", tolerant_key="tolerant", variant=other) - expected) > 1e-4 * expected


# ------------------------------------------------------------------------------------ phase=all skips


class _Recorder:
  def __init__(self, monkeypatch):
    self.calls = []
    # Which phases run, not what they read (the preflight's checks are tested in test_main.py).
    monkeypatch.setattr(pipeline, "preflight", lambda c, w: None)
    monkeypatch.setattr(pipeline, "train_teacher", lambda c, w, t: self.calls.append(f"teacher_{t}"))
    monkeypatch.setattr(pipeline, "cache_teachers", lambda c, w: self.calls.append("cache"))
    monkeypatch.setattr(pipeline, "train_student",
                        lambda c, w, n, seed_index=0: self.calls.append(f"student_{n}"))
    # The cache's contents are checked against the training split elsewhere (test_teacher_cache.py);
    # here only its age against the teachers' done markers decides.
    monkeypatch.setattr(pipeline, "_load_checked_cache", lambda config, workdir, path: None)
    monkeypatch.setattr(pipeline, "evaluate_all", lambda c, w, skip_current: self.calls.append(
        f"eval(skip_current={skip_current})"))
    monkeypatch.setattr(pipeline, "write_report", lambda c, w: self.calls.append("report"))

  def run(self, workdir, **overrides):
    self.calls = []
    pipeline.run(_config(**{"student_seeds": 1, **overrides}), str(workdir))
    return self.calls


def _touch(path, mtime):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    f.write("{}")
  os.utime(path, (mtime, mtime))


def test_phase_all_skips(tmp_path, monkeypatch):
  recorder = _Recorder(monkeypatch)
  tail = ["eval(skip_current=True)", "report"]
  # Baselines only: no teacher, no cache.
  assert recorder.run(tmp_path, student_loss="l2,l1") == ["student_l2", "student_l1", *tail]
  # KD without a cache: both teachers, the cache, then every student.
  everything = ["teacher_tough", "teacher_tolerant", "cache", "student_l2", "student_kd", *tail]
  assert recorder.run(tmp_path, student_loss="l2,kd") == everything
  # A cache newer than both teachers' done markers is current: skipped.
  now = time.time()
  for teacher in pipeline.TEACHERS:
    _touch(os.path.join(tmp_path, f"teacher_{teacher}", checkpoint.DONE_FILE), now - 100)
  _touch(str(teacher_cache.dataset_dir(os.path.join(tmp_path, pipeline.CACHE_DIR), "synthetic")
             / "dataset_info.json"), now - 50)
  assert "cache" not in recorder.run(tmp_path, student_loss="l2,kd")
  # The Tolerant teacher retrained after the cache: the cache is stale and made again.
  _touch(os.path.join(tmp_path, "teacher_tolerant", checkpoint.DONE_FILE), now - 10)
  assert recorder.run(tmp_path, student_loss="l2,kd") == everything
  # Online teachers never read the cache; a report-less config skips the report.
  assert recorder.run(tmp_path, student_loss="kd", teachers_online=True, student_image_size=0,
                      write_report=False) == [
      "teacher_tough", "teacher_tolerant", "student_kd", "eval(skip_current=True)"]
  # A single phase runs whatever the skips would say.
  assert recorder.run(tmp_path, phase="cache_teachers", student_loss="l2") == ["cache"]
  assert recorder.run(tmp_path, phase="eval") == ["eval(skip_current=False)"]


def test_the_pipeline_evaluates_with_its_training_kernels(tmp_path, monkeypatch):
  """phase eval on a CPU computes with the kernels training used (config.cpu_kernels), the portable ones when
  they are off."""
  from kd_landmarks import models
  from kd_landmarks.evaluation import evaluate
  monkeypatch.setattr(pipeline, "trained_model_dirs", lambda workdir: [str(tmp_path / "student_kd")])
  seen = []
  monkeypatch.setattr(evaluate, "evaluate_model", lambda model_dir, **kwargs: seen.append(kwargs["kernels"]))
  for cpu_kernels in (True, False):
    config = _wiring_config(cpu_kernels=cpu_kernels)
    pipeline.evaluate_all(config, str(tmp_path))
    assert seen[-1] == train.training_kernels(config).model
  assert seen[0] != models.PORTABLE and seen[1] == models.PORTABLE
