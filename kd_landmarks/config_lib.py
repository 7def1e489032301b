"""Config building blocks shared by every file in configs/: the paper's defaults and the config arg.

A config file is ``configs/<name>.py`` with ``get_config(arg)``; it starts from :func:`base_config`, changes
what differs and returns :func:`apply_arg` (which parses "phase=...,platform=...,runlocal" and locks the
config, so that a key typo such as ``--config.studnet_loss=l2`` fails at once with ml_collections' "Key
'studnet_loss' does not exist" instead of being silently ignored). This module lives in the package so that
config files import it the same way wherever they are run from.
"""
from __future__ import annotations

import dataclasses

import ml_collections

# Evaluation box scale: the middle of training's random 0-10% expansion, so that test faces are
# framed like an average training face.
EVAL_BOX_SCALE = 1.05


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
  """Ranges of every random transform of :func:`kd_landmarks.augment.augment` (Section 4.3); each can be
  switched off on its own. Here, beside the other hyper-parameters, so that configs load without JAX.

  Frozen (hashable) so that it can be a static argument of ``jax.jit``.
  """
  # Random box expansion: side = (1 + U(0, max_box_expansion)) * landmark-box side. When switched off
  # the box is scaled by EVAL_BOX_SCALE, i.e. framed exactly as at evaluation.
  box_expansion: bool = True
  max_box_expansion: float = 0.10
  # Random shift of the box centre, each axis U(-max_shift, max_shift) * landmark-box side.
  shift: bool = True
  max_shift: float = 0.05
  # In-plane rotation about the box centre, U(-max_rotation_degrees, max_rotation_degrees).
  rotation: bool = True
  max_rotation_degrees: float = 45.0
  # Horizontal flip with probability flip_probability (needs the dataset's flip permutation).
  flip: bool = True
  flip_probability: float = 0.5
  # Photometric jitter on [0, 1] images: brightness offset, contrast and saturation factors around 1,
  # per-channel colour gains around 1.
  photometric: bool = True
  max_brightness_delta: float = 0.2
  max_contrast_delta: float = 0.3
  max_saturation_delta: float = 0.3
  max_color_gain_delta: float = 0.1
  # Additive Gaussian noise with standard deviation U(0, max_noise_std) per image.
  noise: bool = True
  max_noise_std: float = 0.04
  # What lies outside the stored crop: 'constant' (fill_value) or 'nearest' (replicate the border).
  fill_mode: str = "constant"
  fill_value: float = 0.0

  def __post_init__(self):
    if self.fill_mode not in ("constant", "nearest"):
      raise ValueError(f"AugmentConfig.fill_mode={self.fill_mode!r}; choose 'constant' or 'nearest'")
    for name in ("max_box_expansion", "max_shift", "max_rotation_degrees", "max_brightness_delta",
                 "max_contrast_delta", "max_saturation_delta", "max_color_gain_delta", "max_noise_std"):
      if getattr(self, name) < 0:
        raise ValueError(f"AugmentConfig.{name} must be >= 0, got {getattr(self, name)}")
    if not 0.0 <= self.flip_probability <= 1.0:
      raise ValueError(f"AugmentConfig.flip_probability must be in [0, 1], got {self.flip_probability}")

  @classmethod
  def disabled(cls, **overrides) -> "AugmentConfig":
    """Every random transform off (then :func:`augment` equals :func:`preprocess_eval`)."""
    fields = dict(box_expansion=False, shift=False, rotation=False, flip=False, photometric=False,
                  noise=False)
    fields.update(overrides)
    return cls(**fields)




PHASES = ("teacher_tough", "teacher_tolerant", "cache_teachers", "student", "eval", "report", "all")
CHANGED_INPUTS = ("retrain", "keep")
# 'auto': the backend JAX has (kd_landmarks.training.backend resolves it, and dtype/prefetch from it, at run time).
PLATFORMS = ("auto", "cpu", "gpu", "tpu")


