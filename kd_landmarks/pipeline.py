"""The two-stage KD pipeline: the phases that ``python -m kd_landmarks.main`` runs, in order.

Stage 1 (Section 3.2): the Tough teacher learns the ground truth and the Tolerant teacher the soft landmarks
(Eqs. 1-3), both with the L2 loss. Their predictions on the training set are cached once
(``cache_teachers``). Stage 2: the student learns with ``config.student_loss`` (KD-Loss, Eqs. 4-14, or a
baseline of Tables 7-8), the teachers frozen and outside its optimiser and checkpoints. Then every model is
evaluated and the report is written.

``run(config, workdir)`` runs one phase or all of them; each training phase resumes from its newest
checkpoint and returns at once when already finished, so ``phase=all`` can be re-run after an interruption.
A model whose recorded inputs (model.json's ``provenance``: the config fields that change its weights, the
prepared data's content, a student's teacher outputs) differ from this run's is trained again from scratch,
the old one moved to ``WORKDIR/superseded/`` (or kept on purpose: ``config.changed_inputs``).
"""
from __future__ import annotations

import functools
import json
import logging
import os

import jax
from jax.experimental import multihost_utils
import numpy as np

from kd_landmarks.training import backend
from kd_landmarks.training import checkpoint
from kd_landmarks import config_lib
from kd_landmarks import datasets
from kd_landmarks import errors
from kd_landmarks import files
from kd_landmarks.evaluation import evaluate
from kd_landmarks.training import input_pipeline
from kd_landmarks import losses
from kd_landmarks import models
from kd_landmarks import provenance
from kd_landmarks import shapes
from kd_landmarks.training import parallel
from kd_landmarks.evaluation import report
from kd_landmarks.training import train
from kd_landmarks.training import workdir_lock
from kd_landmarks.datasets import builder
from kd_landmarks.datasets import flips
from kd_landmarks.datasets import holdout
from kd_landmarks.datasets import info
from kd_landmarks.datasets import teacher_cache

PHASES = config_lib.PHASES
ALL_PHASES = PHASES[:-1]  # 'all' runs every other phase in this order.
TEACHERS = ("tough", "tolerant")
# Teacher name -> the landmark set it learns: ground truth (Tough) or ASM soft landmarks (Tolerant).
TEACHER_TARGETS = {"tough": "landmarks", "tolerant": "soft_landmarks"}
TEACHER_LOSS = "l2"  # Section 4.3: both teachers are trained with the L2 loss.
# tfds data dir of the workdir's teacher outputs (kd_landmarks_teachers/<dataset>/<version> inside).
CACHE_DIR = "teacher_cache"
# Each role starts from its own initialisation and batch order; every student loss shares one, so that
# the students of Tables 7-8 differ only by their loss.
ROLE_SEED_OFFSETS = {"landmarks": 0, "soft_landmarks": 1, "student": 2}
# Student seed k adds SEED_STRIDE * k: far from the role offsets, so no student seed repeats a teacher's.
SEED_STRIDE = 1000
DONE_FILE = checkpoint.DONE_FILE
# The smallest input side a model trains at (student_image_size too): MobileNetV2 and EfficientNet halve it
# five times ('SAME' padding), so 16 px ends as a 1 x 1 feature map.
MIN_IMAGE_SIZE = 16


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
  """Stops at once on a config that cannot run, with one :class:`errors.ConfigError` naming the field and the
  fix (the lookups below raise ValueError from their own tables; they reach the user the same way)."""
  try:
    _check_config(config)
  except errors.UserError:
    raise
  except ValueError as error:
    raise errors.ConfigError(errors.one_line(error)) from None


def _check_config(config) -> None:
  if config.phase not in PHASES:
    raise errors.ConfigError(f"config.phase: unknown phase {config.phase!r}; choose from {PHASES}")
  if config.platform not in config_lib.PLATFORMS:
    raise errors.ConfigError(f"config.platform: unknown platform {config.platform!r}; choose from {config_lib.PLATFORMS}")
  if config.changed_inputs not in config_lib.CHANGED_INPUTS:
    raise errors.ConfigError(f"config.changed_inputs={config.changed_inputs!r}; choose from "
                             f"{config_lib.CHANGED_INPUTS}")
  try:
    losses.get_variant(config.loss_variant)
  except ValueError as error:  # Name the config field to fix, and the variants to choose from.
    raise errors.ConfigError(f"config.loss_variant: {error}") from None
  if config.dataset == info.CUSTOM:
    register_custom(config)
  try:
    info.get_info(config.dataset)
  except ValueError as error:
    raise errors.ConfigError(f"config.dataset: {error}") from None
  student_losses(config)
  student_seeds(config)
  _check_numbers(config)
  selection(config)
  student_size = int(config.student_image_size)
  if student_size < 0 or (0 < student_size < MIN_IMAGE_SIZE):
    raise errors.ConfigError(f"config.student_image_size must be 0 (= image_size) or at least {MIN_IMAGE_SIZE}, "
                             f"got {student_size}")
  if config.teachers_online and config.teacher_cache_dir:
    raise errors.ConfigError("config.teacher_cache_dir gives cached teacher outputs, config.teachers_online=True runs the "
                     "teachers instead: set one of them")
  if config.teachers_online and student_size > 0 and student_size != int(config.image_size):
    raise errors.ConfigError(
        f"config.teachers_online runs the teachers on the student's {student_size} px batch, but they were "
        f"trained at config.image_size={config.image_size}: use the teacher cache (teachers_online=False, the "
        "default) for a student of another size")


def register_custom(config) -> info.DatasetInfo:
  """Reads the scheme of the custom set in ``config.data_dir`` (points, flip pairs, normaliser, splits) into the
  dataset table, so that every phase knows it from ``--config.dataset=custom --config.data_dir=D`` alone."""
  if not config.data_dir:
    raise errors.ConfigError(
        "config.dataset=custom reads its landmark scheme from the prepared data: set --config.data_dir=D, where "
        "`python -m kd_landmarks.datasets prepare --dataset custom --manual_dir M --data_dir D` wrote it")
  try:
    return datasets.register_custom(os.path.expanduser(config.data_dir))
  except FileNotFoundError as error:
    raise errors.ConfigError(f"config.data_dir: {error}") from None


