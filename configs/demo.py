"""The demo: the whole pipeline on the procedurally rendered synthetic faces, sized for a 2-core CPU.

  python -m kd_landmarks.main --config configs/demo.py --workdir runs/demo

Renders the synthetic dataset into runs/demo/data on first use (no download), trains the Tough and Tolerant
teachers, caches their predictions, trains the student (tiny MobileNetV2) with L2 and with KD-Loss, three
seeds each against the same teachers, evaluates all eight models and writes runs/demo/report.md (teachers
against students, mean ± std over seeds, the paired 95% interval of KD against L2, and every model's
validation NME against step in figures/validation_curves.png). Checkpoints are chosen on 5% of the training
faces held out from all training (config.val_holdout), never on the test split. Same code path as the paper
configs; the sizes, step counts, schedule and the few settings below (each with the measurement that chose
it, all on the held-out faces) differ from the paper's. Figures, with command, commit and CPU:
docs/demo_results.md.
"""
import ml_collections

from kd_landmarks import config_lib


def get_config(arg=None):
  config = config_lib.base_config()
  config.dataset = "synthetic"
  # Its Soft-landmarks keep 95% of the shape variance, not the paper's 90% (3 of 136 components on these
  # faces, 6.2% NME from the ground truth): the dataset's own default, kd_landmarks/datasets/info.py.
  config.synthetic.num_train = 1200
  config.synthetic.num_test = 300
  config.synthetic.image_size = 96
  config.image_size = 64
  # At this size a tiny EfficientNet learns far slower than a tiny MobileNetV2 (measured), so the demo's
  # teachers are the student's architecture, trained longer on a larger input (below).
  config.teacher_model = "mobilenet_v2_tiny"
  config.student_model = "mobilenet_v2_tiny"
  # Faster-moving batch-norm averages: with a few hundred steps Keras' 0.99 leaves eval-mode statistics
  # behind the weights (measured: eval MSE 3x the train MSE after 300 steps).
  config.teacher_overrides = ml_collections.ConfigDict(dict(bn_momentum=0.9))
  config.student_overrides = ml_collections.ConfigDict(dict(bn_momentum=0.9))
  config.student_loss = "l2,kd"
  # Three seeds of each student: one seed cannot tell KD's gain from seed-to-seed noise (measured on an
  # earlier version of this demo: the L2 student alone spanned 3.2 NME points over three seeds).
  config.student_seeds = 3
  config.teacher.batch_size = 32
  config.student.batch_size = 32
  # The teachers' lead over the student trained alone (the paper's premise) comes from the budget, not from
  # capacity: validation NME on the held-out faces, tiny MobileNetV2 with the cosine schedule below, a Tough
  # teacher of 4,000 steps 0.087 at 1,500, 0.058 at 3,000, 0.053 at 4,000 (flat from 3,500), one of 3,000
  # steps 0.065; a 2.5x wider teacher (mobilenet_v2_035, lr 5e-3, 3,000 steps) reached only 0.074 at 0.6x the
  # img/s. So the teachers train 3.5x the students' steps (3,500: within the 10-minute budget on 2 cores,
  # docs/demo_results.md); the students' 1,000 steps flatten their curves (L2 0.094 at 800 and 1,000).
  config.teacher.num_train_steps = 3500
  config.student.num_train_steps = 1000
  # The student sees 48 px, the teachers 64 px (the paper's student is also the lighter model): measured on
  # the held-out faces with the same teachers, L2 student 0.097 at 48 px against 0.094 at 64 px, KD 0.075
  # against 0.072, at 1.6x the speed (68 s against 95 s for the two students).
  config.student_image_size = 48
  # Adam's 1e-2 with a 100-step linear warm-up and a cosine decay to 0 at each phase's last step, instead of
  # the paper's 1e-3 with time-based decay (~250 epochs; the demo has minutes). Measured on the held-out
  # faces, Tough teacher: the paper's schedule at 3e-3 is still falling fast at 4,000 steps (0.063); 1e-2
  # without decay stalls near 0.075 after 1,600; the cosine decay lets each run flatten by its last step.
  config.optimizer.learning_rate = 1e-2
  config.optimizer.schedule = "cosine"
  config.optimizer.warmup_steps = 100
  config.optimizer.final_lr_fraction = 0.0
  # +-15 instead of the paper's +-45 degrees: the synthetic faces are near-frontal and a CPU-sized run
  # cannot learn the full rotation range in a few hundred steps.
  config.augment.max_rotation_degrees = 15.0
  config.log_every_steps = 50
  config.checkpoint_every_steps = 500
  # Every 100 steps: the report's convergence curves (figures/validation_curves.png) and the best checkpoint.
  config.eval_every_steps = 100
  config.eval_batch_size = 100
  return config_lib.apply_arg(config, arg)
