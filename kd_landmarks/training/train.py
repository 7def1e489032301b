"""Training one model: the train state, the data-parallel train step and the fit loop (resume, NaN stop).

The phases of the two-stage KD pipeline that call ``fit`` (teachers, teacher cache, students, evaluation,
report) live one level up, in ``pipeline.py``.
"""
from __future__ import annotations

import dataclasses
import functools
import json
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
from tqdm import tqdm

from kd_landmarks import augment
from kd_landmarks import cpu
from kd_landmarks import errors
from kd_landmarks import losses
from kd_landmarks.metrics import VALIDATION_CURVE_FILE
from kd_landmarks.training import checkpoint
from kd_landmarks.training import input_pipeline
from kd_landmarks.training import machine
from kd_landmarks.training import parallel



class TrainState(flax_train_state.TrainState):
  """Flax's TrainState plus the model's batch-norm statistics (frozen teachers are never in here)."""
  batch_stats: Any = None


class DivergedError(errors.UserError, FloatingPointError):
  """Training blew up (see :data:`PREDICTION_BOUND`, :data:`LOSS_BLOWUP_FACTOR`, :data:`VAL_NME_BOUND`);
  the last good checkpoint is left as it was, and the model is neither marked done nor saved as best."""


class NonFiniteLossError(DivergedError):
  """The loss or gradients became NaN/inf; the last good checkpoint is left as it was."""


# Divergence rule (besides NaN/inf), checked at every log, checkpoint and validation step:
# * a prediction further than PREDICTION_BOUND from the crop: the models predict normalised crop
#   coordinates, the crop is [0, 1]^2 and augmented landmarks stay within about [-0.5, 1.5], so a point ten
#   crop sides away is no face (an lr of 1e3 gives thousands at the first step);
# * a check window's mean loss above LOSS_BLOWUP_FACTOR times the first window's of this process (the
#   run's own early value: training lowers the loss, it never rises a hundredfold) and above LOSS_FLOOR
#   (every loss here is about 1 for predictions a whole crop side off; the floor keeps a resumed run whose
#   first window happened to be tiny from stopping on noise);
# * a validation NME (inter-ocular) above VAL_NME_BOUND: a model whose points all sit at one corner of the
#   crop scores about 2; ten eye distances is a model that predicts nothing near the face.
PREDICTION_BOUND = 10.0
LOSS_BLOWUP_FACTOR = 100.0
LOSS_FLOOR = 1.0
VAL_NME_BOUND = 10.0
# The batch field, present only when the global batch was padded to a multiple of the device count: True on
# the real examples, False on the padding rows.
EXAMPLE_MASK = input_pipeline.EXAMPLE_MASK
_DIVERGED_ADVICE = ("Lower --config.optimizer.learning_rate, check the data (landmarks inside the crop?) or "
                    "use platform=cpu (float32) to rule out bfloat16 overflow.")


@dataclasses.dataclass(frozen=True, eq=False)
class StepSpec:
  """What one train step needs besides (state, batch, rng): static, closed over by the compiled step."""
  target: str                    # The landmark set a regression step fits ('landmarks', 'soft_landmarks'), or 'student'.
  loss_fn: Callable              # losses.STUDENT_LOSSES entry: (pred, gt, tough, tolerant, *, variant, reduction).
  loss_variant: str
  image_size: int
  flip_permutation: np.ndarray
  augment_config: Any
  learning_rate_fn: Callable
  # True: the loss reads the teachers' predictions (KD-Loss and its one-teacher ablations): distillation_step.
  # False: a regression to one landmark set (the teachers; the baseline students L2, L1, smooth L1).
  distill: bool = False
  teacher_modules: Mapping[str, Any] | None = None   # Distillation only, set: the frozen teachers run online.
  augment_kernels: Any = augment.PORTABLE           # augment.AugmentKernels (CPU training: kd_landmarks/cpu).
  # The batch carries 'visible' [B, K] (a custom set's annotated points): missing points leave every loss term.
  masked: bool = False


# ----------------------------------------------------------------------------------------------------------
# Train state, learning rate, steps.


LR_SCHEDULES = ("paper", "cosine")


