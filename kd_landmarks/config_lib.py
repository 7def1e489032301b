"""Config building blocks shared by every file in configs/: the paper's defaults and the config arg.

A config file is ``configs/<name>.py`` with ``get_config(arg)``; it starts from :func:`base_config`, changes
what differs and returns :func:`apply_arg` (which parses "phase=...,platform=...,runlocal" and locks the
config, so that a key typo such as ``--config.studnet_loss=l2`` fails at once with ml_collections' "Key
'studnet_loss' does not exist" instead of being silently ignored). This module lives in the package so that
config files import it the same way wherever they are run from.
"""
from __future__ import annotations

import dataclasses
import importlib.metadata
import importlib.util
import os

import ml_collections

from kd_landmarks import augment

PHASES = ("teacher_tough", "teacher_tolerant", "cache_teachers", "student", "eval", "report", "all")
# 'auto': the backend JAX has (kd_landmarks.backend resolves it, and dtype/prefetch from it, at run time).
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
  # ship to phones (README, Performance). The teacher cache holds stored-crop pixels, so it serves any size.
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
  config.prefetch = -1               # Host batches prepared ahead of the device; -1: 2 on CPU, 4 on GPU/TPU.
  # Hold the training split decoded in memory when it fits this many MiB (decoding is the input pipeline's
  # main cost, paid every epoch otherwise; input_pipeline.InMemorySource). -1: a quarter of the machine's
  # memory; 0: always read from disk.
  config.input_cache_mb = -1
  config.write_report = True
  # CPU kernels (depthwise_impl, norm_impl, pointwise_impl) left at 'auto' in the overrides: 'measure' times
  # the alternatives on this machine at first use and caches the fastest (kd_landmarks/models/autotune.py);
  # 'rules' takes the fixed per-backend rules without measuring. Accelerators always take the rules.
  # The test suite sets KD_LANDMARKS_KERNEL_CHOICE=rules (tests/conftest.py): it trains dozens of tiny shape
  # classes, each of which would be measured once (~25 s).
  config.kernel_choice = os.environ.get("KD_LANDMARKS_KERNEL_CHOICE", "measure")
  config.compilation_cache = True    # Persistent XLA cache in WORKDIR/jax_cache (restarts compile less).

  # Platform: mesh over all devices. 'auto': the backend JAX has; or cpu/gpu/tpu, checked at start.
  # dtype 'auto': float32 on CPU, bfloat16 compute on accelerators (parameters stay float32); both are
  # resolved at run time from the resolved platform (kd_landmarks/backend.py), however platform was set.
  config.platform = "auto"
  config.dtype = "auto"
  # CPU only: glibc's malloc keeps freed memory (kd_landmarks/allocator.py), so that XLA's per-step
  # temporaries reuse mapped pages instead of faulting in new ones (~0.2 s of a 0.7 s student step).
  config.retain_freed_memory = True
  # CPU only: kd_landmarks.main re-executes itself with tcmalloc (or jemalloc) preloaded where one is installed:
  # glibc's malloc slows a long training process as its heap fragments (the demo's students: 1.3-1.4x the img/s
  # and 6 instead of 9-10 s per compilation with tcmalloc; kd_landmarks/allocator.py).
  config.preload_allocator = True

  # Augmentation on device (passed to kd_landmarks.augment.augment as `config`).
  config.augment = default_augment_config()

  # Only for dataset 'synthetic': what `prepare` renders when the data is missing.
  config.synthetic = ml_collections.ConfigDict(dict(num_train=0, num_test=0, image_size=0, seed=0))
  return config


def default_augment_config() -> ml_collections.ConfigDict:
  """Section 4.3: box expansion up to 10%, rotation +-45 deg, flips (p=0.5), brightness/contrast/colour,
  Gaussian noise. The fields and defaults are those of ``kd_landmarks.augment.AugmentConfig`` (one home)."""
  return ml_collections.ConfigDict(dataclasses.asdict(augment.AugmentConfig()))


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
  """Records the requested platform only: dtype and prefetch follow it at run time (kd_landmarks.backend),
  so that ``:platform=gpu`` and ``--config.platform=gpu`` give the same run."""
  if platform not in PLATFORMS:
    raise ValueError(f"unknown platform {platform!r}; choose from {PLATFORMS}")
  config.platform = platform


def runs_on_cpu_before_start(platform: str) -> bool:
  """Whether ``platform`` will resolve to the CPU, known before JAX initialises a backend.

  For what must happen before then (kd_landmarks.allocator). True for 'cpu', and for 'auto' when
  JAX_PLATFORMS starts with cpu or no accelerator plugin (jax_plugins entry points or namespace modules,
  or libtpu) is installed. False when unsure: the caller then leaves the CPU-only settings alone.
  """
  if platform == "cpu":
    return True
  if platform != "auto":
    return False
  restricted = os.environ.get("JAX_PLATFORMS", "").strip()
  if restricted:
    return restricted.split(",")[0].strip() == "cpu"
  if importlib.metadata.entry_points(group="jax_plugins") or importlib.util.find_spec("libtpu"):
    return False
  spec = importlib.util.find_spec("jax_plugins")  # The namespace package plugins may also install into.
  return not (spec and spec.submodule_search_locations and
              any(os.listdir(path) for path in spec.submodule_search_locations if os.path.isdir(path)))

