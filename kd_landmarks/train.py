"""Training: the train state, the data-parallel train step, and the phases of the two-stage KD pipeline.

Stage 1 (Section 3.3): the Tough teacher learns the ground truth and the Tolerant teacher the soft landmarks
(Eqs. 1-3), both with the L2 loss. Their predictions on the training set are cached once
(``cache_teachers``). Stage 2: the student learns with ``config.student_loss`` (KD-Loss, Eqs. 4-14, or a
baseline of Tables 7-8), the teachers frozen and outside its optimiser and checkpoints.

``run(config, workdir)`` runs one phase or all of them; each training phase resumes from its newest
checkpoint and returns at once when already finished, so ``phase=all`` can be re-run after an interruption.
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

from kd_landmarks import checkpoint
from kd_landmarks import config_lib
from kd_landmarks import input_pipeline
from kd_landmarks import parallel

PHASES = config_lib.PHASES
ALL_PHASES = PHASES[:-1]  # 'all' runs every other phase in this order.
TEACHERS = ("tough", "tolerant")
# Teacher name -> the landmark set it learns: ground truth (Tough) or ASM soft landmarks (Tolerant).
TEACHER_TARGETS = {"tough": "landmarks", "tolerant": "soft_landmarks"}
TEACHER_LOSS = "l2"  # Section 4.4: both teachers are trained with the L2 loss.
CACHE_FILE = os.path.join("teacher_cache", "train.npz")
# Each role starts from its own initialisation and batch order; every student loss shares one, so that
# the students of Tables 7-8 differ only by their loss.
ROLE_SEED_OFFSETS = {"landmarks": 0, "soft_landmarks": 1, "student": 2}
DONE_FILE = "train_done.json"


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
  """Keras' time-based decay used by the authors (Section 4.4): lr_t = lr / (1 + decay * t), t = step."""
  base = float(config.optimizer.learning_rate)
  decay = float(config.optimizer.decay)

  def learning_rate_fn(step):
    return base / (1.0 + decay * jnp.asarray(step, jnp.float32))
  return learning_rate_fn


def create_optimizer(config: ml_collections.ConfigDict, learning_rate_fn: Callable):
  """Adam (Section 4.4): b1 0.9, b2 0.999."""
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
  teacher_cache: Mapping[str, np.ndarray] | None = None   # load_teacher_cache(...): joined by 'index'.
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
    _write_done(setup.model_dir, start_step)
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
    _write_done(setup.model_dir, end_step)
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


def _write_done(model_dir, step):
  """Marks training finished. Rewritten only when the step changes: its mtime tells the teacher cache
  and the evaluation whether they are older than the model."""
  path = os.path.join(model_dir, DONE_FILE)
  if jax.process_index() != 0:
    return
  if os.path.exists(path):
    with open(path) as f:
      if json.load(f).get("step") == int(step):
        return
  with open(path, "w") as f:
    json.dump({"step": int(step), "time": time.time()}, f)


def _summary_writer(model_dir):
  from tensorboardX import SummaryWriter
  return SummaryWriter(os.path.join(model_dir, "events"))


# ----------------------------------------------------------------------------------------------------------
# The phases.


def student_losses(config) -> list[str]:
  """``config.student_loss`` as a list ("l2,kd" -> ['l2', 'kd']), each checked against the loss table."""
  from kd_landmarks import losses
  names = [name.strip() for name in str(config.student_loss).split(",") if name.strip()]
  if not names:
    raise ValueError("config.student_loss is empty; set e.g. --config.student_loss=kd")
  for name in names:
    losses.get_student_loss(name)  # Raises "unknown loss: ...; choose from ..." from the one table.
  return names


def needs_teachers(loss_name: str) -> bool:
  """KD-Loss and its ablations read the teachers; the plain regression baselines do not."""
  return loss_name.startswith("kd")