def landmark_scheme(dataset: str) -> dict:
  """What a model's K outputs mean (model.json's ``scheme``, which the model card prints): the dataset, its
  point count, the left/right pairs a horizontal flip swaps and the NME's normaliser."""
  dataset_info = info.get_info(dataset)
  permutation = flips.flip_permutation(dataset)
  scheme = {"dataset": dataset_info.name, "label": dataset_info.label or dataset_info.name,
            "num_landmarks": dataset_info.num_landmarks,
            "flip_pairs": [[int(i), int(j)] for i, j in enumerate(permutation) if i < j],
            "normalization": dataset_info.normalization}
  if dataset_info.normalization == "inter_ocular":
    scheme["normalizing_points"] = list(dataset_info.outer_eye_corners)
  return scheme


def _require(condition: bool, field: str, value, wanted: str) -> None:
  if not condition:
    raise errors.ConfigError(f"config.{field} must be {wanted}, got {value!r}: set --config.{field}=...")


def _check_numbers(config) -> None:
  """The numeric fields, each on its own (no data read): sizes, steps, batch sizes, seeds, optimiser, the
  held-out fraction and the augmentation ranges."""
  size = int(config.image_size)
  _require(size >= MIN_IMAGE_SIZE, "image_size", size,
           f"at least {MIN_IMAGE_SIZE} (the paper uses 224)")
  for phase in ("teacher", "student"):
    phase_config = config[phase]
    _require(int(phase_config.batch_size) >= 1, f"{phase}.batch_size", phase_config.batch_size, ">= 1")
    steps = int(phase_config.num_train_steps)
    _require(steps >= 1 or steps == -1, f"{phase}.num_train_steps", phase_config.num_train_steps,
             ">= 1, or -1 to train for num_epochs")
    if steps == -1:
      epochs = float(phase_config.num_epochs)
      _require(np.isfinite(epochs) and epochs > 0, f"{phase}.num_epochs", phase_config.num_epochs,
               "> 0 when num_train_steps is -1")
  _require(int(config.eval_batch_size) >= 1, "eval_batch_size", config.eval_batch_size, ">= 1")
  for field in ("augment_copies", "log_every_steps", "checkpoint_every_steps", "keep_checkpoints"):
    _require(int(config[field]) >= 1, field, config[field], ">= 1")
  for field in ("seed", "val_holdout_seed"):
    _require(int(config[field]) >= 0, field, config[field], ">= 0")
  for field in ("input_cache_mb", "prefetch"):
    _require(int(config[field]) >= -1, field, config[field], ">= 0, or -1 for the default")
  try:
    soft_landmark_options(config)
  except errors.UserError as error:
    raise errors.ConfigError(f"config.soft_landmarks: {error}") from None
  try:
    holdout.check_holdout(config.val_holdout)
  except ValueError as error:
    raise errors.ConfigError(f"{error}: set --config.val_holdout=0.05 (the default)") from None
  optimizer = config.optimizer
  rate = float(optimizer.learning_rate)
  _require(np.isfinite(rate) and rate > 0, "optimizer.learning_rate", optimizer.learning_rate, "> 0")
  for field in ("b1", "b2"):
    _require(0 <= float(optimizer[field]) < 1, f"optimizer.{field}", optimizer[field], "in [0, 1)")
  _require(float(optimizer.eps) > 0, "optimizer.eps", optimizer.eps, "> 0")
  _require(float(optimizer.decay) >= 0, "optimizer.decay", optimizer.decay, ">= 0")
  _require(optimizer.schedule in train.LR_SCHEDULES, "optimizer.schedule", optimizer.schedule,
           f"one of {train.LR_SCHEDULES}")
  _require(int(optimizer.warmup_steps) >= 0, "optimizer.warmup_steps", optimizer.warmup_steps, ">= 0")
  _require(0 <= float(optimizer.final_lr_fraction) <= 1, "optimizer.final_lr_fraction",
           optimizer.final_lr_fraction, "in [0, 1]")
  try:
    config_lib.AugmentConfig(**config.augment.to_dict())
  except ValueError as error:  # Its message names AugmentConfig.<field>: the config field is augment.<field>.
    raise errors.ConfigError(str(error).replace("AugmentConfig.", "config.augment.")) from None
  dataset = info.get_info(config.dataset)
  for split in filter(None, (name.strip() for name in str(config.eval_splits).split(","))):
    _require(split in dataset.splits, "eval_splits", config.eval_splits,
             f"empty or splits of {dataset.name} from {list(dataset.splits)}")
  for field, value in config.synthetic.to_dict().items():
    _require(int(value) >= 0, f"synthetic.{field}", value, ">= 0 (0: the builder's default)")


def data_dir_of(config, workdir) -> str:
  # Expanded here because `--config.data_dir=~/tfds` reaches us with the tilde unexpanded.
  return os.path.expanduser(config.data_dir) if config.data_dir else os.path.join(workdir, "data")


def load_split(config, workdir, split):
  """The data source of one split, preparing the synthetic dataset on first use; its Soft-landmarks must be
  those config.soft_landmarks asks for (:func:`check_soft_landmarks`)."""
  data_dir = data_dir_of(config, workdir)
  try:
    source = datasets.load_split(config.dataset, split, data_dir)
  except FileNotFoundError:
    if config.dataset != "synthetic":
      raise  # The builder's message names the prepare command for real data.
    _prepare_synthetic(config, data_dir)
    source = datasets.load_split(config.dataset, split, data_dir)
  check_soft_landmarks(config, source, data_dir)
  return source


def soft_landmark_options(config) -> dict:
  """config.soft_landmarks resolved: ``keep`` -1 is the dataset's own (``DatasetInfo.soft_keep``)."""
  options = config.soft_landmarks.to_dict()
  if options.get("keep") == -1:
    options["keep"] = None
  return shapes.soft_landmark_options(options, default_keep=info.get_info(config.dataset).soft_keep)


