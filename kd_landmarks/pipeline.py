"""The two-stage KD pipeline: the phases that ``python -m kd_landmarks.main`` runs, in order.

Stage 1 (Section 3.2): the Tough teacher learns the ground truth and the Tolerant teacher the soft landmarks
(Eqs. 1-3), both with the L2 loss. Their predictions on the training set are cached once
(``cache_teachers``). Stage 2: the student learns with ``config.student_loss`` (KD-Loss, Eqs. 4-14, or a
baseline of Tables 7-8), the teachers frozen and outside its optimiser and checkpoints. Then every model is
evaluated and the report is written.

``run(config, workdir)`` runs one phase or all of them; each training phase resumes from its newest
checkpoint and returns at once when already finished, so ``phase=all`` can be re-run after an interruption.
"""
from __future__ import annotations

import functools
import json
import logging
import os

import jax
import numpy as np

from kd_landmarks import augment
from kd_landmarks import backend
from kd_landmarks import checkpoint
from kd_landmarks import config_lib
from kd_landmarks import datasets
from kd_landmarks import evaluate
from kd_landmarks import losses
from kd_landmarks import models
from kd_landmarks import parallel
from kd_landmarks import report
from kd_landmarks import train
from kd_landmarks.datasets import builder
from kd_landmarks.datasets import flips
from kd_landmarks.datasets import info
from kd_landmarks.datasets import teacher_cache

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
DONE_FILE = checkpoint.DONE_FILE


def student_losses(config) -> list[str]:
  """``config.student_loss`` as a list ("l2,kd" -> ['l2', 'kd']), each checked against the loss table."""
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
  if config.phase not in PHASES:
    raise ValueError(f"unknown phase {config.phase!r}; choose from {PHASES}")
  if config.platform not in config_lib.PLATFORMS:
    raise ValueError(f"unknown platform {config.platform!r}; choose from {config_lib.PLATFORMS}")
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
  return dict(model=model_name, num_landmarks=info.get_info(config.dataset).num_landmarks,
              image_size=phase_image_size(config, phase), dataset=config.dataset, overrides=dict(overrides),
              dtype=config.dtype, phase=phase, loss=loss, loss_variant=config.loss_variant,
              teachers_online=bool(config.teachers_online),
              config=json.loads(config.to_json_best_effort()))


def build_model(meta):
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
  model_dir = os.path.join(workdir, model_dir_name)
  meta = model_meta(config, model_name=model_name, overrides=overrides, phase=phase,
                    loss=loss_name if target == "student" else TEACHER_LOSS)
  model = build_model(meta)
  mesh = parallel.make_mesh()
  train_source = load_split(config, workdir, "train")
  batch_size = global_batch_size(config, phase_config, mesh)
  steps = num_train_steps(phase_config, len(train_source), batch_size)
  learning_rate_fn = train.create_learning_rate_fn(config)
  spec = train.StepSpec(target=target, loss_fn=losses.get_student_loss(loss_name), loss_variant=config.loss_variant,
                  image_size=int(meta["image_size"]), flip_permutation=flips.flip_permutation(config.dataset),
                  augment_config=augment_config(config),
                  learning_rate_fn=learning_rate_fn, teacher_modules=teacher_modules)
  val_source = load_split(config, workdir, val_split(config))
  validate_fn = functools.partial(
      evaluate.mean_nme, model, source=val_source, dataset=config.dataset, image_size=int(meta["image_size"]),
      batch_size=int(config.eval_batch_size), mesh=mesh)
  setup = train.FitSetup(
      model_dir=model_dir, model=model, spec=spec, train_source=train_source,
      global_batch_size=batch_size, num_train_steps=steps, seed=int(config.seed) + ROLE_SEED_OFFSETS[target],
      tx=train.create_optimizer(config, learning_rate_fn), meta=meta, teacher_cache=teacher_cache,
      teacher_variables=teacher_variables, validate_fn=validate_fn,
      log_every_steps=int(config.log_every_steps), checkpoint_every_steps=int(config.checkpoint_every_steps),
      eval_every_steps=int(config.eval_every_steps), keep_checkpoints=int(config.keep_checkpoints),
      prefetch=int(config.prefetch), mesh=mesh)
  return train.fit(setup)


def augment_config(config):
  """``config.augment`` as the frozen ``augment.AugmentConfig`` the step closes over."""
  return augment.AugmentConfig(**config.augment.to_dict())


def val_split(config) -> str:
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
  if jax.process_index() == 0:
    return report.build_report(workdir, dataset=config.dataset, data_dir=data_dir_of(config, workdir))


def run(config, workdir: str):
  """Runs ``config.phase`` (or, for 'all', every phase in order, skipping finished ones) in ``workdir``."""
  validate_config(config)
  config = backend.resolve(config)  # platform 'auto', dtype 'auto', prefetch -1 -> concrete (idempotent).
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
