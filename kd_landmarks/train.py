"""Training one model: the train state, the data-parallel train step and the fit loop (resume, NaN stop).

The phases of the two-stage KD pipeline that call ``fit`` (teachers, teacher cache, students, evaluation,
report) live one level up, in ``pipeline.py``.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import os
import time
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax.training import train_state as flax_train_state
from jax import lax
from jax.sharding import PartitionSpec as P

from kd_landmarks import checkpoint
from kd_landmarks import input_pipeline
from kd_landmarks import parallel



class TrainState(flax_train_state.TrainState):
  """Flax's TrainState plus the model's batch-norm statistics (frozen teachers are never in here)."""
  batch_stats: Any = None


class NonFiniteLossError(FloatingPointError):
  """The loss or gradients became NaN/inf; the last good checkpoint is left as it was."""


@dataclasses.dataclass(frozen=True, eq=False)
class StepSpec:
  """What one train step needs besides (state, batch, rng): static, closed over by the compiled step."""
  target: str                    # 'landmarks' / 'soft_landmarks' (teachers) or 'student'.
  loss_fn: Callable              # losses.STUDENT_LOSSES entry: (pred, gt, tough, tolerant, *, variant, reduction).
  loss_variant: str
  image_size: int
  flip_permutation: np.ndarray
  augment_config: Any
  learning_rate_fn: Callable
  augment_fn: Callable | None = None          # None: kd_landmarks.augment.augment.
  teacher_modules: Mapping[str, Any] | None = None   # Set: run the frozen teachers online in the step.


# ----------------------------------------------------------------------------------------------------------
# Train state, learning rate, steps.


def create_learning_rate_fn(config: ml_collections.ConfigDict) -> Callable:
  """Keras' time-based decay used by the authors (Section 4.3): lr_t = lr / (1 + decay * t), t = step."""
  base = float(config.optimizer.learning_rate)
  decay = float(config.optimizer.decay)

  def learning_rate_fn(step):
    return base / (1.0 + decay * jnp.asarray(step, jnp.float32))
  return learning_rate_fn


def create_optimizer(config: ml_collections.ConfigDict, learning_rate_fn: Callable):
  """Adam (Section 4.3): b1 0.9, b2 0.999."""
  opt = config.optimizer
  return optax.adam(learning_rate_fn, b1=float(opt.b1), b2=float(opt.b2), eps=float(opt.eps))


def create_train_state(rng, model, image_size: int, tx) -> TrainState:
  """Initialises ``model`` on a dummy batch; params and batch statistics stay float32."""
  dummy = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
  variables = jax.jit(functools.partial(model.init, train=False))({"params": rng, "dropout": rng}, dummy)
  return TrainState.create(apply_fn=model.apply, params=variables["params"],
                           batch_stats=variables.get("batch_stats", {}), tx=tx)


def train_step(state: TrainState, batch: Mapping[str, jax.Array], rng: jax.Array,
               teacher_variables: Mapping[str, Any] | None = None, *, spec: StepSpec):
  """One optimiser step on this device's block of the batch (run under shard_map over axis 'data').

  Augments images and every landmark set on device, then fits the model to ``spec.target`` (teachers:
  L2 to the ground truth or soft landmarks) or the student loss against the teachers' predictions.
  Gradients, batch statistics and metrics are averaged over all devices with ``lax.pmean``.
  """
  # Each device draws its own augmentation; the step index is already folded into ``rng`` by the caller.
  rng = jax.random.fold_in(rng, lax.axis_index(parallel.AXIS))
  augment_rng, dropout_rng = jax.random.split(rng)
  landmark_sets = {"landmarks": batch["landmarks"]}
  if spec.target == "soft_landmarks":
    landmark_sets["soft_landmarks"] = batch["soft_landmarks"]
  # A baseline student (l2, l1, smooth_l1) gets no teacher predictions in its batch; its loss ignores them.
  cached_teachers = spec.target == "student" and spec.teacher_modules is None and "tough" in batch
  if cached_teachers:
    landmark_sets["tough"] = batch["tough"]
    landmark_sets["tolerant"] = batch["tolerant"]
  augment_fn = spec.augment_fn or _default_augment_fn()
  images, targets, _ = augment_fn(augment_rng, batch["image"], landmark_sets, reference="landmarks",
                                  out_size=spec.image_size, flip_permutation=spec.flip_permutation,
                                  config=spec.augment_config)
  if spec.target == "student" and (cached_teachers or spec.teacher_modules is not None):
    if spec.teacher_modules is not None:
      # Online teachers see exactly the student's augmented images; frozen: no gradient, eval mode.
      for name, module in spec.teacher_modules.items():
        targets[name] = lax.stop_gradient(
            module.apply(teacher_variables[name], images, train=False).astype(jnp.float32))
    gt, tough, tolerant = targets["landmarks"], targets["tough"], targets["tolerant"]
  else:
    gt = targets["landmarks" if spec.target == "student" else spec.target]
    tough = tolerant = gt  # The L2 loss ignores them; passing gt keeps one loss signature.

  def loss_of(params):
    prediction, updates = state.apply_fn(
        {"params": params, "batch_stats": state.batch_stats}, images, train=True,
        mutable=["batch_stats"], rngs={"dropout": dropout_rng})
    loss = spec.loss_fn(prediction.astype(jnp.float32), gt, tough, tolerant,
                        variant=spec.loss_variant, reduction="mean")
    return loss, updates

  (loss, updates), grads = jax.value_and_grad(loss_of, has_aux=True)(state.params)
  grads = lax.pmean(grads, parallel.AXIS)
  batch_stats = lax.pmean(updates.get("batch_stats", state.batch_stats), parallel.AXIS)
  metrics = {
      "loss": lax.pmean(loss, parallel.AXIS),
      "grad_norm": optax.tree.norm(grads),
      "learning_rate": spec.learning_rate_fn(state.step),
  }
  new_state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
  return new_state, metrics