def create_learning_rate_fn(config: ml_collections.ConfigDict, num_train_steps: int | None = None) -> Callable:
  """The learning rate at step t (0-based) for ``config.optimizer.schedule``.

  'paper': Keras' time-based decay used by the authors (Section 4.3), lr_t = lr / (1 + decay * t).
  'cosine' (not the paper's; configs/demo.py): a linear warm-up from lr / warmup_steps over the first
  ``warmup_steps`` steps, lr_t = lr * (t + 1) / warmup_steps, then a half cosine from lr to
  lr * final_lr_fraction at ``num_train_steps``: lr_t = lr * (f + (1 - f) * (1 + cos(pi * p)) / 2) with
  p = (t - warmup_steps) / (num_train_steps - warmup_steps), clipped to [0, 1]. It needs the phase's
  ``num_train_steps``, so that a teacher and a student with different budgets each end their decay. A run no
  longer than the warm-up (a smoke test of a few steps) is all warm-up.
  """
  opt = config.optimizer
  base = float(opt.learning_rate)
  schedule = opt.get("schedule", "paper")
  if schedule not in LR_SCHEDULES:
    raise ValueError(f"unknown config.optimizer.schedule {schedule!r}; choose from {LR_SCHEDULES}")
  if schedule == "paper":
    decay = float(opt.decay)

    def learning_rate_fn(step):
      return base / (1.0 + decay * jnp.asarray(step, jnp.float32))
    return learning_rate_fn
  warmup = int(opt.warmup_steps)
  final = float(opt.final_lr_fraction)
  if num_train_steps is None or int(num_train_steps) < 1:
    raise ValueError(f"the cosine schedule needs the phase's num_train_steps (>= 1), got {num_train_steps}")
  decay_steps = float(max(1, int(num_train_steps) - warmup))

  def cosine_fn(step):
    step = jnp.asarray(step, jnp.float32)
    progress = jnp.clip((step - warmup) / decay_steps, 0.0, 1.0)
    cosine = base * (final + (1.0 - final) * 0.5 * (1.0 + jnp.cos(jnp.pi * progress)))
    if warmup <= 0:
      return cosine
    return jnp.where(step < warmup, base * (step + 1.0) / warmup, cosine)
  return cosine_fn


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


def training_kernels(config: ml_collections.ConfigDict) -> cpu.TrainingKernels:
  """What a training step computes with: the CPU kernels (kd_landmarks/cpu) when training on the CPU with
  ``config.cpu_kernels``, else the portable ones (accelerators)."""
  if config.cpu_kernels and jax.default_backend() == "cpu":
    return cpu.training_kernels()
  return cpu.PORTABLE


def regression_step(state: TrainState, batch: Mapping[str, jax.Array], rng: jax.Array, *, spec: StepSpec):
  """One optimiser step fitting ``batch['target']`` with ``spec.loss_fn`` (the teachers: L2 to the ground truth
  or to the soft landmarks, Section 3.2; the baseline students of Tables 7-8). Runs under shard_map over
  axis 'data' on this device's block of the batch; :func:`step_batch` puts the fitted set in 'target'."""
  if "target" not in batch:
    raise ValueError(f"a regression step (target {spec.target!r}) fits batch['target']; build the batch with "
                     "train.step_batch(spec, batch)")
  images, sets, dropout_rng = _augment(batch, rng, spec, {"target": batch["target"]})
  target = sets["target"]
  # The baseline losses ignore the teacher slots; the target fills them to keep one loss signature.
  return _optimise(state, images, batch.get(EXAMPLE_MASK), sets.get("visible"), dropout_rng, spec,
                   lambda prediction: spec.loss_fn(prediction, target, target, target,
                                                    variant=spec.loss_variant, reduction="none"))


def distillation_step(state: TrainState, batch: Mapping[str, jax.Array], rng: jax.Array,
                      teacher_variables: Mapping[str, Any] | None = None, *, spec: StepSpec):
  """One optimiser step of the student with ``spec.loss_fn`` against the frozen teachers (KD-Loss, Eqs. 4-14):
  their predictions come from the cache (``batch['tough']``, ``batch['tolerant']``, augmented with the image)
  or, with ``spec.teacher_modules``, from the teachers run on the student's augmented images."""
  online = spec.teacher_modules is not None
  cached = {} if online else {"tough": batch["tough"], "tolerant": batch["tolerant"]}
  images, sets, dropout_rng = _augment(batch, rng, spec, cached)
  if online:
    # The teachers see exactly the student's augmented images; frozen: no gradient, eval mode.
    for name, module in spec.teacher_modules.items():
      sets[name] = lax.stop_gradient(module.apply(teacher_variables[name], images, train=False).astype(jnp.float32))
  return _optimise(state, images, batch.get(EXAMPLE_MASK), sets.get("visible"), dropout_rng, spec,
                   lambda prediction: spec.loss_fn(prediction, sets["landmarks"], sets["tough"], sets["tolerant"],
                                                    variant=spec.loss_variant, reduction="none"))