def base_config() -> ml_collections.ConfigDict:
  """The paper's setup: EfficientNet-B3 teachers, MobileNetV2 student, 224 px, Adam 1e-3, decay 1e-6."""
  config = ml_collections.ConfigDict()
  config.phase = "all"
  config.dataset = "300w"
  config.data_dir = ""            # Empty: WORKDIR/data (where the demo prepares the synthetic set).
  config.seed = 0
  # Seeds per student loss (docs/method.md, "Seeds"): seed k trains student_<loss>_seed<k> (k = 0:
  # student_<loss>) from config.seed + 2 + 1000 k, against the same teachers and teacher cache; the report
  # gives mean +- std over seeds and paired confidence intervals.
  config.student_seeds = 1

  # Models (Section 3.2): teachers are EfficientNet-B3, the student MobileNetV2, inputs 224 x 224.
  config.image_size = 224
  # > 0: the student's own input size (the teachers keep image_size), e.g. 160 for a lighter student to
  # ship to phones (docs/deploy.md, "Measured"). The teacher cache holds stored-crop pixels, so it serves any size.
  config.student_image_size = 0
  config.teacher_model = "efficientnet_b3"
  config.student_model = "mobilenet_v2"
  config.teacher_overrides = ml_collections.ConfigDict()   # Extra create_model kwargs, e.g. dropout_rate.
  config.student_overrides = ml_collections.ConfigDict()

  # Student loss: a name (or comma-separated names; phase 'all' trains each) from losses.STUDENT_LOSSES:
  # kd, l2, l1, smooth_l1, kd_tough_only, kd_tolerant_only (Tables 7, 8). 'paper' or 'author_code'
  # constants (see docs/method.md).
  config.student_loss = "l2,kd"
  config.loss_variant = "paper"
  # True: run the frozen teachers inside the student's step on the augmented batch instead of reading
  # the teacher cache (slower, but the teachers then see exactly the student's augmented image).
  config.teachers_online = False
  # Non-empty: the student reads these teacher outputs (a tfds data dir or dataset folder written by
  # phase=cache_teachers, e.g. a colleague's) instead of WORKDIR/teacher_cache; phase=all then trains no
  # teachers. Checked against the training split before training (teacher_cache.check_matches).
  config.teacher_cache_dir = ""

  # Optimiser (Section 4.3): Adam(lr 1e-3, b1 0.9, b2 0.999) with Keras' time-based decay
  # lr_t = lr / (1 + decay * step), decay 1e-6. eps 1e-7 is Keras' default, which the authors used.
  # schedule 'paper' is that decay; 'cosine' (linear warm-up over warmup_steps, then a half cosine down to
  # final_lr_fraction * learning_rate at the phase's last step; kd_landmarks.train.create_learning_rate_fn)
  # is not the paper's, for short runs such as the demo, and ignores decay.
  config.optimizer = ml_collections.ConfigDict(dict(
      learning_rate=1e-3, b1=0.9, b2=0.999, eps=1e-7, decay=1e-6, schedule="paper", warmup_steps=0,
      final_lr_fraction=0.0))

  # Phases: teachers batch 40, student batch 70, about 250 epochs each (Section 4.3). num_train_steps > 0
  # overrides the epochs. batch_size is global (all devices); per_device_batch_size > 0 replaces it by
  # per_device_batch_size * device count.
  config.teacher = ml_collections.ConfigDict(dict(batch_size=40, num_epochs=250.0, num_train_steps=-1))
  config.student = ml_collections.ConfigDict(dict(batch_size=70, num_epochs=250.0, num_train_steps=-1))
  config.per_device_batch_size = -1
  # The authors augment offline (x4 copies of each face for 300W and WFLW, x10 for COFW, their
  # data-preparation code) and train ~250 epochs over the augmented set: 4-10x our steps per "epoch".
  # augment_copies multiplies the epoch length (steps = num_epochs * augment_copies * N // batch) to match
  # them; 1 counts epochs over the original faces (our augmentation is on-line, every step draws anew).
  config.augment_copies = 1

  # Bookkeeping.
  config.log_every_steps = 100
  config.checkpoint_every_steps = 1000
  config.eval_every_steps = 5000     # Validation NME for the best checkpoint; <= 0: at the end only.
  config.keep_checkpoints = 2
  # Checkpoint selection (docs/method.md, "Validation"): the paper names no validation split. Empty
  # val_split: hold out val_holdout (a fraction in (0, 1), or a count >= 1) of the training split, drawn
  # with val_holdout_seed; nothing trains on it and it alone picks the best checkpoint. 5%: 157 faces of
  # 300W, 67 of COFW, 375 of WFLW, 60 of the demo's 1,200 -- enough that the standard error of a mean NME
  # (per-image spread about half the mean, measured on the demo) is ~4% of it, for 5% fewer training faces.
  # A split named here is used on purpose instead (the whole training split is then trained on), and the
  # report says which split chose the checkpoint ("selected on test" for a test split).
  config.val_split = ""
  config.val_holdout = 0.05
  config.val_holdout_seed = 0
  config.eval_splits = ""            # Comma-separated; empty: every split but train.
  config.eval_batch_size = 64
  # The NME with the evaluation crop's box shifted and scaled (16 perturbations, the whole test set only;
  # evaluate.box_perturbations), for the report's box-robustness table.
  config.box_robustness = True
  config.prefetch = -1               # Host batches prepared ahead of the device; -1: 2 on CPU, 4 on GPU/TPU.
  # Hold the training split decoded in memory when it fits this many MiB (decoding is the input pipeline's
  # main cost, paid every epoch otherwise; input_pipeline.InMemorySource). -1: a quarter of the machine's
  # memory; 0: always read from disk.
  config.input_cache_mb = -1
  # A trained model whose inputs changed since (a config field that changes its weights, the prepared data,
  # the teacher outputs a student learned from; model.json's provenance, docs/training.md "Provenance"):
  # 'retrain' moves it to WORKDIR/superseded/ and trains it again; 'keep' keeps a finished one as it is, on
  # purpose (the report marks it), and stops at an unfinished one.
  config.changed_inputs = "retrain"
  config.write_report = True
  config.compilation_cache = True    # Persistent XLA cache in WORKDIR/jax_cache (restarts compile less).

  # Platform: mesh over all devices. 'auto': the backend JAX has; or cpu/gpu/tpu, checked at start.
  # dtype 'auto': float32 on CPU, bfloat16 compute on accelerators (parameters stay float32); both are
  # resolved at run time from the resolved platform (kd_landmarks/training/backend.py), however platform was set.
  config.platform = "auto"
  config.dtype = "auto"
  # Training on the CPU uses the CPU kernels of kd_landmarks/cpu (the same mathematics, computed faster on XLA's
  # CPU backend; native C++ where a compiler builds them), and so do the pipeline's evaluation and teacher
  # outputs there. Accelerators, export and predict always run the models' portable kernels.
  # docs/performance.md has the measurement of each piece.
  config.cpu_kernels = True

  # Augmentation on device (passed to kd_landmarks.augment.augment as `config`).
  config.augment = default_augment_config()

  # The Tolerant teacher's targets (Section 3.1, Eqs. 1-3): Soft-landmarks rebuilt from the shape model's
  # first m~ components. keep -1: the dataset's own share of the shape variance (the paper's 0.9; 0.95 for
  # the synthetic faces, kd_landmarks/datasets/info.py says why); keep_mode 'variance' is the authors' code,
  # 'eigenvectors' counts that share of all the eigenvectors (the paper's wording); docs/method.md,
  # "Soft-landmarks". They are stored in the prepared data: the pipeline prepares the synthetic set with
  # these and stops, naming the prepare command, on data built otherwise.
  config.soft_landmarks = ml_collections.ConfigDict(dict(keep=-1.0, keep_mode="variance"))

  # Only for dataset 'synthetic': what `prepare` renders when the data is missing.
  config.synthetic = ml_collections.ConfigDict(dict(num_train=0, num_test=0, image_size=0, seed=0))
  return config