def batch_keys(spec: StepSpec) -> tuple:
  """The example fields ``train_step`` reads (the teacher cache adds 'tough'/'tolerant' itself)."""
  return ("image", "landmarks", "soft_landmarks") if spec.target == "soft_landmarks" else ("image", "landmarks")


def _default_augment_fn():
  from kd_landmarks import augment  # Late import: tests may run the step with their own augmentation.
  return augment.augment


def compile_train_step(spec: StepSpec, mesh, *, with_teachers: bool = False):
  """``train_step`` compiled with jit(shard_map): state replicated, batch split along 'data', donated."""
  step = functools.partial(train_step, spec=spec)
  if with_teachers:
    in_specs = (P(), P(parallel.AXIS), P(), P())
  else:
    step = functools.partial(_train_step_no_teachers, step)
    in_specs = (P(), P(parallel.AXIS), P())
  return parallel.compile_step(step, mesh, in_specs=in_specs, out_specs=(P(), P()), donate_argnums=(0,))


def _train_step_no_teachers(step, state, batch, rng):
  return step(state, batch, rng)


# ----------------------------------------------------------------------------------------------------------
# One training run (a teacher or a student), with resume, periodic and best checkpoints, NaN stop.


@dataclasses.dataclass
class FitSetup:
  """Everything ``fit`` needs; built by the phases below or directly by tests."""
  model_dir: str
  model: Any
  spec: StepSpec
  train_source: Any
  global_batch_size: int
  num_train_steps: int
  seed: int
  tx: Any
  meta: Mapping[str, Any]
  # teacher_cache.load_teacher_outputs(...).as_cache(): joined by 'index'.
  teacher_cache: Mapping[str, np.ndarray] | None = None
  teacher_variables: Mapping[str, Any] | None = None
  validate_fn: Callable | None = None      # (variables) -> mean validation NME.
  log_every_steps: int = 100
  checkpoint_every_steps: int = 1000
  eval_every_steps: int = -1
  keep_checkpoints: int = 2
  prefetch: int = 2                        # Batches read ahead of the device (input_pipeline threads).
  mesh: Any = None
  stop_after_steps: int | None = None      # Tests: stop early (as if killed) after this many steps.