def _augment(batch, rng, spec: StepSpec, extra_sets: Mapping[str, jax.Array]):
  """Augments the images and every landmark set together on device (Section 4.3): ``(images, sets, dropout
  rng)``. The step index is already folded into ``rng``. Each example draws from its row of the global batch
  (``augment``'s ``first_example``), so its augmentation does not depend on the number of devices; dropout
  and stochastic depth draw per device."""
  num_devices = lax.axis_size(parallel.AXIS)
  augment_rng, dropout_rng = jax.random.split(jax.random.fold_in(rng, 0))
  block = {}
  if num_devices > 1:
    device = lax.axis_index(parallel.AXIS)
    dropout_rng = jax.random.fold_in(dropout_rng, device)
    local = batch["image"].shape[0]
    block = dict(first_example=device * local, global_batch_size=local * num_devices)
  images, sets, _ = augment.augment(augment_rng, batch["image"], {"landmarks": batch["landmarks"], **extra_sets},
                                    reference="landmarks", out_size=spec.image_size,
                                    flip_permutation=spec.flip_permutation, config=spec.augment_config,
                                    kernels=spec.augment_kernels, point_masks=point_masks(batch), **block)
  return images, sets, dropout_rng


def point_masks(batch) -> dict:
  """The per-point flags augmentation carries with the landmarks (relabelled on a flip): ``visible`` [B, K] of
  a custom set with missing points; none otherwise. The augmented ``sets['visible']`` weighs each point in the
  loss (:func:`_optimise`)."""
  return {"visible": batch["visible"]} if "visible" in batch else {}


def _optimise(state: TrainState, images, example_mask, visible, dropout_rng, spec: StepSpec,
              loss_of_prediction: Callable):
  """One optimiser update with the gradient of the global batch's weighted mean loss.

  ``loss_of_prediction`` returns the loss per coordinate (``reduction='none'``, ``[B, K, 2]``). Its global mean
  is ``sum(w * loss) / sum(w)`` over every device, ``w`` the product of the example mask (0 on the rows that
  pad a batch to a multiple of the device count) and the per-point visibility (0 on a custom set's missing
  points), each device contributing its own sum: the gradient is therefore the ``psum`` of the devices'
  gradients, and BatchNorm normalises with the global batch's statistics over its valid rows
  (:func:`kd_landmarks.models.layers.batch_norm_train`). On one device, without padding nor missing points,
  this is the plain mean and the one-device step; on any device count and padding it is the step of the
  unpadded global batch (tests/test_parallel.py).
  """
  num_devices = lax.axis_size(parallel.AXIS)
  sync_axis = parallel.AXIS if num_devices > 1 else None

  def loss_of(params):
    prediction, updates = state.apply_fn(
        {"params": params, "batch_stats": state.batch_stats}, images, train=True, batch_mask=example_mask,
        sync_axis=sync_axis, mutable=["batch_stats"], rngs={"dropout": dropout_rng})
    prediction = prediction.astype(jnp.float32)
    per_coordinate = loss_of_prediction(prediction)
    weights = _coordinate_weights(example_mask, visible, per_coordinate.shape)
    if weights is None:
      local_sum, local_weight = jnp.sum(per_coordinate), jnp.float32(per_coordinate.size)
    else:
      local_sum, local_weight = jnp.sum(per_coordinate * weights), jnp.sum(weights)
    total_weight = lax.psum(local_weight, parallel.AXIS)  # No gradient flows here: the weights are data.
    return local_sum / jnp.where(total_weight > 0, total_weight, 1.0), (updates, prediction)

  (local_loss, (updates, prediction)), grads = jax.value_and_grad(loss_of, has_aux=True)(state.params)
  grads = lax.psum(grads, parallel.AXIS)
  # Synchronised BatchNorm gave every device the same statistics, hence the same running averages.
  batch_stats = updates.get("batch_stats", state.batch_stats)
  if example_mask is not None:  # Padding rows copy a real example; keep them out of the divergence bound anyway.
    prediction = prediction * example_mask.astype(jnp.float32)[:, None, None]
  metrics = {
      "loss": lax.psum(local_loss, parallel.AXIS),
      "grad_norm": optax.tree.norm(grads),
      "learning_rate": spec.learning_rate_fn(state.step),
      # The divergence rule's bound on normalised coordinates (PREDICTION_BOUND).
      "max_abs_prediction": lax.pmax(jnp.max(jnp.abs(prediction)), parallel.AXIS),
  }
  return state.apply_gradients(grads=grads, batch_stats=batch_stats), metrics