def check_soft_landmarks(config, source, data_dir) -> None:
  """Stops when the prepared data holds other Soft-landmarks than config.soft_landmarks (the Tolerant teacher
  would learn targets the config does not describe), naming both and the two fixes."""
  wanted = soft_landmark_options(config)
  stored = dict(source.metadata.get("soft_landmarks") or {})
  stored = {key: stored.get(key) for key in wanted}
  if stored == wanted:
    return
  command = builder.prepare_command(config.dataset, data_dir, overwrite=True)
  if config.dataset == "synthetic":
    command += "".join(f" --{key} {value}" for key, value in _synthetic_options(config).items())
  command += f" --soft_keep {wanted['keep']} --soft_keep_mode {wanted['keep_mode']}"
  raise errors.DataError(
      f"{source.name} in {data_dir} holds Soft-landmarks keep={stored['keep']} ({stored['keep_mode']}), but "
      f"config.soft_landmarks asks for keep={wanted['keep']} ({wanted['keep_mode']}): set "
      f"--config.soft_landmarks.keep={stored['keep']} --config.soft_landmarks.keep_mode={stored['keep_mode']}, "
      f"or prepare the data again (models trained on the old data are then retrained): {command}")


def _synthetic_options(config) -> dict[str, int]:
  """config.synthetic as ``prepare`` options; zero means "the builder's default" (builder.SYNTHETIC_DEFAULTS)."""
  return {key: int(value) for key, value in config.synthetic.to_dict().items() if value}


def _prepare_synthetic(config, data_dir):
  """Renders the synthetic dataset into ``data_dir`` (the demo's first run; no download)."""
  if jax.process_index() == 0:
    logging.info("preparing the synthetic dataset in %s", data_dir)
    builder.prepare("synthetic", data_dir=data_dir, synthetic_options=_synthetic_options(config),
                    soft_landmarks=soft_landmark_options(config))
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("synthetic dataset prepared")


def phase_image_size(config, phase: str) -> int:
  """The input size of the model a phase trains: ``student_image_size`` for the student when set."""
  if phase == "student" and int(config.student_image_size) > 0:
    return int(config.student_image_size)
  return int(config.image_size)


def model_meta(config, *, model_name, overrides, phase, loss=None, seed=None, seed_index=0) -> dict:
  return dict(model=model_name, seed=seed, seed_index=int(seed_index),
              num_landmarks=info.get_info(config.dataset).num_landmarks,
              image_size=phase_image_size(config, phase), dataset=config.dataset, overrides=dict(overrides),
              dtype=config.dtype, phase=phase, loss=loss, loss_variant=config.loss_variant,
              teachers_online=bool(config.teachers_online), selection=selection(config),
              scheme=landmark_scheme(config.dataset), config=json.loads(config.to_json_best_effort()))


def global_batch_size(config, phase_config, mesh) -> int:
  if config.per_device_batch_size > 0:
    return int(config.per_device_batch_size) * mesh.devices.size
  return int(phase_config.batch_size)