def default_augment_config() -> ml_collections.ConfigDict:
  """Section 4.3: box expansion up to 10%, rotation +-45 deg, flips (p=0.5), brightness/contrast/colour,
  Gaussian noise. The fields and defaults are those of :class:`AugmentConfig` (one home)."""
  return ml_collections.ConfigDict(dataclasses.asdict(AugmentConfig()))


def apply_arg(config: ml_collections.ConfigDict, arg: str | None) -> ml_collections.ConfigDict:
  """Applies "phase=...,platform=...,runlocal" to ``config`` and locks it."""
  for item in filter(None, (part.strip() for part in (arg or "").split(","))):
    key, _, value = item.partition("=")
    if key == "phase":
      if value not in PHASES:
        raise ValueError(f"unknown phase {value!r} in config arg {arg!r}; choose from {PHASES}")
      config.phase = value
    elif key == "platform":
      set_platform(config, value)
    elif key == "runlocal":
      # A quick local smoke run of a full-size config: few steps, frequent logs.
      config.teacher.num_train_steps = 20
      config.student.num_train_steps = 20
      config.log_every_steps = 5
      config.checkpoint_every_steps = 10
      config.eval_every_steps = -1
    else:
      raise ValueError(f"unknown config arg {key!r} in {arg!r}; use phase=..., platform=... or runlocal")
  config.lock()
  return config


def set_platform(config: ml_collections.ConfigDict, platform: str) -> None:
  """Records the requested platform only: dtype and prefetch follow it at run time (kd_landmarks.training.backend),
  so that ``:platform=gpu`` and ``--config.platform=gpu`` give the same run."""
  if platform not in PLATFORMS:
    raise ValueError(f"unknown platform {platform!r}; choose from {PLATFORMS}")
  config.platform = platform