def _coordinate_weights(example_mask, visible, shape):
  """The loss weight of each coordinate ``[B, K, 2]``: example mask x point visibility (None: all ones)."""
  if example_mask is None and visible is None:
    return None
  weights = jnp.ones(shape, jnp.float32)
  if example_mask is not None:
    weights = weights * example_mask.astype(jnp.float32)[:, None, None]
  if visible is not None:
    weights = weights * losses.point_weights(visible, shape)
  return weights


def batch_keys(spec: StepSpec) -> tuple:
  """The example fields the step reads (the teacher cache adds 'tough'/'tolerant' itself)."""
  keys = ("image", "landmarks", "soft_landmarks") if spec.target == "soft_landmarks" else ("image", "landmarks")
  return keys + ("visible",) if spec.masked else keys


def step_batch(spec: StepSpec, host_batch: Mapping[str, np.ndarray]) -> dict:
  """The batch ``fit`` gives the compiled step: for a regression step the fitted landmarks move to the field
  'target' (the Tolerant teacher's soft landmarks; the ground truth otherwise). Both teachers and the L2
  student then trace one program, which the persistent compilation cache compiles once per run instead of
  twice (5.4 s on the demo's 2-core CPU). A distillation batch is passed as it is."""
  batch = dict(host_batch)
  if spec.distill:
    return batch
  batch["target"] = batch.pop("soft_landmarks") if spec.target == "soft_landmarks" else batch["landmarks"]
  return batch


def compile_train_step(spec: StepSpec, mesh):
  """The step ``spec`` calls for, compiled with jit(shard_map): state replicated, batch split along 'data',
  state donated. Online teachers take their variables as a fourth, replicated argument."""
  step = functools.partial(distillation_step if spec.distill else regression_step, spec=spec)
  in_specs = (P(), P(parallel.AXIS), P())
  if spec.distill and spec.teacher_modules is not None:
    in_specs += (P(),)  # The online teachers' variables, replicated.
  return parallel.compile_step(step, mesh, in_specs=in_specs, out_specs=(P(), P()), donate_argnums=(0,))


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
  # Hold the training split decoded in memory when it fits this many bytes (input_pipeline.cache_in_memory).
  input_cache_bytes: int = 0
  mesh: Any = None
  stop_after_steps: int | None = None      # Tests: stop early (as if killed) after this many steps.