def validate_config(config) -> None:
  """Stops at once on an unknown phase, loss, platform or dataset, with what to set instead."""
  from kd_landmarks.datasets import info
  if config.phase not in PHASES:
    raise ValueError(f"unknown phase {config.phase!r}; choose from {PHASES}")
  if config.platform not in config_lib.PLATFORMS:
    raise ValueError(f"unknown platform {config.platform!r}; choose from {config_lib.PLATFORMS}")
  from kd_landmarks import losses
  try:
    losses.get_variant(config.loss_variant)
  except ValueError as error:  # Name the config field to fix, and the variants to choose from.
    raise ValueError(f"config.loss_variant: {error}") from None
  info.get_info(config.dataset)
  student_losses(config)
  student_size = int(config.student_image_size)
  if student_size < 0 or (0 < student_size < 16):
    raise ValueError(f"config.student_image_size must be 0 (= image_size) or at least 16, got {student_size}")
  if config.teachers_online and student_size > 0 and student_size != int(config.image_size):
    raise ValueError(
        f"config.teachers_online runs the teachers on the student's {student_size} px batch, but they were "
        f"trained at config.image_size={config.image_size}: use the teacher cache (teachers_online=False, the "
        "default) for a student of another size")


def data_dir_of(config, workdir) -> str:
  # Expanded here because `--config.data_dir=~/tfds` reaches us with the tilde unexpanded.
  return os.path.expanduser(config.data_dir) if config.data_dir else os.path.join(workdir, "data")


def load_split(config, workdir, split):
  """The data source of one split, preparing the synthetic dataset on first use."""
  from kd_landmarks import datasets
  data_dir = data_dir_of(config, workdir)
  try:
    return datasets.load_split(config.dataset, split, data_dir)
  except FileNotFoundError:
    if config.dataset != "synthetic":
      raise  # The builder's message names the prepare command for real data.
  _prepare_synthetic(config, data_dir)
  return datasets.load_split(config.dataset, split, data_dir)


def _prepare_synthetic(config, data_dir):
  """Renders the synthetic dataset into ``data_dir`` (the demo's first run; no download)."""
  from kd_landmarks.datasets import builder
  if jax.process_index() == 0:
    logging.info("preparing the synthetic dataset in %s", data_dir)
    # Zero means "the builder's default" (builder.SYNTHETIC_DEFAULTS).
    options = {k: int(v) for k, v in config.synthetic.to_dict().items() if v}
    builder.prepare("synthetic", data_dir=data_dir, synthetic_options=options)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices("synthetic dataset prepared")


def phase_image_size(config, phase: str) -> int:
  """The input size of the model a phase trains: ``student_image_size`` for the student when set."""
  if phase == "student" and int(config.student_image_size) > 0:
    return int(config.student_image_size)
  return int(config.image_size)


def model_meta(config, *, model_name, overrides, phase, loss=None) -> dict:
  from kd_landmarks.datasets import info
  return dict(model=model_name, num_landmarks=info.get_info(config.dataset).num_landmarks,
              image_size=phase_image_size(config, phase), dataset=config.dataset, overrides=dict(overrides),
              dtype=config.dtype, phase=phase, loss=loss, loss_variant=config.loss_variant,
              teachers_online=bool(config.teachers_online),
              config=json.loads(config.to_json_best_effort()))


def build_model(meta):
  from kd_landmarks import models
  return models.create_model(meta["model"], num_landmarks=int(meta["num_landmarks"]),
                             dtype=checkpoint._dtype(meta["dtype"]), **dict(meta["overrides"]))  # pylint: disable=protected-access


def global_batch_size(config, phase_config, mesh) -> int:
  if config.per_device_batch_size > 0:
    return int(config.per_device_batch_size) * mesh.devices.size
  return int(phase_config.batch_size)