def num_train_steps(phase_config, num_examples: int, batch_size: int, augment_copies: int = 1) -> int:
  """``num_train_steps`` when set, else ``num_epochs`` epochs of ``augment_copies * num_examples`` faces (the
  authors count epochs over their offline-augmented set, x4 or x10; ``config.augment_copies``)."""
  if phase_config.num_train_steps > 0:
    return int(phase_config.num_train_steps)
  if int(augment_copies) < 1:
    raise ValueError(f"config.augment_copies must be >= 1, got {augment_copies}")
  return max(1, int(np.ceil(phase_config.num_epochs * ((int(augment_copies) * num_examples) // batch_size))))


class ChangedInputsError(errors.UserError, RuntimeError):
  """An unfinished model whose inputs changed, with ``config.changed_inputs='keep'``: it cannot be finished
  on other inputs than it started with."""


def _fit_model(config, workdir, *, model_dir_name, model_name, overrides, phase, target, loss_name,
               phase_config, teacher_cache=None, teacher_modules=None, teacher_variables=None, seed_index=0,
               teacher_inputs=None):
  """Trains one model, or returns None without training when :func:`_train_or_keep` keeps it.

  ``teacher_inputs``: for a distilled student, what identifies the teachers it learns from
  (:func:`_teacher_inputs`), recorded in its provenance."""
  # run() resolved the platform already; a phase called on its own (a notebook, a test) resolves it here,
  # so that model.json never records dtype 'auto' nor the input pipeline a prefetch of -1. Idempotent.
  config = backend.resolve(config)
  model_dir = os.path.join(workdir, model_dir_name)
  meta, plan = _plan(config, workdir, model_name=model_name, overrides=overrides, phase=phase, target=target,
                     loss_name=loss_name, phase_config=phase_config, seed_index=seed_index,
                     teacher_inputs=teacher_inputs)
  if not _train_or_keep(config, model_dir, meta):
    return None
  mesh, train_source, val_source = plan["mesh"], plan["train_source"], plan["val_source"]
  batch_size, steps, seed = plan["batch_size"], plan["steps"], meta["seed"]
  kernels = train.training_kernels(config)
  # Recorded for the reader; export and predict rebuild the model with the portable kernels (same weights).
  meta["train_kernels"] = kernels.description
  model = checkpoint.build_model(meta, kernels.model)
  if teacher_modules is not None:  # Online teachers compute their forward pass with the same kernels.
    teacher_modules = {name: models.with_kernels(module, kernels.model) for name, module in teacher_modules.items()}
  learning_rate_fn = train.create_learning_rate_fn(config, steps)
  spec = train.StepSpec(target=target, loss_fn=losses.get_student_loss(loss_name), loss_variant=config.loss_variant,
                        image_size=int(meta["image_size"]), flip_permutation=flips.flip_permutation(config.dataset),
                        augment_config=augment_config(config), learning_rate_fn=learning_rate_fn,
                        distill=target == "student" and needs_teachers(loss_name),
                        teacher_modules=teacher_modules, augment_kernels=kernels.augment,
                        masked=config.dataset == info.CUSTOM)
  validate_fn = functools.partial(
      evaluate.mean_nme, model, source=val_source, dataset=config.dataset, image_size=int(meta["image_size"]),
      batch_size=int(config.eval_batch_size), mesh=mesh)
  setup = train.FitSetup(
      model_dir=model_dir, model=model, spec=spec, train_source=train_source,
      global_batch_size=batch_size, num_train_steps=steps, seed=seed,
      tx=train.create_optimizer(config, learning_rate_fn), meta=meta, teacher_cache=teacher_cache,
      teacher_variables=teacher_variables, validate_fn=validate_fn,
      log_every_steps=int(config.log_every_steps), checkpoint_every_steps=int(config.checkpoint_every_steps),
      eval_every_steps=int(config.eval_every_steps), keep_checkpoints=int(config.keep_checkpoints),
      prefetch=int(config.prefetch), input_cache_bytes=input_cache_bytes(config), mesh=mesh)
  return train.fit(setup)


def _plan(config, workdir, *, model_name, overrides, phase, target, loss_name, phase_config, seed_index=0,
          teacher_inputs=None):
  """``(meta, plan)``: the model.json a training phase writes, its provenance included, and what its
  training reads (mesh, train and validation sources, global batch size, steps)."""
  meta = model_meta(config, model_name=model_name, overrides=overrides, phase=phase,
                    loss=loss_name if target == "student" else TEACHER_LOSS,
                    seed=training_seed(config, target, seed_index), seed_index=seed_index)
  mesh = parallel.make_mesh()
  train_source, val_source = train_and_val_sources(config, workdir)
  batch_size = global_batch_size(config, phase_config, mesh)
  steps = num_train_steps(phase_config, len(train_source), batch_size, int(config.augment_copies))
  meta["provenance"] = model_provenance(config, workdir, meta, target=target, batch_size=batch_size,
                                        num_train_steps=steps, teacher_inputs=teacher_inputs)
  return meta, dict(mesh=mesh, train_source=train_source, val_source=val_source, batch_size=batch_size,
                    steps=steps)


# ----------------------------------------------------------------------------------------------------------
# Provenance: what made each model (model.json's "provenance"; kd_landmarks/provenance.py).


def model_provenance(config, workdir, meta, *, target, batch_size, num_train_steps, teacher_inputs=None) -> dict:
  """The inputs that determine a model's weights, and their fingerprint, as model.json records them:

  * ``config``: the fields that change the weights (network, input size, seed, loss, optimiser and schedule,
    global batch, steps, augmentation, the faces held out and how often they choose the best checkpoint).
    Not how the run is executed or logged (platform, dtype, kernels, device count, prefetch, logging and
    checkpoint cadence, paths): a workdir moved to another machine keeps its models;
  * ``data``: the dataset's name, builder version and each split training reads, by size and content
    (:meth:`kd_landmarks.datasets.builder.LandmarkSource.content_fingerprint`);
  * ``teachers`` (a distilled student): the teacher outputs it learned from, by content, and the teachers
    they name (:func:`_teacher_inputs`).
  """
  distill = target == "student" and needs_teachers(meta["loss"])
  evaluate_every = int(config.eval_every_steps)
  fields = {key: meta[key] for key in ("model", "overrides", "image_size", "num_landmarks", "seed", "loss")}
  fields.update(target=target, optimizer=config.optimizer.to_dict(), batch_size=int(batch_size),
                num_train_steps=int(num_train_steps), augment=config.augment.to_dict(),
                # The steps validated are the candidates for best/, the weights evaluated and exported.
                selection=dict(meta["selection"], eval_every_steps=evaluate_every if evaluate_every > 0 else 0))
  if distill:
    fields.update(loss_variant=config.loss_variant, teachers_online=bool(config.teachers_online))
  inputs = {"config": fields, "data": data_provenance(config, workdir)}
  if distill:
    inputs["teachers"] = teacher_inputs
  return dict(inputs, fingerprint=provenance.fingerprint(inputs))


def data_provenance(config, workdir) -> dict:
  """The prepared splits a training phase reads (the training split, and a named ``val_split``), by size
  and content; a source not read from record files (an in-memory one) has content None."""
  dataset = info.get_info(config.dataset)
  chosen = selection(config)
  splits = [dataset.train_split] + ([chosen["split"]] if chosen["split"] != holdout.HOLDOUT_NAME else [])
  recorded = {}
  for split in splits:
    source = load_split(config, workdir, split)
    recorded[split] = {"num_examples": len(source), "content": _content(source)}
  return {"dataset": dataset.name, "version": str(builder.KdLandmarks.VERSION), "splits": recorded}


def _content(source) -> str | None:
  """A prepared split's content fingerprint; None for a source not read from record files (in memory)."""
  return source.content_fingerprint() if getattr(source, "files", None) else None


def _teacher_inputs(config, workdir, outputs=None) -> dict:
  """What identifies a distilled student's teachers: the teacher outputs it reads (``outputs``, a
  :class:`teacher_cache.TeacherOutputs`) by content and the teachers their metadata names, or with
  ``teachers_online`` each teacher's own fingerprint and trained steps."""
  if config.teachers_online:
    return {"online": {teacher: {"fingerprint": _recorded_fingerprint(os.path.join(workdir, f"teacher_{teacher}")),
                                 "steps": checkpoint.trained_steps(os.path.join(workdir, f"teacher_{teacher}"))}
                       for teacher in TEACHERS}}
  named = (outputs.metadata.get("teachers") or {}) if outputs is not None else {}
  return {"outputs": outputs.content if outputs is not None else None,
          "teachers": {teacher: {"fingerprint": (named.get(teacher) or {}).get("fingerprint"),
                                 "checkpoint": (named.get(teacher) or {}).get("checkpoint")}
                       for teacher in TEACHERS}}


def _recorded_fingerprint(model_dir) -> str | None:
  """The fingerprint model.json records for ``model_dir`` (None: no model.json, or none recorded)."""
  stored = checkpoint.stored_meta(model_dir)
  return ((stored or {}).get("provenance") or {}).get("fingerprint")


def _train_or_keep(config, model_dir, meta) -> bool:
  """Compares a trained model's recorded provenance with this run's before anything trains: True to train
  (nothing trained yet, the same inputs: resume or finish, or inputs changed and the old model moved to
  ``WORKDIR/superseded/``), False to keep a finished model with changed inputs (``changed_inputs='keep'``).
  Raises :class:`ChangedInputsError` for an unfinished one with changed inputs under 'keep'."""
  stored = checkpoint.resumable_meta(model_dir)
  if stored is None:
    return True
  changed = provenance.differences(stored.get("provenance"), meta["provenance"])
  if not changed:
    return True
  what = "; ".join(changed)
  done = checkpoint.trained_steps(model_dir)
  if config.changed_inputs == "keep":
    if done is not None:
      logging.warning("%s: kept on purpose (config.changed_inputs='keep') although its inputs changed: %s",
                      model_dir, what)
      return False
    raise ChangedInputsError(
        f"{model_dir} is unfinished and its inputs changed since it started ({what}); it cannot be finished "
        "on other inputs: set --config.changed_inputs=retrain to move it aside and train it again, or restore "
        "the inputs it started with")
  if jax.process_count() > 1:  # Every process has read the old model.json before it moves.
    multihost_utils.sync_global_devices(f"{model_dir} compared")
  if jax.process_index() == 0:
    aside = checkpoint.move_aside(model_dir)
    logging.warning("%s: its inputs changed since it was trained (%s): moved to %s; training it again "
                    "(--config.changed_inputs=keep keeps a finished model instead)", model_dir, what, aside)
  if jax.process_count() > 1:  # No process may restore the old checkpoints before they are moved.
    multihost_utils.sync_global_devices(f"{model_dir} moved aside")
  return True


def input_cache_bytes(config) -> int:
  """``config.input_cache_mb`` in bytes (-1: a quarter of the machine's memory)."""
  megabytes = int(config.input_cache_mb)
  return input_pipeline.default_cache_budget_bytes() if megabytes < 0 else megabytes * 2**20


def augment_config(config):
  """``config.augment`` as the frozen ``config_lib.AugmentConfig`` the step closes over."""
  return config_lib.AugmentConfig(**config.augment.to_dict())


def selection(config) -> dict:
  """Which faces choose the best checkpoint (written to model.json, then metrics.json and the report).

  Default (``config.val_split`` empty): the slice of the training split held out by ``config.val_holdout``
  / ``val_holdout_seed`` (``datasets/holdout.py``), on which nothing trains. A named ``val_split`` is used
  on purpose as it is, and the whole training split is trained on; ``on_test`` then says whether it is a
  test split (the report prints "selected on test").
  """
  dataset = info.get_info(config.dataset)
  if config.val_split and config.val_split != holdout.HOLDOUT_NAME:
    if config.val_split not in dataset.splits:
      raise ValueError(f"config.val_split={config.val_split!r} is not a split of {dataset.name}; choose from "
                       f"{list(dataset.splits)}, or leave it empty for the held-out slice of the training split")
    return {"split": config.val_split, "on_test": config.val_split != dataset.train_split}
  if not float(config.val_holdout) > 0:
    raise ValueError("config.val_holdout is 0 and config.val_split is empty: nothing to choose the checkpoint "
                     "on; set --config.val_holdout=0.05 (default) or name a split in --config.val_split")
  return {"split": holdout.HOLDOUT_NAME, "on_test": False, "holdout": float(config.val_holdout),
          "holdout_seed": int(config.val_holdout_seed), "of_split": dataset.train_split}


def train_and_val_sources(config, workdir):
  """``(train_source, val_source)`` of a training phase: the training split without the held-out slice
  and the slice (default), or the whole training split and the named ``config.val_split``."""
  chosen = selection(config)
  train_source = load_split(config, workdir, info.get_info(config.dataset).train_split)
  if chosen["split"] != holdout.HOLDOUT_NAME:
    return train_source, load_split(config, workdir, chosen["split"])
  return holdout.split_train_holdout(train_source, chosen["holdout"], chosen["holdout_seed"],
                                     name=chosen["of_split"])


def _teacher_phase(config, teacher: str) -> dict:
  """What :func:`_fit_model` trains for teacher ``teacher``."""
  return dict(model_dir_name=f"teacher_{teacher}", model_name=config.teacher_model,
              overrides=config.teacher_overrides.to_dict(), phase=f"teacher_{teacher}",
              target=TEACHER_TARGETS[teacher], loss_name=TEACHER_LOSS, phase_config=config.teacher)


def _student_phase(config, loss_name: str, seed_index: int) -> dict:
  """What :func:`_fit_model` trains for student ``loss_name``, seed ``seed_index``."""
  return dict(model_dir_name=student_dir_name(loss_name, seed_index), model_name=config.student_model,
              overrides=config.student_overrides.to_dict(), phase="student", target="student",
              loss_name=loss_name, phase_config=config.student, seed_index=seed_index)


def train_teacher(config, workdir, teacher: str):
  """Phase teacher_tough / teacher_tolerant: L2 on the ground truth / on the soft landmarks (Sec. 3.2)."""
  return _fit_model(config, workdir, **_teacher_phase(config, teacher))


def _require_teacher(workdir, teacher):
  model_dir = os.path.join(workdir, f"teacher_{teacher}")
  if not os.path.exists(os.path.join(model_dir, DONE_FILE)):
    raise errors.MissingFileError(
        f"the {teacher} teacher is not trained ({model_dir}/{DONE_FILE} missing): run "
        f"`python -m kd_landmarks.main --config <config>:phase=teacher_{teacher} --workdir {workdir}` "
        "(or phase=all) first")
  return model_dir


def _rebuild_command(config, workdir) -> str:
  own = f"python -m kd_landmarks.main --config <config>:phase=cache_teachers --workdir {workdir}"
  if config.teacher_cache_dir:
    return (f"ask for teacher outputs made on this training split, or write your own with `{own}` (it needs both "
            "teachers trained in that workdir) and leave --config.teacher_cache_dir unset")
  return f"`{own}` (after both teachers, or phase=all)"


def _cache_metadata(config, source, teacher_metas: dict) -> dict:
  """What the teacher outputs were made on and by (checked by teacher_cache.check_matches)."""
  preparation = dict(source.metadata)
  return {
      "dataset": info.get_info(config.dataset).name, "dataset_version": str(builder.KdLandmarks.VERSION),
      "split": teacher_cache.SPLIT, "num_examples": len(source), "train_content": _content(source),
      "num_landmarks": info.get_info(config.dataset).num_landmarks, "frame": "stored-crop pixels",
      "preparation": preparation, "soft_landmarks": preparation.get("soft_landmarks"),
      "teachers": {teacher: {"model": meta["model"], "overrides": dict(meta.get("overrides") or {}),
                             "fingerprint": (meta.get("provenance") or {}).get("fingerprint"),
                             "checkpoint": {"kind": meta["checkpoint"][0], "step": int(meta["checkpoint"][1])},
                             "image_size": int(meta["image_size"]), "dtype": meta.get("dtype"),
                             "target": TEACHER_TARGETS[teacher], "loss": TEACHER_LOSS,
                             "model_dir": os.path.abspath(meta["model_dir"])}
                   for teacher, meta in teacher_metas.items()},
  }


def cache_teachers(config, workdir):
  """Phase cache_teachers: both teachers' predictions on the whole train split, in stored-crop pixels, written
  as the tfds dataset kd_landmarks_teachers/<dataset> in WORKDIR/teacher_cache (teacher_cache module).

  The cache covers the whole split, the held-out validation slice included: its rows stay aligned with the
  stored ``index`` the input pipeline joins on, and the student's training source never contains a held-out
  row, so those predictions are never trained on (docs/method.md, "Validation")."""
  teacher_dirs = {teacher: _require_teacher(workdir, teacher) for teacher in TEACHERS}  # Fail before work.
  mesh = parallel.make_mesh()
  source = load_split(config, workdir, "train")
  predictions, metas = {}, {}
  index = image_id = None
  kernels = train.training_kernels(config).model  # As in evaluate_all.
  for teacher in TEACHERS:
    module, variables, meta = checkpoint.load_inference_variables(teacher_dirs[teacher])
    # The teacher's own input size (model.json), which the config may no longer match.
    result = evaluate.predict_source(models.with_kernels(module, kernels), variables, source, image_size=int(meta["image_size"]),
                                     batch_size=int(config.eval_batch_size), mesh=mesh,
                                     desc=f"cache {teacher} teacher")
    predictions[teacher] = result["pred_crop"]
    metas[teacher] = dict(meta, model_dir=teacher_dirs[teacher])
    index, image_id = result["index"], result["image_id"]
  cache_dir = os.path.join(workdir, CACHE_DIR)
  path = teacher_cache.dataset_dir(cache_dir, config.dataset)
  if jax.process_index() == 0:
    path = teacher_cache.write_teacher_outputs(cache_dir, dataset=config.dataset, index=index, image_id=image_id,
                                               metadata=_cache_metadata(config, source, metas), **predictions)
  if jax.process_count() > 1:  # The other processes read it next (student phase): wait until it is written.
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices("teacher outputs written")
  return str(path)


def _cache_is_current(workdir, config) -> bool:
  """The workdir's teacher outputs exist, are newer than both teachers' final checkpoints and were made on
  the current train split (same dataset, version, size, preparation)."""
  path = teacher_cache.dataset_dir(os.path.join(workdir, CACHE_DIR), config.dataset)
  info_file = path / "dataset_info.json"
  if not info_file.exists():
    return False
  done = [os.path.join(workdir, f"teacher_{t}", DONE_FILE) for t in TEACHERS]
  if not all(os.path.exists(d) and os.path.getmtime(d) <= os.path.getmtime(info_file) for d in done):
    return False
  try:
    _load_checked_cache(config, workdir, path)
  except (teacher_cache.TeacherCacheError, FileNotFoundError):
    return False
  return True


def _load_checked_cache(config, workdir, path) -> teacher_cache.TeacherOutputs:
  """Reads the teacher outputs at ``path`` and checks them against the train split (before any training)."""
  train_source = load_split(config, workdir, "train")
  rebuild = _rebuild_command(config, workdir)
  outputs = teacher_cache.load_teacher_outputs(path, dataset=config.dataset, rebuild=rebuild)
  teacher_cache.check_matches(
      outputs, dataset=config.dataset, dataset_version=str(builder.KdLandmarks.VERSION),
      num_examples=len(train_source), num_landmarks=info.get_info(config.dataset).num_landmarks,
      preparation=train_source.metadata, train_content=_content(train_source), rebuild=rebuild)
  if not config.teacher_cache_dir:  # The workdir's own outputs: made by the teachers it holds now?
    named = outputs.metadata.get("teachers") or {}
    for teacher in TEACHERS:
      current = _recorded_fingerprint(os.path.join(workdir, f"teacher_{teacher}"))
      made_by = (named.get(teacher) or {}).get("fingerprint")
      if current is not None and current != made_by:
        raise teacher_cache.TeacherCacheMismatchError(
            f"{path}: the teacher outputs were made by the {teacher} teacher {provenance.short(made_by)}, but "
            f"{workdir}/teacher_{teacher} now holds {provenance.short(current)} (trained again). Rebuild them: "
            f"{rebuild}")
  return outputs


def teacher_outputs_path(config, workdir):
  """``config.teacher_cache_dir`` (someone else's teachers) when set, else the workdir's own cache."""
  if config.teacher_cache_dir:
    return teacher_cache.resolve(config.teacher_cache_dir, config.dataset)
  return teacher_cache.dataset_dir(os.path.join(workdir, CACHE_DIR), config.dataset)


def _require_teacher_outputs(config, workdir, loss_name: str):
  """The path of the teacher outputs a distilled student reads, which must exist."""
  path = teacher_outputs_path(config, workdir)
  if not (path / "dataset_info.json").exists():
    legacy = os.path.join(workdir, teacher_cache.LEGACY_NPZ)
    old = (f" ({legacy} is the .npz cache of earlier versions, which is no longer read)"
           if not config.teacher_cache_dir and os.path.exists(legacy) else "")
    raise errors.MissingFileError(
        f"the student loss {loss_name!r} needs the teachers' outputs {path}, which are missing{old}: run "
        f"`python -m kd_landmarks.main --config <config>:phase=cache_teachers --workdir {workdir}` after "
        "both teachers (or phase=all), give another's with --config.teacher_cache_dir=DIR, or set "
        "--config.teachers_online=True")
  return path


def preflight(config, workdir, mesh=None) -> None:
  """Checks, before the first step of any phase, what every phase of this run will need, so that a run does
  not stop hours in on something knowable at its start: the data and splits each phase reads, each training
  phase's global batch against its training set (any batch runs on any device count: it is padded to a
  multiple of the devices and the padding masked out, :func:`parallel.padded_batch_size`), the evaluation
  splits, and the teachers or teacher outputs a distilled student reads when this run does not make them.
  Logs each training phase's batch layout over the devices. Raises :class:`errors.UserError`.
  """
  mesh = mesh or parallel.make_mesh()
  phases = _phases(config)
  run_all = config.phase == "all"
  distilled = _distilled_losses(config)
  trains = {
      "teacher": any(p.startswith("teacher_") for p in phases) and not (run_all and _all_skips_teachers(config)),
      "student": "student" in phases,
  }
  if any(trains.values()) or "cache_teachers" in phases:
    # An unprepared dataset or an unknown split is the builder's MissingFileError / ArgumentError.
    train_source, _ = train_and_val_sources(config, workdir)
    for role, runs in trains.items():
      if not runs:
        continue
      phase_config = config[role]
      batch = global_batch_size(config, phase_config, mesh)
      field = ("config.per_device_batch_size" if config.per_device_batch_size > 0
               else f"config.{role}.batch_size")
      if batch > len(train_source):
        raise errors.ConfigError(
            f"{field} gives a global {role} batch of {batch}, more than the {len(train_source)} training "
            f"examples of {config.dataset} (after the held-out validation slice): lower it to at most "
            f"{len(train_source)}")
      logging.info("%s phases: %s", role, parallel.describe_batch(batch, mesh.devices.size))
  if "eval" in phases:
    if not run_all:
      _require_trained_models(workdir)
    for split in evaluate.eval_splits(config):  # Their names were checked with the config (_check_numbers).
      load_split(config, workdir, split)
  if trains["student"] and distilled:
    if config.teachers_online:
      if not run_all:
        for teacher in TEACHERS:
          _require_teacher(workdir, teacher)
    elif config.teacher_cache_dir:
      _load_checked_cache(config, workdir, _require_teacher_outputs(config, workdir, distilled[0]))
    elif not run_all:
      _require_teacher_outputs(config, workdir, distilled[0])
  if config.phase == "cache_teachers":
    for teacher in TEACHERS:
      _require_teacher(workdir, teacher)


def _phases(config) -> tuple:
  """The phases ``config.phase`` runs, in order."""
  return ALL_PHASES if config.phase == "all" else (config.phase,)


def _distilled_losses(config) -> list[str]:
  """The student losses that read the teachers."""
  return [name for name in student_losses(config) if needs_teachers(name)]


def _all_skips_teachers(config) -> bool:
  """Whether ``phase=all`` trains no teacher: another's outputs are given, or no student loss reads them."""
  return bool(config.teacher_cache_dir) or not _distilled_losses(config)


def student_seeds(config) -> int:
  """``config.student_seeds``: how many seeds each student loss trains with (>= 1)."""
  count = int(config.student_seeds)
  if count < 1:
    raise ValueError(f"config.student_seeds must be >= 1 (the number of seeds per student loss), got {count}")
  return count


def training_seed(config, target: str, seed_index: int = 0) -> int:
  """The seed (initialisation and batch order) of one model: ``config.seed`` + its role's offset, and for
  student seed ``k`` another ``SEED_STRIDE * k``. Every student loss shares the seed of index ``k``, so seed
  ``k`` of KD and seed ``k`` of L2 differ only by their loss (the report pairs them)."""
  return int(config.seed) + ROLE_SEED_OFFSETS[target] + SEED_STRIDE * int(seed_index)


def student_dir_name(loss_name: str, seed_index: int = 0) -> str:
  """``student_<loss>`` for the first seed (as single-seed runs always named it), ``student_<loss>_seed<k>``."""
  return f"student_{loss_name}" if seed_index == 0 else f"student_{loss_name}_seed{seed_index}"


def train_student(config, workdir, loss_name: str, seed_index: int = 0):
  """Phase student: ``loss_name`` against cached (or online) frozen teachers (Section 3.2, Eqs. 4-14).

  ``seed_index`` k > 0 trains another seed of the same loss (``student_<loss>_seed<k>``) against the same
  teachers and teacher cache."""
  cache = teacher_modules = teacher_variables = teacher_inputs = None
  if needs_teachers(loss_name):
    if config.teachers_online:
      teacher_modules, teacher_variables = {}, {}
      for teacher in TEACHERS:
        module, variables, _ = checkpoint.load_inference_variables(_require_teacher(workdir, teacher))
        teacher_modules[teacher], teacher_variables[teacher] = module, variables
      teacher_inputs = _teacher_inputs(config, workdir)
    else:
      path = _require_teacher_outputs(config, workdir, loss_name)
      # Checked against the training split here, before any model is built or step compiled.
      outputs = _load_checked_cache(config, workdir, path)
      cache, teacher_inputs = outputs.as_cache(), _teacher_inputs(config, workdir, outputs)
  # Baselines (l2, l1, smooth_l1) take no teachers; the ground truth fills their slots.
  return _fit_model(config, workdir, **_student_phase(config, loss_name, seed_index), teacher_cache=cache,
                    teacher_modules=teacher_modules, teacher_variables=teacher_variables,
                    teacher_inputs=teacher_inputs)


def trained_model_dirs(workdir) -> list[str]:
  names = sorted(os.listdir(workdir)) if os.path.isdir(workdir) else []
  return [os.path.join(workdir, n) for n in names
          if (n.startswith("teacher_") or n.startswith("student_"))
          and os.path.exists(os.path.join(workdir, n, checkpoint.MODEL_JSON))]


def _require_trained_models(workdir) -> list[str]:
  model_dirs = trained_model_dirs(workdir)
  if not model_dirs:
    raise errors.MissingFileError(f"no trained model in {workdir}: run the teacher/student phases (phase=all) first")
  return model_dirs


def evaluate_all(config, workdir, *, skip_current: bool = False):
  """Phase eval: every trained model in the workdir on every evaluation split."""
  model_dirs = _require_trained_models(workdir)
  # The kernels training used (on a CPU, 5x the portable grouped convolution's forward speed on the demo's
  # model): the same function of the same variables.
  kernels = train.training_kernels(config).model
  results = {}
  for model_dir in model_dirs:
    if skip_current and evaluate.is_current(model_dir):
      continue
    results[os.path.basename(model_dir)] = evaluate.evaluate_model(
        model_dir, splits=evaluate.eval_splits(config), load_split_fn=lambda s: load_split(config, workdir, s),
        batch_size=int(config.eval_batch_size), box_robustness_on=bool(config.box_robustness), kernels=kernels)
  return results


def configured_provenances(config, workdir) -> dict:
  """For each trained model directory this config trains: the provenance it would record now (a dict), or
  one line saying why that cannot be known (e.g. the teacher outputs are missing or stale). The report
  marks a model whose recorded fingerprint differs."""
  config = backend.resolve(config)
  phases = {}
  if not _all_skips_teachers(config):
    phases.update({f"teacher_{teacher}": _teacher_phase(config, teacher) for teacher in TEACHERS})
  for seed_index in range(student_seeds(config)):
    phases.update({student_dir_name(loss, seed_index): _student_phase(config, loss, seed_index)
                   for loss in student_losses(config)})
  configured, outputs = {}, {}
  for name, phase in phases.items():
    if not os.path.exists(os.path.join(workdir, name, checkpoint.MODEL_JSON)):
      continue
    phase = {key: value for key, value in phase.items() if key != "model_dir_name"}
    try:
      teacher_inputs = None
      if phase["target"] == "student" and needs_teachers(phase["loss_name"]):
        if not config.teachers_online and "outputs" not in outputs:
          outputs["outputs"] = _load_checked_cache(config, workdir, teacher_outputs_path(config, workdir))
        teacher_inputs = _teacher_inputs(config, workdir, outputs.get("outputs"))
      configured[name] = _plan(config, workdir, **phase, teacher_inputs=teacher_inputs)[0]["provenance"]
    except (errors.UserError, FileNotFoundError) as error:
      configured[name] = errors.one_line(error)
  return configured


def write_report(config, workdir):
  if jax.process_index() == 0:
    return report.build_report(workdir, dataset=config.dataset, data_dir=data_dir_of(config, workdir),
                               configured=configured_provenances(config, workdir))


def run(config, workdir: str, *, break_lock: bool = False):
  """Runs ``config.phase`` (or, for 'all', every phase in order, skipping finished ones) in ``workdir``.

  Holds the workdir's lock (:mod:`kd_landmarks.training.workdir_lock`) throughout: a second run on the same workdir
  stops at once naming this one; ``break_lock`` takes over a lock its holder left behind. A full disk or a
  read-only workdir stops the run with one :class:`errors.WriteError` naming the file; every file a re-run
  trusts (checkpoints, model.json, train_done.json, teacher outputs, prepared data) is written whole or
  not at all.
  """
  validate_config(config)
  config = backend.resolve(config)  # platform 'auto', dtype 'auto', prefetch -1 -> concrete (idempotent).
  with files.writing(workdir):
    os.makedirs(workdir, exist_ok=True)
    lock = workdir_lock.acquire(workdir, break_lock=break_lock, process_index=jax.process_index(),
                                process_count=jax.process_count())
    try:
      _run_phases(config, workdir)
    finally:
      lock.release()


def _run_phases(config, workdir: str):
  if config.compilation_cache:
    # Teachers share shapes, so do the students: the persistent cache turns their recompiles into reads.
    jax.config.update("jax_compilation_cache_dir", os.path.join(workdir, "jax_cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
  preflight(config, workdir)
  run_all = config.phase == "all"
  for phase in _phases(config):
    logging.info("phase %s", phase)
    if phase in ("teacher_tough", "teacher_tolerant"):
      if run_all and _all_skips_teachers(config):
        continue  # Nothing downstream reads these teachers.
      train_teacher(config, workdir, phase.split("_", 1)[1])
    elif phase == "cache_teachers":
      if run_all and (config.teachers_online or _all_skips_teachers(config) or _cache_is_current(workdir, config)):
        continue
      cache_teachers(config, workdir)
    elif phase == "student":
      # Seed-major: a run stopped early has every loss at the same number of seeds, ready to pair.
      for seed_index in range(student_seeds(config)):
        for loss_name in student_losses(config):
          train_student(config, workdir, loss_name, seed_index)
    elif phase == "eval":
      evaluate_all(config, workdir, skip_current=run_all)
    elif phase == "report":
      if config.write_report or not run_all:
        path = write_report(config, workdir)
        if path is not None:
          logging.info("report: %s", path)
          print(f"report written to {path}", flush=True)