def fit(setup: FitSetup) -> dict:
  """Trains until ``num_train_steps``, resuming from ``model_dir/checkpoints``; returns the final variables
  (numpy). Raises :class:`NonFiniteLossError` on a NaN/inf loss without saving the bad state."""
  mesh = setup.mesh or parallel.make_mesh()
  parallel.check_batch_size(setup.global_batch_size, mesh)
  is_chief = jax.process_index() == 0
  # Before model.json is rewritten: a reused workdir must not silently resume another dataset or network.
  checkpoint.check_resumable(setup.model_dir, setup.meta)
  if is_chief:  # One writer: the processes of a multi-host run share the workdir.
    checkpoint.write_model_json(setup.model_dir, setup.meta)
  base_rng = jax.random.PRNGKey(setup.seed)
  init_rng, train_rng = jax.random.split(base_rng)
  state = create_train_state(init_rng, setup.model, setup.spec.image_size, setup.tx)

  state_manager = checkpoint.state_manager(setup.model_dir, max_to_keep=setup.keep_checkpoints)
  host_state = parallel.fetch_replicated(_state_tree(state))
  restored = checkpoint.restore_state(state_manager, host_state)
  if restored is not None:
    state = state.replace(step=restored["step"], params=restored["params"],
                          batch_stats=restored["batch_stats"], opt_state=restored["opt_state"])
  start_step = int(np.asarray(state.step))
  if start_step >= setup.num_train_steps:
    logging.info("%s: already trained (%d steps)", setup.model_dir, start_step)
    checkpoint.write_done(setup.model_dir, start_step)
    return _inference_variables(parallel.fetch_replicated(_state_tree(state)))
  if restored is not None:
    logging.info("%s: resuming from step %d", setup.model_dir, start_step)

  with_teachers = setup.teacher_variables is not None
  step_fn = compile_train_step(setup.spec, mesh, with_teachers=with_teachers)
  state = parallel.replicate(_state_tree(state), mesh)
  state = TrainState(apply_fn=setup.model.apply, tx=setup.tx, **state)
  teachers = parallel.replicate(setup.teacher_variables, mesh) if with_teachers else None
  best = checkpoint.best_manager(setup.model_dir) if setup.validate_fn else None
  writer = _summary_writer(setup.model_dir) if is_chief else None
  end_step = setup.num_train_steps
  if setup.stop_after_steps is not None:
    end_step = min(end_step, start_step + setup.stop_after_steps)
  # Batch s is a pure function of (seed, s), so a resumed run reads exactly what it would have read.
  batches = input_pipeline.make_train_iterator(
      setup.train_source, global_batch_size=setup.global_batch_size, seed=setup.seed,
      start_step=start_step, num_steps=end_step - start_step, num_processes=jax.process_count(),
      process_index=jax.process_index(), teacher_cache=setup.teacher_cache,
      keys=batch_keys(setup.spec), prefetch_batches=setup.prefetch)
  pending = []  # Device metrics not yet checked for NaN (fetched in bulk to keep the device busy).
  last_saved = start_step if restored is not None else None
  from tqdm import tqdm
  progress = tqdm(total=setup.num_train_steps, initial=start_step, disable=not is_chief,
                  desc=os.path.basename(os.path.normpath(setup.model_dir)), unit="step", dynamic_ncols=True)
  started = time.time()
  try:
    for step in range(start_step, end_step):
      batch = parallel.shard_host_batch(next(batches), mesh)
      args = (state, batch, jax.random.fold_in(train_rng, step))
      state, metrics = step_fn(*args, teachers) if with_teachers else step_fn(*args)
      pending.append((step, metrics))
      progress.update(1)
      done = step + 1
      is_last = done == end_step
      validate = setup.validate_fn is not None and (
          done == setup.num_train_steps
          or (setup.eval_every_steps > 0 and done % setup.eval_every_steps == 0))
      # Checked before anything reads the state (log, checkpoint, validation), so a NaN stops the run with
      # NonFiniteLossError instead of surfacing later as a NaN prediction.
      if (done % setup.log_every_steps == 0 or is_last or done % setup.checkpoint_every_steps == 0
          or validate):
        summary = _check_finite(pending, setup.model_dir, last_saved)
        pending = []
        progress.set_postfix(loss=f"{summary['loss']:.5f}")
        if writer is not None:
          for name, value in summary.items():
            writer.add_scalar(f"train/{name}", value, done)
          writer.add_scalar("train/steps_per_second", (done - start_step) / (time.time() - started), done)
      if done % setup.checkpoint_every_steps == 0 or is_last:
        checkpoint.save_state(state_manager, done, parallel.fetch_replicated(_state_tree(state)))
        last_saved = done
      if validate:
        variables = _inference_variables(parallel.fetch_replicated(_state_tree(state)))
        val_nme = float(setup.validate_fn(variables))
        checkpoint.save_best(best, done, variables, val_nme)
        progress.write(f"{setup.model_dir}: step {done} validation NME {val_nme:.5f}")
        if writer is not None:
          writer.add_scalar("val/nme", val_nme, done)
  finally:
    batches.close()
    progress.close()
    if writer is not None:
      writer.close()
  if end_step == setup.num_train_steps:
    checkpoint.write_done(setup.model_dir, end_step)
  return _inference_variables(parallel.fetch_replicated(_state_tree(state)))


def _state_tree(state) -> dict:
  """The checkpointed part of a TrainState (no functions, no teachers)."""
  if isinstance(state, Mapping):
    return dict(state)
  return {"step": state.step, "params": state.params, "batch_stats": state.batch_stats,
          "opt_state": state.opt_state}


def _inference_variables(tree) -> dict:
  variables = {"params": tree["params"]}
  if tree.get("batch_stats"):
    variables["batch_stats"] = tree["batch_stats"]
  return variables


def _check_finite(pending, model_dir, last_saved) -> dict:
  """Fetches pending metrics; raises NonFiniteLossError at the first NaN/inf loss or gradient."""
  host = [(step, parallel.fetch_replicated(metrics)) for step, metrics in pending]
  for step, metrics in host:
    if not (np.isfinite(metrics["loss"]) and np.isfinite(metrics["grad_norm"])):
      kept = (f"the last good checkpoint (step {last_saved}) in {model_dir}/checkpoints is kept"
              if last_saved is not None else "no checkpoint had been saved yet")
      raise NonFiniteLossError(
          f"{model_dir}: loss {metrics['loss']} / gradient norm {metrics['grad_norm']} at step {step + 1} "
          f"is not finite; training stopped and {kept}. Lower --config.optimizer.learning_rate, check the "
          "data (landmarks inside the crop?) or use platform=cpu (float32) to rule out bfloat16 overflow.")
  last = host[-1][1]
  return {"loss": float(np.mean([m["loss"] for _, m in host])), "grad_norm": float(last["grad_norm"]),
          "learning_rate": float(last["learning_rate"])}


def _summary_writer(model_dir):
  from tensorboardX import SummaryWriter
  return SummaryWriter(os.path.join(model_dir, "events"))