def num_train_steps(phase_config, num_examples: int, batch_size: int) -> int:
  if phase_config.num_train_steps > 0:
    return int(phase_config.num_train_steps)
  return max(1, int(np.ceil(phase_config.num_epochs * (num_examples // batch_size))))


def _fit_model(config, workdir, *, model_dir_name, model_name, overrides, phase, target, loss_name,
               phase_config, teacher_cache=None, teacher_modules=None, teacher_variables=None):
  from kd_landmarks import evaluate
  from kd_landmarks import losses
  from kd_landmarks.datasets import flips
  model_dir = os.path.join(workdir, model_dir_name)
  meta = model_meta(config, model_name=model_name, overrides=overrides, phase=phase,
                    loss=loss_name if target == "student" else TEACHER_LOSS)
  model = build_model(meta)
  mesh = parallel.make_mesh()
  train_source = load_split(config, workdir, "train")
  batch_size = global_batch_size(config, phase_config, mesh)
  steps = num_train_steps(phase_config, len(train_source), batch_size)
  learning_rate_fn = create_learning_rate_fn(config)
  spec = StepSpec(target=target, loss_fn=losses.get_student_loss(loss_name), loss_variant=config.loss_variant,
                  image_size=int(meta["image_size"]), flip_permutation=flips.flip_permutation(config.dataset),
                  augment_config=augment_config(config),
                  learning_rate_fn=learning_rate_fn, teacher_modules=teacher_modules)
  val_source = load_split(config, workdir, val_split(config))
  validate_fn = functools.partial(
      evaluate.mean_nme, model, source=val_source, dataset=config.dataset, image_size=int(meta["image_size"]),
      batch_size=int(config.eval_batch_size), mesh=mesh)
  setup = FitSetup(
      model_dir=model_dir, model=model, spec=spec, train_source=train_source,
      global_batch_size=batch_size, num_train_steps=steps, seed=int(config.seed) + ROLE_SEED_OFFSETS[target],
      tx=create_optimizer(config, learning_rate_fn), meta=meta, teacher_cache=teacher_cache,
      teacher_variables=teacher_variables, validate_fn=validate_fn,
      log_every_steps=int(config.log_every_steps), checkpoint_every_steps=int(config.checkpoint_every_steps),
      eval_every_steps=int(config.eval_every_steps), keep_checkpoints=int(config.keep_checkpoints),
      prefetch=int(config.prefetch), mesh=mesh)
  return fit(setup)


def augment_config(config):
  """``config.augment`` as the frozen ``augment.AugmentConfig`` the step closes over."""
  from kd_landmarks import augment
  return augment.AugmentConfig(**config.augment.to_dict())


def val_split(config) -> str:
  from kd_landmarks.datasets import info
  if config.val_split:
    return config.val_split
  return [s for s in info.get_info(config.dataset).splits if s != info.get_info(config.dataset).train_split][0]


def train_teacher(config, workdir, teacher: str):
  """Phase teacher_tough / teacher_tolerant: L2 on the ground truth / on the soft landmarks (Sec. 3.3)."""
  return _fit_model(config, workdir, model_dir_name=f"teacher_{teacher}", model_name=config.teacher_model,
                    overrides=config.teacher_overrides.to_dict(), phase=f"teacher_{teacher}",
                    target=TEACHER_TARGETS[teacher], loss_name=TEACHER_LOSS, phase_config=config.teacher)


def _require_teacher(workdir, teacher):
  model_dir = os.path.join(workdir, f"teacher_{teacher}")
  if not os.path.exists(os.path.join(model_dir, DONE_FILE)):
    raise FileNotFoundError(
        f"the {teacher} teacher is not trained ({model_dir}/{DONE_FILE} missing): run "
        f"`python -m kd_landmarks.main --config <config>:phase=teacher_{teacher} --workdir {workdir}` "
        "(or phase=all) first")
  return model_dir


def cache_teachers(config, workdir):
  """Phase cache_teachers: both teachers' predictions on the train split, in stored-crop pixels."""
  from kd_landmarks import evaluate
  from kd_landmarks.datasets import teacher_cache
  teacher_dirs = {teacher: _require_teacher(workdir, teacher) for teacher in TEACHERS}  # Fail before work.
  mesh = parallel.make_mesh()
  source = load_split(config, workdir, "train")
  predictions = {}
  index = None
  for teacher in TEACHERS:
    module, variables, meta = checkpoint.load_inference_variables(teacher_dirs[teacher])
    # The teacher's own input size (model.json), which the config may no longer match.
    result = evaluate.predict_source(module, variables, source, image_size=int(meta["image_size"]),
                                     batch_size=int(config.eval_batch_size), mesh=mesh,
                                     desc=f"cache {teacher} teacher")
    predictions[teacher] = result["pred_crop"]
    index = result["index"]
  path = os.path.join(workdir, CACHE_FILE)
  if jax.process_index() == 0:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    teacher_cache.write_teacher_cache(path, index=index, **predictions)
  return path


def _cache_is_current(workdir) -> bool:
  """The cache exists and is newer than both teachers' final checkpoints."""
  path = os.path.join(workdir, CACHE_FILE)
  if not os.path.exists(path):
    return False
  done = [os.path.join(workdir, f"teacher_{t}", DONE_FILE) for t in TEACHERS]
  return all(os.path.exists(d) and os.path.getmtime(d) <= os.path.getmtime(path) for d in done)


def train_student(config, workdir, loss_name: str):
  """Phase student: ``loss_name`` against cached (or online) frozen teachers (Section 3.3, Eqs. 4-14)."""
  cache = teacher_modules = teacher_variables = None
  if needs_teachers(loss_name):
    if config.teachers_online:
      teacher_modules, teacher_variables = {}, {}
      for teacher in TEACHERS:
        module, variables, _ = checkpoint.load_inference_variables(_require_teacher(workdir, teacher))
        teacher_modules[teacher], teacher_variables[teacher] = module, variables
    else:
      from kd_landmarks.datasets import info
      from kd_landmarks.datasets import teacher_cache
      path = os.path.join(workdir, CACHE_FILE)
      if not os.path.exists(path):
        raise FileNotFoundError(
            f"the student loss {loss_name!r} needs the teacher cache {path}, which is missing: run "
            f"`python -m kd_landmarks.main --config <config>:phase=cache_teachers --workdir {workdir}` after "
            "both teachers (or phase=all), or set --config.teachers_online=True")
      cache = teacher_cache.load_teacher_cache(
          path, num_examples=len(load_split(config, workdir, "train")),
          num_landmarks=info.get_info(config.dataset).num_landmarks)
  # Baselines (l2, l1, smooth_l1) take no teachers; the ground truth fills their slots.
  return _fit_model(config, workdir, model_dir_name=f"student_{loss_name}", model_name=config.student_model,
                    overrides=config.student_overrides.to_dict(), phase="student", target="student",
                    loss_name=loss_name, phase_config=config.student, teacher_cache=cache,
                    teacher_modules=teacher_modules, teacher_variables=teacher_variables)


def trained_model_dirs(workdir) -> list[str]:
  names = sorted(os.listdir(workdir)) if os.path.isdir(workdir) else []
  return [os.path.join(workdir, n) for n in names
          if (n.startswith("teacher_") or n.startswith("student_"))
          and os.path.exists(os.path.join(workdir, n, checkpoint.MODEL_JSON))]


def evaluate_all(config, workdir, *, skip_current: bool = False):
  """Phase eval: every trained model in the workdir on every evaluation split."""
  from kd_landmarks import evaluate
  model_dirs = trained_model_dirs(workdir)
  if not model_dirs:
    raise FileNotFoundError(f"no trained model in {workdir}: run the teacher/student phases (phase=all) first")
  results = {}
  for model_dir in model_dirs:
    if skip_current and evaluate.is_current(model_dir):
      continue
    results[os.path.basename(model_dir)] = evaluate.evaluate_model(
        model_dir, splits=evaluate.eval_splits(config), load_split_fn=lambda s: load_split(config, workdir, s),
        batch_size=int(config.eval_batch_size))
  return results


def write_report(config, workdir):
  from kd_landmarks import report
  if jax.process_index() == 0:
    return report.build_report(workdir, dataset=config.dataset, data_dir=data_dir_of(config, workdir))


def run(config, workdir: str):
  """Runs ``config.phase`` (or, for 'all', every phase in order, skipping finished ones) in ``workdir``."""
  validate_config(config)
  os.makedirs(workdir, exist_ok=True)
  if config.compilation_cache:
    # Teachers share shapes, so do the students: the persistent cache turns their recompiles into reads.
    jax.config.update("jax_compilation_cache_dir", os.path.join(workdir, "jax_cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
  phases = ALL_PHASES if config.phase == "all" else (config.phase,)
  run_all = config.phase == "all"
  for phase in phases:
    logging.info("phase %s", phase)
    if phase in ("teacher_tough", "teacher_tolerant"):
      if run_all and not any(needs_teachers(n) for n in student_losses(config)):
        continue  # Nothing downstream reads the teachers.
      train_teacher(config, workdir, phase.split("_", 1)[1])
    elif phase == "cache_teachers":
      if run_all and (config.teachers_online or _cache_is_current(workdir)
                      or not any(needs_teachers(n) for n in student_losses(config))):
        continue
      cache_teachers(config, workdir)
    elif phase == "student":
      for loss_name in student_losses(config):
        train_student(config, workdir, loss_name)
    elif phase == "eval":
      evaluate_all(config, workdir, skip_current=run_all)
    elif phase == "report":
      if config.write_report or not run_all:
        path = write_report(config, workdir)
        if path is not None:
          logging.info("report: %s", path)
          print(f"report written to {path}", flush=True)
