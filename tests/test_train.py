"""Tests of kd_landmarks.training.train: learning rate, the train step, its batches, fit (resume, NaN)."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kd_landmarks.training import checkpoint
from kd_landmarks.training import input_pipeline
from kd_landmarks.training import parallel
from kd_landmarks import pipeline
from kd_landmarks.training import train
import train_fixtures as fx


def _config(**optimizer):
  import ml_collections
  base = dict(learning_rate=1e-3, b1=0.9, b2=0.999, eps=1e-7, decay=1e-6)
  base.update(optimizer)
  return ml_collections.ConfigDict({"optimizer": base})


def test_learning_rate_is_keras_time_based_decay():
  # Section 4.4: lr 1e-3, decay 1e-6 -> lr / (1 + 1e-6 * step).
  fn = train.create_learning_rate_fn(_config())
  assert float(fn(0)) == pytest.approx(1e-3)
  assert float(fn(1_000_000)) == pytest.approx(0.5e-3)
  assert float(fn(250_000)) == pytest.approx(1e-3 / 1.25)


def test_paper_schedule_is_the_default_and_ignores_the_step_count():
  config = _config()
  assert config.optimizer.get("schedule", "paper") == "paper"
  from kd_landmarks import config_lib
  base = config_lib.base_config().optimizer
  assert (base.schedule, base.warmup_steps, base.final_lr_fraction) == ("paper", 0, 0.0)
  short, long = train.create_learning_rate_fn(config, 10), train.create_learning_rate_fn(config, 10**6)
  assert float(short(250_000)) == float(long(250_000)) == pytest.approx(1e-3 / 1.25)


def test_cosine_schedule_by_value():
  # lr 1e-2, warm-up 10 steps, final fraction 0.1, 110 steps: warm-up lr * (t + 1) / 10; then
  # lr * (0.1 + 0.9 * (1 + cos(pi * (t - 10) / 100)) / 2).
  config = _config(learning_rate=1e-2, schedule="cosine", warmup_steps=10, final_lr_fraction=0.1)
  fn = train.create_learning_rate_fn(config, 110)
  expected = {0: 1e-3, 4: 5e-3, 9: 1e-2, 10: 1e-2, 35: 1e-2 * (0.1 + 0.45 * (1 + np.cos(np.pi / 4))),
              60: 5.5e-3, 85: 1e-2 * (0.1 + 0.45 * (1 - np.cos(np.pi / 4))), 110: 1e-3, 500: 1e-3}
  for step, value in expected.items():
    assert float(fn(step)) == pytest.approx(value, rel=1e-5), step
  # Without warm-up the decay starts at lr and reaches final * lr at the last step.
  config = _config(learning_rate=2e-3, schedule="cosine", warmup_steps=0, final_lr_fraction=0.0)
  fn = train.create_learning_rate_fn(config, 100)
  assert [float(fn(t)) for t in (0, 50, 100)] == pytest.approx([2e-3, 1e-3, 0.0], abs=1e-9)
  # The optimiser follows it: Adam's first step is -lr_0 * sign(g), here lr_0 = lr / warmup_steps.
  config = _config(learning_rate=0.1, schedule="cosine", warmup_steps=4, final_lr_fraction=0.0)
  tx = train.create_optimizer(config, train.create_learning_rate_fn(config, 20))
  params = {"w": jnp.array([1.0, -2.0])}
  updates, _ = tx.update({"w": jnp.array([0.5, -4.0])}, tx.init(params), params)
  np.testing.assert_allclose(updates["w"], [-0.025, 0.025], rtol=1e-3)


def test_cosine_schedule_needs_the_step_count_and_known_names():
  config = _config(schedule="cosine", warmup_steps=10, final_lr_fraction=0.0)
  with pytest.raises(ValueError, match="needs the phase's num_train_steps"):
    train.create_learning_rate_fn(config)
  with pytest.raises(ValueError, match="needs the phase's num_train_steps"):
    train.create_learning_rate_fn(config, 0)
  # A run shorter than the warm-up (a smoke test) is all warm-up: lr * (t + 1) / warmup_steps.
  fn = train.create_learning_rate_fn(_config(learning_rate=1e-2, schedule="cosine", warmup_steps=100,
                                             final_lr_fraction=0.0), 3)
  assert [float(fn(t)) for t in (0, 1, 2)] == pytest.approx([1e-4, 2e-4, 3e-4])
  with pytest.raises(ValueError, match="unknown config.optimizer.schedule 'step'"):
    train.create_learning_rate_fn(_config(schedule="step"), 100)


def test_optimizer_first_step_is_adam():
  # Adam's first update is -lr * g / (|g| + eps') = -lr * sign(g) (bias-corrected m/sqrt(v) = sign).
  config = _config(learning_rate=0.1)
  tx = train.create_optimizer(config, train.create_learning_rate_fn(config))
  params = {"w": jnp.array([1.0, -2.0, 3.0])}
  grads = {"w": jnp.array([0.5, -4.0, 1e-3])}
  updates, _ = tx.update(grads, tx.init(params), params)
  np.testing.assert_allclose(updates["w"], -0.1 * np.sign(grads["w"]), rtol=1e-3)


def test_optimizer_second_step_reads_b1_b2_eps_and_decay_from_the_config():
  # The first step is blind to b1/b2 (it is -lr * sign(g)); the second is not. Adam by hand (Kingma & Ba,
  # Algorithm 1) with non-default b1, b2, eps and the time-based decay at step 1.
  lr, b1, b2, eps, decay = 0.1, 0.5, 0.75, 1e-3, 0.5
  config = _config(learning_rate=lr, b1=b1, b2=b2, eps=eps, decay=decay)
  tx = train.create_optimizer(config, train.create_learning_rate_fn(config))
  params = {"w": jnp.array([1.0, -2.0, 3.0])}
  g1, g2 = np.array([0.5, -4.0, 0.25]), np.array([-1.0, 2.0, 0.5])
  state = tx.init(params)
  _, state = tx.update({"w": jnp.asarray(g1)}, state, params)
  updates, _ = tx.update({"w": jnp.asarray(g2)}, state, params)
  m1, v1 = (1 - b1) * g1, (1 - b2) * g1 ** 2
  m2, v2 = b1 * m1 + (1 - b1) * g2, b2 * v1 + (1 - b2) * g2 ** 2
  m_hat, v_hat = m2 / (1 - b1 ** 2), v2 / (1 - b2 ** 2)
  expected = -(lr / (1 + decay * 1)) * m_hat / (np.sqrt(v_hat) + eps)
  np.testing.assert_allclose(updates["w"], expected, rtol=1e-5)
  # The paper's b1, b2 give another step: the config's values reach optax.
  default = _config(learning_rate=lr, eps=eps, decay=decay)
  tx_default = train.create_optimizer(default, train.create_learning_rate_fn(default))
  _, state = tx_default.update({"w": jnp.asarray(g1)}, tx_default.init(params), params)
  other, _ = tx_default.update({"w": jnp.asarray(g2)}, state, params)
  assert np.abs(np.asarray(other["w"]) - expected).max() > 1e-3


def test_train_batches_from_a_resume_step_join_the_teacher_cache_by_index():
  source = fx.InMemorySource(12)
  table = np.arange(12, dtype=np.float32)[:, None, None] * np.ones((1, fx.NUM_LANDMARKS, 2), np.float32)
  batches = input_pipeline.make_train_iterator(source, keys=("image", "index"), global_batch_size=4, seed=3,
                                               start_step=2, teacher_cache={"tough": table, "tolerant": table})
  try:
    batch = next(batches)
  finally:
    batches.close()
  expected = input_pipeline.train_batch_indices(2, num_examples=12, global_batch_size=4, seed=3)
  np.testing.assert_array_equal(batch["index"], expected)
  np.testing.assert_array_equal(batch["tough"][:, 0, 0], expected.astype(np.float32))


def _single_device_step(spec, state, batch, rng, teachers=None):
  mesh = parallel.make_mesh(jax.devices()[:1])
  step = train.compile_train_step(spec, mesh)
  state = jax.tree.map(jnp.copy, state)  # The step donates its state; keep the caller's copy alive.
  args = (state, parallel.shard_host_batch(train.step_batch(spec, batch), mesh), rng)
  return step(*args, teachers) if teachers is not None else step(*args)


def _state(model=None, tx=None, seed=0):
  return train.create_train_state(jax.random.PRNGKey(seed), model or fx.TinyModel(), fx.IMAGE_SIZE,
                                  tx or fx.make_tx())


def test_train_step_matches_a_hand_written_step():
  """The compiled step equals: augment -> forward -> L2 grad -> Adam, written out independently."""
  import optax
  from kd_landmarks import augment
  from kd_landmarks import losses
  source = fx.InMemorySource(8)
  batch = fx.make_batch(source, range(4))
  spec = fx.make_spec()
  state = _state()
  rng = jax.random.PRNGKey(7)
  new_state, metrics = _single_device_step(spec, state, batch, rng)

  step_rng = jax.random.fold_in(rng, 0)  # Device 0 of the 'data' axis.
  augment_rng, dropout_rng = jax.random.split(step_rng)
  images, sets, _ = augment.augment(augment_rng, batch["image"], {"landmarks": batch["landmarks"]},
                                    out_size=fx.IMAGE_SIZE, flip_permutation=spec.flip_permutation,
                                    config=spec.augment_config)
  model = fx.TinyModel()

  def loss_of(params):
    pred, updates = model.apply({"params": params, "batch_stats": state.batch_stats}, images, train=True,
                                mutable=["batch_stats"])
    return jnp.mean((pred - sets["landmarks"]) ** 2), updates

  (loss, updates), grads = jax.value_and_grad(loss_of, has_aux=True)(state.params)
  np.testing.assert_allclose(metrics["loss"], loss, rtol=1e-5)
  tx = fx.make_tx()
  opt_updates, _ = tx.update(grads, tx.init(state.params), state.params)
  expected = optax.apply_updates(state.params, opt_updates)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), new_state.params,
               expected)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), new_state.batch_stats,
               updates["batch_stats"])
  assert int(new_state.step) == 1
  np.testing.assert_allclose(metrics["learning_rate"], 1e-2)


def test_l2_assumption_of_the_hand_written_step():
  # The hand-written step above uses the mean squared error per coordinate; pin it to losses.l2_loss.
  from kd_landmarks import losses
  pred = jnp.array([[[0.0, 0.0], [1.0, 1.0]]])
  gt = jnp.array([[[3.0, 4.0], [1.0, 1.0]]])
  assert float(losses.l2_loss(pred, gt)) == pytest.approx((9 + 16) / 4)


def test_student_step_reads_teachers_and_keeps_them_frozen():
  source = fx.InMemorySource(8)
  batch = fx.make_batch(source, range(4))
  teacher = fx.TinyModel()
  teacher_variables = {name: teacher.init(jax.random.PRNGKey(i), jnp.zeros((1, 8, 8, 3)))
                       for i, name in enumerate(pipeline.TEACHERS)}
  state = _state()
  spec_online = fx.make_spec("student", "kd", teacher_modules={"tough": teacher, "tolerant": teacher})
  new_state, metrics = _single_device_step(spec_online, state, batch, jax.random.PRNGKey(1), teacher_variables)
  assert np.isfinite(metrics["loss"])
  # The optimiser state mirrors the student's params only: no teacher leaf sneaks in.
  student_only = fx.make_tx().init(state.params)
  assert jax.tree.structure(new_state.opt_state) == jax.tree.structure(student_only)
  # Cached teachers: predictions equal to the ground truth make KD differ from L2 only by its weights;
  # with teachers far away the loss changes, so the step really reads batch['tough'/'tolerant'].
  cached = dict(batch, tough=batch["landmarks"], tolerant=batch["landmarks"])
  far = dict(batch, tough=batch["landmarks"] + 3.0, tolerant=batch["landmarks"] - 3.0)
  spec = fx.make_spec("student", "kd")
  _, near_metrics = _single_device_step(spec, _state(), cached, jax.random.PRNGKey(1))
  _, far_metrics = _single_device_step(spec, _state(), far, jax.random.PRNGKey(1))
  assert float(near_metrics["loss"]) != pytest.approx(float(far_metrics["loss"]))


def test_fit_trains_saves_and_reports_best(tmp_path):
  model_dir = str(tmp_path / "teacher_tough")
  setup = fx.fit_setup(model_dir, num_train_steps=4, checkpoint_every=2, validate=True)
  variables = train.fit(setup)
  assert checkpoint.state_manager(model_dir).all_steps() == [2, 4]
  assert json.load(open(os.path.join(model_dir, checkpoint.DONE_FILE)))["step"] == 4
  assert checkpoint.read_model_json(model_dir)["phase"] == "teacher_tough"
  assert checkpoint.best_manager(model_dir).best_step() == 4
  # TensorBoard: the train loss, the divergence metric and the validation NME series (tags stored verbatim).
  events = b"".join(open(os.path.join(model_dir, "events", name), "rb").read()
                    for name in os.listdir(os.path.join(model_dir, "events")))
  assert b"train/loss" in events and b"train/max_abs_prediction" in events and b"val/nme" in events
  # A second fit finds the run finished and returns the same variables without training.
  again = train.fit(fx.fit_setup(model_dir, num_train_steps=4))
  jax.tree.map(np.testing.assert_array_equal, again, variables)


@pytest.mark.slow
def test_interrupted_fit_resumes_to_the_same_params(tmp_path):
  whole = train.fit(fx.fit_setup(str(tmp_path / "a"), num_train_steps=6, checkpoint_every=2))
  # Stopped after 3 steps (checkpoint at 2): the restart redoes step 3 from the step-2 checkpoint.
  train.fit(fx.fit_setup(str(tmp_path / "b"), num_train_steps=6, checkpoint_every=2, stop_after_steps=3))
  assert checkpoint.state_manager(str(tmp_path / "b")).latest_step() == 3
  resumed = train.fit(fx.fit_setup(str(tmp_path / "b"), num_train_steps=6, checkpoint_every=2))
  jax.tree.map(np.testing.assert_array_equal, resumed, whole)


@pytest.mark.parametrize("key, value", [("dataset", "wflw"), ("model", "mobilenet_v2")])
def test_a_reused_workdir_does_not_resume_another_model(tmp_path, key, value):
  model_dir = str(tmp_path / "teacher_tough")
  train.fit(fx.fit_setup(model_dir, num_train_steps=4, checkpoint_every=2, stop_after_steps=2))
  setup = fx.fit_setup(model_dir, num_train_steps=4, checkpoint_every=2)
  setup.meta = dict(setup.meta, **{key: value})
  stored = checkpoint.read_model_json(model_dir)[key]
  with pytest.raises(ValueError, match=r"(?s)teacher_tough holds a checkpoint of another model.*"
                     rf"{key}: stored '{stored}', configured '{value}'.*"
                     r"Use a new --workdir, or delete .*teacher_tough to start over"):
    train.fit(setup)
  assert checkpoint.read_model_json(model_dir)[key] == stored  # Left as it was.
  assert checkpoint.state_manager(model_dir).all_steps() == [2]


def test_a_resume_may_change_the_step_count_and_the_rest_of_the_config(tmp_path):
  model_dir = str(tmp_path / "teacher_tough")

  def setup(num_train_steps, **kwargs):
    fit_setup = fx.fit_setup(model_dir, num_train_steps=num_train_steps, checkpoint_every=2, **kwargs)
    fit_setup.meta = dict(fit_setup.meta, config={"teacher": {"num_train_steps": num_train_steps}})
    return fit_setup

  trained = train.fit(setup(2))
  # The same config finds the run finished ...
  jax.tree.map(np.testing.assert_array_equal, train.fit(setup(2)), trained)
  # ... and more steps, another learning rate and logging resume from the step-2 checkpoint.
  longer = setup(6, stop_after_steps=1)
  longer.meta["config"].update(log_every_steps=1, optimizer={"learning_rate": 1e-4})
  longer.tx = fx.make_tx(learning_rate=1e-4)
  train.fit(longer)
  assert checkpoint.state_manager(model_dir).all_steps() == [2, 3]
  # model.json is the one written when the weights were started: fit never rewrites it over saved weights
  # (whether a changed config may resume at all is the pipeline's provenance check, tests/test_provenance.py).
  assert checkpoint.read_model_json(model_dir)["config"]["teacher"]["num_train_steps"] == 2


@pytest.mark.slow
def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
  model_dir = str(tmp_path / "m")
  setup = fx.fit_setup(model_dir, num_train_steps=8, checkpoint_every=2)
  source = setup.train_source
  good_steps = 3
  original_iterator = input_pipeline.make_train_iterator

  def poisoned_iterator(*args, start_step=0, **kwargs):
    for step, batch in enumerate(original_iterator(*args, start_step=start_step, **kwargs), start_step):
      if step >= good_steps:
        batch["landmarks"] = np.full_like(batch["landmarks"], np.nan)
      yield batch

  monkeypatch.setattr(input_pipeline, "make_train_iterator", poisoned_iterator)
  with pytest.raises(train.NonFiniteLossError, match=r"step 4 is not finite.*step 2"):
    train.fit(setup)
  manager = checkpoint.state_manager(model_dir)
  assert manager.latest_step() == 2
  restored = checkpoint.restore_state(manager, None and source or _host_tree())
  assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(restored["params"]))


def _host_tree():
  state = _state()
  return parallel.fetch_replicated(train._state_tree(state))  # pylint: disable=protected-access


# ----------------------------------------------------------------------------------------------------------
# Divergence and best-checkpoint selection.


def _scripted_validation(values):
  """A validate_fn returning ``values`` in turn, recording the step-order of its calls."""
  calls = []

  def validate_fn(variables):
    calls.append(variables)
    return values[len(calls) - 1]
  return validate_fn, calls


def test_finite_blow_up_stops_with_the_nan_message_and_keeps_the_last_good_checkpoint(tmp_path):
  # Probe: --config.optimizer.learning_rate=1e3 (loss 7e9, NME 10,363%, saved as best, done, exit 0).
  model_dir = str(tmp_path / "m")
  train.fit(fx.fit_setup(model_dir, num_train_steps=6, checkpoint_every=2, stop_after_steps=2))
  good = checkpoint.restore_state(checkpoint.state_manager(model_dir), _host_tree())
  setup = fx.fit_setup(model_dir, num_train_steps=6, checkpoint_every=2)
  setup.tx = fx.make_tx(learning_rate=1e3)
  # Step 3 runs on the good step-2 parameters; its lr-1e3 update throws step 4's predictions far off.
  with pytest.raises(train.DivergedError, match=r"diverged at step 4: a prediction reached .* bound 10.*"
                     r"last good checkpoint \(step 2\).*Lower --config.optimizer.learning_rate"):
    train.fit(setup)
  manager = checkpoint.state_manager(model_dir)
  assert manager.all_steps() == [2]
  kept = checkpoint.restore_state(manager, _host_tree())
  jax.tree.map(np.testing.assert_array_equal, kept["params"], good["params"])
  assert not os.path.exists(os.path.join(model_dir, checkpoint.DONE_FILE))


def test_loss_blow_up_against_the_runs_first_loss():
  # The rule on the run's own early value: 100x the first window's mean loss stops, 99x does not.
  def metrics(loss):
    return {"loss": np.float32(loss), "grad_norm": np.float32(1.0), "learning_rate": np.float32(1e-3),
            "max_abs_prediction": np.float32(0.9)}
  summary = train._check_finite([(4, metrics(0.99)), (5, metrics(1.01))], "m", 4, first_loss=0.01)  # pylint: disable=protected-access
  assert summary["loss"] == pytest.approx(1.0) and summary["max_abs_prediction"] == pytest.approx(0.9)
  with pytest.raises(train.DivergedError, match=r"m: training diverged at step 6: mean loss 1.1 is over "
                     r"100 times this run's first logged loss 0.01 \(and over 1\).*\(step 4\)"):
    train._check_finite([(4, metrics(1.0)), (5, metrics(1.2))], "m", 4, first_loss=0.01)  # pylint: disable=protected-access
  # Below the floor of 1 a hundredfold rise is noise of a near-zero loss, not a blow-up.
  train._check_finite([(4, metrics(0.5))], "m", 4, first_loss=1e-4)  # pylint: disable=protected-access
  with pytest.raises(train.DivergedError, match=r"at step 3: a prediction reached 10.5"):
    train._check_finite([(2, dict(metrics(0.1), max_abs_prediction=np.float32(10.5)))], "m", None)  # pylint: disable=protected-access


def test_train_step_reports_the_largest_prediction(tmp_path):
  source = fx.InMemorySource(8)
  spec = fx.make_spec()
  state = _state()
  _, metrics = _single_device_step(spec, state, fx.make_batch(source, range(4)), jax.random.PRNGKey(0))
  from kd_landmarks import augment
  # Recomputed outside the step: the same augmentation, the model's train-mode forward.
  images, _, _ = augment.augment(
      jax.random.split(jax.random.fold_in(jax.random.PRNGKey(0), 0))[0],
      jnp.asarray(fx.make_batch(source, range(4))["image"]), {"landmarks": jnp.asarray(source.landmarks[:4])},
      reference="landmarks", out_size=spec.image_size, flip_permutation=spec.flip_permutation,
      config=spec.augment_config)
  prediction, _ = state.apply_fn({"params": state.params, "batch_stats": state.batch_stats}, images,
                                 train=True, mutable=["batch_stats"])
  np.testing.assert_allclose(metrics["max_abs_prediction"], np.abs(prediction).max(), rtol=1e-5)


def test_absurd_validation_nme_is_never_best_nor_done(tmp_path):
  model_dir = str(tmp_path / "m")
  setup = fx.fit_setup(model_dir, num_train_steps=6, checkpoint_every=2, validate=True)
  setup.validate_fn, calls = _scripted_validation([0.5, 103.63])
  setup.eval_every_steps = 2
  with pytest.raises(train.DivergedError, match=r"diverged at step 4: validation NME 103.6 \(1.036e\+04% .*"
                     r"not saved as best nor marked done.*\(step 2\)"):
    train.fit(setup)
  assert len(calls) == 2
  assert checkpoint.state_manager(model_dir).all_steps() == [2]  # Step 4's state was never saved.
  assert checkpoint.best_manager(model_dir).all_steps() == [2]
  assert not os.path.exists(os.path.join(model_dir, checkpoint.DONE_FILE))


def test_best_checkpoint_is_the_lowest_scripted_validation_nme(tmp_path):
  # Validation at steps 2, 4, 6 scores 0.3, 0.1, 0.2: best/ must hold step 4's variables, not the last.
  model_dir = str(tmp_path / "m")
  setup = fx.fit_setup(model_dir, num_train_steps=6, checkpoint_every=2, validate=True)
  setup.validate_fn, calls = _scripted_validation([0.3, 0.1, 0.2])
  setup.eval_every_steps = 2
  setup.keep_checkpoints = 3
  train.fit(setup)
  assert len(calls) == 3
  best = checkpoint.best_manager(model_dir)
  assert best.best_step() == 4 and best.all_steps() == [4]
  stored = best.restore(4)
  state_at_4 = checkpoint.restore_state(checkpoint.state_manager(model_dir), _host_tree(), step=4)
  jax.tree.map(np.testing.assert_array_equal, dict(stored["params"]), dict(state_at_4["params"]))
  # The variables validated at step 4 are those saved: the validate_fn saw exactly them.
  jax.tree.map(np.testing.assert_array_equal, dict(calls[1]["params"]), dict(state_at_4["params"]))
  # Every validation is recorded for the report's convergence figure.
  assert train.read_validation_curve(model_dir) == [
      {"step": 2, "val_nme": 0.3}, {"step": 4, "val_nme": 0.1}, {"step": 6, "val_nme": 0.2}]


def test_a_resumed_run_keeps_the_validation_points_up_to_its_start(tmp_path):
  # Killed after step 4 (checkpoint at 4) with a point at 6 recorded by an earlier, longer attempt: the
  # resumed run keeps 2 and 4, and step 6 is validated again (0.05), replacing the stale 0.9.
  model_dir = str(tmp_path / "m")
  setup = fx.fit_setup(model_dir, num_train_steps=6, checkpoint_every=2, validate=True)
  setup.validate_fn, _ = _scripted_validation([0.3, 0.1])
  setup.eval_every_steps = 2
  setup.stop_after_steps = 4
  train.fit(setup)
  train.record_validation(model_dir, 6, 0.9, train.read_validation_curve(model_dir))
  setup = fx.fit_setup(model_dir, num_train_steps=6, checkpoint_every=2, validate=True)
  setup.validate_fn, calls = _scripted_validation([0.05])
  setup.eval_every_steps = 2
  train.fit(setup)
  assert len(calls) == 1
  assert train.read_validation_curve(model_dir) == [
      {"step": 2, "val_nme": 0.3}, {"step": 4, "val_nme": 0.1}, {"step": 6, "val_nme": 0.05}]


def test_fit_from_memory_trains_the_same_model_and_writes_its_speed(tmp_path, caplog):
  """Held decoded in memory (input_cache_bytes) the training split gives the very same model, and the run
  writes train_speed.json: the first step's seconds (compilation) and the img/s after it, on this CPU."""
  from_disk = train.fit(fx.fit_setup(str(tmp_path / "disk"), num_train_steps=4))
  with caplog.at_level("INFO"):
    from_memory = train.fit(fx.fit_setup(str(tmp_path / "memory"), num_train_steps=4, input_cache_bytes=2**30))
  assert any("InMemorySource(" in record.getMessage() for record in caplog.records)
  jax.tree.map(np.testing.assert_array_equal, from_memory, from_disk)
  speed = json.load(open(tmp_path / "memory" / train.SPEED_FILE))
  assert speed["steps"] == 4 and speed["global_batch_size"] == 4
  assert 0 < speed["first_step_seconds"] <= speed["seconds"]
  expected = 3 * 4 / (speed["seconds"] - speed["first_step_seconds"])
  assert speed["images_per_second"] == pytest.approx(expected, rel=0.02)
  assert speed["cpu"]["name"] and speed["platform"] == "cpu"
