"""Tests of configs/: the paper's hyper-parameters, the arg parser, locking against key typos."""
import importlib.util
import os

import pytest

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


def _load(name):
  spec = importlib.util.spec_from_file_location(f"config_{name}", os.path.join(CONFIG_DIR, f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.mark.parametrize("name,dataset", [("300w", "300w"), ("cofw", "cofw"), ("wflw", "wflw")])
def test_dataset_configs_hold_the_papers_hyper_parameters(name, dataset):
  config = _load(name).get_config()
  assert config.dataset == dataset
  # Section 4.3.
  assert config.optimizer.learning_rate == 1e-3
  assert (config.optimizer.b1, config.optimizer.b2) == (0.9, 0.999)
  assert config.optimizer.decay == 1e-6
  assert config.optimizer.schedule == "paper"  # Keras' time-based decay, not the demo's cosine.
  assert config.teacher.batch_size == 40 and config.student.batch_size == 70
  assert config.teacher.num_epochs == 250 and config.student.num_epochs == 250
  assert (config.teacher_model, config.student_model, config.image_size) == (
      "efficientnet_b3", "mobilenet_v2", 224)
  # Section 4.3: +-45 degree rotation, flips with probability 0.5, box expanded up to 10%.
  assert config.augment.max_rotation_degrees == 45.0
  assert config.augment.flip_probability == 0.5
  assert config.augment.max_box_expansion == pytest.approx(0.1)
  # Resolved at run time from the backend JAX has (kd_landmarks.training.backend; tests/test_backend.py).
  assert (config.platform, config.dtype, config.prefetch) == ("auto", "auto", -1)


def test_config_arg_sets_phase_platform_and_runlocal():
  config = _load("300w").get_config("phase=student,platform=gpu,runlocal")
  assert config.phase == "student"
  # The arg records the platform only; dtype follows it at run time (as for --config.platform=gpu).
  assert config.platform == "gpu" and config.dtype == "auto"
  assert config.student.num_train_steps == 20
  assert _load("cofw").get_config("platform=tpu").platform == "tpu"


@pytest.mark.parametrize("arg,match", [("phase=techer", "unknown phase"), ("platform=ipu", "unknown platform"),
                                       ("flavour=x", "unknown config arg")])
def test_bad_config_arg_fails_with_the_choices(arg, match):
  with pytest.raises(ValueError, match=match):
    _load("default").get_config(arg)


@pytest.mark.parametrize("name", ["default", "demo", "demo_ablation", "300w", "cofw", "wflw"])
def test_configs_are_locked_against_key_typos(name):
  config = _load(name).get_config()
  with pytest.raises(AttributeError, match="studnet_loss"):
    config.studnet_loss = "l2"
  with pytest.raises(AttributeError):
    config.optimizer.learnin_rate = 1.0
  config.student_loss = "kd"  # Existing keys stay settable (what --config.x=y does).


def test_demo_names_existing_models_and_losses_and_augment_fields():
  from kd_landmarks import augment
  from kd_landmarks import models
  from kd_landmarks import pipeline
  config = _load("demo").get_config()
  assert config.teacher_model in models.MODEL_NAMES and config.student_model in models.MODEL_NAMES
  assert pipeline.student_losses(config) == ["l2", "kd"]
  pipeline.validate_config(config)
  pipeline.augment_config(config)  # Every augment key is a field of AugmentConfig.
  assert isinstance(pipeline.augment_config(config), augment.AugmentConfig)


def test_demo_and_ablation_train_three_seeds_and_select_off_the_test_split():
  from kd_landmarks import pipeline
  demo = _load("demo").get_config()
  assert pipeline.student_seeds(demo) == 3 and pipeline.student_losses(demo) == ["l2", "kd"]
  assert pipeline.selection(demo)["split"] == "train_holdout" and demo.val_holdout == 0.05
  ablation = _load("demo_ablation").get_config("phase=student")
  pipeline.validate_config(ablation)
  assert ablation.phase == "student" and pipeline.student_seeds(ablation) == 3
  assert sorted(pipeline.student_losses(ablation)) == ["kd", "kd_tolerant_only", "kd_tough_only", "l1", "l2",
                                                      "smooth_l1"]
  # Same data, teachers and schedule as the demo, so a finished runs/demo serves it.
  for key in ("synthetic", "teacher_model", "teacher", "student", "optimizer", "augment", "image_size"):
    assert ablation[key] == demo[key], key
  # The defaults: the paper's configs also select on the held-out slice, one seed, no offline copies.
  paper = _load("300w").get_config()
  assert (paper.val_split, paper.val_holdout, paper.student_seeds, paper.augment_copies) == ("", 0.05, 1, 1)


def test_augment_copies_multiplies_the_epoch_length():
  import ml_collections
  from kd_landmarks import pipeline
  phase = ml_collections.ConfigDict(dict(num_epochs=250.0, num_train_steps=-1))
  # 300W's 3,148 faces minus the 5% slice (157) = 2,991; batch 70: 42 batches/epoch; x4 copies: 170.
  assert pipeline.num_train_steps(phase, 2991, 70) == 250 * 42
  assert pipeline.num_train_steps(phase, 2991, 70, augment_copies=4) == 250 * (4 * 2991 // 70)
  with pytest.raises(ValueError, match="augment_copies"):
    pipeline.num_train_steps(phase, 2991, 70, augment_copies=0)


def test_demo_schedule_warms_up_then_decays_to_zero_at_each_phases_last_step():
  from kd_landmarks.training import train
  demo = _load("demo").get_config()
  assert (demo.optimizer.schedule, demo.optimizer.learning_rate) == ("cosine", 1e-2)
  warmup = demo.optimizer.warmup_steps
  for phase in (demo.teacher, demo.student):
    steps = phase.num_train_steps
    assert 0 < warmup < steps // 5  # The warm-up is a small part of either budget.
    fn = train.create_learning_rate_fn(demo, steps)
    assert float(fn(warmup)) == pytest.approx(1e-2)
    assert float(fn(steps)) == pytest.approx(0.0, abs=1e-9)
    # The validation curve has a point at least every tenth of the run, and one at the last step.
    assert 0 < demo.eval_every_steps <= steps // 10 and steps % demo.eval_every_steps == 0
  # The teachers' lead comes from their longer budget (configs/demo.py): same network, more steps.
  assert demo.teacher_model == demo.student_model and demo.teacher.num_train_steps > demo.student.num_train_steps