def fit(setup: FitSetup) -> dict:
  """Trains until ``num_train_steps``, resuming from ``model_dir/checkpoints``; returns the final variables
  (numpy). Raises :class:`NonFiniteLossError` on a NaN/inf loss without saving the bad state."""
  mesh = setup.mesh or parallel.make_mesh()
  padded_rows = parallel.padded_batch_size(setup.global_batch_size, mesh.devices.size)
  is_chief = jax.process_index() == 0
  # Before model.json is written: a reused workdir must not silently resume another dataset or network.
  resumed_meta = checkpoint.check_resumable(setup.model_dir, setup.meta)
  # model.json describes the weights: written when training starts them, never over weights a run keeps
  # or resumes (which the pipeline trains only when their recorded provenance equals this run's).
  if is_chief and resumed_meta is None:
    checkpoint.write_model_json(setup.model_dir, setup.meta)  # One writer: hosts share the workdir.
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

  with_teachers = setup.spec.teacher_modules is not None
  logging.info("%s: %s", setup.model_dir, parallel.describe_batch(setup.global_batch_size, mesh.devices.size))
  step_fn = compile_train_step(setup.spec, mesh)
  state = parallel.replicate(_state_tree(state), mesh)
  state = TrainState(apply_fn=setup.model.apply, tx=setup.tx, **state)
  teachers = parallel.replicate(setup.teacher_variables, mesh) if with_teachers else None
  best = checkpoint.best_manager(setup.model_dir) if setup.validate_fn else None
  writer = _summary_writer(setup.model_dir) if is_chief else None
  end_step = setup.num_train_steps
  if setup.stop_after_steps is not None:
    end_step = min(end_step, start_step + setup.stop_after_steps)
  # Batch s is a pure function of (seed, s), so a resumed run reads exactly what it would have read.
  keys = batch_keys(setup.spec)
  train_source = input_pipeline.cache_in_memory(
      setup.train_source, keys + (("index",) if setup.teacher_cache is not None else ()),
      setup.input_cache_bytes, progress=is_chief)
  batches = input_pipeline.make_train_iterator(
      train_source, global_batch_size=setup.global_batch_size, seed=setup.seed,
      start_step=start_step, num_steps=end_step - start_step, num_processes=jax.process_count(),
      process_index=jax.process_index(), teacher_cache=setup.teacher_cache,
      keys=keys, prefetch_batches=setup.prefetch,
      padded_batch_size=padded_rows)
  pending = []  # Device metrics not yet checked for NaN (fetched in bulk to keep the device busy).
  last_saved = start_step if restored is not None else None
  first_loss = None  # The run's own early loss (first check window of this process): the blow-up yardstick.
  progress = tqdm(total=setup.num_train_steps, initial=start_step, disable=not is_chief,
                  desc=os.path.basename(os.path.normpath(setup.model_dir)), unit="step", dynamic_ncols=True)
  started = time.time()
  first_step_seconds = None
  # Validation NME per step (the report's convergence figure); a resumed run keeps the points up to its
  # start and drops later ones, which the steps it is about to retrain replace.
  curve = [point for point in read_validation_curve(setup.model_dir) if point["step"] <= start_step]
  try:
    for step in range(start_step, end_step):
      batch = parallel.shard_host_batch(step_batch(setup.spec, next(batches)), mesh)
      args = (state, batch, jax.random.fold_in(train_rng, step))
      state, metrics = step_fn(*args, teachers) if with_teachers else step_fn(*args)
      pending.append((step, metrics))
      if first_step_seconds is None:  # Compilation (or a compilation-cache hit) and one step.
        jax.block_until_ready(metrics)
        first_step_seconds = time.time() - started
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
        summary = _check_finite(pending, setup.model_dir, last_saved, first_loss)
        first_loss = summary["loss"] if first_loss is None else first_loss
        pending = []
        progress.set_postfix(loss=f"{summary['loss']:.5f}")
        if writer is not None:
          for name, value in summary.items():
            writer.add_scalar(f"train/{name}", value, done)
          writer.add_scalar("train/steps_per_second", (done - start_step) / (time.time() - started), done)
      val_nme = None
      if validate:  # Before the state is saved: a diverged model must not become the newest checkpoint.
        variables = _inference_variables(parallel.fetch_replicated(_state_tree(state)))
        val_nme = float(setup.validate_fn(variables))
        _check_val_nme(val_nme, done, setup.model_dir, last_saved)
      if done % setup.checkpoint_every_steps == 0 or is_last:
        checkpoint.save_state(state_manager, done, parallel.fetch_replicated(_state_tree(state)))
        last_saved = done
      if validate:
        checkpoint.save_best(best, done, variables, val_nme)
        if is_chief:
          curve = record_validation(setup.model_dir, done, val_nme, curve)
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
  variables = _inference_variables(parallel.fetch_replicated(_state_tree(state)))
  if is_chief and first_step_seconds is not None:
    _write_speed(setup.model_dir, first_step_seconds=first_step_seconds, steps=end_step - start_step,
                 seconds=time.time() - started, global_batch_size=setup.global_batch_size)
  return variables


SPEED_FILE = "train_speed.json"


def read_validation_curve(model_dir) -> list[dict]:
  """``model_dir``'s validation points ``[{"step", "val_nme"}]`` by step; [] when none was recorded."""
  path = os.path.join(model_dir, VALIDATION_CURVE_FILE)
  if not os.path.exists(path):
    return []
  with open(path) as f:
    points = json.load(f)
  return sorted(({"step": int(p["step"]), "val_nme": float(p["val_nme"])} for p in points),
                key=lambda p: p["step"])


def record_validation(model_dir, step: int, val_nme: float, curve: list[dict]) -> list[dict]:
  """Appends (step, val_nme) to ``curve`` and writes it to ``model_dir/validation_curve.json`` atomically;
  returns the new curve."""
  curve = [p for p in curve if p["step"] != int(step)] + [{"step": int(step), "val_nme": float(val_nme)}]
  path = os.path.join(model_dir, VALIDATION_CURVE_FILE)
  with open(path + ".tmp", "w") as f:
    json.dump(curve, f, indent=1)
  os.replace(path + ".tmp", path)
  return curve


def _write_speed(model_dir, *, first_step_seconds: float, steps: int, seconds: float, global_batch_size: int):
  """Logs and writes ``train_speed.json``: the first step (compilation included) and the loop's throughput
  after it, validation and checkpoints included (what a user waits for), with the CPU it ran on."""
  after_first = max(seconds - first_step_seconds, 1e-9)
  speed = {"first_step_seconds": round(first_step_seconds, 3), "steps": steps, "seconds": round(seconds, 3),
           "global_batch_size": global_batch_size,
           "images_per_second": round((steps - 1) * global_batch_size / after_first, 1) if steps > 1 else None,
           "platform": jax.default_backend(), "devices": jax.device_count(), "cpu": machine.cpu_description()}
  logging.info("%s: first step %.1f s (compilation included), then %s img/s over %d steps",
               model_dir, first_step_seconds, speed["images_per_second"], steps - 1)
  with open(os.path.join(model_dir, SPEED_FILE), "w") as f:
    json.dump(speed, f, indent=1)


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


def _kept(model_dir, last_saved) -> str:
  return (f"the last good checkpoint (step {last_saved}) in {model_dir}/checkpoints is kept"
          if last_saved is not None else "no checkpoint had been saved yet")


def _check_finite(pending, model_dir, last_saved, first_loss=None) -> dict:
  """Fetches pending metrics; raises NonFiniteLossError at the first NaN/inf loss or gradient, and
  DivergedError at a prediction beyond PREDICTION_BOUND or a window loss above LOSS_BLOWUP_FACTOR times
  ``first_loss``."""
  host = [(step, parallel.fetch_replicated(metrics)) for step, metrics in pending]
  for step, metrics in host:
    if not (np.isfinite(metrics["loss"]) and np.isfinite(metrics["grad_norm"])):
      raise NonFiniteLossError(
          f"{model_dir}: loss {metrics['loss']} / gradient norm {metrics['grad_norm']} at step {step + 1} "
          f"is not finite; training stopped and {_kept(model_dir, last_saved)}. {_DIVERGED_ADVICE}")
    if not metrics["max_abs_prediction"] <= PREDICTION_BOUND:
      raise DivergedError(
          f"{model_dir}: training diverged at step {step + 1}: a prediction reached "
          f"{float(metrics['max_abs_prediction']):.4g} in normalised crop coordinates (the crop is [0, 1]; "
          f"bound {PREDICTION_BOUND}), loss {float(metrics['loss']):.4g}; training stopped and "
          f"{_kept(model_dir, last_saved)}. {_DIVERGED_ADVICE}")
  window_loss = float(np.mean([m["loss"] for _, m in host]))
  if first_loss is not None and window_loss > max(LOSS_BLOWUP_FACTOR * first_loss, LOSS_FLOOR):
    raise DivergedError(
        f"{model_dir}: training diverged at step {host[-1][0] + 1}: mean loss {window_loss:.4g} is over "
        f"{LOSS_BLOWUP_FACTOR:g} times this run's first logged loss {first_loss:.4g} (and over {LOSS_FLOOR:g}); "
        "training stopped and "
        f"{_kept(model_dir, last_saved)}. {_DIVERGED_ADVICE}")
  last = host[-1][1]
  return {"loss": window_loss, "grad_norm": float(last["grad_norm"]),
          "learning_rate": float(last["learning_rate"]),
          "max_abs_prediction": float(max(m["max_abs_prediction"] for _, m in host))}


def _check_val_nme(val_nme: float, step: int, model_dir, last_saved) -> None:
  """Raises DivergedError for a NaN or absurd (> VAL_NME_BOUND) validation NME: never saved as best."""
  if not val_nme <= VAL_NME_BOUND:
    raise DivergedError(
        f"{model_dir}: training diverged at step {step}: validation NME {val_nme:.4g} "
        f"({100 * val_nme:.4g}% of the eye distance; bound {VAL_NME_BOUND:g}); the model is not saved as "
        f"best nor marked done, training stopped and {_kept(model_dir, last_saved)}. {_DIVERGED_ADVICE}")


def _summary_writer(model_dir):
  from tensorboardX import SummaryWriter  # Optional dependency (TensorBoard logs), only on the chief.
  return SummaryWriter(os.path.join(model_dir, "events"))
